"""The CUDA lowering: the grouped experts as Triton kernels (``moe_fuser.kernels.triton_moe``), forward and backward.

``TritonLowering`` keeps the lowering contract of ``moe_fuser.lowering`` exactly as the ATen lowering does:
``forward`` returns ``(out_TD, h_NH, order_N)`` with ``order_N`` the stable argsort of the flat expert ids
(dropped pairs last) and ``h_NH`` the first projection in that order, zero in the dropped rows; ``backward``
returns ``(dx_TD, dweights_TK, dw1, dw2, dw3, db1, db2, db3)``, None where not needed or absent, weight grads
stacked for stacked weights and a list for per-expert lists.

How: per-expert weight lists are stacked once per call (the kernels index one ``[E, ...]`` tensor; this copies
the weights, which a stacked-weights model avoids), biases made contiguous; the block configuration comes from
``moe_fuser.kernels.tuning`` for (E, F, D, dtype, device, T) unless ``configs`` overrides it. The combine is
``"gather"`` (sorted rows, each token sums its K rows in slot order: deterministic, the default) or
``"atomic"`` (fp32 atomic adds into ``[T, D]``); ``torch.use_deterministic_algorithms(True)`` forces
``"gather"``. Inputs other than fp16, bf16 and fp32 (float64, for gradcheck) run the ATen lowering in both
directions.

Devices: CUDA tensors, or CPU tensors when Triton's interpreter is on (``TRITON_INTERPRET=1`` in the
environment before ``moe_fuser.kernels.triton_moe`` is first imported: that is how the CPU tests run it). The
module imports neither triton nor the kernels until a forward runs, so a CPU-only install without triton
imports and auto-selects cleanly.

Legend: T tokens, D model dim, F expert hidden dim, H = F or 2F, E experts, K top-k, N = T*K pairs.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import torch

from ..spec import ExpertSpec

__all__ = ["TritonLowering"]

COMBINES = ("gather", "atomic")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # tl.dot inputs with fp32 accumulation


def _interpreting() -> bool:
    mod = sys.modules.get("moe_fuser.kernels.triton_moe")
    if mod is not None:
        return mod.INTERPRET
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _aten():
    """The ATen lowering, for dtypes the kernels do not take (float64: gradcheck); it keeps the same contract."""
    from .cpu import CpuLowering
    return CpuLowering()


def _stacked(ws):
    if ws is None or isinstance(ws, torch.Tensor):
        return ws
    return torch.stack(list(ws))


def _bias(bs):
    bs = _stacked(bs)
    return None if bs is None else bs.contiguous()


def _like_input(grad, ws):
    """A stacked grad back in the input's form: a list of per-expert tensors for a per-expert list."""
    if grad is None or isinstance(ws, torch.Tensor):
        return grad
    return [g.clone() for g in grad.unbind(0)]


class TritonLowering:
    name = "triton"

    def __init__(self, combine: str = "gather", configs: Optional[dict] = None):
        """``configs``: a (partial) block configuration used for every call instead of the tuned data."""
        if combine not in COMBINES:
            raise ValueError(f"combine={combine!r} is unknown; use one of {COMBINES}")
        self.combine = combine
        self.configs = configs
        self._kernels = None

    def available(self, device: torch.device) -> Optional[str]:
        if device.type == "cuda":
            if not torch.cuda.is_available():
                return "CUDA is not available in this process"
        elif not (device.type == "cpu" and _interpreting()):
            return (f"the Triton kernels need CUDA tensors (got {device.type}); on CPU set TRITON_INTERPRET=1 "
                    "before triton is imported to run them in Triton's (slow) interpreter")
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            return f"triton is not importable ({exc}); pip install triton"
        return None

    def _k(self):
        if self._kernels is None:
            from ..kernels import triton_moe
            self._kernels = triton_moe
        return self._kernels

    def _setup(self, x_TD, T, w1, w2, w3, b1, b2, b3, spec: ExpertSpec):
        reason = self.available(x_TD.device)
        if reason is not None:
            raise ValueError(f"the Triton lowering cannot run here: {reason}")
        from ..kernels.tuning import block_config
        w1_, w2_, w3_ = _stacked(w1), _stacked(w2), _stacked(w3)
        E, D, F_ = w2_.shape[0], w2_.shape[1], w2_.shape[2]
        config = block_config(E, F_, D, x_TD.dtype, x_TD.device, T, self.configs)
        atomic = self.combine == "atomic" and not torch.are_deterministic_algorithms_enabled()
        kw = dict(glu=spec.glu, activation=spec.activation, alpha=spec.alpha, limit=spec.op_limit, config=config,
                  atomic=atomic)
        return (w1_, w2_, w3_, _bias(b1), _bias(b2), _bias(b3)), kw

    def forward(self, x_TD, topk_weights_TK, topk_ids_TK, w1, w2, w3, b1, b2, b3, spec: ExpertSpec):
        if x_TD.dtype not in DTYPES:
            return _aten().forward(x_TD, topk_weights_TK, topk_ids_TK, w1, w2, w3, b1, b2, b3, spec)
        ws, kw = self._setup(x_TD, topk_ids_TK.shape[0], w1, w2, w3, b1, b2, b3, spec)
        return self._k().experts_forward(x_TD, topk_weights_TK, topk_ids_TK, *ws, **kw)

    def backward(self, grad_TD, x_TD, topk_weights_TK, topk_ids_TK, h_NH, order_N, w1, w2, w3, b1, b2, b3,
                 spec: ExpertSpec, needs_input_grad):
        need_x, need_weights, need_w = needs_input_grad
        if x_TD.dtype not in DTYPES:
            return _aten().backward(grad_TD, x_TD, topk_weights_TK, topk_ids_TK, h_NH, order_N, w1, w2, w3, b1, b2,
                                    b3, spec, needs_input_grad)
        ws, kw = self._setup(x_TD, topk_ids_TK.shape[0], w1, w2, w3, b1, b2, b3, spec)
        dx, dweights, *dws = self._k().experts_backward(
            grad_TD, x_TD, topk_weights_TK, topk_ids_TK, h_NH, *ws, **kw, need_x=need_x,
            need_weights=need_weights, need_w=need_w)
        dws = [_like_input(g, w) for g, w in zip(dws, (w1, w2, w3, b1, b2, b3))]
        return (dx, dweights, *dws)
