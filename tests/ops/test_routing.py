"""Routers, capacity, shared experts and router statistics against independent plain-PyTorch formulations."""

import pytest
import torch
import torch.nn.functional as F

import moe_fuser
from moe_fuser.ops.routing import apply_capacity, route
from moe_fuser.spec import CapacitySpec, RouterSpec
from _moe_cases import Case, leaves, rel_err


def dense(weights_TK, ids_TK, E):
    """[T, E] matrix of routing weights: independent of the order top-k returns its k ids in."""
    return torch.zeros(ids_TK.shape[0], E, dtype=weights_TK.dtype).scatter(1, ids_TK, weights_TK)


def test_softmax_topk_renormalize_in_fp32():
    logits = torch.randn(50, 8, dtype=torch.bfloat16)
    w, ids = route(logits, RouterSpec(top_k=2))
    p = F.softmax(logits, dim=1, dtype=torch.float)
    rw, rids = p.topk(2)
    rw = rw / rw.sum(-1, keepdim=True)
    assert w.dtype == torch.float32
    assert torch.allclose(dense(w, ids, 8), dense(rw, rids, 8), atol=1e-6)
    w, ids = route(logits, RouterSpec(top_k=2, renormalize=False))
    assert torch.allclose(dense(w, ids, 8), dense(*p.topk(2), 8), atol=1e-6)


def test_router_dtype_none_routes_in_input_precision():
    logits = torch.randn(20, 8, dtype=torch.bfloat16)
    w, _ = route(logits, RouterSpec(top_k=2, dtype=None, renormalize=False))
    assert w.dtype == torch.bfloat16


def test_topk_then_softmax():
    logits = torch.randn(40, 16)
    w, ids = route(logits, RouterSpec(top_k=4, topk_first=True))
    v, i = logits.topk(4)
    assert torch.allclose(dense(w, ids, 16), dense(v.softmax(-1), i, 16), atol=1e-6)


@pytest.mark.parametrize("renorm", [False, True])
def test_topk_then_sigmoid(renorm):
    """Llama 4: top-k of the logits, a sigmoid of each (selection on the logits, not on the sigmoids)."""
    logits = torch.randn(40, 16, dtype=torch.bfloat16)
    w, ids = route(logits, RouterSpec(top_k=3, scoring="sigmoid", topk_first=True, renormalize=renorm))
    v, i = logits.topk(3)
    want = v.float().sigmoid()
    if renorm:
        want = want / (want.sum(-1, keepdim=True) + 1e-20)
    assert w.dtype == torch.float32
    assert torch.equal(ids, i) and torch.allclose(w, want, atol=1e-6)


def _deepseek_v3_router(logits, bias, top_k, n_group, topk_group, scale, norm):
    """DeepSeek-V3's router as its reference code writes it (masking unselected groups with 0)."""
    E = logits.shape[-1]
    scores = logits.float().sigmoid()
    choice = scores + bias
    group_scores = choice.view(-1, n_group, E // n_group).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = group_scores.topk(topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, E // n_group).reshape(-1, E)
    ids = choice.masked_fill(~score_mask.bool(), 0.0).topk(top_k, dim=-1, sorted=False)[1]
    w = scores.gather(1, ids)
    if norm:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return w * scale, ids


@pytest.mark.parametrize("norm", [True, False])
def test_deepseek_v3_sigmoid_grouped_topk(norm):
    E, k = 32, 4
    logits = torch.randn(64, E)
    bias = torch.rand(E) * 0.1  # DeepSeek's correction bias; positive so 0-masking equals -inf masking
    spec = RouterSpec(top_k=k, scoring="sigmoid", num_groups=8, topk_groups=3, group_score="top2_sum",
                      scaling_factor=2.5, selection_bias=True, renormalize=norm)
    w, ids = route(logits, spec, bias)
    rw, rids = _deepseek_v3_router(logits, bias, k, 8, 3, 2.5, norm)
    assert torch.allclose(dense(w, ids, E), dense(rw, rids, E), atol=1e-6)


def test_capacity_matches_switch_priority():
    """Switch Transformers: token_priority = cumsum(one_hot) over tokens; keep if priority <= capacity."""
    ids = torch.randint(0, 4, (2 * 30, 1))
    got = apply_capacity(ids, 4, CapacitySpec(capacity=5), token_groups=2)
    one_hot = F.one_hot(ids[:, 0], 4).view(2, 30, 4)
    priority = one_hot.cumsum(dim=1) * one_hot
    keep = (priority.sum(-1) <= 5).view(-1, 1)
    assert torch.equal(got, torch.where(keep, ids, -1))


@pytest.mark.parametrize("dropped", ["zero", "passthrough"])
@pytest.mark.parametrize("as_list", [False, True])   # weight lists: the dropped pairs are in no saved chunk
def test_capacity_in_fused_moe(dropped, as_list):
    x, logits, kw = Case(T=40, D=16, F=24, E=4, k=1, dtype=torch.float32, as_list=as_list).make(requires_grad=True)
    out, stats = moe_fuser.fused_moe(x, logits, **kw, capacity=6, dropped=dropped, renormalize=False,
                                     return_router_stats=True)
    ref = moe_fuser.fused_moe(x, logits, **kw, capacity=6, dropped=dropped, renormalize=False, impl="reference")
    assert rel_err(out, ref) < 1e-5
    assert (stats.tokens_per_expert <= 6).all() and (stats.topk_ids == -1).any()
    dropped_rows = (stats.topk_ids == -1).squeeze(1)
    if dropped == "zero":
        assert out[dropped_rows].abs().max() == 0
    else:
        p = logits.detach().softmax(-1).max(-1).values
        assert torch.allclose(out[dropped_rows], p[dropped_rows, None] * x[dropped_rows], atol=1e-6)
    grads = torch.autograd.grad(out.sum(), leaves(x, logits, kw))
    want = torch.autograd.grad(ref.sum(), leaves(x, logits, kw))
    assert all(rel_err(g, w) < 1e-5 for g, w in zip(grads, want))


def test_router_stats_count_tokens_per_expert():
    x, logits, kw = Case(T=33, D=16, F=24, E=6, k=2, dtype=torch.float32).make()
    _, stats = moe_fuser.fused_moe(x, logits, **kw, return_router_stats=True)
    assert torch.equal(stats.tokens_per_expert, torch.bincount(stats.topk_ids.flatten(), minlength=6))
    assert stats.tokens_per_expert.sum() == 66


def test_external_router_and_shared_expert_with_gate():
    x, logits, kw = Case(T=21, D=16, F=24, E=6, k=3, dtype=torch.float32).make(requires_grad=True)
    w, ids = torch.rand(21, 3, requires_grad=True), torch.randint(0, 6, (21, 3))
    shared = dict(shared_w1=torch.randn(32, 16) * 0.2, shared_w2=torch.randn(16, 32) * 0.2,
                  shared_w3=torch.randn(32, 16) * 0.2, shared_gate=torch.randn(1, 16) * 0.2)
    out = moe_fuser.fused_moe(x, None, **kw, topk_weights=w, topk_ids=ids, **shared)
    routed = moe_fuser.fused_moe(x, None, **kw, topk_weights=w, topk_ids=ids, impl="reference")
    s = F.linear(F.silu(F.linear(x, shared["shared_w1"])) * F.linear(x, shared["shared_w3"]), shared["shared_w2"])
    ref = routed + torch.sigmoid(F.linear(x, shared["shared_gate"])) * s
    assert rel_err(out, ref) < 1e-5
    assert rel_err(torch.autograd.grad(out.sum(), w)[0], torch.autograd.grad(ref.sum(), w)[0]) < 1e-5
