"""SiLU experts' elementwise work (SwiGLU or plain) in one pass per direction on CPU (``cpu_glu.cpp``, part of the
native library that ``native`` builds), for the ATen lowering. Where that library is not built, ``available()`` is
False and the lowering keeps its plain ATen path, which computes the same values.

Tensors: CPU, float32 or bfloat16, all one dtype, ``[rows, F]`` (or ``[E, C, F]``: any leading dims that
flatten to rows of one stride) with unit column stride; the routing weights one per row, contiguous.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Optional

import torch

from . import native

__all__ = ["available", "silu_backward", "silu_glu", "supports"]

_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_P, _I = ctypes.c_void_p, ctypes.c_int64


@functools.lru_cache(maxsize=None)
def _library() -> Optional[ctypes.CDLL]:
    lib = native.library()
    if lib is None:
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
