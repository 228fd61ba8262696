"""``apply_router_weight_on_input`` (Llama 4): the routing weight scales the expert's input, not its output, against
an independent plain-PyTorch formulation (transformers' dense Llama 4 block: every expert on every token, the rows
scaled by a [T, E] score matrix that is zero off the top-k), forward and every gradient."""

import pytest
import torch
import torch.nn.functional as F

import moe_fuser
from moe_fuser.ops.fused import moe_forward
from moe_fuser.spec import ExpertSpec, MoESpec, MoEWeights, RouterSpec
from _moe_cases import TOL, rel_err


def dense_llama4(x, logits, w1, w2, k):
    """Llama 4's block as transformers writes it (w1 [E, 2F, D], w2 [E, D, F] in nn.Linear layout here)."""
    E, D = w1.shape[0], x.shape[1]
    v, i = logits.topk(k, dim=1)
    scores = torch.full_like(logits, float("-inf")).scatter_(1, i, v)
    scores = torch.sigmoid(scores.float()).to(scores.dtype)
    rows = x.repeat(E, 1) * scores.transpose(0, 1).reshape(-1, 1)
    gate, up = torch.bmm(rows.view(E, -1, D), w1.transpose(1, 2)).chunk(2, dim=-1)
    out = torch.bmm(up * F.silu(gate), w2.transpose(1, 2))
    return out.view(-1, D).reshape(E, -1, D).sum(0)


def _problem(T, E, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    D, F_ = 24, 20
    x = torch.randn(T, D, generator=g).to(dtype)
    logits = torch.randn(T, E, generator=g).to(dtype)
    w1 = (torch.randn(E, 2 * F_, D, generator=g) / D ** 0.5).to(dtype)
    w2 = (torch.randn(E, D, F_, generator=g) / F_ ** 0.5).to(dtype)
    leaves = [t.requires_grad_() for t in (x, logits, w1, w2)]
    return leaves, torch.randn(T, D, generator=g).to(dtype)


@pytest.mark.parametrize("impl", ["cpu", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,E,k", [(13, 6, 1), (9, 5, 2), (1, 4, 3), (0, 4, 2)])
def test_matches_the_dense_formulation(impl, dtype, T, E, k):
    """The op as the Llama 4 pattern builds it (score rounded to the model's dtype): bitwise on the CPU lowering
    for one slot, within the dtype's tolerance otherwise (the sum over the k slots reassociates)."""
    (x, logits, w1, w2), grad = _problem(T, E, k, dtype, seed=T * 31 + E * 7 + k)
    spec = MoESpec(RouterSpec(top_k=k, scoring="sigmoid", topk_first=True, renormalize=False, weights_dtype=dtype),
                   ExpertSpec(num_experts=E, glu="concat"), weight_on_input=True)
    out = moe_forward(spec, x, logits, MoEWeights(w1, w2), impl=impl)
    want = dense_llama4(x, logits, w1, w2, k)
    assert out.dtype == dtype and out.shape == want.shape
    if T == 0:
        return
    got_g = torch.autograd.grad((out.float() * grad.float()).sum(), (x, logits, w1, w2))
    want_g = torch.autograd.grad((want.float() * grad.float()).sum(), (x, logits, w1, w2))
    tol = TOL[dtype]
    assert rel_err(out, want) <= tol
    for name, a, b in zip(("x", "logits", "w1", "w2"), got_g, want_g):
        assert rel_err(a, b) <= tol, name


def test_public_api_forms_the_product_in_the_weights_precision():
    """``fused_moe(..., apply_router_weight_on_input=True)`` with the default fp32 routing: ``w * x`` in fp32, then
    the experts in the hidden states' dtype; each slot runs on its own weighted row."""
    (x, logits, w1, w2), _ = _problem(11, 6, 2, torch.bfloat16, seed=5)
    out = moe_fuser.fused_moe(x, logits, w1, w2, top_k=2, gate_up="concat", scoring="sigmoid", topk_first=True,
                              renormalize=False, apply_router_weight_on_input=True)
    v, ids = logits.float().topk(2, dim=1)
    w = v.sigmoid()
    want = torch.zeros(11, 24)
    for t in range(11):
        for j in range(2):
            e = int(ids[t, j])
            row = (x[t].float() * w[t, j]).to(torch.bfloat16)
            gate, up = (w1[e] @ row).chunk(2)
            want[t] += (w2[e] @ (up * F.silu(gate))).float()
    assert rel_err(out, want) <= TOL[torch.bfloat16]
    # and the output weighting differs: the option is not a no-op
    plain = moe_fuser.fused_moe(x, logits, w1, w2, top_k=2, gate_up="concat", scoring="sigmoid", topk_first=True,
                                renormalize=False)
    assert rel_err(plain, want) > 0.05
