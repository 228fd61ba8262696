"""fused_moe (custom op + CPU lowering) against the plain-PyTorch reference, forward and backward."""

import pytest
import torch

import moe_fuser
from _moe_cases import TOL, Case, leaves, random_cases, rel_err

CASES = random_cases(40, seed=1234)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c.T}-E{c.E}-k{c.k}-{c.glu}-{c.activation}-"
                         f"{str(c.dtype)[6:]}{'-bias' if c.bias else ''}{'-list' if c.as_list else ''}")
def test_forward_and_backward_match_reference(case):
    x, logits, kw = case.make(requires_grad=True)
    out = moe_fuser.fused_moe(x, logits, **kw)
    ref = moe_fuser.fused_moe(x, logits, **kw, impl="reference")
    assert out.dtype == x.dtype and out.shape == x.shape
    if case.T == 0:
        return
    assert rel_err(out, ref) < TOL[case.dtype]
    grad = torch.randn_like(out)
    ins = leaves(x, logits, kw)
    got = torch.autograd.grad(out, ins, grad, allow_unused=True)
    want = torch.autograd.grad(ref, ins, grad, allow_unused=True)
    for name, g, w in zip(range(len(ins)), got, want):
        if w is None or g is None:   # None: an expert that got no rows, as the eager loop leaves it
            assert (g is None or g.abs().max() == 0) and (w is None or w.abs().max() == 0), f"grad of input {name}"
            continue
        # Relative error, with an absolute floor for gradients that are zero up to rounding (router logits
        # with k=1 and renormalisation: the weight is exactly 1 whatever the logits).
        err = (g.double() - w.double()).norm()
        assert err <= 2 * TOL[case.dtype] * w.double().norm() + 1e-6 * w.numel() ** 0.5, f"grad of input {name}"


def test_empty_batch_backward():
    x, logits, kw = Case(T=0, D=16, F=24, E=4, k=2, dtype=torch.float32).make(requires_grad=True)
    out = moe_fuser.fused_moe(x, logits, **kw)
    grads = torch.autograd.grad(out.sum(), leaves(x, logits, kw), allow_unused=True)
    assert grads[0].shape == x.shape and all(g is None or g.abs().sum() == 0 for g in grads)


@pytest.mark.parametrize("glu,act", [(None, "gelu"), ("separate", "silu"), ("interleaved", "gpt_oss"),
                                     ("concat", "gelu_tanh")])
def test_gradcheck_float64(glu, act):
    x, logits, kw = Case(T=5, D=6, F=7, E=4, k=2, dtype=torch.float64, glu=glu, activation=act,
                         bias=True).make(requires_grad=True)
    names = [n for n in ("w1", "w2", "w3", "b1", "b2", "b3") if n in kw]

    def f(x, logits, *ws):
        return moe_fuser.fused_moe(x, logits, **{**kw, **dict(zip(names, ws))}, impl="cpu")

    # fast_mode checks random vector-Jacobian products (seconds instead of minutes for the full Jacobian)
    assert torch.autograd.gradcheck(f, (x, logits, *[kw[n] for n in names]), eps=1e-6, atol=1e-6,
                                    fast_mode=True)


@pytest.mark.parametrize("compiled", [False, True])
def test_idle_experts_of_weight_lists_keep_no_gradient(compiled):
    """Weight lists in eager mode: an expert that got no token keeps ``grad is None``, as in the eager loop (which
    never touches it), so an optimizer step leaves it alone; the others match the reference. A compiled graph
    cannot return a data-dependent None: there the idle experts get zero gradients, as a compiled loop's do."""
    case = Case(T=7, D=12, F=20, E=6, k=2, dtype=torch.float32, glu="separate", as_list=True)
    x, logits, kw = case.make(requires_grad=True)
    with torch.no_grad():
        logits[:, 4:] = -1e4   # experts 4 and 5 get no token
    fn = torch.compile(moe_fuser.fused_moe, backend="aot_eager", fullgraph=True) if compiled else moe_fuser.fused_moe
    fn(x, logits, **kw).square().sum().backward()
    ref = moe_fuser.fused_moe(x, logits, **kw, impl="reference")
    names = ("w1", "w2", "w3")
    want = list(torch.autograd.grad(ref.square().sum(), [w for n in names for w in kw[n][:4]]))
    for n in names:
        for e, w in enumerate(kw[n]):
            if e < 4:
                assert rel_err(w.grad, want.pop(0)) < TOL[torch.float32], f"{n}[{e}]"
            elif compiled:
                assert w.grad is not None and w.grad.abs().max() == 0, f"{n}[{e}]"
            else:
                assert w.grad is None, f"{n}[{e}]"


@pytest.mark.parametrize("as_list", [False, True])
def test_double_backward_says_the_backward_has_no_derivative(as_list):
    """create_graph=True builds the first gradient through the backward op, and backpropagating through that
    gradient then fails saying the op has a first derivative only and naming the fix, instead of failing inside
    the lowering or dropping the term silently; the named fix (impl="reference") gives the second derivative."""
    x, logits, kw = Case(T=7, D=12, F=20, E=4, k=2, dtype=torch.float32, as_list=as_list).make(requires_grad=True)
    gx, = torch.autograd.grad(moe_fuser.fused_moe(x, logits, **kw).square().sum(), x, create_graph=True)
    assert gx.requires_grad
    with pytest.raises(RuntimeError, match="first derivative only.*impl='reference'"):
        gx.sum().backward()
    gx, = torch.autograd.grad(moe_fuser.fused_moe(x, logits, **kw, impl="reference").square().sum(), x,
                              create_graph=True)
    gx.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_per_expert_lists_are_not_copied():
    """ModuleList-style weights must reach the GEMMs as they are: no stack/cat of expert weights per call."""
    x, logits, kw = Case(T=9, D=16, F=24, E=4, k=2, dtype=torch.float32, as_list=True).make(requires_grad=True)
    seen = []

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    with Spy():
        out = moe_fuser.fused_moe(x, logits, **kw)
        out.sum().backward()
    assert torch.ops.aten.stack.default not in seen
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in kw["w1"])


@pytest.mark.parametrize("as_list", [False, True])
def test_frozen_expert_weights_get_no_weight_gradients(monkeypatch, as_list):
    """Training only the router and the layers around (expert weights frozen) must not compute or allocate
    expert weight gradients; the other gradients still match the reference."""
    from moe_fuser.lowering import cpu

    asked = []
    backward = cpu.CpuLowering.backward

    def spy(self, *args):
        asked.append(args[-1])
        return backward(self, *args)

    monkeypatch.setattr(cpu.CpuLowering, "backward", spy)
    x, logits, kw = Case(T=21, D=16, F=24, E=5, k=2, dtype=torch.float32, bias=True,
                         as_list=as_list).make(requires_grad=True)
    for w in leaves(x, logits, kw)[2:]:
        w.requires_grad_(False)
    grad = torch.randn(21, 16)
    got = torch.autograd.grad(moe_fuser.fused_moe(x, logits, **kw, impl="cpu"), (x, logits), grad)
    want = torch.autograd.grad(moe_fuser.fused_moe(x, logits, **kw, impl="reference"), (x, logits), grad)
    assert asked == [(True, True, False)]
    for g, w in zip(got, want):
        assert rel_err(g, w) < TOL[torch.float32]


def test_activation_backward_matches_autograd():
    from moe_fuser.ops.activations import expert_activation, expert_activation_backward
    from moe_fuser.spec import ExpertSpec

    for glu in (None, "separate", "concat", "interleaved"):
        for act in ("silu", "gelu", "gelu_tanh", "relu", "relu2", "gpt_oss"):
            if act == "gpt_oss" and glu is None:
                continue
            for limit in ((None, 1.5) if glu else (None,)):   # 1.5 clamps many of the N(0, 4) values
                spec = ExpertSpec(num_experts=1, activation=act, glu=glu, limit=limit)
                h = (torch.randn(11, 2 * 9 if glu else 9, dtype=torch.float64) * 2).requires_grad_()
                a = expert_activation(h, spec)
                dA = torch.randn_like(a)
                (want,) = torch.autograd.grad(a, h, dA)
                got = expert_activation_backward(h.detach(), dA, spec)
                assert torch.allclose(got, want, atol=1e-12), (glu, act, limit)


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh", "relu", "relu2"])
def test_activation_into_strided_buffers(act):
    """act_fn(..., out=) into a half of a wider buffer (the CPU backward's slots), from contiguous and strided
    inputs and in place: torch 2.13's gelu.out writes a strided out as if it were contiguous when the input is."""
    from moe_fuser.ops.activations import act_fn

    for h_strided in (False, True):
        h = torch.randn(13, 2 * 24)[:, 24:] if h_strided else torch.randn(13, 24)
        want = act_fn(act, h)
        buf = torch.randn(13, 2 * 24)
        act_fn(act, h, out=buf[:, :24])
        torch.testing.assert_close(buf[:, :24], want, rtol=1e-6, atol=1e-6)   # vector and scalar paths may differ
        inplace = h.clone()
        assert act_fn(act, inplace, out=inplace) is inplace
        torch.testing.assert_close(inplace, want, rtol=1e-6, atol=1e-6)
