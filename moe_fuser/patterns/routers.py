"""Router recognition: which ``RouterSpec`` turns the router logits into the top-k weights and ids a MoE uses.

Every family finds, in its own way, the two nodes its experts consume: the per-(token, slot) routing weights
``[T, K]`` and expert ids ``[T, K]`` (or ``[B, S, K]``, from ``[B, S, E]`` logits: the op routes them flattened).
``recognise_router(weights, ids)`` walks back from them to the router logits and returns a ``RouterMatch``: the
spec, the logits node, the selection-bias node, and the router's nodes (which join the family's region: the fused
op recomputes them in fp32). Recognised routers (the RouterSpec semantics are in ``moe_fuser.spec``):

    softmax -> topk (-> renormalise)                  Mixtral, Qwen2-MoE, OLMoE, Switch (k=1), the seed
    topk -> softmax                                   GShard, Granite, GPT-OSS
    sigmoid/softmax (+ bias) (-> group mask) -> topk -> gather the unbiased scores (-> renormalise)
                                                      DeepSeek-V3 (groups scored by top-2 sum or max)
    any of them followed by ``* routed_scaling`` (a Python number) and dtype casts

Upcasts are part of the spec, not noise: ``softmax(logits.float())`` or ``softmax(..., dtype=torch.float)``
routes in fp32 (``RouterSpec.dtype=float32``); a softmax left in bf16 routes in the logits' dtype
(``dtype=None``), so the fused op reproduces the user's ties. A downcast of the final weights (``.to(x.dtype)``)
is dropped: the op multiplies in fp32, which differs only by rounding.

Anything else (noise, a learned temperature, an in-place update the walk does not model) yields an *external*
router: the user's router stays in the graph as written, and the op takes its top-k weights and ids as they are.

Legend: T tokens, E experts, K top-k, G expert groups.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx

from ..fx.dag import mutated_arg
from ..fx.graph import arg, is_op, op, scalar_arg, val
from ..spec import RouterSpec, default_renorm_eps

__all__ = ["RouterMatch", "recognise_router"]

_CASTS = ("to", "float", "type_as", "half", "bfloat16", "double", "type")
_INT_CASTS = ("to", "long", "int", "type")


class _NoMatch(Exception):
    pass


@dataclass
class RouterMatch:
    """The router behind (topk_weights, topk_ids). ``nodes`` are the router's nodes after ``logits`` up to and
    including the given weights and ids nodes; empty for an external router."""

    spec: RouterSpec
    topk_weights: fx.Node
    topk_ids: fx.Node
    logits: Optional[fx.Node] = None
    selection_bias: Optional[fx.Node] = None
    nodes: frozenset = frozenset()
    reason: str = ""
    kind: str = field(default="")

    @property
    def external(self) -> bool:
        return self.spec.external


def _dtype_of(node) -> Optional[torch.dtype]:
    v = val(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


class _Walk:
    """Collects the nodes a recognition step consumed and refuses unmodelled in-place updates."""

    def __init__(self) -> None:
        self.nodes: set = set()

    def take(self, node: fx.Node) -> fx.Node:
        for u in node.users:
            m = mutated_arg(u)
            if m is node and not is_op(u, "itruediv", "div_"):
                raise _NoMatch(f"{u.name} updates {node.name} in place")
        self.nodes.add(node)
        return node

    def strip_casts(self, node: fx.Node, allow_int: bool = False) -> fx.Node:
        casts = _INT_CASTS if allow_int else _CASTS
        while is_op(node, *casts) and isinstance(node.args[0], fx.Node) and _is_dtype_only_cast(node):
            self.take(node)
            node = node.args[0]
        return node


def _is_dtype_only_cast(node: fx.Node) -> bool:
    v_in, v_out = val(node.args[0]), val(node)
    if not isinstance(v_in, torch.Tensor) or not isinstance(v_out, torch.Tensor):
        return False
    return v_in.shape == v_out.shape and v_in.device == v_out.device


def _last_dim(node: fx.Node, index: int, name: str, default=-1) -> bool:
    dim = scalar_arg(node, index, name, default)
    v = val(node.args[0])
    return isinstance(dim, int) and isinstance(v, torch.Tensor) and dim in (-1, v.dim() - 1)


def _topk_parts(ids: fx.Node, walk: _Walk) -> tuple[fx.Node, int]:
    """ids = topk(s, k)[1] (or max(s, -1)[1], a top-1; ``RouterSpec.first_max``) -> (topk or max node, k)."""
    if is_op(ids, "getitem") and ids.args[1] == 1 and is_op(ids.args[0], "max") and len(ids.args[0].args) >= 1 \
            and _last_dim(ids.args[0], 1, "dim", None):
        walk.take(ids)
        return walk.take(ids.args[0]), 1
    if not (is_op(ids, "getitem") and ids.args[1] == 1 and is_op(ids.args[0], "topk")):
        raise _NoMatch(f"the expert ids {ids.name} are not the indices of a top-k")
    tk = ids.args[0]
    k = scalar_arg(tk, 1, "k")
    if not isinstance(k, int) or not _last_dim(tk, 2, "dim") or scalar_arg(tk, 3, "largest", True) is not True:
        raise _NoMatch(f"{tk.name} is not a top-k over the experts (last dim, largest) with a constant k")
    walk.take(ids)
    walk.take(tk)
    return tk, k


def _topk_values(tk: fx.Node) -> Optional[fx.Node]:
    for u in tk.users:
        if is_op(u, "getitem") and u.args[1] == 0:
            return u
    return None


def _softmax_input(node: fx.Node, walk: _Walk) -> tuple[fx.Node, Optional[torch.dtype]]:
    """softmax(s(.float()), dim=-1(, dtype=float)) -> (logits before any upcast, routing dtype)."""
    if not is_op(node, "softmax") or not _last_dim(node, 1, "dim", None):
        raise _NoMatch(f"{node.name} is not a softmax over the experts")
    walk.take(node)
    upcast = _dtype_of(node) == torch.float32
    s = walk.strip_casts(node.args[0])
    if _dtype_of(s) is None:
        raise _NoMatch(f"no fake value for {s.name}")
    return s, (torch.float32 if upcast or _dtype_of(s) == torch.float32 else None)


def _scores(node: fx.Node, walk: _Walk) -> tuple[str, fx.Node, Optional[torch.dtype]]:
    """The scoring function's node -> (scoring, logits, routing dtype)."""
    node = walk.strip_casts(node)
    if is_op(node, "softmax"):
        s, dtype = _softmax_input(node, walk)
        return "softmax", s, dtype
    if is_op(node, "sigmoid"):
        walk.take(node)
        s = walk.strip_casts(node.args[0])
        upcast = _dtype_of(node) == torch.float32
        return "sigmoid", s, (torch.float32 if upcast else None)
    raise _NoMatch(f"{node.name} ({op(node)}) is neither a softmax nor a sigmoid over the router logits")


def _selection(node: fx.Node, scores: fx.Node, walk: _Walk, E: int) -> tuple[Optional[fx.Node], dict]:
    """The node top-k selects from: scores (+ bias) (masked to the best groups) -> (bias node, group kwargs)."""
    groups: dict = {}
    if is_op(node, "masked_fill"):
        value = scalar_arg(node, 2, "value")
        if not (isinstance(value, float) and math.isinf(value) and value < 0):
            raise _NoMatch(f"{node.name} masks experts with {value!r}, not -inf")
        walk.take(node)
        groups = _group_mask(node.args[1], node.args[0], walk, E)
        node = node.args[0]
    node = walk.strip_casts(node)
    bias = None
    if is_op(node, "add") and len(node.args) == 2:
        a, b = node.args
        b_src = walk.strip_casts(_through_unsqueeze(b, walk)) if isinstance(b, fx.Node) else None
        a_src = walk.strip_casts(_through_unsqueeze(a, walk)) if isinstance(a, fx.Node) else None
        if b_src is not None and b_src.op in ("placeholder", "get_attr"):
            walk.take(node)
            bias, node = b_src, a
        elif a_src is not None and a_src.op in ("placeholder", "get_attr"):
            walk.take(node)
            bias, node = a_src, b
        elif _flat_parameter(b, E):
            walk.take(node)
            bias, node = b, a
        elif _flat_parameter(a, E):
            walk.take(node)
            bias, node = a, b
        else:
            raise _NoMatch(f"{node.name} adds something other than a per-expert bias parameter to the scores")
        v = val(bias)
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != (E,):
            raise _NoMatch(f"the selection bias {bias.name} is not a [E={E}] tensor")
        node = walk.strip_casts(node)
    if node is not scores:
        raise _NoMatch(f"top-k selects from {node.name}, which is not the router scores {scores.name}")
    return bias, groups


def _flat_parameter(node, E: int) -> bool:
    """``node`` is a [E] view of a parameter or buffer stored with other unit dims (ERNIE-4.5 keeps its bias as
    [1, E] and adds ``bias.squeeze()``). The view itself, left outside the region, becomes the op's bias."""
    if not (isinstance(node, fx.Node) and is_op(node, "squeeze", "view", "reshape", "flatten")
            and isinstance(node.args[0], fx.Node) and node.args[0].op in ("placeholder", "get_attr")):
        return False
    v = val(node)
    return isinstance(v, torch.Tensor) and tuple(v.shape) == (E,)


def _through_unsqueeze(node: fx.Node, walk: _Walk) -> fx.Node:
    while is_op(node, "unsqueeze", "view", "reshape") and isinstance(node.args[0], fx.Node) \
            and val(node.args[0]) is not None and val(node.args[0]).dim() == 1:
        walk.take(node)
        node = node.args[0]
    return node


def _group_mask(mask: fx.Node, select: fx.Node, walk: _Walk, E: int) -> dict:
    """~(group mask).bool() of DeepSeek's group-limited routing -> RouterSpec group kwargs."""
    node = mask
    if is_op(node, "invert", "logical_not", "bitwise_not"):
        walk.take(node)
        node = node.args[0]
    else:
        raise _NoMatch(f"the expert mask {mask.name} is not the negation of a group mask")
    node = walk.strip_casts(node)
    if is_op(node, "bool"):
        walk.take(node)
        node = node.args[0]
    if not is_op(node, "reshape", "view", "flatten"):
        raise _NoMatch(f"{node.name} does not flatten a per-group mask")
    walk.take(node)
    node = node.args[0]
    if is_op(node, "expand"):
        walk.take(node)
        node = node.args[0]
    if not is_op(node, "unsqueeze"):
        raise _NoMatch(f"{node.name} does not broadcast a per-group mask over experts")
    walk.take(node)
    node = node.args[0]
    if is_op(node, "zeros_like", "new_zeros", "zeros"):
        # mask = zeros_like(scores); mask.scatter_(1, idx, 1): the in-place scatter is the mask's only writer.
        writers = [u for u in node.users if mutated_arg(u) is node]
        if len(writers) != 1 or not is_op(writers[0], "scatter_"):
            raise _NoMatch(f"the group mask {node.name} is not filled by exactly one scatter_")
        walk.nodes.add(node)
        node = writers[0]
    elif not is_op(node, "scatter"):
        raise _NoMatch(f"{node.name} is not a scatter of the selected groups")
    walk.take(node)
    base, dim, gidx = node.args[0], arg(node, 1, "dim"), arg(node, 2, "index")
    if scalar_arg(node, 3, "value", None) not in (1, 1.0, True):
        raise _NoMatch(f"{node.name} does not mark the selected groups with 1")
    if not (is_op(base, "zeros_like", "new_zeros", "zeros") and dim in (1, -1)):
        raise _NoMatch(f"the group mask {node.name} does not start from zeros")
    walk.nodes.add(base)
    if not (is_op(gidx, "getitem") and gidx.args[1] == 1 and is_op(gidx.args[0], "topk")):
        raise _NoMatch(f"{gidx.name} is not the top-k groups")
    walk.take(gidx)
    gtk = walk.take(gidx.args[0])
    topk_groups = scalar_arg(gtk, 1, "k")
    gscore = gtk.args[0]
    v = val(gscore)
    if not isinstance(topk_groups, int) or not isinstance(v, torch.Tensor) or v.dim() != 2:
        raise _NoMatch(f"{gtk.name} does not pick a constant number of groups from [T, G] group scores")
    G = v.shape[-1]
    if not isinstance(G, int) or E % G:
        raise _NoMatch(f"{G} groups do not divide E={E}")
    # group score: view(T, G, E/G).topk(2)[0].sum(-1)  or  .max(-1)[0] / .amax(-1)
    node = gscore
    walk.take(node)
    if is_op(node, "sum"):
        inner = node.args[0]
        if not (is_op(inner, "getitem") and inner.args[1] == 0 and is_op(inner.args[0], "topk")
                and scalar_arg(inner.args[0], 1, "k") == 2):
            raise _NoMatch(f"group score {node.name} is a sum but not of each group's top 2")
        walk.take(inner)
        grouped = walk.take(inner.args[0]).args[0]
        kind = "top2_sum"
    elif is_op(node, "amax"):
        grouped, kind = node.args[0], "max"
    elif is_op(node, "getitem") and node.args[1] == 0 and is_op(node.args[0], "max"):
        grouped, kind = walk.take(node.args[0]).args[0], "max"
    else:
        raise _NoMatch(f"group score {node.name} ({op(node)}) is neither a top-2 sum nor a max")
    if not is_op(grouped, "view", "reshape") or walk.strip_casts(grouped.args[0]) is not select:
        raise _NoMatch(f"groups are not formed from the selection scores {select.name}")
    walk.take(grouped)
    return {"num_groups": G, "topk_groups": topk_groups, "group_score": kind}


def _weights_chain(w: fx.Node, walk: _Walk) -> tuple[fx.Node, float, bool, float, float]:
    """Peel casts, `* scale` and `/ sum` (`/ (sum + eps)`, `/ clamp(sum, min=m)`) off the final weights ->
    (core node, scale, renormalised, eps, m)."""
    scale, renorm, eps, floor = 1.0, False, 0.0, 0.0
    node = walk.strip_casts(w)
    while True:
        if is_op(node, "mul", "imul") and len(node.args) == 2:
            a, b = node.args
            if isinstance(b, (int, float)) and isinstance(a, fx.Node):
                walk.take(node)
                scale *= float(b)
                node = walk.strip_casts(a)
                continue
            if isinstance(a, (int, float)) and isinstance(b, fx.Node):
                walk.take(node)
                scale *= float(a)
                node = walk.strip_casts(b)
                continue
        if is_op(node, "div", "itruediv", "div_") and len(node.args) == 2 and not renorm:
            num, den = node.args
            if isinstance(den, fx.Node):
                if is_op(den, "add") and isinstance(den.args[1], (int, float)) and den.args[1] >= 0:
                    walk.take(den)
                    den, eps = den.args[0], float(den.args[1])
                elif is_op(den, "clamp", "clamp_min") and isinstance(den.args[0], fx.Node):
                    lo = scalar_arg(den, 1, "min")
                    hi = scalar_arg(den, 2, "max") if is_op(den, "clamp") else None
                    if isinstance(lo, (int, float)) and lo > 0 and hi is None:
                        walk.take(den)
                        den, floor = den.args[0], float(lo)
                if is_op(den, "sum") and den.args[0] is num and _last_dim(den, 1, "dim", None) and \
                        (arg(den, 2, "keepdim", False) is True):
                    walk.take(node)
                    walk.take(den)
                    renorm = True
                    node = walk.strip_casts(num)
                    continue
        return node, scale, renorm, eps, floor


def recognise_router(topk_weights: fx.Node, topk_ids: fx.Node,
                     applied_dtype: Optional[torch.dtype] = None) -> RouterMatch:
    """The router that produced ``topk_weights`` / ``topk_ids`` ([T, K] each), or an external one.

    ``applied_dtype``: the weights' dtype where the experts use them, if a cast after ``topk_weights`` changes it
    (a loop's ``w[tok, slot, None].to(x.dtype)``); the spec then rounds the weights to it."""
    try:
        return _recognise(topk_weights, topk_ids, applied_dtype)
    except _NoMatch as exc:
        k = _k_of(topk_ids)
        return RouterMatch(RouterSpec(top_k=k, external=True, dtype=None), topk_weights, topk_ids,
                           reason=str(exc), kind="external")


def _k_of(ids: fx.Node) -> int:
    """k of [..., K] ids (1 for the 1-D ids of an argmax)."""
    v = val(ids)
    if isinstance(v, torch.Tensor) and v.dim() >= 2 and isinstance(v.shape[-1], int):
        return v.shape[-1]
    return 1


def _recognise(w: fx.Node, ids: fx.Node, applied_dtype: Optional[torch.dtype]) -> RouterMatch:
    walk = _Walk()
    walk.take(w)
    ids_core = walk.strip_casts(ids, allow_int=True)
    tk, k = _topk_parts(ids_core, walk)
    first_max = is_op(tk, "max")   # ties to the lowest id, which topk does not promise
    core, scale, renorm, eps, floor = _weights_chain(w, walk)
    if is_op(core, "getitem") and core.args[0] is tk and core.args[1] == 0:
        # softmax -> topk: weights are the top-k probabilities.
        walk.take(core)
        scoring, logits, dtype = _scores(tk.args[0], walk)
        if scoring != "softmax":
            raise _NoMatch("a sigmoid router must gather its weights from the unbiased scores")
        spec = RouterSpec(top_k=k, renormalize=renorm, scaling_factor=scale, dtype=dtype, renorm_min=floor,
                          renorm_eps=_eps(renorm, eps, scoring), first_max=first_max)
        kind = "softmax-topk"
    elif is_op(core, "softmax"):
        # topk -> softmax over the k logits.
        values = _topk_values(tk)
        if values is None or walk.strip_casts(core.args[0]) is not values or not _last_dim(core, 1, "dim", None):
            raise _NoMatch(f"{core.name} is not a softmax over the top-k values of {tk.name}")
        walk.take(core)
        walk.take(values)
        upcast = _dtype_of(core) == torch.float32
        logits = walk.strip_casts(tk.args[0])
        if renorm:
            raise _NoMatch("renormalising softmax weights that already sum to one")
        dtype = torch.float32 if upcast else None
        spec = RouterSpec(top_k=k, topk_first=True, renormalize=False, scaling_factor=scale, dtype=dtype,
                          first_max=first_max)
        kind = "topk-softmax"
    elif is_op(core, "gather"):
        walk.take(core)
        src, index = core.args[0], arg(core, 2, "index")
        if not _last_dim(core, 1, "dim", None) or walk.strip_casts(index, allow_int=True) is not ids_core:
            raise _NoMatch(f"{core.name} does not gather the scores at the selected experts")
        scores = walk.strip_casts(src)
        scoring, logits, dtype = _scores(scores, walk)
        E = val(logits).shape[-1]
        bias, groups = _selection(tk.args[0], scores, walk, E)
        spec = RouterSpec(top_k=k, scoring=scoring, renormalize=renorm, scaling_factor=scale, dtype=dtype,
                          selection_bias=bias is not None, renorm_min=floor, renorm_eps=_eps(renorm, eps, scoring),
                          first_max=first_max, **groups)
        kind = f"{scoring}-topk" + ("-grouped" if groups else "")
        return _finish(spec, w, ids, logits, bias, walk, kind, applied_dtype)
    else:
        raise _NoMatch(f"the routing weights {w.name} come from {core.name} ({op(core)}), not a recognised router")
    return _finish(spec, w, ids, logits, None, walk, kind, applied_dtype)


def _eps(renorm: bool, eps: float, scoring: str) -> Optional[float]:
    """RouterSpec.renorm_eps for the epsilon the code adds to the sum: None where it is the scoring's default."""
    if not renorm or eps == default_renorm_eps(scoring):
        return None
    return eps


def _finish(spec: RouterSpec, w, ids, logits, bias, walk: _Walk, kind: str,
            applied_dtype: Optional[torch.dtype] = None) -> RouterMatch:
    v = val(logits)
    if not isinstance(v, torch.Tensor) or v.dim() not in (2, 3) or not v.is_floating_point():
        raise _NoMatch(f"the router logits {logits.name} are not a floating [T, E] or [B, S, E] tensor")
    E = v.shape[-1]
    if not isinstance(E, int):
        raise _NoMatch("the number of experts is not static")
    compute = v.dtype if spec.dtype is None else torch.promote_types(spec.dtype, v.dtype)
    out = applied_dtype or _dtype_of(w)
    if out is not None and out.is_floating_point and out != compute and \
            torch.finfo(out).bits <= torch.finfo(compute).bits:
        # the model rounds its routing weights (``.to(hidden_states.dtype)``); the op rounds them the same way
        spec = dataclasses.replace(spec, weights_dtype=out)
    try:
        spec.validate_for(E)
    except ValueError as exc:
        raise _NoMatch(str(exc)) from None
    return RouterMatch(spec, w, ids, logits=logits, selection_bias=bias, nodes=frozenset(walk.nodes), kind=kind)
