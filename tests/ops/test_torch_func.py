"""``torch.func`` over the fused op: ``grad`` and ``vjp`` give what autograd gives (a first derivative); a
transform around them (grad of grad) is refused with a clear error, not computed wrong."""

import pytest
import torch

import moe_fuser

F64 = torch.float64


def _weights(E, D, F_, as_list, gen):
    def w(*shape):
        t = torch.randn(*shape, dtype=F64, generator=gen) / shape[-1] ** 0.5
        return list(t.unbind(0)) if as_list else t
    return w(E, F_, D), w(E, D, F_), w(E, F_, D)


@pytest.mark.parametrize("as_list", [False, True], ids=["stacked", "list"])
def test_grad_and_vjp_match_autograd(as_list):
    gen = torch.Generator().manual_seed(7)
    T, D, F_, E, k = 11, 16, 24, 4, 2
    x = torch.randn(T, D, dtype=F64, generator=gen)
    logits = torch.randn(T, E, dtype=F64, generator=gen)
    w1, w2, w3 = _weights(E, D, F_, as_list, gen)
    weight = torch.randn(T, D, dtype=F64, generator=gen)

    def loss(x, logits, w1):
        return (moe_fuser.fused_moe(x, logits, w1, w2, w3, top_k=k) * weight).sum()

    got = torch.func.grad(loss, argnums=(0, 1, 2))(x, logits, w1)
    leaves = [t.clone().requires_grad_() for t in (x, logits)]
    w1_leaf = [t.clone().requires_grad_() for t in w1] if as_list else w1.clone().requires_grad_()
    want = torch.autograd.grad(loss(*leaves, w1_leaf), [*leaves, *(w1_leaf if as_list else [w1_leaf])])
    flat_got = [got[0], got[1], *(got[2] if as_list else [got[2]])]
    for g, w in zip(flat_got, want):
        assert torch.allclose(g, w, rtol=1e-10, atol=1e-12)
    _, vjp = torch.func.vjp(lambda x: moe_fuser.fused_moe(x, logits, w1, w2, w3, top_k=k), x)
    assert torch.allclose(vjp(weight)[0], want[0], rtol=1e-10, atol=1e-12)


def test_grad_of_grad_is_refused():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(5, 8, dtype=F64, generator=gen)
    logits = torch.randn(5, 4, dtype=F64, generator=gen)
    w1, w2, w3 = _weights(4, 8, 12, False, gen)
    inner = torch.func.grad(lambda x: moe_fuser.fused_moe(x, logits, w1, w2, w3, top_k=2).sum())
    with pytest.raises(RuntimeError, match="first derivative only"):
        torch.func.grad(lambda x: inner(x).sum())(x)
