"""Llama 4's MoE block (transformers' ``Llama4TextMoe``): every expert on every token, the routing weight on the
input.

transformers computes Llama 4's routed experts densely: each of the E experts runs on all T tokens, whose rows
are first scaled by a [T, E] score matrix that is zero except at each token's top-k experts, and the E results are
summed. The graph (K top-k; ``[...]`` marks optional nodes):

    v, ids = topk(logits, K, dim=1)                                   logits: the router Linear, outside the region
    S = full_like(logits, -inf).scatter_(1, ids, v);  S = sigmoid(S[.float()])[.to(dtype)]
    rows = x.repeat(E, 1) * S.transpose(0, 1).reshape(-1, 1)          [E*T, D]
    h = bmm(rows.view(E, -1, D), gate_up_proj)                        gate_up_proj [E, D, 2F]: [in, out] layout
    g, u = h.chunk(2, -1);  a = u * act(g)                            (the gates of ``transformers_experts``)
    y = bmm(a, down_proj).view(-1, D)[.reshape(E, -1, D)].sum(0)      down_proj [E, F, D]

An expert whose score is 0 gets zero rows and, with no biases and act(0) finite, returns exact zeros, so the sum
is that of the K chosen experts on ``w * x``: the fused op with ``MoESpec.weight_on_input`` and the router
``topk_first`` + ``sigmoid`` (top-k of the logits, a sigmoid of each, no renormalisation), computing E/K times
fewer expert FLOPs. The product ``w * x`` is formed in the dtypes the graph forms it in (the score's cast is
``RouterSpec.weights_dtype``), so the op's expert inputs are the model's own rows. (Only a non-finite hidden
state differs: the dense form multiplies it by the zero scores too, giving NaN in every expert.)

The shared expert (``out = shared_expert(x); out.add_(routed)``) stays as written; it reads the op's result.

Entry point: the pattern ``transformers.llama4`` (family ``"transformers"``), registered at import.
"""

from __future__ import annotations

from typing import Union

import torch
import torch.fx as fx

from ..fx import graph as fxg
from ..spec import ExpertSpec, MoESpec, MoEWeights, RouterSpec
from .base import Match, MatchContext, Rejection, register_pattern
from .transformers_experts import (FAMILY, _block_path, _describe, _expect, _int, _is, _match_gate, _Miss, _only_user,
                                   _shape, _strip_casts, _users, _want)

__all__ = ["find_llama4"]

PATTERN = "transformers.llama4"


def _repeat_count(rep: fx.Node):
    """E of ``x.repeat(E, 1)`` (args or one tuple), else None."""
    reps = rep.args[1:] if len(rep.args) > 2 else (rep.args[1] if len(rep.args) == 2 else ())
    reps = tuple(reps) if isinstance(reps, (tuple, list)) else (reps,)
    return reps[0] if len(reps) == 2 and reps[1] == 1 and isinstance(reps[0], int) else None


def _walk_scores(scale: fx.Node, region: set, T: int, E: int):
    """From the per-row scale ``S.transpose(0, 1).reshape(-1, 1)`` up to the router logits: (logits, K, the
    routing dtype (None: the logits' own), the score's dtype)."""
    _want(_is(scale, "reshape", "view") and _shape(scale) == (E * T, 1),
          f"{_describe(scale)}: the rows should be scaled by a [E*T={E * T}, 1] column of scores")
    region.add(scale)
    tr = _expect(scale.args[0], ("transpose", "t"), "the scores transposed to [E, T]")
    _want(_is(tr, "t") or set(tr.args[1:3]) == {0, 1}, f"{tr.name}: expected transpose(0, 1)")
    region.add(tr)
    scores = tr.args[0]
    _want(_shape(scores) == (T, E), f"{_describe(scores)}: the scores should be [T={T}, E={E}]")
    score_dtype = fxg.val(scores).dtype
    sig = _expect(_strip_casts(scores, region), ("sigmoid",), "a sigmoid of the scattered top-k logits")  # .to(dtype)
    region.add(sig)
    scatter = _expect(_strip_casts(sig.args[0], region), ("scatter_", "scatter"),   # sigmoid(S.float())
                      "the top-k logits scattered into a -inf tensor")
    region.add(scatter)
    _want(fxg.arg(scatter, 1, "dim") in (1, -1) and fxg.arg(scatter, 4, "reduce") is None,
          f"{scatter.name}: expected a plain scatter (no reduce) along the experts")
    base, ids, vals = scatter.args[0], fxg.arg(scatter, 2, "index"), fxg.arg(scatter, 3, "src")
    _want(_is(base, "full_like") and fxg.arg(base, 1, "fill_value") == float("-inf"),
          f"{_describe(base)}: expected full_like(logits, -inf) under the scattered logits")
    _want(list(base.users) == [scatter] or all(u is scatter or u in region for u in base.users),
          f"{base.name}: the -inf tensor is read elsewhere")
    region.add(base)
    _want(_is(vals, "getitem") and _is(ids, "getitem") and vals.args[0] is ids.args[0]
          and (vals.args[1], ids.args[1]) == (0, 1), f"{scatter.name}: expected the values and indices of one topk")
    topk = _expect(vals.args[0], ("topk",), "topk of the router logits")
    logits = topk.args[0]
    _want(base.args[0] is logits, f"{base.name}: the -inf tensor should be shaped like the topk's logits")
    _want(fxg.arg(topk, 2, "dim", -1) in (1, -1) and fxg.arg(topk, 3, "largest", True) is True,
          f"{topk.name}: expected the largest top-k along the experts")
    K = _int(topk, 1, "k")
    _want(K is not None and 1 <= K <= E, f"{topk.name}: top-k count {fxg.arg(topk, 1, 'k')!r} is not an int in [1, E]")
    region.update((topk, vals, ids))
    logit_dtype, sig_dtype = fxg.val(logits).dtype, fxg.val(sig.args[0]).dtype
    _want(sig_dtype in (logit_dtype, torch.float32),
          f"{sig.name}: the sigmoid runs in {sig_dtype}, neither the logits' {logit_dtype} nor float32")
    return logits, K, (torch.float32 if sig_dtype == torch.float32 else None), score_dtype


def _walk(ctx: MatchContext, rep: fx.Node) -> Union[Match, Rejection]:
    region: set = {rep}
    x, E = rep.args[0], _repeat_count(rep)
    sx = _shape(x)
    _want(E is not None and sx is not None and len(sx) == 2, f"{rep.name}: expected x.repeat(E, 1) of a [T, D] x")
    T, D = sx
    mul = _only_user(rep, region, "the scaling by the routing scores")
    _want(_is(mul, "mul") and len(mul.args) == 2 and rep in mul.args, f"{_describe(mul)}: expected rows * scores")
    region.add(mul)
    logits, K, route_dtype, score_dtype = _walk_scores(mul.args[1] if mul.args[0] is rep else mul.args[0],
                                                       region, T, E)
    view = _only_user(mul, region, "the view to [E, T, D]")
    _want(_is(view, "view", "reshape") and _shape(view) == (E, T, D), f"{_describe(view)}: expected [E, T, D] rows")
    region.add(view)
    up = _only_user(view, region, "the up projection")
    _want(_is(up, "bmm") and up.args[0] is view, f"{_describe(up)}: expected bmm(rows, gate_up_proj)")
    region.add(up)
    w1, s1 = up.args[1], _shape(up.args[1])
    _want(ctx.param_path(w1) is not None and s1 is not None and s1[:2] == (E, D),
          f"{_describe(w1)}: the up projection's weight should be an [E, D, 2F] parameter")
    gate = _match_gate(up, _users(up, region), region)
    _want(gate.glu == "concat", f"{up.name}: expected gate and up halves (chunk), found a {gate.glu or 'plain'} gate")
    down = _only_user(gate.out, region, "the down projection")
    _want(_is(down, "bmm") and down.args[0] is gate.out, f"{_describe(down)}: expected bmm(act, down_proj)")
    region.add(down)
    w2, s2 = down.args[1], _shape(down.args[1])
    F_ = s1[2] // 2
    _want(ctx.param_path(w2) is not None and s2 == (E, F_, D),
          f"{_describe(w2)}: the down projection's weight should be an [E={E}, F={F_}, D={D}] parameter")
    node = down
    while True:   # .view(-1, D)[.reshape(E, -1, D)]
        nxt = _only_user(node, region, "the sum over the experts")
        if not _is(nxt, "view", "reshape"):
            break
        region.add(nxt)
        node = nxt
    _want(_is(nxt, "sum") and _shape(node) == (E, T, D) and fxg.arg(nxt, 1, "dim") in (0, [0], (0,))
          and not fxg.arg(nxt, 2, "keepdim", False), f"{_describe(nxt)}: expected the sum over the experts (dim 0)")
    region.add(nxt)
    _want(fxg.val(nxt).dtype == fxg.val(down).dtype, f"{nxt.name}: the sum over the experts changes dtype")
    where = _block_path(up, (logits,))
    try:
        spec = MoESpec(router=RouterSpec(top_k=K, scoring="sigmoid", topk_first=True, renormalize=False,
                                         dtype=route_dtype, weights_dtype=score_dtype),
                       experts=ExpertSpec(num_experts=E, activation=gate.activation, glu="concat", limit=gate.limit),
                       weight_on_input=True)
    except ValueError as e:
        return Rejection(FAMILY, PATTERN, f"the recognised MoE is not a valid MoESpec: {e}", where, frozenset(region))
    return Match(family=FAMILY, pattern=PATTERN, spec=spec, x=x, output=nxt, region=frozenset(region),
                 weights=MoEWeights(w1=w1, w2=w2), router_logits=logits, transposed=frozenset({"w1", "w2"}),
                 module_path=where,
                 notes=(f"routing weight on the experts' input, as written; the dense all-{E}-experts bmm becomes "
                        f"the {K} chosen experts per token",))


def find_llama4(ctx: MatchContext):
    """Each ``x.repeat(E, 1)`` scaled by a score column and fed to a bmm of an [E, D, 2F] parameter is a
    candidate block (other repeats are not MoE and are skipped without a word)."""
    for rep in ctx.nodes_of("repeat"):
        if rep in ctx.claimed or _repeat_count(rep) is None or not _feeds_expert_bmm(rep):
            continue
        try:
            yield _walk(ctx, rep)
        except _Miss as e:
            yield Rejection(FAMILY, PATTERN, str(e), fxg.module_path(rep).rpartition(".")[0])


def _feeds_expert_bmm(rep: fx.Node) -> bool:
    """Whether the repeated rows reach a bmm within three single-user steps (rows * scores, view): the shape of
    a Llama 4 block, as opposed to any other repeat."""
    node = rep
    for _ in range(3):
        if len(node.users) != 1:
            return False
        node = next(iter(node.users))
        if _is(node, "bmm"):
            return True
    return False


register_pattern(find_llama4, name=PATTERN, family=FAMILY, priority=20)
