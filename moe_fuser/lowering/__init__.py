"""Device lowerings of the grouped-experts op, behind one registry.

A lowering computes the expert part of the fused op (gather -> grouped FFN -> weighted combine) and its
backward for one kind of device. Each registers itself here by name; optional dependencies (triton, torch_npu)
are imported lazily, so a CPU-only install imports cleanly. ``select(impl, device)`` picks one:

- ``impl=None`` or ``"auto"``: the highest-priority lowering whose ``available(device)`` holds; the ATen
  lowering (``"cpu"``, plain ATen ops, valid on any device) is the fallback, and the choice is logged.
- an explicit name: that lowering, or a ``ValueError`` saying why it cannot run and what to do instead.
- ``"reference"`` is not a lowering: ``fused_moe`` runs the plain-PyTorch oracle without the custom op.

The contract every lowering keeps (``ExpertsLowering``): ``forward`` returns ``(out_TD, h_NH, order_N)`` where
``order_N`` is the stable argsort of the flattened expert ids (dropped slots, id -1, last) and ``h_NH`` (shape
``[T*K, H]``, the input's dtype) holds the first projection's output in that order, saved for backward; the
layout of its columns (or storage) is private to the lowering, since only its own ``backward`` reads it.
``backward`` returns the gradients in the op's order; in a per-expert weight list's gradients, None marks an
expert that got no rows (no gradient, as in an eager loop that skips it). A lowering may save ``h`` in several
tensors instead: it then has ``save_chunks(device, stacked, num_experts) -> int``, and ``forward(..., chunks=n)``
for ``n > 1`` returns a list of ``n`` tensors (row counts its own), which ``backward`` receives as that list
(``cpu`` does, for per-expert weight lists; see ``CpuLowering``). A lowering with ``saves_into = True`` also
takes ``forward(..., h_out=buf)``: it writes the saved rows of the kept pairs only (``[n, H]``, no rows for dropped
slots) into ``buf`` and returns it as ``h``, and its ``backward`` takes such an ``h`` (expert parallelism saves
every chunk into one tensor so; ``cpu`` does).

Lowerings: ``cpu`` (``cpu.py``, ATen, any device), ``triton`` (``cuda.py``, Triton kernels in
``moe_fuser.kernels``), ``npu`` (``npu.py``, torch_npu's fused MoE ops).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch

__all__ = ["ExpertsLowering", "LoweringEntry", "available_lowerings", "register_lowering", "select"]

log = logging.getLogger("moe_fuser")


class ExpertsLowering(Protocol):
    name: str

    def available(self, device: torch.device) -> Optional[str]:
        """None if this lowering can run on ``device``, else the reason it cannot."""

    def forward(self, x_TD, topk_weights_TK, topk_ids_TK, w1, w2, w3, b1, b2, b3, spec):
        ...

    def backward(self, grad_TD, x_TD, topk_weights_TK, topk_ids_TK, h_NH, order_N, w1, w2, w3, b1, b2, b3,
                 spec, needs_input_grad):
        ...


@dataclass
class LoweringEntry:
    name: str
    loader: Callable[[], ExpertsLowering]
    priority: int
    _instance: Optional[ExpertsLowering] = None
    _load_error: Optional[str] = None

    def load(self) -> Optional[ExpertsLowering]:
        if self._instance is None and self._load_error is None:
            try:
                self._instance = self.loader()
            except ImportError as exc:
                self._load_error = f"{type(exc).__name__}: {exc}"
        return self._instance


_REGISTRY: dict[str, LoweringEntry] = {}


def register_lowering(name: str, loader: Callable[[], ExpertsLowering], priority: int = 0) -> None:
    """Register a lowering. ``loader`` is called on first use and may raise ImportError for a missing
    optional dependency; that makes the lowering unavailable (auto selection skips it, an explicit request
    reports the error)."""
    _REGISTRY[name] = LoweringEntry(name, loader, priority)


def available_lowerings(device: torch.device) -> list[str]:
    out = []
    for entry in sorted(_REGISTRY.values(), key=lambda e: -e.priority):
        low = entry.load()
        if low is not None and low.available(device) is None:
            out.append(entry.name)
    return out


@torch.compiler.assume_constant_result
def _load_all() -> bool:
    """Load every lowering eagerly, even while dynamo traces a caller of ``select``: a loader imports modules,
    which dynamo cannot trace, and an instance first created inside a trace breaks its guards."""
    for entry in _REGISTRY.values():
        entry.load()
    return True


def select(impl: Optional[str], device: torch.device) -> ExpertsLowering:
    _load_all()
    if impl in (None, "auto"):
        for entry in sorted(_REGISTRY.values(), key=lambda e: -e.priority):
            low = entry.load()
            if low is not None and low.available(device) is None:
                return low
        raise ValueError(f"no moe_fuser lowering can run on device {device}")
    entry = _REGISTRY.get(impl)
    if entry is None:
        raise ValueError(f"impl={impl!r} is unknown; use None/'auto', 'reference' or one of {sorted(_REGISTRY)}")
    low = entry.load()
    if low is None:
        raise ValueError(f"impl={impl!r} cannot be loaded ({entry._load_error}); install its dependency or "
                         "use impl=None to pick an available lowering")
    reason = low.available(device)
    if reason is not None:
        raise ValueError(f"impl={impl!r} cannot run on device {device}: {reason}; use impl=None to pick an "
                         "available lowering")
    return low


def _load_cpu():
    from .cpu import CpuLowering
    return CpuLowering()


def _load_triton():
    from .cuda import TritonLowering
    return TritonLowering()


def _load_npu():
    from .npu import NpuLowering
    return NpuLowering()


register_lowering("cpu", _load_cpu, priority=0)
register_lowering("triton", _load_triton, priority=10)
register_lowering("npu", _load_npu, priority=10)
