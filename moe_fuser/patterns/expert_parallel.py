"""Hand-written expert parallelism (the seed's five steps) -> the distributed fused op on the same process group.

Users who outgrow one device write the seed's EP layer: gate -> top-k -> all-to-all dispatch of every (token,
slot) pair to the rank owning its expert -> the local experts one by one -> all-to-all back -> weighted sum. Dynamo
traces ``torch.distributed.all_to_all_single`` (the legacy in-place form, which then ``copy_``s into the
preallocated output) and ``_functional_collectives.all_to_all_single(_autograd)`` alike into
``_c10d_functional.all_to_all_single(input, out_splits, in_splits, group_name)`` + ``wait_tensor`` (torch < 2.13
wraps the autograd form's wait in an ``autograd_function_apply``), with split sizes from ``.tolist()`` as
unbacked SymInts (``moe_fuser.capture`` turns that capture on). This family finds that region and replaces it
by ``moe_forward(..., ep_group=<group name>, expert_placement=<owners>)``: the deduplicated, node-aware,
chunk-overlapped exchange of ``moe_fuser.distributed``, or the lowering's own expert-parallel path where it has
one (npu: MC2 or all_to_all + re_routing).

Recognition walks back from each ``all_to_all_single`` whose output feeds a weighted sum, one small predicate per
step, each listing the forms it accepts (data); anything else is a Rejection with the reason:

    OUTPUT     (y.view(T, K, D) * W.unsqueeze(-1)).sum(1)        W: the top-k weights [T, K] (casts allowed)
    UNPERMUTE  y = empty_like(B).index_put((order,), B)  |  buf[order] = B  (index_put_ / setitem)
    COMBINE    B = all_to_all(C, in_splits, out_splits)          the DISPATCH splits, swapped
    EXPERTS    C = zeros_like(R), then per local expert e: C = C.index_put((rows,), ffn_e(R[rows])) (or in place),
               rows = torch.where(recv_ids == e)[0], ffn_e one of the hand-written family's FFN forms with the
               expert's own nn.Linear parameters (ModuleList)
    DISPATCH   R = all_to_all(x[order // K], out_splits, in_splits); recv_ids = all_to_all(flat_ids[order], same)
    ORDER      order = argsort(dest); dest = owner[flat_ids] (a buffer: its values are the placement)
               | flat_ids // n (n experts per rank, consecutive); flat_ids = ids.flatten() | view(-1) | reshape(-1)
    SPLITS     in_splits = [counts[i].item()...], counts = histc(dest, W bins) | bincount(dest, minlength=W)
               | one_hot(dest, W).sum(0); out_splits = the items of all_to_all(counts)

Checks beyond the structure: all four all-to-alls use one group; the local loop covers exactly the experts the
placement gives this rank; K and T agree with the top-k and the hidden states. The router stays as written
(``spec.router.external``): the op takes the top-k weights and ids; its spec counts the *local* experts (what the
compile-time shape check sees), and ``expert_placement`` carries the global E. ``ranks_per_node`` is detected by
the op at its first call (a collective at run time, when every rank calls it).

Legend: T tokens, D hidden size, K top-k, W ranks in the group, E experts (global).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.fx as fx

from ..fx.dag import mutated_arg
from ..fx.graph import arg, is_op, module_path, val
from ..spec import ExpertSpec, MoESpec, MoEWeights, RouterSpec
from .base import Match, MatchContext, Rejection, register_pattern
from .handwritten import _dispatch, _ffn, _gather, _NoMatch, _skip_dropout, _Walk

__all__ = ["HandwrittenExpertParallel"]

FAMILY = "expert_parallel"
_BUFFERS = ("empty", "empty_like", "new_empty", "zeros", "zeros_like", "new_zeros")
_ZEROS = ("zeros", "zeros_like", "new_zeros")
_FLATTEN = ("flatten", "view", "reshape")


def _received(node: fx.Node, walk: _Walk) -> fx.Node:
    """The all_to_all_single whose result ``node`` holds: ``wait_tensor(a2a)`` or a buffer ``copy_``'d from it."""
    if is_op(node, *_BUFFERS):
        writers = [u for u in node.users if mutated_arg(u) is node]
        if len(writers) != 1 or not is_op(writers[0], "copy_"):
            raise _NoMatch(f"{node.name} is not a buffer filled by one copy_ of an all-to-all")
        walk.take(node)
        walk.take(writers[0])
        node = writers[0].args[1]
    waited = _autograd_wait(node)
    if waited is not None:
        for n in (node, node.args[0], *node.args[0].args[:2]):
            walk.take(n)
        return walk.take(waited)
    if not is_op(node, "wait_tensor") or not is_op(node.args[0], "all_to_all_single"):
        raise _NoMatch(f"{node.name} is not the result of an all_to_all_single")
    walk.take(node)
    return walk.take(node.args[0])


def _body_calls(gm: Any) -> list:
    return [n for n in getattr(gm, "graph", fx.Graph()).nodes
            if n.op == "call_function" and n.target is not torch._C._set_grad_enabled]


def _autograd_wait(node: fx.Node) -> Optional[fx.Node]:
    """torch < 2.13 traces the wait of ``all_to_all_single_autograd`` as an autograd.Function:
    ``autograd_function_apply(fwd_body, bwd_body, *sizes, a2a)[0]`` whose forward only waits and whose backward
    passes the gradient through. The all_to_all_single node for that form, else None."""
    apply = node.args[0] if is_op(node, "getitem") and node.args[1] == 0 else None
    hop = getattr(torch.ops.higher_order, "autograd_function_apply", None)
    if not isinstance(apply, fx.Node) or hop is None or apply.target is not hop or len(apply.users) != 1:
        return None
    root = node.graph.owning_module
    fwd, bwd, a2a = apply.args[0], apply.args[1], apply.args[-1]
    if not all(isinstance(b, fx.Node) and b.op == "get_attr" for b in (fwd, bwd)) or root is None:
        return None
    fwd_calls, bwd_calls = _body_calls(getattr(root, fwd.target, None)), _body_calls(getattr(root, bwd.target, None))
    if len(fwd_calls) != 1 or not is_op(fwd_calls[0], "wait_tensor") or bwd_calls:
        return None
    return a2a if is_op(a2a, "all_to_all_single") else None


def _a2a_args(a2a: fx.Node) -> tuple[fx.Node, list, list, str]:
    inp, out_splits, in_splits, group = (list(a2a.args) + [None] * 4)[:4]
    group = a2a.kwargs.get("group_name", group)
    if not isinstance(out_splits, (list, tuple)) or not isinstance(in_splits, (list, tuple)) \
            or not isinstance(group, str):
        raise _NoMatch(f"{a2a.name}: split sizes or group name not in the traced form")
    return inp, list(out_splits), list(in_splits), group


def _unweight(out: fx.Node, walk: _Walk) -> tuple[fx.Node, fx.Node, tuple]:
    """OUTPUT: (y.view(T, K, D) * W[..., None]).sum(1) -> (y, W, (T, K, D))."""
    if not (is_op(out, "sum") and arg(out, 1, "dim") in (1, (1,), [1]) and not arg(out, 2, "keepdim", False)):
        raise _NoMatch(f"{out.name} is not a sum over the top-k slots")
    mul = walk.casts(out.args[0])
    if not (is_op(mul, "mul") and len(mul.args) == 2 and all(isinstance(a, fx.Node) for a in mul.args)):
        raise _NoMatch(f"{mul.name} is not the product of the results and the routing weights")
    walk.take(out)
    walk.take(mul)
    for v, w in (mul.args, mul.args[::-1]):
        v, w = walk.casts(v), walk.casts(w)
        if is_op(v, "view", "reshape") and len(val(v).shape) == 3 and \
                (is_op(w, "unsqueeze") and arg(w, 1, "dim") in (-1, 2)
                 or is_op(w, "getitem") and w.args[1] in ((Ellipsis, None), (slice(None), slice(None), None))):
            walk.take(v)
            walk.take(w)
            return v.args[0], walk.casts(w.args[0]), tuple(val(v).shape)
    raise _NoMatch(f"{mul.name} is not y.view(T, K, D) * W.unsqueeze(-1)")


def _unpermute(y: fx.Node, walk: _Walk) -> tuple[fx.Node, fx.Node]:
    """UNPERMUTE: y[order] = B -> (B, order)."""
    if is_op(y, "index_put") and is_op(y.args[0], *_BUFFERS) and len(y.args[1]) == 1 \
            and not arg(y, 3, "accumulate", False):
        walk.take(y)
        walk.take(y.args[0])
        return y.args[2], y.args[1][0]
    if is_op(y, *_BUFFERS):
        writers = [u for u in y.users if mutated_arg(u) is y or is_op(u, "setitem") and u.args[0] is y]
        if len(writers) == 1:
            u = writers[0]
            if is_op(u, "index_put_") and len(u.args[1]) == 1 and not arg(u, 3, "accumulate", False):
                walk.take(y)
                walk.take(u)
                return u.args[2], u.args[1][0]
            if is_op(u, "setitem") and isinstance(u.args[1], fx.Node):
                walk.take(y)
                walk.take(u)
                return u.args[2], u.args[1]
    raise _NoMatch(f"{y.name} does not put the returned rows back in token order (y[order] = rows)")


def _expert_chain(c: fx.Node, walk: _Walk) -> tuple[list, fx.Node]:
    """EXPERTS: the per-expert writes into the combine buffer -> ([(rows, value)], R) with R = its zeros_like."""
    writes = []
    node = c
    while is_op(node, "index_put") and len(node.args[1]) == 1 and not arg(node, 3, "accumulate", False):
        walk.take(node)
        writes.append((node.args[1][0], node.args[2]))
        node = node.args[0]
    if not writes and is_op(node, *_ZEROS):
        for u in node.users:
            if mutated_arg(u) is node and is_op(u, "index_put_") and len(u.args[1]) == 1:
                walk.take(u)
                writes.append((u.args[1][0], u.args[2]))
            elif is_op(u, "setitem") and u.args[0] is node and isinstance(u.args[1], fx.Node):
                walk.take(u)
                writes.append((u.args[1], u.args[2]))
    if not writes or not is_op(node, *_ZEROS):
        raise _NoMatch(f"{c.name} is not a zero buffer filled expert by expert (out[rows] = expert(x[rows]))")
    walk.take(node)
    return writes, node


def _counts_items(splits: list, walk: _Walk) -> fx.Node:
    """[counts[0].item(), counts[1].item(), ...] -> counts."""
    counts = None
    for i, s in enumerate(splits):
        if not (is_op(s, "item") and is_op(s.args[0], "getitem") and s.args[0].args[1] == i):
            raise _NoMatch(f"split size {i} ({getattr(s, 'name', s)}) is not counts[{i}].item() (.tolist())")
        c = s.args[0].args[0]
        if counts is not None and c is not counts:
            raise _NoMatch("the split sizes come from different count tensors")
        counts = c
        walk.take(s)
        walk.take(s.args[0])
    return counts


def _count_source(counts: fx.Node, world: int, walk: _Walk) -> fx.Node:
    """SPLITS: counts of dest per rank -> dest."""
    node = walk.casts(counts)
    walk.take(counts)
    if is_op(node, "long", "to") and is_op(node.args[0], "histc"):
        walk.take(node)
        node = node.args[0]
    if is_op(node, "histc"):
        if not (arg(node, 1, "bins") == world and arg(node, 2, "min") == 0 and arg(node, 3, "max") == world - 1):
            raise _NoMatch(f"{node.name} is not histc(dest, bins={world}, min=0, max={world - 1})")
        walk.take(node)
        return walk.casts(node.args[0])
    if is_op(node, "bincount") and arg(node, 2, "minlength") == world and arg(node, 1, "weights") is None:
        walk.take(node)
        return node.args[0]
    if is_op(node, "sum") and arg(node, 1, "dim") in (0, (0,), [0]) and is_op(node.args[0], "one_hot") \
            and arg(node.args[0], 1, "num_classes") == world:
        walk.take(node)
        walk.take(node.args[0])
        return node.args[0].args[0]
    raise _NoMatch(f"the send counts {counts.name} are not a per-rank count of the destinations")


def _placement(ctx: MatchContext, dest: fx.Node, E: int, world: int, walk: _Walk) -> tuple[list, Any, fx.Node]:
    """ORDER's dest -> (owner rank of each expert now, what the op reads the placement from, flat ids). An owner
    buffer is passed to the op as it is (read at each call: the model may rebalance it)."""
    if is_op(dest, "getitem") and isinstance(dest.args[0], fx.Node) and dest.args[0].op == "placeholder":
        owner = _constant_value(ctx, dest.args[0])
        if owner is None or owner.dim() != 1 or owner.shape[0] != E or owner.is_floating_point():
            raise _NoMatch(f"the owner table {dest.args[0].name} is not a length-{E} integer buffer")
        walk.take(dest)
        return [int(v) for v in owner.tolist()], dest.args[0], dest.args[1]
    if is_op(dest, "floordiv", "div") and isinstance(dest.args[1], int) and \
            (is_op(dest, "floordiv") or dest.kwargs.get("rounding_mode") == "floor"):
        n = dest.args[1]
        if n * world != E:
            raise _NoMatch(f"{dest.name}: ids // {n} places {n} experts per rank, but E={E} on {world} ranks")
        walk.take(dest)
        owners = [e // n for e in range(E)]
        return owners, tuple(owners), dest.args[0]
    raise _NoMatch(f"the destination rank {dest.name} is neither owner[ids] (a buffer) nor ids // n")


def _constant_value(ctx: MatchContext, placeholder: fx.Node) -> Optional[torch.Tensor]:
    """The real tensor behind a buffer placeholder (dynamo passes the module's own buffers)."""
    if placeholder not in ctx.params:
        return None
    index = [n for n in ctx.nodes if n.op == "placeholder"].index(placeholder)
    value = ctx.example_inputs[index] if index < len(ctx.example_inputs) else None
    if not isinstance(value, torch.Tensor) or isinstance(value, torch._subclasses.FakeTensor):
        return None
    return value.detach()


def _flat_ids(node: fx.Node, walk: _Walk) -> fx.Node:
    if is_op(node, *_FLATTEN) and (is_op(node, "flatten") or tuple(node.args[1:]) in ((-1,), ((-1,),))):
        walk.take(node)
        return node.args[0]
    raise _NoMatch(f"{node.name} is not ids.flatten()")


def _topk_experts(ids: fx.Node) -> Optional[int]:
    """E when ``ids`` is the index output of a top-k over E scores (so the ids provably lie in [0, E))."""
    node = ids
    while is_op(node, "to", "long", "int") and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    if is_op(node, "getitem") and node.args[1] == 1 and is_op(node.args[0], "topk"):
        v = val(node.args[0].args[0])
        if isinstance(v, torch.Tensor):
            return int(v.shape[-1])
    return None


class HandwrittenExpertParallel:
    """The seed's hand-written EP layer (see the module docstring)."""

    name = "expert_parallel.all_to_all"
    family = FAMILY
    priority = 10   # before the hand-written loop family: its local loop is part of this region

    def find(self, ctx: MatchContext):
        seen = set()
        for a2a in ctx.nodes_of("all_to_all_single"):
            if a2a in ctx.claimed or a2a in seen:
                continue
            out = self._weighted_sum_of(a2a)
            if out is None:
                continue
            try:
                m = self._match(ctx, out)
            except _NoMatch as exc:
                yield Rejection(FAMILY, self.name, str(exc), module_path(a2a))
                continue
            seen |= m.region
            yield m

    @staticmethod
    def _weighted_sum_of(a2a: fx.Node) -> Optional[fx.Node]:
        """The candidate's output: a sum over slots reached from the combine all-to-all in a few steps."""
        frontier, steps = [a2a], 0
        while frontier and steps < 8:
            nxt = []
            for n in frontier:
                for u in n.users:
                    if is_op(u, "sum") and arg(u, 1, "dim") in (1, (1,), [1]):
                        return u
                    nxt.append(u)
                    if mutated_arg(u) is not None:   # copy_ into a buffer: follow the buffer too
                        nxt.append(mutated_arg(u))
            frontier, steps = nxt, steps + 1
        return None

    def _match(self, ctx: MatchContext, out: fx.Node) -> Match:
        walk = _Walk()
        y, W, view_TKD = _unweight(out, walk)
        B, order = _unpermute(y, walk)
        C, c_out, c_in, group = _a2a_args(_received(B, walk))
        writes, zeros = _expert_chain(C, walk)
        R = zeros.args[0] if is_op(zeros, "zeros_like", "new_zeros") else None
        if R is None:
            raise _NoMatch(f"{zeros.name} is not zeros_like(received rows)")
        x_sent, d_out, d_in, group_d = _a2a_args(_received(R, walk))
        if group_d != group or c_out != d_in or c_in != d_out:
            raise _NoMatch("the combine all-to-all does not return along the dispatch's splits and group")
        experts, ids_recv = _local_experts(writes, R, walk)
        ids_sent, i_out, i_in, group_i = _a2a_args(_received(ids_recv, walk))
        if group_i != group or i_out != d_out or i_in != d_in:
            raise _NoMatch("the expert ids travel with other splits or another group than the rows")
        x, k_div, flat, dest = _ordered(x_sent, ids_sent, order, walk)
        ids = _flat_ids(flat, walk)
        try:
            pg = dist.distributed_c10d._resolve_process_group(group)
        except Exception as exc:  # noqa: BLE001 - a group this process does not know
            raise _NoMatch(f"process group {group!r} is unknown here ({exc})") from None
        world, rank = dist.get_world_size(pg), dist.get_rank(pg)
        _check_splits(d_in, d_out, dest, group, world, walk)

        E, K = _check_shapes(x, W, ids, k_div, view_TKD)
        owners, placement, flat_src = _placement(ctx, dest, E, world, walk)
        if flat_src is not flat:
            raise _NoMatch("the destination ranks are not computed from the flat expert ids")
        local = [e for e in range(E) if owners[e] == rank]
        if not local:
            raise _NoMatch(f"rank {rank} holds no expert")
        if sorted(experts) != local:
            raise _NoMatch(f"the loop on rank {rank} computes experts {sorted(experts)} but the placement gives "
                           f"it {local}")
        weights, expert_spec, transposed = _local_weights(experts, local)
        spec = MoESpec(router=RouterSpec(top_k=K, external=True), experts=expert_spec)
        note = (f"expert parallel over process group {group!r} ({world} ranks): experts {_ranges(local)} of {E} "
                f"on rank {rank}; the seed's all-to-alls become the lowering's expert-parallel exchange")
        return Match(family=FAMILY, pattern=self.name, spec=spec, x=x, output=out, region=frozenset(walk.nodes),
                     weights=weights, topk_weights=W, topk_ids=ids,
                     op_kwargs={"ep_group": group, "expert_placement": placement}, transposed=transposed,
                     module_path=module_path(out), notes=(note,))


def _local_experts(writes: list, R: fx.Node, walk: _Walk) -> tuple[dict, fx.Node]:
    """EXPERTS: each write is out[rows] = ffn_e(R[rows]), rows = where(recv_ids == e)[0] -> ({e: (params,
    activation, glu)}, recv_ids)."""
    experts, ids_recv = {}, None
    for rows, value in writes:
        sub = _Walk()
        recv_ids, e = _dispatch(rows, None, sub)
        if ids_recv is not None and recv_ids is not ids_recv:
            raise _NoMatch("the local experts select rows from different id tensors")
        ids_recv = recv_ids
        x_e, params, act, glu = _ffn(value, e, sub)
        if _gather(_skip_dropout(x_e, sub), rows, sub) is not R:
            raise _NoMatch(f"expert {e} does not read the received rows")
        if any(not kind.startswith("param") for kind, _ in filter(None, params.values())):
            raise _NoMatch(f"expert {e} reads rows of a stacked weight; EP needs each expert's own tensors")
        if e in experts:
            raise _NoMatch(f"expert {e} is computed twice")
        experts[e] = (params, act, glu)
        walk.nodes |= sub.nodes
    return experts, ids_recv


def _ordered(x_sent: fx.Node, ids_sent: fx.Node, order: fx.Node, walk: _Walk) -> tuple:
    """DISPATCH inputs x[order // K] and flat_ids[order], order = argsort(dest) -> (x, K, flat_ids, dest)."""
    if not (is_op(x_sent, "getitem") and is_op(x_sent.args[1], "floordiv") and x_sent.args[1].args[0] is order):
        raise _NoMatch(f"the dispatched rows {x_sent.name} are not x[order // K]")
    walk.take(x_sent)
    walk.take(x_sent.args[1])
    if not (is_op(ids_sent, "getitem") and ids_sent.args[1] is order):
        raise _NoMatch(f"the dispatched ids {ids_sent.name} are not flat_ids[order]")
    walk.take(ids_sent)
    if not is_op(order, "argsort"):
        raise _NoMatch(f"{order.name} is not an argsort of the destination ranks")
    walk.take(order)
    return x_sent.args[0], x_sent.args[1].args[1], ids_sent.args[0], order.args[0]


def _check_splits(d_in: list, d_out: list, dest: fx.Node, group: str, world: int, walk: _Walk) -> None:
    """SPLITS: send sizes count dest per rank; receive sizes are those counts' all-to-all on the same group."""
    send_counts = _counts_items(d_in, walk)
    if _count_source(send_counts, world, walk) is not dest:
        raise _NoMatch("the send counts do not count the pairs' destination ranks")
    cnt_in, _, _, group_c = _a2a_args(_received(_counts_items(d_out, walk), walk))
    if cnt_in is not send_counts or group_c != group:
        raise _NoMatch("the receive counts are not the all-to-all of the send counts")


def _check_shapes(x: fx.Node, W: fx.Node, ids: fx.Node, k_div: Any, view_TKD: tuple) -> tuple[int, int]:
    """(E, K), after checking x [T, D], W and ids [T, K], x[order // K] and y.view(T, K, D)."""
    E = _topk_experts(ids)
    if E is None:
        raise _NoMatch(f"cannot prove the expert ids {ids.name} lie in [0, E) (not a top-k)")
    xv, Wv, idv = val(x), val(W), val(ids)
    if not all(isinstance(v, torch.Tensor) for v in (xv, Wv, idv)) or xv.dim() != 2 or idv.dim() != 2 or \
            tuple(Wv.shape) != tuple(idv.shape):
        raise _NoMatch("hidden states, weights or ids do not have the [T, D], [T, K] shapes")
    K = idv.shape[1]
    if k_div != K or view_TKD != (xv.shape[0], K, xv.shape[1]):
        raise _NoMatch(f"x[order // {k_div}] or the view of the results does not fit top-{K} of {xv.shape[0]} "
                       "tokens")
    return E, K


def _local_weights(experts: dict, local: list) -> tuple[MoEWeights, ExpertSpec, frozenset]:
    """The local experts' own parameters as per-expert lists (global-id order), their ExpertSpec and the roles
    whose weights hold the [in, out] layout (``x @ w``: ``Match.transposed``)."""
    params, act, glu = experts[local[0]]
    if any((a, g) != (act, glu) for _, a, g in experts.values()):
        raise _NoMatch("the local experts differ in activation or GLU form")
    kinds = {k: v[0] for k, v in params.items() if v is not None}
    if any({k: v[0] for k, v in p.items() if v is not None} != kinds for p, _, _ in experts.values()):
        raise _NoMatch("the local experts differ in which weights and biases they have, or in their layout")
    weights = MoEWeights(**{k: [experts[e][0][k][1] for e in local] if k in kinds else None
                            for k in ("w1", "w2", "w3", "b1", "b2", "b3")})
    transposed = frozenset(k for k, kind in kinds.items() if kind.endswith(".kn"))
    return weights, ExpertSpec(num_experts=len(local), activation=act, glu=glu,
                               bias=bool(kinds.keys() & {"b1", "b2", "b3"})), transposed


def _ranges(ids: list) -> str:
    """[0, 1, 2, 5] -> "0..2, 5"."""
    out, start = [], ids[0]
    for a, b in zip(ids, ids[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}..{a}" if a != start else f"{a}")
            start = b
    return ", ".join(out)


register_pattern(HandwrittenExpertParallel())
