"""fused_moe under torch.autocast: the experts compute in the autocast dtype, as the ``nn.Linear`` calls of an eager
expert loop would, while routing stays fp32, the output keeps the hidden states' dtype and fp32 weights get fp32
gradients. Reference: the eager loop written with ``F.linear``, run under the same autocast."""

import pytest
import torch
import torch.nn.functional as F

import moe_fuser
from moe_fuser.ops import fused as fused_module
from moe_fuser.ops.fused import experts_dtype

TOL_BF16 = 2e-2
T, E, K, D, F_ = 37, 6, 2, 24, 40


def _loop(x, logits, w1, w2, w3, k, b1=None, b2=None, b3=None):
    """The hand-written loop: under autocast its matmuls run in bf16, its weighting and combine in fp32."""
    p = logits.float().softmax(-1)
    w, ids = p.topk(k, -1)
    w = w / w.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for e in range(len(w1)):
        tok, slot = torch.where(ids == e)
        if tok.numel():
            b = [None if bs is None else bs[e] for bs in (b1, b2, b3)]
            y = F.linear(F.silu(F.linear(x[tok], w1[e], b[0])) * F.linear(x[tok], w3[e], b[2]), w2[e], b[1])
            out.index_add_(0, tok, (y * w[tok, slot, None]).to(x.dtype))
    return out


def _rel(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def _inputs(gen, idle_expert: bool, bias: bool = False):
    """x, logits and per-expert lists w1, w2, w3 (then b1, b2, b3 with ``bias``)."""
    x = torch.randn(T, D, generator=gen)
    logits = torch.randn(T, E, generator=gen)
    if idle_expert:   # the last expert is never in anyone's top 2
        logits[:, -1] = -30.0
    ws = [[torch.randn(o, i, generator=gen) * i ** -0.5 for _ in range(E)] for o, i in ((F_, D), (D, F_), (F_, D))]
    if bias:
        ws += [[torch.randn(o, generator=gen) * 0.1 for _ in range(E)] for o in (F_, D, F_)]
    return x, logits, ws


@pytest.fixture
def experts_inputs(monkeypatch):
    """Records the dtype the grouped-experts op receives its hidden states in."""
    seen = []
    real = fused_module.grouped_experts

    def recording(x, *args, **kwargs):
        seen.append(x.dtype)
        return real(x, *args, **kwargs)
    monkeypatch.setattr(fused_module, "grouped_experts", recording)
    return seen


@pytest.mark.parametrize("stacked,bias", [(True, False), (False, False), (True, True), (False, True)],
                         ids=["stacked", "lists", "stacked-bias", "lists-bias"])
def test_experts_compute_in_the_autocast_dtype_and_train_like_the_loop(stacked, bias, experts_inputs):
    """Stacked weights run the CPU lowering's padded layout here (every expert has ~12 rows), lists the ragged
    one; both take the fp32 weights and cast each expert group's where used."""
    x, logits, params = _inputs(torch.Generator().manual_seed(1), idle_expert=not stacked, bias=bias)
    leaves = {}
    for name in ("ref", "fused"):
        xs = x.clone().requires_grad_(True)
        lg = logits.clone().requires_grad_(True)
        ws = [[w.clone().requires_grad_(True) for w in group] for group in params]
        args = [torch.stack(group) for group in ws] if stacked and name == "fused" else ws
        biases = dict(zip(("b1", "b2", "b3"), args[3:]))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if name == "ref":
                out = _loop(xs, lg, *ws[:3], K, *ws[3:])
            else:
                out = moe_fuser.fused_moe(xs, lg, *args[:3], top_k=K, **biases)
        (out * torch.linspace(0.5, 1.5, out.numel()).view_as(out)).sum().backward()
        leaves[name] = (out, xs, lg, ws)
    (ref, x_ref, lg_ref, w_ref), (got, x_got, lg_got, w_got) = leaves["ref"], leaves["fused"]
    assert experts_inputs == [torch.bfloat16]
    assert got.dtype == torch.float32
    assert _rel(got, ref) <= TOL_BF16
    assert _rel(x_got.grad, x_ref.grad) <= TOL_BF16
    assert _rel(lg_got.grad, lg_ref.grad) <= TOL_BF16
    for group_ref, group_got in zip(w_ref, w_got):
        for a, b in zip(group_got, group_ref):
            if b.grad is None:   # the idle expert: the loop never touches it, nor does the op
                assert a.grad is None
                continue
            assert a.grad.dtype == torch.float32
            assert _rel(a.grad, b.grad) <= TOL_BF16
    assert not stacked or all(b.grad is not None for group in w_ref for b in group)
    assert stacked or w_ref[0][-1].grad is None


def test_outside_autocast_nothing_is_cast(experts_inputs):
    x, logits, (w1, w2, w3) = _inputs(torch.Generator().manual_seed(2), idle_expert=False)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        out = moe_fuser.fused_moe(x, logits, w1, w2, w3, top_k=K)
    assert experts_inputs == [torch.float32]
    assert _rel(out, _loop(x, logits, w1, w2, w3, K)) <= 1e-5


def test_autocast_dtype_rules():
    x = torch.randn(3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert experts_dtype(x) == torch.bfloat16
        assert experts_dtype(x.half()) == torch.bfloat16     # autocast casts any floating dtype but fp64
        assert experts_dtype(x.double()) == torch.float64
        assert experts_dtype(x, torch.float32) == torch.float32   # an explicit request wins (the compiler's)
    assert experts_dtype(x) == torch.float32


def test_compiled_call_under_autocast_matches_eager():
    """dynamo traces the autocast query and the casts: fullgraph, dynamic, two token counts, with backward."""
    gen = torch.Generator().manual_seed(3)
    w1, w2, w3 = (torch.randn(E, o, i, generator=gen) * i ** -0.5 for o, i in ((F_, D), (D, F_), (F_, D)))

    def layer(x, logits, w1, w2, w3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return moe_fuser.fused_moe(x, logits, w1, w2, w3, top_k=K)
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    for tokens in (T, 20):
        x, logits = torch.randn(tokens, D, generator=gen), torch.randn(tokens, E, generator=gen)
        results = []
        for fn in (layer, compiled):
            leaves = [t.clone().requires_grad_(True) for t in (x, logits, w1, w2, w3)]
            out = fn(*leaves)
            out.pow(2).sum().backward()
            results.append((out, [t.grad for t in leaves]))
        (ref, g_ref), (got, g_got) = results
        assert got.dtype == torch.float32
        assert _rel(got, ref) <= TOL_BF16
        for a, b in zip(g_got, g_ref):
            assert _rel(a, b) <= TOL_BF16
