"""Router recognition on dynamo graphs: each router style maps to the RouterSpec whose routing equals it, and
anything else becomes an external router (never a wrong spec)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from moe_fuser.ops.routing import route
from moe_fuser.patterns.routers import recognise_router

E = 8


def r_seed(x, w, b):
    p = F.linear(x, w).float().softmax(-1)
    v, i = p.topk(2, -1)
    return v / v.sum(-1, keepdim=True), i


def r_mixtral_inplace(x, w, b):
    p = F.softmax(F.linear(x, w), dim=1, dtype=torch.float)
    v, i = torch.topk(p, 2, dim=-1)
    v /= v.sum(dim=-1, keepdim=True)
    return v.to(x.dtype), i


def r_no_renorm(x, w, b):
    return torch.topk(F.linear(x, w).softmax(-1), 3, dim=-1)


def r_topk_softmax(x, w, b):
    v, i = torch.topk(F.linear(x, w), 2, dim=-1)
    return F.softmax(v, dim=1, dtype=v.dtype), i


def r_max(x, w, b):
    v, i = F.linear(x, w).softmax(-1).max(dim=-1)
    return v, i


def r_deepseek(x, w, b):
    scores = F.linear(x.float(), w.float()).sigmoid()
    sel = scores + b.unsqueeze(0)
    group_scores = sel.view(-1, 4, 2).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=2, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, 4, 2).reshape(-1, E)
    sel = sel.masked_fill(~score_mask.bool(), float("-inf"))
    ids = torch.topk(sel, k=3, dim=-1, sorted=False)[1]
    wts = scores.gather(1, ids)
    return wts / (wts.sum(dim=-1, keepdim=True) + 1e-20) * 2.5, ids


def r_sigmoid_bias_kwargs(x, w, b):                   # AFMoE's router: keyword gather, no groups, route scale
    scores = torch.sigmoid(F.linear(x, w).to(torch.float32))
    _, ids = torch.topk(scores + b, k=2, dim=1)
    wts = scores.gather(dim=1, index=ids)
    return wts / (wts.sum(dim=-1, keepdim=True) + 1e-20) * 1.5, ids


def r_sigmoid_no_eps(x, w, b):                        # MiniMax-M2, Laguna: sigmoid, bias, plain renormalisation
    scores = torch.sigmoid(F.linear(x, w).float())
    ids = torch.topk(scores + b, 2, dim=-1, sorted=False)[1]
    wts = scores.gather(1, ids)
    return wts / wts.sum(dim=-1, keepdim=True), ids


def r_softmax_eps(x, w, b):                           # softmax -> top-k, renormalised with an epsilon
    v, i = torch.topk(F.linear(x, w).softmax(-1), 2, dim=-1)
    return v / (v.sum(dim=-1, keepdim=True) + 0.5), i


def r_sigmoid_weights(x, w, b):                       # sigmoid of the top-k logits: not a modelled router
    v, i = torch.topk(F.linear(x, w), 2, dim=-1)
    return torch.sigmoid(v), i


def r_masked_zero(x, w, b):                           # masks with 0.0 instead of -inf: not modelled
    scores = F.linear(x, w).sigmoid()
    keep = scores > 0.1
    ids = torch.topk(scores.masked_fill(~keep, 0.0), 2, dim=-1)[1]
    return scores.gather(1, ids), ids


def r_inplace_surprise(x, w, b):                      # an in-place update after the top-k the walk cannot see
    v, i = torch.topk(F.linear(x, w).softmax(-1), 2, dim=-1)
    v.mul_(3.0)
    return v, i


CASES = [
    (r_seed, dict(renormalize=True, dtype=torch.float32), True),
    (r_mixtral_inplace, dict(renormalize=True, dtype=torch.float32), True),
    (r_no_renorm, dict(renormalize=False, dtype=torch.float32), True),
    (r_topk_softmax, dict(topk_first=True, renormalize=False), True),
    (r_max, dict(top_k=1, renormalize=False), True),
    (r_deepseek, dict(scoring="sigmoid", num_groups=4, topk_groups=2, group_score="top2_sum",
                      selection_bias=True, scaling_factor=2.5, renormalize=True, renorm_eps=None), True),
    (r_sigmoid_bias_kwargs, dict(scoring="sigmoid", selection_bias=True, scaling_factor=1.5, renormalize=True),
     True),
    (r_sigmoid_no_eps, dict(scoring="sigmoid", selection_bias=True, renormalize=True, renorm_eps=0.0), True),
    (r_softmax_eps, dict(renormalize=True, renorm_eps=0.5), True),
    (r_sigmoid_weights, {}, False),
    (r_masked_zero, {}, False),
    (r_inplace_surprise, {}, False),
]


def _recognise(fn, args):
    found = []

    def backend(gm, example_inputs):
        out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        found.append(recognise_router(out[0], out[1]))
        return gm.forward

    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return found[0]


@pytest.mark.parametrize("fn, expect, recognised", CASES, ids=[c[0].__name__ for c in CASES])
def test_router_recognition(fn, expect, recognised):
    torch._dynamo.reset()
    x, w, b = torch.randn(12, 16), torch.randn(E, 16), torch.randn(E) * 0.1
    rm = _recognise(fn, (x, w, b))
    assert rm.external is not recognised, rm.reason
    if not recognised:
        assert rm.reason and not rm.nodes
        return
    for key, value in expect.items():
        assert getattr(rm.spec, key) == value, (key, rm.spec)
    # the spec routes exactly like the code it was recognised from
    logits = F.linear(x.float() if rm.spec.scoring == "sigmoid" else x, w)
    want_w, want_ids = fn(x, w, b)
    got_w, got_ids = route(logits, rm.spec, b if rm.spec.selection_bias else None)
    want_ids = want_ids.view(12, -1)
    order_w, order_g = want_ids.sort(-1).indices, got_ids.sort(-1).indices
    assert torch.equal(want_ids.gather(1, order_w), got_ids.gather(1, order_g))
    torch.testing.assert_close(want_w.view(12, -1).float().gather(1, order_w), got_w.gather(1, order_g))


def r_ernie(x, w, b_1E):                              # ERNIE-4.5: [1, E] bias squeezed, sum clamped from below
    p = F.softmax(F.linear(x.float(), w.float()), dim=1, dtype=torch.float)
    _, ids = torch.topk(p + b_1E.squeeze(), 2, dim=-1)
    wts = torch.gather(p, dim=-1, index=ids)
    return wts / torch.clamp(wts.sum(dim=-1, keepdim=True), min=0.9), ids


def test_clamped_renormalisation_and_a_squeezed_bias():
    """ERNIE-4.5's router (its moe_norm_min is 1e-12; 0.9 here, so the clamp acts on some tokens): recognised as
    softmax + selection bias + renormalisation with renorm_min, and routes exactly like the code."""
    torch._dynamo.reset()
    x, w, b = torch.randn(12, 16), torch.randn(E, 16), torch.randn(E) * 0.1
    rm = _recognise(r_ernie, (x, w, b.view(1, E)))
    assert not rm.external, rm.reason
    assert (rm.spec.scoring, rm.spec.selection_bias, rm.spec.renorm_min) == ("softmax", True, 0.9), rm.spec
    want_w, want_ids = r_ernie(x, w, b.view(1, E))
    got_w, got_ids = route(F.linear(x, w), rm.spec, b)
    assert torch.equal(want_ids, got_ids)
    torch.testing.assert_close(want_w, got_w)
    assert (torch.gather(F.linear(x, w).softmax(-1), 1, got_ids).sum(-1) < 0.9).any()   # the clamp mattered


def r_rounded(x, w, b):                               # Qwen2-MoE in bf16: fp32 routing, weights cast back
    p = F.softmax(F.linear(x, w), dim=1, dtype=torch.float)
    v, i = torch.topk(p, 2, dim=-1)
    return v.to(x.dtype), i


def test_rounded_routing_weights_are_reproduced():
    """Routing in fp32 whose weights the model casts to bf16: the spec rounds them the same way (kept fp32), so
    the op's weights equal the model's exactly."""
    torch._dynamo.reset()
    x, w = torch.randn(12, 16, dtype=torch.bfloat16), torch.randn(E, 16, dtype=torch.bfloat16)
    rm = _recognise(r_rounded, (x, w, None))
    assert (rm.spec.dtype, rm.spec.weights_dtype) == (torch.float32, torch.bfloat16), rm.spec
    want_w, want_ids = r_rounded(x, w, None)
    got_w, got_ids = route(F.linear(x, w), rm.spec)
    assert torch.equal(want_ids, got_ids) and got_w.dtype == torch.float32
    assert torch.equal(want_w.float(), got_w)
    unrounded, _ = route(F.linear(x, w), dataclasses.replace(rm.spec, weights_dtype=None))
    assert not torch.equal(unrounded, got_w)            # the rounding is what makes them equal


def r_bf16_sigmoid_fp32_bias(x, w, b):                # HY-V4 under autocast: bf16 scores, fp32 correction bias
    scores = F.linear(x, w).sigmoid()
    ids = torch.topk(scores + b, 2, dim=-1)[1]
    wts = scores.gather(1, ids)
    return wts / (wts.sum(dim=-1, keepdim=True) + 1e-20), ids


def test_selection_bias_promotes_like_the_model():
    """bf16 scores plus an fp32 bias select in fp32 (type promotion), as the model does; rounding the bias to the
    scores' dtype would break bf16's many ties differently."""
    torch._dynamo.reset()
    x, w = torch.randn(64, 16, dtype=torch.bfloat16), torch.randn(E, 16, dtype=torch.bfloat16)
    b = torch.randn(E) * 0.01
    rm = _recognise(r_bf16_sigmoid_fp32_bias, (x, w, b))
    assert rm.spec.selection_bias and rm.spec.dtype is None, rm.spec
    want_w, want_ids = r_bf16_sigmoid_fp32_bias(x, w, b)
    got_w, got_ids = route(F.linear(x, w), rm.spec, b)
    assert torch.equal(want_ids, got_ids) and torch.equal(want_w, got_w)


def test_top1_by_max_keeps_the_tie_order_of_max():
    """torch.max (and argmax) give a tie to the lowest expert id; topk's order among equal scores is another (exact
    ties are common with bf16 logits), so a max router routed by topk would send tied tokens elsewhere. Here three
    experts tie at the top for every token: the recognised spec routes exactly as the max does."""
    torch._dynamo.reset()
    x, w = torch.rand(64, 16), torch.randn(E, 16) * 0.1
    w[[2, 5, 6]] = 1.0
    rm = _recognise(r_max, (x, w, None))
    assert rm.spec.first_max and rm.spec.top_k == 1
    logits = F.linear(x, w)
    want_w, want_ids = r_max(x, w, None)
    got_w, got_ids = route(logits, rm.spec)
    assert (want_ids == 2).all() and torch.equal(got_ids.view(-1), want_ids) and torch.equal(got_w.view(-1), want_w)
    assert not torch.equal(logits.softmax(-1).topk(1).indices.view(-1), want_ids)   # what topk would have picked
