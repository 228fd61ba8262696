"""Hand-written loops over one row per (token, slot) pair: DeepSeek-MoE's training path.

DeepSeek-MoE's and DeepSeek-V2's own modeling code (``trust_remote_code``; the MoE layers copied from it) runs
the experts in training as

    xs = x.repeat_interleave(K, dim=0)                    # [T*K, D]: row t*K + j is token t, for slot j
    y = torch.empty_like(xs)                              # (or zeros_like, new_empty, new_zeros)
    for e in range(E):
        y[flat == e] = expert[e](xs[flat == e])           # flat = ids.view(-1): each row written once
    out = (y.view(T, K, D) * w.unsqueeze(-1)).sum(dim=1)  # (y.view(*w.shape, -1), w[..., None], casts)

Each row of ``y`` is written by exactly one expert when every id lies in [0, E) (a recognised router's top-k, or
external ids proven to lie there), so ``out[t] = sum_j w[t, j] * expert_{ids[t, j]}(x[t])``: the fused op, without
the K copies of every token. The experts are read as the loop pattern reads them (``handwritten._ffn``: Linear
-> act -> Linear, SwiGLU modules, matmuls, eval-mode dropout). Under autocast the weighted rows are formed and
summed in the routing weights' fp32 (``ExpertSpec.combine_dtype``), as the layer does.

Entry point: the pattern ``handwritten.slots`` (family ``"handwritten"``), registered at import; it runs before
``handwritten.loop``, which would report such a buffer as a loop it does not understand. A buffer written by
anything but ``y[mask] = ...`` assignments is not this form and is left to the other patterns without a word.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..fx.dag import mutated_arg
from ..fx.graph import arg, is_op, module_path, op, val
from ..spec import ExpertSpec
from .base import Match, MatchContext, Rejection, register_pattern
from .handwritten import (_CASTS, FAMILY, HandwrittenLoop, _expert_of, _ffn, _NoMatch, _same_shape,
                          _skip_dropout, _Walk, _want, _weight_kinds, routed_match)

__all__ = ["find_slot_rows"]

PATTERN = "handwritten.slots"
_BUFFERS = ("empty_like", "zeros_like", "new_empty", "new_zeros", "empty", "zeros")


def _masked_assign(node: fx.Node) -> bool:
    """``y[flat == e] = value`` with ``flat`` a flattening of 2-D ids (with 1-D top-1 ids, ``out[ids == e] = ...`` is
    the loop pattern's assignment form)."""
    if op(node) != "setitem" or not is_op(node.args[1], "eq"):
        return False
    flat = node.args[1].args[0]
    return is_op(flat, "view", "reshape", "flatten") and isinstance(val(flat.args[0]), torch.Tensor) \
        and val(flat.args[0]).dim() == 2


def _flat_ids(flat: fx.Node, walk: _Walk) -> fx.Node:
    """flat = ids.view(-1) (``reshape(-1)``, ``flatten()``) of 2-D ids -> ids."""
    _want(is_op(flat, "view", "reshape", "flatten") and tuple(flat.args[1:]) in ((-1,), ((-1,),), ([-1],), ()),
          f"{flat.name} is not the flattened expert ids")
    ids = flat.args[0]
    _want(isinstance(val(ids), torch.Tensor) and val(ids).dim() == 2, f"{ids.name} are not [T, K] expert ids")
    walk.take(flat)
    return ids


def _weight_column(factor: fx.Node, walk: _Walk, T_K: tuple) -> fx.Node:
    """``w.unsqueeze(-1)`` / ``w[..., None]`` / ``w[:, :, None]`` / ``w.view(T, K, 1)`` of [T, K] weights -> w."""
    node = walk.casts(factor)
    v = val(node)
    _want(isinstance(v, torch.Tensor) and tuple(v.shape) == (*T_K, 1),
          f"{node.name} is not a [T, K, 1] column of routing weights")
    _want(is_op(node, "unsqueeze", "getitem", "view", "reshape"), f"{node.name} does not add a trailing dim")
    walk.take(node)
    w = walk.casts(node.args[0])
    _want(isinstance(val(w), torch.Tensor) and tuple(val(w).shape) == T_K,
          f"{w.name} are not [T, K] routing weights")
    return w


def _match(ctx: MatchContext, buf: fx.Node, writes: list) -> Match:
    walk = _Walk()
    walk.take(buf)
    experts = []
    for u in writes:
        walk.take(u)
        flat, e = _expert_of(u.args[1], walk)
        x_e, params, act, glu = _ffn(u.args[2], e, walk)
        x_e = _skip_dropout(x_e, walk)
        _want(is_op(x_e, "getitem") and isinstance(x_e.args[1], fx.Node),
              f"the input of expert {e} is not rows[flat == {e}]")
        flat2, e2 = _expert_of(x_e.args[1], walk)
        _want(flat2 is flat and e2 == e, f"expert {e} reads other rows than it writes")
        walk.take(x_e)
        experts.append((e, x_e.args[0], flat, act, glu, params))
    E = len(experts)
    _want(sorted(ex[0] for ex in experts) == list(range(E)),
          f"the loop writes experts {sorted(ex[0] for ex in experts)}, not each of 0..{E - 1} once: rows of "
          f"{buf.name} would keep what the buffer held")
    e0, xs, flat, act, glu, params0 = experts[0]
    for e, xs_e, flat_e, act_e, glu_e, params in experts[1:]:
        _want(xs_e is xs and flat_e is flat, f"experts {e0} and {e} read different rows or ids")
        _want((act_e, glu_e) == (act, glu), f"experts {e0} and {e} differ in their activation")
        _want(_weight_kinds(params) == _weight_kinds(params0), f"experts {e0} and {e} hold their weights differently")
    ids = _flat_ids(flat, walk)
    T_K = tuple(val(ids).shape)
    K = T_K[1]
    _want(is_op(xs, "repeat_interleave") and arg(xs, 1, "repeats") == K and arg(xs, 2, "dim") == 0,
          f"{xs.name} is not x.repeat_interleave({K}, dim=0): its rows are not one per (token, slot) pair")
    walk.take(xs)
    x = xs.args[0]
    xv, bv = val(x), val(buf)
    _want(isinstance(xv, torch.Tensor) and xv.dim() == 2 and tuple(bv.shape) == (xv.shape[0] * K, xv.shape[1]),
          f"{buf.name} is not one row per (token, slot) pair of {x.name}")
    # COMBINE: the buffer's one reader, y.view(T, K, D) * w.unsqueeze(-1), summed over the slots
    readers = [u for u in buf.users if mutated_arg(u) is not buf]
    _want(len(readers) == 1 and is_op(readers[0], "view", "reshape")
          and tuple(val(readers[0]).shape) == (*T_K, xv.shape[1]),
          f"{buf.name} is read other than once, as [T, K, D]")
    view = walk.take(readers[0])
    prod = next(iter(view.users)) if len(view.users) == 1 else None
    _want(is_op(prod, "mul") and len(prod.args) == 2, f"{view.name} is not multiplied by the routing weights")
    walk.take(prod)
    factor = prod.args[1] if prod.args[0] is view else prod.args[0]
    w = _weight_column(factor, walk, T_K)
    out = next(iter(prod.users)) if len(prod.users) == 1 else None
    _want(is_op(out, "sum") and arg(out, 1, "dim") in (1, -2, (1,), [1]) and not arg(out, 2, "keepdim", False),
          f"{prod.name} is not summed over the slots (sum(dim=1))")
    walk.take(out)
    cast = next(iter(out.users)) if len(out.users) == 1 else None
    if val(out).dtype != xv.dtype and is_op(cast, *_CASTS) and _same_shape(cast, out) and val(cast).dtype == xv.dtype:
        out = walk.take(cast)   # summed in the weights' dtype, cast back: the op does the same
    combine_dtype = val(prod).dtype if val(prod).dtype != bv.dtype else None
    weights, transposed = HandwrittenLoop._weights([ex[5] for ex in sorted(experts, key=lambda ex: ex[0])])
    return routed_match(PATTERN, walk, x, out, w, ids, val(factor).dtype, weights, transposed,
                        ExpertSpec(num_experts=E, activation=act, glu=glu, combine_dtype=combine_dtype),
                        module_path(buf), ("one row per (token, slot) pair: the K copies of each token are not made",))


def find_slot_rows(ctx: MatchContext):
    """Each buffer written only by masked assignments ``y[flat == e] = ...`` is a candidate."""
    for buf in ctx.nodes_of(*_BUFFERS):
        if buf in ctx.claimed:
            continue
        writes = [u for u in buf.users if mutated_arg(u) is buf]
        if not writes or not all(_masked_assign(u) for u in writes):
            continue
        try:
            yield _match(ctx, buf, writes)
        except _NoMatch as exc:
            yield Rejection(FAMILY, PATTERN, str(exc), module_path(buf))


register_pattern(find_slot_rows, name=PATTERN, family=FAMILY, priority=10)
