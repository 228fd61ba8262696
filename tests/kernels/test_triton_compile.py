"""The Triton kernels compile for Hopper (sm_90) without a GPU, as the launchers call them.

The interpreter (tests/lowering/triton_cases.py) checks what the kernels compute but not that the compiler
accepts them. Here the launchers run on CPU tensors with every kernel replaced by a recorder that compiles the
exact specialization Triton's JIT would build (argument types and divisibility from Triton's own
``native_specialize_impl``, the constexprs, num_warps/num_stages) for ``cuda:90`` with the bundled ptxas, and
checks the properties performance depends on: the large-T GEMMs use wgmma with cp.async software pipelining,
every kernel fits in shared memory, and none spills registers (``cuobjdump -res-usage`` of the cubin: STACK 0)
with the default block configs. Nothing is launched (values are irrelevant).
"""

import math
import os
import re
import subprocess
import tempfile

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("the interpreter is on: kernels are not compiled", allow_module_level=True)
triton = pytest.importorskip("triton", reason="triton is not installed")
try:
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource
except ImportError as exc:  # internal API: moved in another triton version
    pytest.skip(f"triton's compile API differs here ({exc})", allow_module_level=True)

from moe_fuser.kernels import triton_moe, tuning  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
SMEM_LIMIT = 227 * 1024  # H100/H200: max dynamic shared memory per block
KERNELS = ("_count_kernel", "_scatter_kernel", "_gate_up_kernel", "_down_kernel", "_combine_kernel",
           "_down_bwd_kernel", "_wgrad_kernel")


class _Compiler:
    """Stands in for one kernel: ``kernel[grid](...)`` compiles the specialization once and records it."""

    def __init__(self, fn, compiled):
        self.fn, self.compiled = fn, compiled

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs):
        opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        values = {**dict(zip(self.fn.arg_names, args)), **kwargs}
        sig, consts, attrs = {}, {}, {}
        for i, p in enumerate(self.fn.params):
            v = values[p.name]
            if p.is_constexpr:
                sig[p.name], consts[p.name] = "constexpr", v
                continue
            ty, attr = native_specialize_impl(BaseBackend, v, False, True, True)
            sig[p.name] = ty
            if ty == "constexpr":
                consts[p.name] = v
            elif attr and BaseBackend.parse_attr(attr):
                attrs[(i,)] = BaseBackend.parse_attr(attr)
        key = (self.fn.__name__, repr(sorted(sig.items())), repr(sorted(consts.items())), repr(sorted(attrs)),
               repr(sorted(opts.items())))
        if key not in self.compiled:
            self.compiled[key] = triton.compile(ASTSource(self.fn, sig, consts, attrs), target=HOPPER,
                                                options=opts)


@pytest.fixture
def compiled(monkeypatch):
    done = {}
    for name in KERNELS:
        monkeypatch.setattr(triton_moe, name, _Compiler(getattr(triton_moe, name), done))
    return done


def _run(T, D, F, E, K, dtype, glu, act, bias, atomic, backward):
    cfg = tuning.block_config(E, F, D, dtype, torch.device("cpu"), T)
    H = 2 * F if glu in ("concat", "interleaved") else F
    x = torch.empty(T, D, dtype=dtype)
    w1, w2 = torch.empty(E, H, D, dtype=dtype), torch.empty(E, D, F, dtype=dtype)
    w3 = torch.empty(E, F, D, dtype=dtype) if glu == "separate" else None
    b1 = torch.empty(E, H, dtype=dtype) if bias else None
    b2 = torch.empty(E, D, dtype=dtype) if bias else None
    ids, weights = torch.randint(0, E, (T, K)), torch.rand(T, K)
    kw = dict(glu=glu, activation=act, alpha=1.702, limit=7.0 if act == "gpt_oss" else math.inf, config=cfg,
              atomic=atomic)
    _, h, _ = triton_moe.experts_forward(x, weights, ids, w1, w2, w3, b1, b2, None, **kw)
    if backward:
        triton_moe.experts_backward(torch.empty(T, D, dtype=dtype), x, weights, ids, h, w1, w2, w3, b1, b2, None,
                                    **kw, need_x=True, need_weights=True, need_w=True)
    return cfg


def _stack_bytes(kernel) -> int:
    """Per-thread stack (register spills) from cuobjdump's resource usage of the cubin."""
    tool = getattr(getattr(getattr(triton, "knobs", None), "nvidia", None), "cuobjdump", None)
    if tool is None or not getattr(tool, "path", None):
        pytest.skip("no cuobjdump with this triton")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([tool.path, "-res-usage", f.name], capture_output=True, text=True).stdout
    return int(re.search(r"STACK:(\d+)", usage).group(1))


def _check_resources(compiled):
    for key, kernel in compiled.items():
        assert kernel.metadata.shared <= SMEM_LIMIT, (key[0], kernel.metadata.shared)
        assert _stack_bytes(kernel) == 0, (key[0], "spills registers", key[-1])


def _ptx_counts(kernel):
    ptx = kernel.asm["ptx"]
    return ptx.count("wgmma.mma_async"), ptx.count("cp.async")


def test_large_T_bf16_swiglu_forward_and_backward_compile_pipelined(compiled):
    """The prefill configuration (BLOCK_M 128 tiles): every GEMM on wgmma with cp.async pipelining."""
    _run(4096, 512, 256, 8, 2, torch.bfloat16, "concat", "silu", False, False, True)
    gemms = {k: v for k, v in compiled.items() if k[0] in ("_gate_up_kernel", "_down_kernel", "_down_bwd_kernel",
                                                           "_wgrad_kernel")}
    # gate_up, down (forward), down (dx), down_bwd, wgrad (dW2: gathered left) and wgrad (dW1: gathered right)
    assert len(gemms) == 6
    for key, kernel in gemms.items():
        wgmma, async_copies = _ptx_counts(kernel)
        assert wgmma > 0 and async_copies > 0, (key[0], wgmma, async_copies)
    _check_resources(compiled)


def test_small_T_and_other_layouts_compile(compiled):
    """Decode tiles (BLOCK_M 16) with the atomic combine and separate w1/w3 (two-phase dx); fp16 interleaved
    GPT-OSS with biases; fp32 plain GELU; the mid-T tiles (BLOCK_M 64) forward and backward."""
    _run(16, 512, 352, 8, 2, torch.bfloat16, "separate", "silu", False, True, True)
    _run(64, 256, 96, 16, 4, torch.float16, "interleaved", "gpt_oss", True, False, False)
    _run(64, 128, 64, 8, 2, torch.float32, None, "gelu", True, False, False)
    _run(512, 256, 128, 8, 2, torch.bfloat16, "concat", "silu", False, False, True)
    assert {k[0] for k in compiled} == set(KERNELS)
    _check_resources(compiled)
