"""The Triton lowering (moe_fuser/lowering/cuda.py) without a GPU: its cases run in Triton's CPU interpreter.

Triton chooses between compiled and interpreted kernels when a kernel is decorated, from ``TRITON_INTERPRET``.
Setting it inside this pytest process would also make auto selection hand every later test's CPU tensors to the
interpreted kernels (~1000x slower than ATen). So ``test_interpreter_cases`` runs ``triton_cases.py`` (which
pytest does not collect by itself) in a child process with ``TRITON_INTERPRET=1``. Run them directly with:

    TRITON_INTERPRET=1 python -m pytest tests/lowering/triton_cases.py -q

The other tests here check what holds without the interpreter: CPU tensors are refused with the reason, and a
CPU-only install without triton imports and runs cleanly.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_fuser import fused_moe, lowering

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None


def _run(args, env_extra, timeout):
    env = {**os.environ, **env_extra, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton): nothing to interpret")
def test_interpreter_cases():
    proc = _run(["-m", "pytest", str(HERE / "triton_cases.py"), "-q", "-x", "-p", "no:cacheprovider"],
                {"TRITON_INTERPRET": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter is on in this process")
def test_cpu_tensors_need_the_interpreter():
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        lowering.select("triton", torch.device("cpu"))
    assert lowering.select(None, torch.device("cpu")).name == "cpu"


def test_imports_and_runs_cleanly_without_triton():
    """A CPU-only install: triton unimportable. moe_fuser imports, auto selection runs on CPU without trying
    triton, and an explicit impl='triton' fails with the reason."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, moe_fuser\n"
        "x, logits = torch.randn(5, 8), torch.randn(5, 4)\n"
        "w1, w2 = torch.randn(4, 6, 8), torch.randn(4, 8, 6)\n"
        "out = moe_fuser.fused_moe(x, logits, w1, w2, top_k=2)\n"
        "assert out.shape == (5, 8) and sys.modules['triton'] is None\n"
        "try:\n"
        "    moe_fuser.fused_moe(x, logits, w1, w2, top_k=2, impl='triton')\n"
        "except ValueError as exc:\n"
        "    assert 'triton is not importable' in str(exc), exc\n"
        "    print('refused:', exc)\n"
        "else:\n"
        "    raise AssertionError('impl=triton ran without triton')\n"
    )
    proc = _run(["-c", code], {"TRITON_INTERPRET": "1"}, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "refused:" in proc.stdout


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_explicit_triton_on_cpu_fails_loudly_through_fused_moe():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter is on in this process")
    x, logits = torch.randn(5, 8), torch.randn(5, 4)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        fused_moe(x, logits, torch.randn(4, 6, 8), torch.randn(4, 8, 6), top_k=2, impl="triton")
