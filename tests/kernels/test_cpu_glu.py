"""The native CPU SiLU kernels (``moe_fuser.kernels.cpu_glu``) against float64 PyTorch, in the layouts the CPU
lowering hands them: halves of one ``[rows, 2F]`` buffer (concat), blocks of a ``[2, rows, F]`` buffer (separate),
``[E, C, F]`` padded rows, row tails shorter than a vector, and outputs written over their inputs."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moe_fuser.kernels import cpu_glu

sys.path.insert(0, str(Path(__file__).parents[1] / "ops"))
from _moe_cases import rel_err  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and not os.environ.get("CXX"),
                                reason="no C++ compiler: the kernels are not built (the lowering uses ATen)")

# float32: the kernels' exp is within ~2 ulp of libm's; bfloat16: one or two roundings of 2^-8
TOL = {torch.float32: 2e-6, torch.bfloat16: 1e-2}


def _views(layout: str, rows: int, F_: int, dtype: torch.dtype, fill: bool = True):
    """(gate, up) of one buffer in ``layout``; random N(0, 2) values unless ``fill`` is False."""
    if layout == "concat":
        buf = torch.empty(rows, 2 * F_, dtype=dtype)
        halves = buf.chunk(2, -1)
    elif layout == "separate":
        halves = torch.empty(2, rows, F_, dtype=dtype).unbind(0)
    else:  # padded [E, C, F] rows, concat halves
        halves = torch.empty(3, rows // 3, 2 * F_, dtype=dtype).chunk(2, -1)
    if fill:
        for h in halves:
            h.copy_(torch.randn(h.shape) * 2)
    return halves


def test_builds_here():
    """Where a compiler is (CI has g++, as inductor needs it), the kernels build and load: the CPU lowering's silu
    tests here and in tests/lowering then run them, not the ATen fallback."""
    assert cpu_glu.available()


@pytest.mark.parametrize("layout", ["concat", "separate", "padded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("F_", [5, 8, 37])
def test_forward(layout, dtype, F_):
    gate, up = _views(layout, 24, F_, dtype)
    a = torch.empty(gate.shape, dtype=dtype)
    assert cpu_glu.supports(gate, up, a)
    cpu_glu.silu_glu(gate, up, a)
    assert rel_err(a, F.silu(gate.double()) * up.double()) < TOL[dtype]
    cpu_glu.silu_glu(up, None, a)   # plain silu
    assert rel_err(a, F.silu(up.double())) < TOL[dtype]
    if dtype == torch.bfloat16:
        cpu_glu.silu_glu(gate, up, a)
        # silu(gate) is rounded before the product, as ATen's silu then mul: the same bits almost everywhere
        assert (a == F.silu(gate) * up).float().mean() > 0.98


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_in_place_over_gate_and_extreme_inputs(dtype):
    """``out`` may be the gate's memory (inference writes the activation over the first projection); large
    magnitudes saturate like ATen's silu (no inf or NaN from the exp)."""
    gate, up = _views("concat", 9, 19, dtype)
    gate[0, :4] = torch.tensor([-1e4, -90.0, 90.0, 1e4], dtype=dtype)
    want = F.silu(gate.double()) * up.double()
    cpu_glu.silu_glu(gate, up, gate)
    assert torch.isfinite(gate).all() and rel_err(gate, want) < TOL[dtype]


@pytest.mark.parametrize("layout", ["concat", "separate", "padded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gated,weighted", [(True, True), (True, False), (False, True)])
def test_backward_against_autograd(layout, dtype, gated, weighted):
    """One pass: the recomputed activation, the routing weight's gradient rowsum(a * dA) and the activation's
    gradient of dA scaled by the routing weights, for SwiGLU and plain silu."""
    gate, up = _views(layout, 24, 37, dtype)
    up = up if gated else None
    dA = torch.randn(gate.shape).to(dtype)
    w = torch.rand(gate.shape[:-1]).to(dtype) if weighted else None
    g64 = gate.double().requires_grad_()
    u64 = up.double().requires_grad_() if gated else None
    act = F.silu(g64) * u64 if gated else F.silu(g64)
    act.backward(dA.double() * (w.double().unsqueeze(-1) if weighted else 1))
    a, d_gate = torch.empty_like(gate), torch.empty_like(gate)
    d_up = torch.empty_like(gate) if gated else None
    dg = cpu_glu.silu_backward(gate, up, dA, None if w is None else w.reshape(-1), a, d_gate, d_up)
    assert rel_err(a, act.detach()) < TOL[dtype]
    assert dg.dtype == torch.float32 and dg.shape == gate.shape[:-1]
    assert rel_err(dg, (a.double() * dA.double()).sum(-1)) < 1e-5   # from the stored (rounded) activation
    assert rel_err(d_gate, g64.grad) < TOL[dtype]
    if gated:
        assert rel_err(d_up, u64.grad) < TOL[dtype]
    if weighted:   # the activation weighted per row instead (dW2 = dy^T (w a)); dg still from the unweighted one
        assert torch.equal(cpu_glu.silu_backward(gate, up, dA, w.reshape(-1), a, d_gate, d_up, weight_a=True), dg)
        assert rel_err(a, act.detach() * w.double().unsqueeze(-1)) < 2 * TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_written_over_its_inputs(dtype):
    """The lowering's aliasing: the activation over dA, the gradients over the saved rows' shape (here over gate
    and up themselves), bit for bit what separate outputs get."""
    gate, up = _views("concat", 16, 29, dtype)
    dA = torch.randn(gate.shape).to(dtype)
    w = torch.rand(16).to(dtype)
    want = [torch.empty_like(gate) for _ in range(3)]
    want_dg = cpu_glu.silu_backward(gate, up, dA, w, *want)
    dg = cpu_glu.silu_backward(gate, up, dA, w, dA, gate, up)
    assert torch.equal(dg, want_dg) and torch.equal(dA, want[0])
    assert torch.equal(gate, want[1]) and torch.equal(up, want[2])


def test_what_the_kernels_do_not_take():
    gate, up = _views("concat", 4, 8, torch.float32)
    inter = torch.randn(4, 16)
    assert not cpu_glu.supports(inter[:, 0::2], inter[:, 1::2])            # interleaved columns: stride 2
    assert not cpu_glu.supports(gate.half(), up.half())                    # float16
    assert not cpu_glu.supports(gate, up.to(torch.bfloat16))               # mixed dtypes
    assert not cpu_glu.supports(gate, up[:3])                              # mismatched rows
    assert not cpu_glu.supports(torch.randn(4, 3, 8).transpose(0, 1), up.expand(3, 4, 8))  # rows of no one stride
    out = [torch.empty(4, 8) for _ in range(3)]
    with pytest.raises(ValueError, match="one per row"):
        cpu_glu.silu_backward(gate, up, torch.randn(4, 8), torch.rand(3), *out)
    with pytest.raises(ValueError, match="both for a GLU"):
        cpu_glu.silu_backward(gate, up, torch.randn(4, 8), None, *out[:2], None)


@pytest.mark.parametrize("setting", [{"MOE_FUSER_NATIVE_KERNELS": "0"}, {"CXX": "no-such-compiler"}])
def test_switched_off_or_without_a_compiler(tmp_path, setting):
    """``MOE_FUSER_NATIVE_KERNELS=0``, or a compiler that is not there, keeps the lowering on ATen (silu passes and
    GEMMs): nothing is built, and a missing compiler is named in one warning."""
    env = dict(os.environ, MOE_FUSER_CACHE_DIR=str(tmp_path), **setting)
    code = ("import logging; logging.basicConfig(); from moe_fuser.kernels import cpu_gemm, cpu_glu; "
            "print(cpu_glu.available(), cpu_glu.available(), cpu_gemm.available())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False False" and not any(tmp_path.iterdir())
    assert out.stderr.count("no-such-compiler") == ("CXX" in setting)
