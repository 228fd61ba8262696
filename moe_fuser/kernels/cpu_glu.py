"""SiLU experts' elementwise work (SwiGLU or plain) in one pass per direction on CPU (``cpu_glu.cpp``), for the ATen
lowering.

Built on first use with the host's g++ (``$CXX`` overrides it) into ``$MOE_FUSER_CACHE_DIR`` (default
``~/.cache/moe_fuser``), keyed by the source, the compiler, torch's version and the CPU's flags (the build is
``-march=native``), then loaded through ctypes. It links the libgomp that torch ships, so its OpenMP loops run on
torch's own thread pool. Where there is no compiler, the build fails, or ``MOE_FUSER_NATIVE_KERNELS=0``,
``available()`` is False (the reason logged once on the ``moe_fuser`` logger) and the lowering keeps its plain ATen
path, which computes the same values.

Tensors: CPU, float32 or bfloat16, all one dtype, ``[rows, F]`` (or ``[E, C, F]``: any leading dims that
flatten to rows of one stride) with unit column stride; the routing weights one per row, contiguous.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import torch

__all__ = ["available", "silu_backward", "silu_glu", "supports"]

log = logging.getLogger("moe_fuser")

_SOURCE = Path(__file__).with_name("cpu_glu.cpp")
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_P, _I = ctypes.c_void_p, ctypes.c_int64


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _build(cache_dir: Path) -> Path:
    """The shared library's path, compiled there unless a build of the same inputs is already cached."""
    cxx = shlex.split(os.environ.get("CXX", "")) or [shutil.which("g++")]   # $CXX may carry a wrapper (ccache)
    if not cxx[0]:
        raise RuntimeError("no C++ compiler (g++ or $CXX) on PATH")
    torch_lib = Path(torch.__file__).parent / "lib"
    flags = ["-O3", "-march=native", "-fPIC", "-shared", "-std=c++17"]
    if (torch_lib / "libgomp.so.1").exists():   # torch's own OpenMP runtime: share its thread pool
        flags += ["-fopenmp", f"-L{torch_lib}", "-l:libgomp.so.1", f"-Wl,-rpath,{torch_lib}"]
    version = subprocess.run([*cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\0".join([_SOURCE.read_text(), " ".join(cxx), version, " ".join(flags), torch.__version__,
                                    _cpu_flags()]).encode()).hexdigest()[:16]
    lib = cache_dir / f"cpu_glu-{key}.so"
    if lib.exists():
        return lib
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir)
    os.close(fd)
    try:
        done = subprocess.run([*cxx, *flags, str(_SOURCE), "-o", tmp], capture_output=True, text=True, timeout=300)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cxx)} failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, lib)   # atomic: concurrent builders (pytest-xdist workers) each publish a whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


@functools.lru_cache(maxsize=None)
def _library() -> Optional[ctypes.CDLL]:
    if os.environ.get("MOE_FUSER_NATIVE_KERNELS", "1") == "0":
        log.info("moe_fuser: native CPU kernels switched off (MOE_FUSER_NATIVE_KERNELS=0)")
        return None
    cache = Path(os.environ.get("MOE_FUSER_CACHE_DIR") or Path.home() / ".cache" / "moe_fuser")
    try:
        lib = ctypes.CDLL(str(_build(cache)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("moe_fuser: native CPU kernels unavailable, using plain ATen for SiLU experts (%s)", e)
        return None
    lib.moe_silu_glu.argtypes = [ctypes.c_int, _I, _I, _P, _I, _P, _I, _P, _I, ctypes.c_int]
    lib.moe_silu_glu.restype = None
    lib.moe_silu_backward.argtypes = [ctypes.c_int, _I, _I, _P, _I, _P, _I, _P, _I, _P, _P, _I, _P, _I, _P, _I, _P,
                                      ctypes.c_int, ctypes.c_int]
    lib.moe_silu_backward.restype = None
    return lib


def available() -> bool:
    """Whether the kernels are built and loaded (building them on the first call)."""
    return _library() is not None


def _row_stride(t: torch.Tensor) -> Optional[int]:
    """The stride between consecutive rows of ``t`` seen as ``[rows, F]``, or None where it has none (a column
    stride other than one, or leading dims that do not flatten to one row stride)."""
    st, sh = t.stride(), t.shape
    if len(st) < 2 or st[-1] != 1:
        return None
    for d in range(len(st) - 3, -1, -1):
        if sh[d] > 1 and st[d] != st[d + 1] * sh[d + 1]:
            return None
    return st[-2]


def supports(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether these ``[rows, F]`` tensors (all one shape; None entries skipped) can go to the kernels, and the
    kernels are built. (Checked per expert group: plain attribute reads, a few microseconds.)"""
    shape = dtype = None
    for t in tensors:
        if t is None:
            continue
        if shape is None:
            shape, dtype = t.shape, t.dtype
            if dtype not in _DTYPES:
                return False
        if not t.is_cpu or t.dtype != dtype or t.shape != shape or _row_stride(t) is None:
            return False
    return shape is not None and available()


def _rows(t: torch.Tensor) -> int:
    return t.numel() // t.shape[-1] if t.shape[-1] else 0


def _ptr(t: Optional[torch.Tensor]) -> tuple[Optional[int], int]:
    """(data pointer, row stride) of an optional ``[rows, F]`` argument that ``supports`` accepted (so its row
    stride is its second-to-last one)."""
    return (None, 0) if t is None else (t.data_ptr(), t.stride(-2))


def silu_glu(gate: torch.Tensor, up: Optional[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """``out = silu(gate) * up``, or ``silu(gate)`` where ``up`` is None (``out`` may be ``gate``'s memory).
    Callers check ``supports`` first."""
    n, F = _rows(out), out.shape[-1]
    if n and F:
        _library().moe_silu_glu(_DTYPES[gate.dtype], n, F, *_ptr(gate), *_ptr(up), *_ptr(out),
                                torch.get_num_threads())
    return out


def silu_backward(gate: torch.Tensor, up: Optional[torch.Tensor], dA: torch.Tensor, weight: Optional[torch.Tensor],
                  a: torch.Tensor, d_gate: torch.Tensor, d_up: Optional[torch.Tensor],
                  need_dg: bool = True, weight_a: bool = False) -> Optional[torch.Tensor]:
    """The backward of ``silu(gate) * up`` (or of ``silu(gate)``: ``up`` and ``d_up`` None) from ``dA`` in one pass:
    writes the activation ``a`` (recomputed; with ``weight_a`` times ``weight``, so that the second projection's
    weight gradient needs no weighted copy of the output gradient) and the gradients ``d_gate`` (and ``d_up``) of
    ``dA`` scaled per row by ``weight`` (one value per row, contiguous, the tensors' dtype; None: 1); returns the
    routing weight's gradient ``rowsum(a * dA)`` (``a`` unweighted) in float32, shaped like the rows, when
    ``need_dg``. Any output may be the memory of an input (each element is read before it is written). Callers
    check ``supports`` first."""
    n, F = _rows(dA), dA.shape[-1]
    if weight is not None and (weight.numel() != n or not weight.is_contiguous() or weight.dtype != dA.dtype):
        raise ValueError(f"weight must be {n} contiguous {dA.dtype} values, one per row; got "
                         f"{tuple(weight.shape)} {weight.dtype}")
    if (up is None) != (d_up is None):
        raise ValueError("up and d_up go together: both for a GLU, neither for a plain silu")
    dg = torch.empty(dA.shape[:-1], dtype=torch.float32) if need_dg else None
    if not (n and F):
        return None if dg is None else dg.zero_()
    _library().moe_silu_backward(_DTYPES[gate.dtype], n, F, *_ptr(gate), *_ptr(up), *_ptr(dA),
                                 None if weight is None else weight.data_ptr(), *_ptr(a), *_ptr(d_gate), *_ptr(d_up),
                                 None if dg is None else dg.data_ptr(), int(weight_a), torch.get_num_threads())
    return dg
