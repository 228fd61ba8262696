"""The expert-parallel fused MoE op: ``torch.ops.moe_fuser.ep_experts`` and ``ep_moe_forward``.

``fused_moe(..., ep_group=group)`` / ``moe_forward(..., ep_group=group)`` land in ``ep_moe_forward``: routing in
fp32 on each rank's own tokens (plain differentiable code, as in the single-device op), then the expert part as
one custom op that, on each rank,

    counts exchange (one all_gather, configuration fingerprint checked) -> per chunk: dispatch (node-level, then
    rank-level) -> local grouped experts with the device's lowering -> combine back (rank-level, node-level)

with chunk c+1 in flight while chunk c computes (``moe_fuser.distributed.dispatch`` has the exchange and the
schedule). A rank receives each token once however many of its experts it holds; the token's pairs there become
a top-k table over the received rows (``_row_slots``: [R, S] ids and weights, -1 in unused slots), so the
lowering gathers each row once and returns the row's partial sum directly. Each rank holds only its local
experts' weights (``ExpertPlacement.local_experts(rank)``, stacked or as a list in global-id order); E is
``router_logits.shape[1]`` (or the placement's size with an external router). The placement may also be an
integer tensor of owner ranks (a model's buffer), read at each call.

A lowering with its own expert-parallel form (an ``expert_parallel`` method: the npu lowering's MC2, or
all_to_all + npu_moe_re_routing) gets the expert part whole instead: ``ep_experts`` hands it the call, and none of
the exchange below runs.

Backward (training): a second custom op replays the plan saved by the forward (kept only when a gradient can
flow, as for the single-device op): the output gradient travels the way the tokens went, the lowering's backward
runs on each rank's received rows (weight gradients stay local: the expert weights are not replicated), and
input and routing-weight gradients travel back. The backward issues the same collectives on every rank whatever
``requires_grad`` says locally; ranks must agree on whether a backward runs at all (one that runs it alone
waits for the others until the timeout, then raises).

Why a custom op (and not an ``autograd.Function``): it stays one opaque node under torch.compile (the compiler's
rewrite of hand-written EP code emits it), its fake kernel gives the output shapes, and the forward's plan (index
tensors with data-dependent sizes) is returned as extra outputs with unbacked sizes, which AOTAutograd saves for
the backward op: nothing lives outside the graph. The process group travels by name (``group.group_name``).

Legend: T tokens (this rank), K top-k, D model dim, E global experts, E_r experts on this rank, F expert hidden
dim, H = F (plain) or 2F (gated), n pairs computed on this rank, R rows received, S slots per received row (the
most pairs any of them has).
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

from .. import lowering
from ..ops.experts import (_hidden_width, _spec, _unpack_all, fake_weight_grads, pack_weights,
                           register_ep_autograd, zero_filled)
from ..ops.fused import (_all_finite, _on_real_data, _shared_expert, cast_experts, experts_dtype, no_autocast,
                         select_routing, sum_slots, validate, weighted_input_rows)
from ..ops.routing import router_stats
from ..spec import ExpertSpec, MoESpec, MoEWeights, RouterSpec
from .dispatch import HEADER_FIELDS, MAX_CHUNKS, TokenDispatcher, _dtype_code, _MAGIC, _KINDS
from .placement import ExpertPlacement, Placement, Topology, detect_ranks_per_node, resolve_placement

__all__ = ["DEFAULT_TIMEOUT_S", "auto_chunks", "ep_experts", "ep_moe_forward"]

DEFAULT_TIMEOUT_S = 300.0   # a peer that died or stalls is reported after this long (first calls may compile)
AUTO_CHUNK_TOKENS = 512     # auto overlap: about this many tokens per chunk (smaller GEMMs lose efficiency) ...
AUTO_MAX_CHUNKS = 4         # ... and at most this many chunks (each adds collective latency)


def auto_chunks(num_tokens: int) -> int:
    """This rank's overlap degree when none is given; the call uses the maximum over the ranks."""
    return max(1, min(AUTO_MAX_CHUNKS, num_tokens // AUTO_CHUNK_TOKENS))


_DISPATCHERS: dict[tuple, TokenDispatcher] = {}


def _dispatcher(group_name: str, owner: Sequence[int], ranks_per_node: int, timeout_s: float) -> TokenDispatcher:
    group = _resolve_process_group(group_name)
    world = dist.get_world_size(group)
    key = (group_name, world, dist.get_rank(group), tuple(owner), ranks_per_node, timeout_s)
    if key not in _DISPATCHERS:   # (a group name can come back after destroy_process_group: rank/size in key)
        _DISPATCHERS[key] = TokenDispatcher(group, ExpertPlacement(tuple(owner), world),
                                            Topology(world, ranks_per_node), timeout_s)
    return _DISPATCHERS[key]


def _setup(group_name: str, owner: torch.Tensor, ranks_per_node: int, timeout_s: float,
           w1: list[torch.Tensor]) -> tuple[TokenDispatcher, list[int], int]:
    """The dispatcher for this call (the owner table is read now: a buffer the model may update), after checking
    that this rank holds as many experts as the placement gives it (before any collective)."""
    owners = [int(r) for r in owner.tolist()]
    rpn = ranks_per_node or detect_ranks_per_node(_resolve_process_group(group_name))
    disp = _dispatcher(group_name, owners, rpn, timeout_s)
    want, held = disp.placement.num_local(disp.rank), _num_local(w1)
    if held != want:
        raise ValueError(f"rank {disp.rank} holds {held} experts but the placement gives it {want} "
                         f"(global ids {list(disp.placement.local_experts(disp.rank))}); pass only this rank's "
                         "experts' weights, in global-id order")
    return disp, owners, rpn


def _config_crc(activation: str, glu: str, alpha: float, limit: float, biases: Sequence[bool]) -> int:
    return zlib.crc32(f"{activation}|{glu}|{alpha!r}|{limit!r}|{tuple(biases)}".encode())


def _local_spec(num_local: int, activation, glu, alpha, limit, has_bias) -> Optional[ExpertSpec]:
    return None if num_local == 0 else _spec(num_local, activation, glu, has_bias, alpha, limit)


def _num_local(w1: list[torch.Tensor]) -> int:
    return w1[0].shape[0] if len(w1) == 1 and w1[0].dim() == 3 else len(w1)


@torch.library.custom_op("moe_fuser::ep_experts", mutates_args=())
def _ep_experts_op(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                   w1: list[torch.Tensor], w2: list[torch.Tensor], w3: list[torch.Tensor],
                   b1: list[torch.Tensor], b2: list[torch.Tensor], b3: list[torch.Tensor],
                   owner: torch.Tensor, ranks_per_node: int, chunks: int, timeout_s: float, group_name: str,
                   activation: str, glu: str, alpha: float, limit: float, impl: str, save: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                              torch.Tensor]:
    disp, owner, ranks_per_node = _setup(group_name, owner, ranks_per_node, timeout_s, w1)
    T, K = topk_ids.shape
    D = x.shape[1]
    ws = _unpack_all(w1, w2, w3, b1, b2, b3)
    spec = _local_spec(_num_local(w1), activation, glu, alpha, limit, bool(b1 or b2 or b3))
    low = lowering.select(impl, x.device)
    header = [_MAGIC, len(owner), K, D, _dtype_code(x.dtype), w1[0].shape[-2], w2[0].shape[-1], ranks_per_node,
              disp.placement.fingerprint(),
              _config_crc(activation, glu, alpha, limit, (bool(b1), bool(b2), bool(b3))),
              chunks or auto_chunks(T)]
    plan = disp.plan(topk_ids, topk_weights, header[-1], header)

    # Saved for backward: the received rows of every chunk, received straight into one tensor, and the
    # lowering's saved first projection: written into one tensor too where the lowering can (``saves_into``:
    # the kept pairs' rows only), else one per chunk, concatenated after.
    into = save and getattr(low, "saves_into", False)
    H = _hidden_width(w2, glu)
    row_start = [0]
    pair_start = [0]
    for s in plan.splits:
        row_start.append(row_start[-1] + s.compute_rows)
        pair_start.append(pair_start[-1] + s.compute_pairs)
    xrows = x.new_empty(row_start[-1] if save else 0, D)
    h = x.new_empty(pair_start[-1] * H if into else 0)
    saved_h, saved_order = [], []

    def compute(c, cp, rows_RD):
        if cp.row_of_pair.numel() == 0:
            return rows_RD.new_zeros(cp.num_rows, D), None
        weights_RS, ids_RS, _ = _row_slots(cp)
        # the full forward also when nothing is kept: chunks already bound its temporaries, and it is faster here
        # than a lowering's streaming forward_inference
        h_out = _rows(h, pair_start[c], pair_start[c + 1], H) if into else None
        partial_RD, h_NH, order_N = low.forward(rows_RD, weights_RS, ids_RS, *ws, spec,
                                                **({"h_out": h_out} if into else {}))
        if save:
            if not into:
                saved_h.append(h_NH.reshape(-1))   # flat: a lowering may give its saved tensor a storage layout
            saved_order.append(order_N)
        return partial_RD, None

    plan, back = disp.run(plan, lambda c: x.index_select(0, plan.origin[c].tok_rows), compute,
                          recv_into=(lambda c: xrows[row_start[c]:row_start[c + 1]]) if save else None)
    out_TD = torch.zeros_like(x)
    for c, (rows, _) in enumerate(back):
        out_TD.index_add_(0, plan.origin[c].tok_rows, rows)
    if not save:   # no gradient can flow: nothing kept for a backward
        return (out_TD, plan.table, topk_ids.new_zeros(0), topk_weights.new_zeros(0, dtype=torch.float32),
                xrows, h, topk_ids.new_zeros(0))
    idx, wpair = disp.pack(plan)
    if not into:
        h = torch.cat(saved_h) if saved_h else x.new_zeros(0)
    order = torch.cat(saved_order) if saved_order else topk_ids.new_zeros(0)
    return out_TD, plan.table, idx, wpair, xrows, h, order


def _rows(flat: torch.Tensor, start: int, stop: int, width: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of a flat tensor of rows of ``width`` elements, as ``[stop - start, width]``."""
    return flat[start * width:stop * width].view(stop - start, width)


def _row_slots(cp) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A chunk's pairs as a top-k table over its received rows: ``weights_RS``/``ids_RS`` [R, S] with S the most
    pairs any row has (-1: empty slot, which the lowerings skip like a dropped pair), and each pair's flat
    position in it. The lowering then gathers each row once and sums a row's pairs itself: no per-pair copy of
    the rows. (Pairs arrive sorted by row.)"""
    R, n = cp.num_rows, cp.row_of_pair.numel()
    per_row = torch.bincount(cp.row_of_pair, minlength=R)
    S = int(per_row.max())
    first = torch.cumsum(per_row, 0) - per_row
    slot_n = cp.row_of_pair * S + (torch.arange(n) - first[cp.row_of_pair])
    ids_RS = torch.full((R * S,), -1, dtype=torch.int64).index_copy_(0, slot_n, cp.local_expert).view(R, S)
    weights_RS = torch.zeros(R * S, dtype=torch.float32).index_copy_(0, slot_n, cp.weight).view(R, S)
    return weights_RS, ids_RS, slot_n


def _table_width(group_name: str) -> tuple[int, int]:
    world = dist.get_world_size(_resolve_process_group(group_name))
    return world, len(HEADER_FIELDS) + MAX_CHUNKS * _KINDS * world


@_ep_experts_op.register_fake
def _(x, topk_weights, topk_ids, w1, w2, w3, b1, b2, b3, owner, ranks_per_node, chunks, timeout_s, group_name,
      activation, glu, alpha, limit, impl, save):
    ctx = torch.library.get_ctx()
    n_idx, n_pairs, n_rows, n_h, n_slots = (ctx.new_dynamic_size() for _ in range(5))
    world, width = _table_width(group_name)
    return (x.new_empty(x.shape), topk_ids.new_empty((world, width), dtype=torch.int64),
            topk_ids.new_empty((n_idx,), dtype=torch.int64), topk_weights.new_empty((n_pairs,), dtype=torch.float32),
            x.new_empty((n_rows, x.shape[1])), x.new_empty((n_h,)),
            topk_ids.new_empty((n_slots,), dtype=torch.int64))


@torch.library.custom_op("moe_fuser::ep_experts_backward", mutates_args=())
def _ep_experts_backward_op(
        grad: torch.Tensor, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
        table: torch.Tensor, idx: torch.Tensor, wpair: torch.Tensor, xrows: torch.Tensor, h: torch.Tensor,
        order: torch.Tensor, w1: list[torch.Tensor], w2: list[torch.Tensor], w3: list[torch.Tensor],
        b1: list[torch.Tensor], b2: list[torch.Tensor], b3: list[torch.Tensor],
        owner: torch.Tensor, ranks_per_node: int, chunks: int, timeout_s: float, group_name: str,
        activation: str, glu: str, alpha: float, limit: float, impl: str, need_w: bool
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor],
           list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    dx_TD, dweights_TK, *grads_w = _ep_backward(
        grad, x, topk_weights, topk_ids, table, idx, wpair, xrows, h, order, w1, w2, w3, b1, b2, b3, owner,
        ranks_per_node, chunks, timeout_s, group_name, activation, glu, alpha, limit, impl, need_w)
    return (dx_TD, dweights_TK, *zero_filled(grads_w, (w1, w2, w3, b1, b2, b3)))


def _ep_backward(grad, x, topk_weights, topk_ids, table, idx, wpair, xrows, h, order, w1, w2, w3, b1, b2, b3, owner,
                 ranks_per_node, chunks, timeout_s, group_name, activation, glu, alpha, limit, impl, need_w):
    """What the backward op computes; a local weight whose experts got no rows has no gradient (None)."""
    disp, _, _ = _setup(group_name, owner, ranks_per_node, timeout_s, w1)
    T, K = topk_ids.shape
    D = x.shape[1]
    ws = _unpack_all(w1, w2, w3, b1, b2, b3)
    spec = _local_spec(_num_local(w1), activation, glu, alpha, limit, bool(b1 or b2 or b3))
    low = lowering.select(impl, x.device)
    plan = disp.restore(table, idx, wpair)
    grad = grad.contiguous()
    grads_w = [[None] * len(wl) if need_w else [] for wl in (w1, w2, w3, b1, b2, b3)]
    H = _hidden_width(w2, glu)
    into = getattr(low, "saves_into", False)   # as the forward saved h: kept pairs' rows, or R*S per chunk
    offsets = {"rows": 0, "slots": 0, "h": 0}

    def compute(c, cp, g_RD):
        R = cp.num_rows
        r0 = offsets["rows"]
        offsets["rows"] += R
        if cp.row_of_pair.numel() == 0:
            return g_RD.new_zeros(R, D), cp.weight.new_zeros(0)
        weights_RS, ids_RS, slot_n = _row_slots(cp)
        N, s0, h0 = ids_RS.numel(), offsets["slots"], offsets["h"]
        offsets["slots"] += N
        offsets["h"] += cp.row_of_pair.numel() if into else N
        dx_RD, dweights_RS, *dws = low.backward(g_RD, xrows[r0:r0 + R], weights_RS, ids_RS,
                                                _rows(h, h0, offsets["h"], H), order[s0:s0 + N], *ws, spec,
                                                (True, True, need_w))
        if need_w:   # the lowering's gradients are fresh: the first chunk's become the sums
            for acc, g in zip(grads_w, dws):
                for e, gi in enumerate(pack_weights(g)):
                    if gi is not None:   # None: an expert that got no rows in this chunk
                        acc[e] = gi if acc[e] is None else acc[e].add_(gi)
        return dx_RD, dweights_RS.reshape(-1)[slot_n].to(torch.float32)

    plan, back = disp.run(plan, lambda c: grad.index_select(0, plan.origin[c].tok_rows), compute)
    dx_TD = torch.zeros_like(x)
    dweights_N = torch.zeros(T * K, dtype=torch.float32, device=x.device)
    for c, (rows, pairs) in enumerate(back):
        dx_TD.index_add_(0, plan.origin[c].tok_rows, rows)
        dweights_N.index_copy_(0, plan.origin[c].tj_pairs, pairs)
    return (dx_TD, dweights_N.view(T, K).to(topk_weights.dtype), *grads_w)


@_ep_experts_backward_op.register_fake
def _(grad, x, topk_weights, topk_ids, table, idx, wpair, xrows, h, order, w1, w2, w3, b1, b2, b3, owner,
      ranks_per_node, chunks, timeout_s, group_name, activation, glu, alpha, limit, impl, need_w):
    return (x.new_empty(x.shape), topk_weights.new_empty(topk_weights.shape),
            *fake_weight_grads((w1, w2, w3, b1, b2, b3), need_w))


register_ep_autograd(_ep_experts_op, _ep_experts_backward_op, eager_backward=_ep_backward)


Weights = Union[torch.Tensor, Sequence[torch.Tensor], None]


@torch.compiler.assume_constant_result
def _lowering_name(impl: Optional[str], device_type: str) -> str:
    if impl == "reference":
        raise ValueError("impl='reference' is the single-process oracle and has no expert-parallel form; use "
                         "impl=None or a lowering name ('cpu', 'triton', 'npu') with ep_group")
    return lowering.select(impl, torch.device(device_type)).name


def ep_experts(x_TD: torch.Tensor, topk_weights_TK: torch.Tensor, topk_ids_TK: torch.Tensor, w1: Weights,
               w2: Weights, w3: Weights = None, b1: Weights = None, b2: Weights = None, b3: Weights = None, *,
               spec: ExpertSpec, group: dist.ProcessGroup, placement: Union[ExpertPlacement, torch.Tensor],
               ranks_per_node: int = 0,
               chunks: Optional[int] = None, timeout_s: float = DEFAULT_TIMEOUT_S,
               impl: Optional[str] = None) -> torch.Tensor:
    """The expert part under expert parallelism: ``out[t] = sum_j w[t, j] * expert_{ids[t, j]}(x[t])`` for this
    rank's tokens, the experts living on their owner ranks. ``topk_ids`` are global expert ids (-1: dropped);
    ``placement``: an ExpertPlacement or an int tensor of owner ranks (read at each call);
    ``ranks_per_node=0``: detected at the first call (one collective, cached per group).

    A lowering with its own expert-parallel form (``expert_parallel``: the npu lowering's MC2 or all_to_all +
    npu_moe_re_routing) gets the whole call instead of moe_fuser's exchange; ``chunks`` and ``ranks_per_node``
    tune moe_fuser's exchange only."""
    if chunks is not None and not (isinstance(chunks, int) and 1 <= chunks <= MAX_CHUNKS):
        raise ValueError(f"overlap_chunks={chunks!r} must be an int in [1, {MAX_CHUNKS}] or None (automatic)")
    name = _lowering_name(impl, x_TD.device.type)
    own_ep = getattr(lowering.select(name, x_TD.device), "expert_parallel", None)
    if own_ep is not None:
        return own_ep(x_TD, topk_weights_TK, topk_ids_TK, w1, w2, w3, b1, b2, b3, spec=spec, group=group,
                      placement=placement, timeout_s=timeout_s)
    packed = [pack_weights(w) for w in (w1, w2, w3, b1, b2, b3)]
    # Keep the plan and activations for backward only when a gradient can flow (every rank must agree: a rank
    # running a backward the others skip waits for them until the timeout).
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (x_TD, topk_weights_TK, *sum(packed, [])))
    out = _ep_experts_op(
        x_TD, topk_weights_TK, topk_ids_TK, *packed, _owner_tensor(placement), int(ranks_per_node),
        int(chunks or 0), float(timeout_s), group.group_name, spec.activation, spec.glu or "", float(spec.alpha),
        spec.op_limit, name, save)
    return out[0]


def _owner_tensor(placement: Union[ExpertPlacement, torch.Tensor]) -> torch.Tensor:
    if isinstance(placement, torch.Tensor):
        return placement
    return torch.tensor(placement.owner, dtype=torch.int64)


def _fail(msg: str):
    raise ValueError(msg)


def _validate_ep(spec: MoESpec, x_TD, router_logits_TE, w: MoEWeights, E: int, rank: int,
                 local: Optional[tuple], weights_TK, ids_TK) -> None:
    """The single-device checks on this rank's share (its experts), plus the EP-specific ones. ``local``: the
    experts the placement gives this rank (None for an owner tensor, which the op checks when it reads it)."""
    if spec.capacity is not None:
        _fail("capacity (token dropping) is not supported with expert parallelism; drop capacity= or ep_group=")
    if router_logits_TE is not None:
        if router_logits_TE.dim() != 2 or router_logits_TE.shape[0] != x_TD.shape[0]:
            _fail(f"router_logits must be [T={x_TD.shape[0]}, E]; got {tuple(router_logits_TE.shape)}")
        if _on_real_data(router_logits_TE) and not _all_finite(router_logits_TE):
            _fail("router_logits contain NaN or inf; check the router's input and weights")
    if w.selection_bias is not None and tuple(w.selection_bias.shape) != (E,):
        _fail(f"selection_bias must be [E={E}]; got {tuple(w.selection_bias.shape)}")
    w1 = pack_weights(w.w1)
    held = _num_local(w1) if w1 else 0
    if local is not None and held != len(local):
        _fail(f"rank {rank} holds {held} experts but the placement gives it {len(local)} (global ids "
              f"{list(local)}); pass only this rank's experts' weights, stacked in global-id order"
              + ("; a rank without experts passes empty stacked tensors [0, F, D]" if not local else ""))
    if not held:
        for name in ("w1", "w2", "w3"):
            ws = getattr(w, name)
            if ws is not None and not (isinstance(ws, torch.Tensor) and ws.dim() == 3 and ws.shape[0] == 0):
                _fail(f"rank {rank} holds no experts: pass {name} as an empty stacked tensor [0, out, in]")
        return
    local_spec = spec.replace(router=RouterSpec(top_k=spec.top_k, external=True),
                              experts=dataclasses.replace(spec.experts, num_experts=held), capacity=None)
    validate(local_spec, x_TD, None, w._replace(selection_bias=None), weights_TK, ids_TK, num_ids=E)


def ep_moe_forward(spec: MoESpec, x_TD: torch.Tensor, router_logits_TE: Optional[torch.Tensor], w: MoEWeights,
                   group: Union[dist.ProcessGroup, str], *,
                   expert_placement: Union[Placement, torch.Tensor] = None,
                   overlap_chunks: Optional[int] = None, ranks_per_node: Optional[int] = None,
                   ep_timeout: Optional[float] = None, impl: Optional[str] = None,
                   topk_weights_TK: Optional[torch.Tensor] = None, topk_ids_TK: Optional[torch.Tensor] = None,
                   return_router_stats: bool = False, check: bool = True,
                   expert_dtype: Optional[torch.dtype] = None, shared_dtype: Optional[torch.dtype] = None):
    """``moe_forward`` under expert parallelism (what ``fused_moe(..., ep_group=...)`` runs). ``group``: a
    ProcessGroup or its name; ``expert_placement``: None (balanced), owner ranks, an ExpertPlacement, or an int
    tensor of owner ranks read at each call; ``expert_dtype``, ``shared_dtype`` as in ``moe_forward``."""
    expert_dtype, shared_dtype = experts_dtype(x_TD, expert_dtype), experts_dtype(x_TD, shared_dtype)
    with no_autocast(x_TD.device.type):
        return _ep_moe_forward(spec, x_TD, router_logits_TE, w, group, expert_placement, overlap_chunks,
                               ranks_per_node, ep_timeout, impl, topk_weights_TK, topk_ids_TK, return_router_stats,
                               check, expert_dtype, shared_dtype)


def _ep_moe_forward(spec: MoESpec, x_TD: torch.Tensor, router_logits_TE: Optional[torch.Tensor], w: MoEWeights,
                    group, expert_placement, overlap_chunks, ranks_per_node, ep_timeout, impl, topk_weights_TK,
                    topk_ids_TK, return_router_stats: bool, check: bool, expert_dtype: torch.dtype,
                    shared_dtype: torch.dtype):
    if isinstance(group, str):   # a group name (what the compiler's rewrite passes)
        group = _resolve_process_group(group)
    world, rank = group.size(), group.rank()
    E = None if spec.router.external else router_logits_TE.shape[-1]
    if spec.router.external and expert_placement is None:
        _fail("with topk_weights/topk_ids under expert parallelism the number of experts is unknown: pass "
              "expert_placement (one owner rank per global expert)")
    if isinstance(expert_placement, torch.Tensor):   # an owner table the model keeps (and may update)
        if expert_placement.dim() != 1 or expert_placement.is_floating_point() or \
                (E is not None and expert_placement.shape[0] != E):
            _fail(f"expert_placement as a tensor must be a 1-D integer tensor of E={E} owner ranks")
        placement, E, local = expert_placement, int(expert_placement.shape[0]), None
    else:
        placement = resolve_placement(expert_placement, E, world)
        E, local = placement.num_experts, placement.local_experts(rank)
    if spec.num_experts != E:
        spec = spec.replace(experts=dataclasses.replace(spec.experts, num_experts=E))
    rpn = 0 if ranks_per_node is None else Topology(world, int(ranks_per_node)).ranks_per_node  # 0: op detects
    low = None
    if not spec.router.external:
        spec.router.validate_for(E)
        low = lowering.select(_lowering_name(impl, x_TD.device.type), x_TD.device)
    weights_TK, ids_TK = select_routing(spec.router, low, router_logits_TE, w.selection_bias, topk_weights_TK,
                                        topk_ids_TK)
    if check:
        _validate_ep(spec, x_TD, router_logits_TE, w, E, rank, local, weights_TK, ids_TK)
    xe_TD, we = cast_experts(x_TD, w, expert_dtype)
    rows, rows_w, rows_ids = xe_TD, weights_TK, ids_TK
    if spec.weight_on_input:   # one row per (token, slot): a token's slots on one rank travel apart
        rows, rows_w, rows_ids = weighted_input_rows(x_TD, weights_TK, ids_TK, spec.router, xe_TD.dtype)
    out_TD = ep_experts(rows, rows_w, rows_ids, we.w1, we.w2, we.w3, we.b1, we.b2, we.b3, spec=spec.experts,
                        group=group, placement=placement, ranks_per_node=rpn, chunks=overlap_chunks,
                        timeout_s=DEFAULT_TIMEOUT_S if ep_timeout is None else float(ep_timeout), impl=impl)
    if spec.weight_on_input:
        out_TD = sum_slots(out_TD, spec.top_k)
    out_TD = out_TD.to(x_TD.dtype)
    if spec.shared is not None:
        out_TD = (out_TD + _shared_expert(x_TD, spec.shared, w, shared_dtype)).to(x_TD.dtype)
    if return_router_stats:
        return out_TD, router_stats(weights_TK, ids_TK, E)
    return out_TD
