"""transformers v5 experts (``@use_experts_implementation``): the ``grouped_mm`` and ``batched_mm`` graphs.

Most MoE models in transformers 5 (Mixtral, Qwen2/3-MoE, DeepSeek-V3, GPT-OSS, ...) keep their experts as two
stacked parameters, ``gate_up_proj`` and ``down_proj``, and dispatch through ``transformers/integrations/moe.py``.
A whole model (``*ForCausalLM(config)``) defaults to ``experts_implementation="grouped_mm"`` and dynamo captures
its MoE block in one graph; this module turns each such block into a ``Match``.

Entry points: the patterns ``transformers.grouped_mm``, ``transformers.batched_mm`` and
``transformers.eager_loop`` (family ``"transformers"``), registered at import.

What the graphs look like (K top-k, S = T*K (token, slot) pairs; ``[...]`` marks optional nodes):

    grouped_mm:  ids_S = topk_ids.reshape(-1);  w_S = topk_weights.reshape(-1)
                 ids_g, perm = sort(ids_S);  xs = x[perm // K];  w_g = w_S[perm]
                 offs = cumsum(histc(ids_g.float(), bins=E, min=0, max=E-1), 0, dtype=int32)
                 h = grouped_mm(xs[.to], W1, offs)   [h.add_(b1[ids_g])]     W1 = gate_up_proj(.transpose(-2, -1))
                 a = gate(h)                                                  (see "Expert gates" below)
                 y = grouped_mm(a[.to], W2, offs)    [y.add_(b2[ids_g])]     W2 = down_proj(.transpose(-2, -1))
                 z = y * w_g.unsqueeze(-1);  inv = empty_like(perm);  inv[perm] = arange(S)
                 out = z[inv].view(T, K, D).sum(1)[.to(dtype)]
    batched_mm:  xs = x.repeat_interleave(K, 0);  h = bmm(W1[ids_S], xs.unsqueeze(-1)).squeeze(-1)
                 (transposed layout: bmm(xs.unsqueeze(1), W1[ids_S]).squeeze(1)); same gate; same for W2;
                 out = (y * w_S.unsqueeze(-1)).view(T, K, D).sum(1)[.to(dtype)]

``grouped_mm`` is ``torch._grouped_mm`` in bf16 graphs and ``torch.ops.transformers.grouped_mm_fallback`` in fp32
ones; ``moe_fuser.fx.graph.op`` names both "grouped_mm". ``is_transposed`` experts (GPT-OSS) store
``gate_up_proj [E, D, 2F]`` and use it untransposed; the Match then hands the op a transposed view (the op's
layout is nn.Linear's ``[E, out, in]``), which the rewrite inserts.

Expert gates (``self._apply_gate`` / ``self.act_fn``):

    concat      g, u = h.chunk(2, -1);  act(g) * u                                  (default; act in silu, gelu,
                                                                                     gelu_tanh, relu, relu2)
                [g = g.clamp(max=L);  u = u.clamp(-L, L) before that]               (DeepSeek-V4: ExpertSpec limit)
    interleaved g, u = h[..., ::2], h[..., 1::2];  g = g.clamp(max=L);  u = u.clamp(-L, L)
                (u + 1) * (g * sigmoid(g * alpha))                                  (GPT-OSS: activation gpt_oss;
                                                                                     MiniMax-M3: the same on
                                                                                     concat halves)
    plain       act(h)                                                              (``has_gate=False``)

The router in front (``topk_weights``, ``topk_ids``) is recognised by ``moe_fuser.patterns.routers``: a known
router is folded into the op (its logits node stays outside the region, so ``output_router_logits`` and the
aux loss still read it); an unknown one stays as written and the op takes its top-k weights and ids.

A shared expert added to the routed output is folded in too (``SharedExpertSpec``):
``routed + shared_mlp(x)`` (DeepSeek-V3, possibly after a view back to ``[B, S, D]``) or
``routed + sigmoid(x @ gate^T) * shared_mlp(x)`` (Qwen2-MoE), with ``shared_mlp`` a plain bias-free
``down(act(gate(x)) * up(x))`` or ``down(act(up(x)))``. Anything else after the routed output is left alone.

Expert-parallel sentinels: transformers marks pairs another rank owns with ids >= E. With the flag
``_is_expert_parallel`` (always in 5.0-5.17) the graphs carry ``mask = ids >= E``, a clamp of the ids to E-1,
``masked_fill(mask, 0)`` on the sorted rows and on each projection (grouped_mm) or on the routing weights
(batched_mm): such a pair adds nothing. The walk takes these nodes into the region; the match is kept only when
the router is recognised (its ids come from a top-k over E scores, so none is a sentinel and the masking is the
identity), and rejected with an external router, whose ids could be sentinels the op does not know.

Invariants: every node the walk visits (and only those) is the region; the first mismatch ends the walk with
a ``Rejection`` naming the node and what was expected; post-expert norms and any other extra node therefore
reject, never silently fuse.

``transformers.eager_loop`` fuses nothing: it recognises the preamble of transformers' own eager experts loop
(``one_hot(ids, E+1).permute(2, 1, 0)`` -> ``sum`` -> ``greater(0)`` -> ``nonzero`` as a graph output: the loop
``for expert_idx in expert_hit`` iterates a data-dependent tensor, so dynamo always breaks the graph there) and
records why the block stays unfused and how to fix it (``experts_implementation="grouped_mm"``).

Legend: T tokens, D model dim, F expert hidden dim, H = F or 2F, E experts, K top-k, S = T*K.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional, Union

import torch
import torch.fx as fx

from ..fx import graph as fxg
from ..spec import ExpertSpec, MoESpec, MoEWeights, SharedExpertSpec
from .base import Match, MatchContext, Rejection, register_pattern

__all__ = ["FAMILY", "find_batched_mm", "find_eager_loop", "find_grouped_mm", "match_shared_expert"]

FAMILY = "transformers"

# Canonical op names of the plain activations transformers' ACT2FN produces in a dynamo graph.
_PLAIN_ACTS = ("silu", "gelu", "relu")
_CASTS = ("to", "float", "type", "bfloat16", "half")
_ID_CASTS = _CASTS + ("int", "long")  # histc reads the sorted ids as float on CPU, as int32 on CUDA


class _Miss(Exception):
    """The walk met something it does not understand: the candidate becomes a Rejection with this reason."""


def _want(cond: bool, reason: str) -> None:
    if not cond:
        raise _Miss(reason)


def _is(node, *names: str) -> bool:
    return fxg.is_op(node, *names)


def _expect(node, names: tuple, what: str) -> fx.Node:
    _want(_is(node, *names), f"expected {what} ({'/'.join(names)}), found {_describe(node)}")
    return node


def _describe(node) -> str:
    if isinstance(node, fx.Node):
        return f"{fxg.op(node) or node.op} ({node.name})"
    return repr(node)


def _shape(node) -> Optional[tuple]:
    v = fxg.val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _int(node, index: int, name: str, default=None):
    a = fxg.arg(node, index, name, default)
    return a if isinstance(a, int) and not isinstance(a, bool) else None


def _users(node: fx.Node, region: set) -> list[fx.Node]:
    """Users of ``node`` that are not yet part of the region (in graph order)."""
    return [u for u in node.users if u not in region]


def _only_user(node: fx.Node, region: set, what: str) -> fx.Node:
    users = _users(node, region)
    _want(len(users) == 1, f"{node.name} should feed only {what}; it has {len(users)} other users "
                           f"({', '.join(u.name for u in users)})")
    return users[0]


def _strip_casts(node, region: set, casts: tuple = _CASTS):
    """Follow ``.to(dtype)``/``.float()`` casts up from ``node``, adding them to the region."""
    while _is(node, *casts) and isinstance(node.args[0], fx.Node):
        region.add(node)
        node = node.args[0]
    return node


def _follow_cast(node: fx.Node, region: set) -> fx.Node:
    """Follow at most one dtype cast down from ``node`` (a single-user ``.to``), adding it to the region."""
    users = _users(node, region)
    if len(users) == 1 and _is(users[0], *_CASTS):
        region.add(users[0])
        return users[0]
    return node


def _inplace_bias(h: fx.Node, region: set, ids_node: fx.Node, what: str) -> tuple[Optional[fx.Node], list]:
    """``h.add_(b[ids])`` right after a projection: (the bias parameter node or None, remaining users of h)."""
    users = _users(h, region)
    adds = [u for u in users if _is(u, "add_") and u.args[0] is h]
    if not adds:
        return None, users
    _want(len(adds) == 1, f"{h.name}: more than one in-place add after the {what} projection")
    add = adds[0]
    sel = add.args[1]
    _want(_is(sel, "getitem") and sel.args[1] is ids_node,
          f"{add.name}: the {what} bias should be indexed by the sorted expert ids; found {_describe(sel)}")
    _want(not _users(add, region), f"{add.name}: the in-place bias add's result is read directly")
    region.update((add, sel))
    return sel.args[0], [u for u in users if u is not add]


def _sentinel_mask(ids: fx.Node, E: int, region: set) -> Optional[fx.Node]:
    """transformers' expert-parallel sentinel mask ``(ids >= E)[.unsqueeze(-1)]`` read from ``ids``, if any, with
    the in-place ``ids.clamp_(max=E-1)`` beside it (both join the region); returns the mask node."""
    ges = [u for u in ids.users if _is(u, "ge") and u.args[0] is ids and u.args[1] == E]
    if not ges:
        return None
    _want(len(ges) == 1, f"{ids.name}: more than one sentinel comparison ids >= {E}")
    mask = ges[0]
    region.add(mask)
    if len(mask.users) == 1 and _is(next(iter(mask.users)), "unsqueeze"):
        mask = next(iter(mask.users))
        _want(fxg.arg(mask, 1, "dim") in (-1, 1), f"{mask.name}: expected the sentinel mask unsqueezed at -1")
        region.add(mask)
    for u in _users(ids, region):
        if _is(u, "clamp_"):
            _want(fxg.arg(u, 1, "min") is None and fxg.arg(u, 2, "max") == E - 1 and not u.users,
                  f"{u.name}: expected the sentinel clamp ids.clamp_(max={E - 1})")
            region.add(u)
    return mask


def _unmasked(node: fx.Node, mask: Optional[fx.Node], region: set) -> fx.Node:
    """Skip the in-place ``node.masked_fill_(mask, 0)`` among ``node``'s users (into the region)."""
    if mask is not None:
        for u in _users(node, region):
            if _is(u, "masked_fill_") and u.args[0] is node and u.args[1] is mask and u.args[2] == 0 and not u.users:
                region.add(u)
    return node


def _past_mask(node: fx.Node, users: list, mask: Optional[fx.Node], region: set) -> tuple[fx.Node, list]:
    """Step over ``node.masked_fill(mask, 0)`` when it is ``node``'s only remaining user: (new node, its users)."""
    if mask is None or len(users) != 1:
        return node, users
    u = users[0]
    if _is(u, "masked_fill") and u.args[0] is node and u.args[1] is mask and u.args[2] == 0:
        region.add(u)
        return u, _users(u, region)
    return node, users


# ---------------------------------------------------------------------------------------------- expert gates
@dataclass
class _Gate:
    activation: str
    glu: Optional[str]
    out: fx.Node
    alpha: float = 1.702
    limit: Optional[float] = None   # gate/up clamp (GPT-OSS, DeepSeek-V4)


def _plain_act(node: fx.Node) -> Optional[str]:
    """The ExpertSpec activation name of an activation node, or None."""
    name = fxg.op(node)
    if name not in _PLAIN_ACTS or node.kwargs.get("inplace"):
        return None
    if name == "gelu":
        approx = fxg.arg(node, 1, "approximate", "none")
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(approx)
    return name


def _act_from_input(first: fx.Node) -> Optional[tuple[str, fx.Node, list]]:
    """The activation that starts at node ``first``: (ExpertSpec name, its output node, its nodes), or None.
    ``relu`` then a square of it is ``relu2``."""
    name = _plain_act(first)
    if name is None:
        return None
    if name == "relu" and len(first.users) == 1:
        sq = next(iter(first.users))
        if fxg.squared_relu(sq) is first:
            return "relu2", sq, [first, sq]
    return name, first, [first]


def _act_from_output(out) -> Optional[tuple[str, fx.Node, list]]:
    """The activation that ends at node ``out``: (ExpertSpec name, its input, its nodes), or None."""
    r = fxg.squared_relu(out)
    if r is not None:
        return "relu2", r.args[0], [out, r]
    name = _plain_act(out) if isinstance(out, fx.Node) else None
    return (name, out.args[0], [out]) if name else None


def _match_gate(h: fx.Node, users: list, region: set) -> _Gate:
    """Recognise the gate applied to the first projection's output ``h`` (see the module docstring)."""
    _want(len(users) in (1, 2), f"{h.name}: the first projection's output has {len(users)} users; expected a gate")
    if len(users) == 1 and _is(users[0], "chunk"):
        return _concat_gate(users[0], region)
    if len(users) == 1 and _act_from_input(users[0]) is not None:
        name, out, nodes = _act_from_input(users[0])
        region.update(nodes)
        return _Gate(name, None, out)
    if len(users) == 2 and all(_is(u, "getitem") for u in users):
        return _interleaved_gate(h, users, region)
    raise _Miss(f"{h.name}: unrecognised expert gate starting at {', '.join(_describe(u) for u in users)}")


def _concat_gate(chunk: fx.Node, region: set) -> _Gate:
    _want(fxg.arg(chunk, 1, "chunks") == 2 and fxg.arg(chunk, 2, "dim", 0) in (-1, 1),
          f"{chunk.name}: gate_up should be split in two along the last dim")
    region.add(chunk)
    parts = {u.args[1]: u for u in chunk.users if _is(u, "getitem")}
    _want(set(parts) == {0, 1} and len(chunk.users) == 2, f"{chunk.name}: expected the gate and up halves")
    gate, up = parts[0], parts[1]
    region.update((gate, up))
    gate, up = _same_dtype_cast(gate, region, "gate"), _same_dtype_cast(up, region, "up")
    act = _only_user(gate, region, "the activation")
    limit = None
    if _is(act, "clamp", "clamp_max"):  # DeepSeek-V4: gate.clamp(max=L), up.clamp(-L, L), then act(gate) * up
        gate, up, limit = _clamped(gate, _only_user(up, region, "the up clamp"), region)
        if len(_users(gate, region)) == 2:   # GPT-OSS's clamped SwiGLU on concatenated halves (MiniMax-M3)
            return _gpt_oss_gate(gate, up, limit, region, "concat")
        act = _only_user(gate, region, "the activation")
    found = _act_from_input(act)
    _want(found is not None, f"unsupported expert activation {_describe(act)}; supported: silu, gelu, gelu_tanh, "
                             "relu, relu2")
    name, act, nodes = found
    region.update(nodes)
    mul = _only_user(act, region, "the gate product")
    _want(_is(mul, "mul") and set(mul.args) == {act, up} and list(up.users) == [mul],
          f"{mul.name}: expected act(gate) * up, found {_describe(mul)}")
    region.add(mul)
    return _Gate(name, "concat", mul, limit=limit)   # casts after it: the down projection strips them


def _same_dtype_cast(node: fx.Node, region: set, what: str) -> fx.Node:
    """``node``'s only user when it is a cast that keeps the dtype (Beam's ``gate.float()`` in an fp32 model),
    added to the region; else ``node``. A cast that changes the dtype is refused: the GLU would be computed in
    another precision than the fused op's."""
    users = _users(node, region)
    if len(users) != 1 or not _is(users[0], *_CASTS):
        return node
    cast, src, dst = users[0], getattr(fxg.val(node), "dtype", None), getattr(fxg.val(users[0]), "dtype", None)
    _want(src is not None and src == dst, f"{cast.name}: the {what} is cast from {src} to {dst} inside the gate; the "
                                          f"fused op computes the gate in the experts' dtype, which rounds differently")
    region.add(cast)
    return cast


def _const(node, default=None):
    return node if isinstance(node, (int, float)) and not isinstance(node, bool) else default


def _clamped(gate: fx.Node, uc: fx.Node, region: set) -> tuple[fx.Node, fx.Node, float]:
    """The clamps of GPT-OSS and DeepSeek-V4 on the gate half (``gate``'s only user: from above) and the up half
    (``uc``: to [-L, L]): (clamped gate, clamped up, L)."""
    gc = _expect(_only_user(gate, region, "a clamp"), ("clamp", "clamp_max"), "the gate clamp")
    _expect(uc, ("clamp",), "the up clamp")
    bound = fxg.arg(gc, 2, "max") if _is(gc, "clamp") else fxg.arg(gc, 1, "max")
    _want(not isinstance(bound, fx.Node), f"{gc.name}: the clamp limit is a traced value, not a constant (dynamo "
                                          "makes a float attribute a graph input under dynamic=True or once it "
                                          "changed between calls; torch._dynamo.config.specialize_float = True "
                                          "keeps it a constant, guarded)")
    limit = _const(bound)
    _want(limit is not None and limit > 0 and (not _is(gc, "clamp") or fxg.arg(gc, 1, "min") is None),
          f"{gc.name}: the gate should be clamped from above only, by a positive constant")
    _want(_const(fxg.arg(uc, 1, "min")) == -limit and _const(fxg.arg(uc, 2, "max")) == limit,
          f"{uc.name}: the up half should be clamped to [-{limit}, {limit}]")
    region.update((gc, uc))
    return gc, uc, float(limit)


def _interleaved_gate(h: fx.Node, users: list, region: set) -> _Gate:
    """GPT-OSS: gate = h[..., ::2], up = h[..., 1::2], clamped SwiGLU with alpha and limit."""
    def step(n):
        idx = n.args[1]
        if not (isinstance(idx, tuple) and len(idx) == 2 and idx[0] is Ellipsis and isinstance(idx[1], slice)):
            return None
        s = idx[1]
        return (s.start or 0, s.stop, s.step)
    steps = {step(u): u for u in users}
    _want(set(steps) == {(0, None, 2), (1, None, 2)}, f"{h.name}: expected interleaved gate/up halves "
                                                      "h[..., ::2] and h[..., 1::2]")
    gate, up = steps[(0, None, 2)], steps[(1, None, 2)]
    region.update((gate, up))
    gc, uc, limit = _clamped(gate, _only_user(up, region, "a clamp"), region)
    return _gpt_oss_gate(gc, uc, limit, region, "interleaved")


def _gpt_oss_gate(gc: fx.Node, uc: fx.Node, limit: float, region: set, layout: str) -> _Gate:
    """GPT-OSS's gate on the clamped halves ``gc``, ``uc``: (up + 1) * (gate * sigmoid(gate * alpha))."""
    gusers = _users(gc, region)
    _want(len(gusers) == 2, f"{gc.name}: the clamped gate should feed gate*alpha and the product")
    scale = next((u for u in gusers if _is(u, "mul") and _const(u.args[1]) is not None), None)
    _want(scale is not None, f"{gc.name}: expected gate * alpha")
    alpha = float(scale.args[1])
    sig = _expect(_only_user(scale, region, "sigmoid"), ("sigmoid",), "sigmoid(gate * alpha)")
    glu = _only_user(sig, region, "the gate product")
    _want(_is(glu, "mul") and set(glu.args) == {gc, sig}, f"{glu.name}: expected gate * sigmoid(gate * alpha)")
    add1 = _only_user(uc, region, "up + 1")
    _want(_is(add1, "add") and add1.args[0] is uc and _const(add1.args[1]) == 1, f"{add1.name}: expected up + 1")
    region.update((scale, sig, glu, add1))
    out = _only_user(add1, region, "the gated product")
    _want(_is(out, "mul") and set(out.args) == {add1, glu} and _only_user(glu, region, "the product") is out,
          f"{out.name}: expected (up + 1) * glu")
    region.add(out)
    return _Gate("gpt_oss", layout, out, alpha=alpha, limit=limit)


# ------------------------------------------------------------------------------------------- the combine tail
def _combine_tail(z: fx.Node, region: set, K: int, D: int) -> fx.Node:
    """``z.view(T, K, D).sum(1)[.to(dtype)]``: returns the output node."""
    view = _expect(_only_user(z, region, "the [T, K, D] view"), ("view", "reshape"), "view(T, K, D)")
    shape = view.args[1:] if len(view.args) > 2 else view.args[1]
    _want(len(shape) == 3 and shape[1] == K and shape[2] == D, f"{view.name}: expected view(T, {K}, {D})")
    region.add(view)
    total = _expect(_only_user(view, region, "sum over the K slots"), ("sum",), "sum(dim=1)")
    _want(fxg.arg(total, 1, "dim") in (1, (1,), [1]) and not fxg.arg(total, 2, "keepdim", False),
          f"{total.name}: expected a sum over dim 1")
    region.add(total)
    return _follow_cast(total, region)


def _weighted(y: fx.Node, users: list, w_node_ok, region: set) -> fx.Node:
    """``y * w.unsqueeze(-1)`` where ``w_node_ok(w)`` accepts the routing-weight node."""
    if not (len(users) == 1 and _is(users[0], "mul")):
        _want(not _normalises(y), f"{y.name}: a norm of each expert's output (transformers' has_post_expert_norm, "
                                  "an RMSNorm) comes before the routing weight; the fused op has no post-expert norm")
        raise _Miss(f"{y.name}: the down projection should be multiplied by the routing weights; found "
                    f"{', '.join(_describe(u) for u in users) or 'no user'}")
    mul = users[0]
    other = mul.args[1] if mul.args[0] is y else mul.args[0]
    _want(_is(other, "unsqueeze") and fxg.arg(other, 1, "dim") in (-1, 1) and w_node_ok(other.args[0]),
          f"{mul.name}: expected y * routing_weights.unsqueeze(-1)")
    region.update((mul, other))
    return mul


def _normalises(y: fx.Node, depth: int = 6) -> bool:
    """Whether a norm of ``y`` follows it closely: an ``rsqrt`` (RMSNorm's ``x * rsqrt(mean(x^2) + eps)``) or a norm op
    within ``depth`` steps (only to name the reason of a rejection)."""
    frontier = [y]
    for _ in range(depth):
        frontier = [u for n in frontier for u in n.users]
        if any(_is(u, "rsqrt", "norm", "rms_norm", "layer_norm") for u in frontier):
            return True
    return False


def _flat(node, region: set, what: str) -> fx.Node:
    """``t.reshape(-1)`` / ``t.view(-1)``: returns ``t``."""
    _expect(node, ("reshape", "view", "flatten"), f"{what}.reshape(-1)")
    _want(fxg.op(node) == "flatten" or tuple(node.args[1:]) in ((-1,), ((-1,),), ([-1],)),
          f"{node.name}: expected {what}.reshape(-1)")
    region.add(node)
    return node.args[0]


# ----------------------------------------------------------------------------------------------- the experts
@dataclass
class _Experts:
    """What the experts walk found: the boundary nodes and the expert description."""

    x: fx.Node
    topk_weights: fx.Node
    topk_ids: fx.Node
    output: fx.Node
    w1: fx.Node
    w2: fx.Node
    b1: Optional[fx.Node]
    b2: Optional[fx.Node]
    transposed: bool
    gate: _Gate
    num_experts: int
    top_k: int
    anchor: fx.Node
    region: set = field(default_factory=set)
    sentinels: bool = False  # transformers' expert-parallel sentinel masking is in the region


def _weight_param(w: fx.Node, region: set, E: int, what: str) -> tuple[fx.Node, bool]:
    """The [E, ...] weight behind a projection argument: (node, transposed-storage?)."""
    if _is(w, "transpose"):
        dims = tuple(w.args[1:3]) if len(w.args) >= 3 else ()
        _want(dims in ((-2, -1), (-1, -2), (1, 2), (2, 1)), f"{w.name}: expected {what}.transpose(-2, -1)")
        region.add(w)
        w = w.args[0]
        transposed = False
    else:
        transposed = True
    shape = _shape(w)
    _want(shape is not None and len(shape) == 3 and shape[0] == E,
          f"{what} should be a stacked [E={E}, ., .] tensor; found {_describe(w)} with shape {shape}")
    return w, transposed


def _walk_grouped(ctx: MatchContext, offs: fx.Node) -> _Experts:
    region: set = {offs}
    _want(fxg.arg(offs, 1, "dim") == 0 and offs.kwargs.get("dtype") in (torch.int32, None),
          f"{offs.name}: offsets should be cumsum(tokens_per_expert, dim=0)")
    hist = _expect(offs.args[0], ("histc",), "histc(expert ids)")
    region.add(hist)
    E = _int(hist, 1, "bins")
    _want(E is not None and fxg.arg(hist, 2, "min") == 0 and fxg.arg(hist, 3, "max") == E - 1,
          f"{hist.name}: expected histc(ids, bins=E, min=0, max=E-1)")
    ids_g = _strip_casts(hist.args[0], region, _ID_CASTS)
    _want(_is(ids_g, "getitem") and ids_g.args[1] == 0 and _is(ids_g.args[0], "sort"),
          f"{hist.name}: the histogram should count sort(expert_ids).values")
    sort = ids_g.args[0]
    region.update((ids_g, sort))
    perms = [u for u in sort.users if _is(u, "getitem") and u.args[1] == 1]
    _want(len(perms) == 1, f"{sort.name}: expected the sort permutation")
    perm = perms[0]
    region.add(perm)
    topk_ids = _flat(sort.args[0], region, "topk_ids")
    mask = _sentinel_mask(ids_g, E, region)

    mms = sorted((u for u in offs.users if _is(u, "grouped_mm")), key=lambda n: ctx.position[n])
    _want(len(mms) == 2 and len(offs.users) == 2,
          f"{offs.name}: expected exactly two grouped matmuls (up and down) on these offsets; found "
          f"{', '.join(_describe(u) for u in offs.users)}")
    mm1, mm2 = mms
    region.update(mms)

    # Up projection and its input rows x[perm // K].
    xs = _strip_casts(mm1.args[0], region)
    _want(_is(xs, "getitem") and _is(xs.args[1], "floordiv") and xs.args[1].args[0] is perm,
          f"{mm1.name}: its input should be hidden_states[perm // top_k]; found {_describe(xs)}")
    K = xs.args[1].args[1]
    _want(isinstance(K, int) and K >= 1, f"{xs.args[1].name}: top_k should be a constant")
    region.update((xs, xs.args[1]))
    _unmasked(xs, mask, region)
    x = xs.args[0]
    w1, t1 = _weight_param(mm1.args[1], region, E, "gate_up_proj")
    b1, users = _inplace_bias(mm1, region, ids_g, "up")
    h, users = _past_mask(mm1, users, mask, region)
    gate = _match_gate(h, users, region)

    # Down projection.
    a = _strip_casts(mm2.args[0], region)
    _want(a is gate.out, f"{mm2.name}: the down projection should read the gate's output {gate.out.name}")
    w2, t2 = _weight_param(mm2.args[1], region, E, "down_proj")
    _want(t1 == t2, "gate_up_proj and down_proj disagree on being transposed")
    b2, users = _inplace_bias(mm2, region, ids_g, "down")
    y, users = _past_mask(mm2, users, mask, region)

    # Routing weights in sorted order, the inverse permutation, the combine.
    topk_weights = []

    def sorted_weights(w):
        if _is(w, "getitem") and w.args[1] is perm and _is(w.args[0], "reshape", "view", "flatten"):
            topk_weights.append(w)
            return True
        return False
    z = _weighted(y, users, sorted_weights, region)
    w_g = topk_weights[0]
    region.add(w_g)
    topk_w = _flat(w_g.args[0], region, "topk_weights")
    zi = _only_user(z, region, "the inverse permutation")
    _want(_is(zi, "getitem") and _is(zi.args[1], "empty_like") and zi.args[1].args[0] is perm,
          f"{zi.name}: expected weighted_out[inverse permutation]")
    inv = zi.args[1]
    sets = [u for u in inv.users if _is(u, "setitem")]
    _want(len(sets) == 1 and sets[0].args[1] is perm and _is(sets[0].args[2], "arange"),
          f"{inv.name}: expected inv_perm[perm] = arange(S)")
    region.update((zi, inv, sets[0], sets[0].args[2]))
    D = _shape(x)[-1] if _shape(x) else None
    output = _combine_tail(zi, region, K, D)
    return _Experts(x, topk_w, topk_ids, output, w1, w2, b1, b2, t1, gate, E, K, mm1, region, mask is not None)


def _picks_expert_weights(node) -> bool:
    """``W[expert_ids]`` with a stacked [E, ., .] ``W``: per-pair expert weights for a bmm."""
    return _is(node, "getitem") and isinstance(node.args[1], fx.Node) and _shape(node.args[0]) is not None \
        and len(_shape(node.args[0])) == 3


def _is_up_projection(bmm: fx.Node) -> bool:
    """``bmm(W[ids], xs.unsqueeze(-1))`` or ``bmm(xs.unsqueeze(1), W[ids])`` with ``xs`` repeated per slot."""
    if sum(_picks_expert_weights(a) for a in bmm.args[:2]) != 1:
        return False
    vec = bmm.args[1] if _picks_expert_weights(bmm.args[0]) else bmm.args[0]
    if not _is(vec, "unsqueeze"):
        return False
    return _is(_strip_casts(vec.args[0], set()), "repeat_interleave")


def _walk_batched(ctx: MatchContext, bmm1: fx.Node) -> _Experts:
    region: set = {bmm1}
    # Plain layout: bmm(W[ids] [S, out, in], xs.unsqueeze(-1)); transposed: bmm(xs.unsqueeze(1), W[ids]).
    transposed = not _picks_expert_weights(bmm1.args[0])
    sel1, vec1 = (bmm1.args[1], bmm1.args[0]) if transposed else (bmm1.args[0], bmm1.args[1])
    _want(_is(sel1, "getitem") and isinstance(sel1.args[1], fx.Node),
          f"{bmm1.name}: expected weights indexed by the expert ids")
    ids_S = sel1.args[1]
    w1 = sel1.args[0]
    shape = _shape(w1)
    _want(shape is not None and len(shape) == 3, f"{w1.name}: expected a stacked [E, ., .] weight")
    E = shape[0]
    region.add(sel1)
    flat_ids, mask = ids_S, None
    if _is(ids_S, "clamp"):  # sentinel clamp (see the module docstring)
        _want(fxg.arg(ids_S, 1, "min") == 0 and fxg.arg(ids_S, 2, "max") == E - 1,
              f"{ids_S.name}: expected the sentinel clamp ids.clamp(0, {E - 1})")
        region.add(ids_S)
        flat_ids = ids_S.args[0]
        mask = _sentinel_mask(flat_ids, E, region)
    topk_ids = _flat(flat_ids, region, "topk_ids")
    _want(_is(vec1, "unsqueeze") and fxg.arg(vec1, 1, "dim") == (1 if transposed else -1),
          f"{vec1.name}: expected the token rows unsqueezed for bmm")
    rep = _strip_casts(vec1.args[0], region)
    _want(_is(rep, "repeat_interleave") and fxg.arg(rep, 2, "dim") == 0,
          f"{vec1.name}: expected hidden_states.repeat_interleave(top_k, dim=0)")
    K = fxg.arg(rep, 1, "repeats")
    _want(isinstance(K, int), f"{rep.name}: top_k should be a constant")
    region.update((vec1, rep))
    x = rep.args[0]

    def squeeze_of(b):
        sq = _expect(_only_user(b, region, "squeeze"), ("squeeze",), "bmm(...).squeeze()")
        region.add(sq)
        return sq

    h = squeeze_of(bmm1)
    b1, users = _inplace_bias(h, region, ids_S, "up")
    gate = _match_gate(h, users, region)

    uns = _only_user(gate.out, region, "the down projection")
    _want(_is(uns, "unsqueeze"), f"{uns.name}: expected the gate output unsqueezed for bmm")
    bmm2 = _expect(_only_user(uns, region, "bmm"), ("bmm",), "the down projection bmm")
    sel2 = bmm2.args[1] if transposed else bmm2.args[0]
    _want(_is(sel2, "getitem") and sel2.args[1] is ids_S and (bmm2.args[0] if transposed else bmm2.args[1]) is uns,
          f"{bmm2.name}: expected down_proj[expert_ids] applied to the gate output")
    w2 = sel2.args[0]
    _want(_shape(w2) is not None and len(_shape(w2)) == 3 and _shape(w2)[0] == E,
          f"{w2.name}: expected a stacked [E, ., .] down_proj")
    region.update((uns, bmm2, sel2))
    y = squeeze_of(bmm2)
    b2, users = _inplace_bias(y, region, ids_S, "down")

    found = []

    def flat_weights(w):
        if mask is not None and _is(w, "masked_fill") and w.args[1] is mask and w.args[2] == 0:
            region.add(w)
            w = w.args[0]
        if _is(w, "reshape", "view", "flatten"):
            found.append(w)
            return True
        return False
    z = _weighted(y, users, flat_weights, region)
    topk_w = _flat(found[0], region, "topk_weights")
    D = _shape(x)[-1] if _shape(x) else None
    output = _combine_tail(z, region, K, D)
    return _Experts(x, topk_w, topk_ids, output, w1, w2, b1, b2, transposed, gate, E, K, bmm1, region,
                    ids_S is not flat_ids)


# ------------------------------------------------------------------------------------------- shared experts
@dataclass
class _Shared:
    spec: SharedExpertSpec
    w1: fx.Node
    w2: fx.Node
    w3: Optional[fx.Node]
    gate: Optional[fx.Node]
    output: fx.Node
    region: set
    x_source: Optional[fx.Node]   # the [B, S, D] tensor x views, when the block adds in that shape


def _linear_of(node, inp_ok) -> Optional[fx.Node]:
    """The weight of a bias-free ``linear(inp, W)`` whose input passes ``inp_ok``, else None."""
    if not _is(node, "linear") or not inp_ok(node.args[0]):
        return None
    if fxg.arg(node, 2, "bias") is not None:
        return None
    w = node.args[1]
    return w if _shape(w) is not None and len(_shape(w)) == 2 else None


def _shared_mlp(node, inp_ok) -> Optional[tuple]:
    """``down(act(gate(x)) * up(x))`` or ``down(act(up(x)))``: (activation, glu, w1, w2, w3, nodes)."""
    w2 = _linear_of(node, lambda a: True)
    if w2 is None:
        return None
    h = node.args[0]
    if _is(h, "mul") and len(h.args) == 2:
        for act, up in (h.args, h.args[::-1]):
            found = _act_from_output(act)
            if found is not None and _linear_of(found[1], inp_ok) is not None and _linear_of(up, inp_ok) is not None:
                name, gate, act_nodes = found
                return (name, True, _linear_of(gate, inp_ok), w2, _linear_of(up, inp_ok),
                        [node, h, *act_nodes, gate, up])
        return None
    found = _act_from_output(h)
    if found is not None and _linear_of(found[1], inp_ok) is not None:
        name, up, act_nodes = found
        return name, False, _linear_of(up, inp_ok), w2, None, [node, *act_nodes, up]
    return None


def match_shared_expert(routed: fx.Node, x: fx.Node, region: set) -> Optional[_Shared]:
    """A shared expert added to the routed output ``routed`` (see the module docstring), or None."""
    users = _users(routed, region)
    if len(users) != 1:
        return None
    add, extra = users[0], []
    if _is(add, "view", "reshape") and len(add.users) == 1:
        extra, add = [add], next(iter(add.users))
    if not _is(add, "add") or len(add.args) != 2:
        return None
    other = add.args[1] if add.args[0] is (extra[0] if extra else routed) else add.args[0]
    if not isinstance(other, fx.Node):
        return None
    # The shared expert may read x itself or the tensor x is a flat view of (DeepSeek-V3 reads [B, S, D]).
    sources = {x}
    if _is(x, "view", "reshape") and isinstance(x.args[0], fx.Node):
        sources.add(x.args[0])
    inp_ok = lambda a: a in sources  # noqa: E731
    gate_w = None
    nodes: list = []
    mlp = _shared_mlp(other, inp_ok)
    if mlp is None and _is(other, "mul") and len(other.args) == 2:
        for sig, body in (other.args, other.args[::-1]):
            if _is(sig, "sigmoid") and _linear_of(sig.args[0], inp_ok) is not None:
                gw = _linear_of(sig.args[0], inp_ok)
                if _shape(gw) is not None and _shape(gw)[0] == 1:
                    mlp = _shared_mlp(body, inp_ok)
                    if mlp is not None:
                        gate_w, nodes = gw, [other, sig, sig.args[0]]
                        break
    if mlp is None:
        return None
    act, glu, w1, w2, w3, mlp_nodes = mlp
    nodes += mlp_nodes
    shared_inputs = {n.args[0] for n in nodes if _is(n, "linear") and n.args[0] in sources}
    # Values of the shared expert nobody else may read: it disappears into the op.
    inside = set(nodes) | {add}
    for n in nodes:
        if any(u not in inside for u in n.users):
            return None
    # Added after viewing the routed output back to [B, S, D] (DeepSeek-V3): the match then takes that
    # tensor as its hidden states, and x (its flat view) joins the region.
    x_source = None
    if _shape(add) != _shape(x):
        if shared_inputs != {x.args[0]} or _shape(add) != _shape(x.args[0]):
            return None
        x_source = x.args[0]
    return _Shared(SharedExpertSpec(activation=act, glu=glu, gated=gate_w is not None), w1, w2, w3, gate_w,
                   add, set(nodes) | set(extra) | {add}, x_source)


# ------------------------------------------------------------------------------------------- building a match
def _block_path(anchor: fx.Node, router_nodes: Iterable[fx.Node]) -> str:
    """The MoE block's module path: the common prefix of the experts and the router ("model.layers.0.mlp")."""
    paths = [fxg.module_path(anchor)] + [fxg.module_path(n) for n in router_nodes]
    path = fxg.common_prefix(p for p in paths if p)
    if path == fxg.module_path(anchor):  # no router metadata: drop the experts' own name
        path = path.rpartition(".")[0]
    return path


def _to_match(ctx: MatchContext, ex: _Experts, pattern: str) -> Union[Match, Rejection]:
    from . import routers

    E, K = ex.num_experts, ex.top_k
    where = _block_path(ex.anchor, ())
    # Shapes the op's layout needs: W1 [E, H, D], W2 [E, D, F] (after undoing a transposed layout).
    s1, s2, sx = _shape(ex.w1), _shape(ex.w2), _shape(ex.x)
    if ex.transposed:
        s1, s2 = (s1[0], s1[2], s1[1]), (s2[0], s2[2], s2[1])
    D = sx[-1]
    F_ = s2[2]
    H = 2 * F_ if ex.gate.glu else F_
    if s1[1:] != (H, D) or s2[1:] != (D, F_):
        return Rejection(FAMILY, pattern, f"expert weight shapes {tuple(_shape(ex.w1))} / {tuple(_shape(ex.w2))} "
                                          f"do not fit hidden size {D} with a {ex.gate.glu or 'plain'} gate", where,
                         frozenset(ex.region))
    for name, b, width in (("gate_up_proj_bias", ex.b1, H), ("down_proj_bias", ex.b2, D)):
        if b is not None and _shape(b) != (E, width):
            return Rejection(FAMILY, pattern, f"{name} has shape {_shape(b)}; expected [{E}, {width}]", where,
                             frozenset(ex.region))

    router = routers.recognise_router(ex.topk_weights, ex.topk_ids)
    region = set(ex.region) | set(router.nodes)
    if ex.sentinels:
        logits = _shape(router.logits) if router.logits is not None else None
        if router.external or logits is None or logits[-1] != E:
            return Rejection(FAMILY, pattern, "transformers' expert-parallel sentinel masking (ids >= E add nothing) "
                             "behind a router moe_fuser does not recognise: its ids may be sentinels, which the "
                             f"fused op does not model ({router.reason or 'router logits are not [T, E]'})",
                             where, frozenset(region))
    experts = ExpertSpec(num_experts=E, activation=ex.gate.activation, glu=ex.gate.glu,
                         bias=ex.b1 is not None or ex.b2 is not None, alpha=ex.gate.alpha, limit=ex.gate.limit)
    shared = match_shared_expert(ex.output, ex.x, region)
    x, output = ex.x, ex.output
    if shared is not None:
        region |= shared.region
        output = shared.output
        if shared.x_source is not None:
            region.add(x)
            x = shared.x_source
    notes = [f"router left as written ({router.reason})"] if router.external else []
    if ex.sentinels:
        notes.append("expert-parallel sentinel masking dropped: the router's ids are a top-k over E scores")
    if ex.transposed:
        notes.append("transposed expert weights (is_transposed=True): the op reads transposed views")
    try:
        spec = MoESpec(router=router.spec.replace(top_k=K) if router.spec.top_k != K else router.spec,
                       experts=experts, shared=shared.spec if shared else None)
    except ValueError as e:
        return Rejection(FAMILY, pattern, f"the recognised MoE is not a valid MoESpec: {e}", where,
                         frozenset(region))
    weights = MoEWeights(
        w1=ex.w1, w2=ex.w2, b1=ex.b1, b2=ex.b2, selection_bias=router.selection_bias,
        shared_w1=shared.w1 if shared else None, shared_w2=shared.w2 if shared else None,
        shared_w3=shared.w3 if shared else None, shared_gate=shared.gate if shared else None)
    where = _block_path(ex.anchor, router.nodes)
    return Match(family=FAMILY, pattern=pattern, spec=spec, x=x, output=output, region=frozenset(region),
                 weights=weights, router_logits=router.logits,
                 topk_weights=router.topk_weights if router.external else None,
                 topk_ids=router.topk_ids if router.external else None, module_path=where, notes=tuple(notes),
                 transposed=frozenset({"w1", "w2"}) if ex.transposed else frozenset(),
                 router_outputs=None if router.external else (router.topk_weights, router.topk_ids))


def inverted(mm: fx.Node) -> bool:
    """Whether a sort permutation near this projection's input feeds an inverse permutation (``empty_like(perm)``):
    transformers' form. Other grouped matmuls are hand-written ones (``moe_fuser.patterns.grouped_mm``)."""
    frontier = [mm.args[0]]
    for _ in range(6):
        for n in frontier:
            if _is(n, "getitem") and n.args[1] == 1 and _is(n.args[0], "sort") \
                    and any(_is(u, "empty_like") for u in n.users):
                return True
        frontier = [i for n in frontier if isinstance(n, fx.Node) for i in n.all_input_nodes]
    return False


def find_grouped_mm(ctx: MatchContext):
    """Each set of ``grouped_mm`` offsets shared by an up and a down projection whose rows come back through an
    inverse permutation is one candidate block."""
    seen = set()
    for mm in ctx.nodes_of("grouped_mm"):
        offs = fxg.arg(mm, 2, "offs")
        if not isinstance(offs, fx.Node) or offs in seen or mm in ctx.claimed or not inverted(mm):
            continue
        seen.add(offs)
        try:
            if not _is(offs, "cumsum"):
                raise _Miss(f"{mm.name}: grouped_mm offsets come from {_describe(offs)}, not a cumsum of "
                            "tokens per expert")
            yield _to_match(ctx, _walk_grouped(ctx, offs), "transformers.grouped_mm")
        except _Miss as e:
            yield Rejection(FAMILY, "transformers.grouped_mm", str(e), fxg.module_path(mm).rpartition(".")[0])


def find_batched_mm(ctx: MatchContext):
    """Each ``bmm`` of per-pair expert weights (``W[expert_ids]``) feeding a gate is a candidate up projection."""
    for bmm in ctx.nodes_of("bmm"):
        if bmm in ctx.claimed or not _is_up_projection(bmm):
            continue
        try:
            yield _to_match(ctx, _walk_batched(ctx, bmm), "transformers.batched_mm")
        except _Miss as e:
            yield Rejection(FAMILY, "transformers.batched_mm", str(e), fxg.module_path(bmm).rpartition(".")[0])


def find_eager_loop(ctx: MatchContext):
    """transformers' eager experts loop cannot be captured: report each one seen (nothing is fused)."""
    outputs = _graph_outputs(ctx)
    for nz in ctx.nodes_of("nonzero"):
        if nz not in outputs:
            continue
        gt = nz.args[0]
        if not (_is(gt, "greater", "gt") and _const(gt.args[1]) == 0 and _is(gt.args[0], "sum")):
            continue
        mask = gt.args[0].args[0]
        if not (_is(mask, "permute") and tuple(mask.args[1:]) in ((2, 1, 0), ((2, 1, 0),))):
            continue
        onehot = mask.args[0]
        if not _is(onehot, "one_hot"):
            continue
        yield Rejection(
            FAMILY, "transformers.eager_loop",
            "an experts loop over `expert_hit`, the experts that got tokens (transformers' eager experts, "
            "experts_implementation='eager' or unset as for a bare block built from a config; NLLB-MoE's experts): "
            "it iterates a data-dependent tensor, so dynamo breaks the graph and the MoE never reaches a backend "
            "whole; where the experts class supports it, model.set_experts_implementation('grouped_mm') (the "
            "default for *ForCausalLM models) fuses it, and a loop `for e in range(num_experts)` over "
            "torch.where(ids == e) fuses anywhere",
            fxg.module_path(onehot), frozenset({onehot, mask, gt.args[0], gt, nz}))


def _graph_outputs(ctx: MatchContext) -> set:
    out: list = []
    fx.node.map_arg(ctx.graph.output_node().args, out.append)
    return set(out)


register_pattern(find_grouped_mm, name="transformers.grouped_mm", family=FAMILY, priority=20)
register_pattern(find_batched_mm, name="transformers.batched_mm", family=FAMILY, priority=20)
register_pattern(find_eager_loop, name="transformers.eager_loop", family=FAMILY, priority=0)
