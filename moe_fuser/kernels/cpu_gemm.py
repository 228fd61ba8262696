"""An expert group's independent float32 GEMMs in one native call (``cpu_gemm.cpp``, part of the library that
``native`` builds): cut into tiles that torch's threads take one at a time, each a single-threaded call of the BLAS
torch links. For the ATen lowering, whose GEMMs are one expert's rows each.

Runs where the native library is built and torch's BLAS is MKL (which runs single-threaded inside the tiles'
OpenMP region) exposing ``sgemm_``, as torch's x86 builds do, unless ``MOE_FUSER_NATIVE_GEMMS=0`` (or ``ENABLED``
set False: the benchmarks' switch); ``available()`` is False elsewhere and ``mm`` returns False, leaving the GEMMs
to the caller (``torch.mm``). Operands: CPU float32 matrices with one unit stride (row-major
or a transposed view of one); the output row-major.
"""

from __future__ import annotations

import ctypes
import functools
import os
from typing import Optional, Sequence

import torch

from . import native

__all__ = ["available", "mm"]

# Each thread gets about this many tiles (dynamic scheduling evens out GEMMs of different sizes and a thread the
# host slows down) ...
TILES_PER_THREAD = 2
# ... and no tile is narrower than this many rows or columns (the BLAS's own blocking).
MIN_TILE = 64
_INT32 = 2**31 - 1
ENABLED = os.environ.get("MOE_FUSER_NATIVE_GEMMS", "1") != "0"


@functools.lru_cache(maxsize=None)
def _sgemm() -> Optional[int]:
    """The address of torch's ``sgemm_``, where the library is built and the BLAS is MKL."""
    lib = native.library()
    if lib is None or not torch.backends.mkl.is_available():
        return None
    try:
        blas = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        address = ctypes.cast(blas.sgemm_, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None
    lib.moe_gemms.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64,
                              ctypes.c_int64]
    lib.moe_gemms.restype = None
    return address


def available() -> bool:
    """Whether ``mm`` runs GEMMs natively here (building the library on the first call)."""
    return ENABLED and _sgemm() is not None


def _operand(t: torch.Tensor) -> Optional[tuple[int, int]]:
    """(transposed, leading dimension) of a 2-D float32 CPU matrix as the BLAS reads it, or None."""
    if t.dtype != torch.float32 or t.dim() != 2 or t.device.type != "cpu":
        return None
    rows, cols = t.shape
    s0, s1 = t.stride()
    if s1 == 1 and (s0 >= cols or rows == 1):
        transposed, ld = 0, max(s0, cols)
    elif s0 == 1 and (s1 >= rows or cols == 1):
        transposed, ld = 1, max(s1, rows)
    else:
        return None
    return (transposed, ld) if ld <= _INT32 else None


def mm(items: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], accumulate: bool = False) -> bool:
    """``out = a @ b`` (``out += a @ b`` with ``accumulate``) for every ``(a, b, out)`` of ``items``, in one call;
    the outputs must not overlap each other or any operand. Returns False, having done nothing, where any GEMM does
    not qualify (see the module docstring; also an empty inner dimension or one beyond the BLAS's 32-bit sizes) or
    the native path is unavailable."""
    sgemm = _sgemm() if ENABLED else None
    if sgemm is None:
        return False
    desc = []
    for a, b, out in items:
        (m, k), n = a.shape, b.shape[1]
        if b.shape[0] != k or tuple(out.shape) != (m, n):
            raise ValueError(f"cpu_gemm.mm: shapes {tuple(a.shape)} @ {tuple(b.shape)} -> {tuple(out.shape)}")
        oa, ob, oc = _operand(a), _operand(b), _operand(out)
        if oa is None or ob is None or oc is None or oc[0] or k == 0 or max(m, n, k) > _INT32:
            return False
        desc += (oa[0], ob[0], m, n, k, a.data_ptr(), oa[1], b.data_ptr(), ob[1], out.data_ptr(), oc[1],
                 int(accumulate))
    if desc:
        native.library().moe_gemms(sgemm, len(items), (ctypes.c_int64 * len(desc))(*desc),
                                   torch.get_num_threads(), TILES_PER_THREAD, MIN_TILE)
    return True
