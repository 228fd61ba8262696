"""Expert activations shared by every lowering: plain (silu, gelu, gelu_tanh, relu, relu2 = squared ReLU), GLU in
three weight layouts, GPT-OSS's clamped SwiGLU, and DeepSeek-V4's clamp of gate and up before any GLU.

``expert_activation(h_NH, spec)`` maps the first projection's output (``H = F`` plain, ``2F`` gated, laid out as
``[gate | up]`` for ``glu in ("separate", "concat")`` and as alternating columns for ``"interleaved"``) to the
input of the second projection ``[N, F]``. ``expert_activation_backward(h_NH, dA_NF, spec)`` is its vector-Jacobian
product written out with ATen's own backward ops: lowerings run inside custom-op kernels, below the autograd
dispatch key, where autograd cannot be called. Tests check it against autograd on ``expert_activation``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..spec import ExpertSpec

__all__ = ["act_backward", "act_fn", "clamp_gate_up", "expert_activation", "expert_activation_backward",
           "gated_activation", "gated_activation_backward", "split_gate_up"]


def act_fn(name: str, h: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The activation ``name`` of ``h``, written into ``out`` when given (``h`` itself for in place; a view of a
    larger buffer is fine). Explicit overloads: resolving an ``OpOverloadPacket`` costs about as much as the call."""
    aten = torch.ops.aten
    if name == "silu":
        return F.silu(h) if out is None else aten.silu.out(h, out=out)
    if name in ("gelu", "gelu_tanh"):
        approximate = "none" if name == "gelu" else "tanh"
        if out is None:
            return F.gelu(h, approximate=approximate)
        if out is h or not out.is_contiguous():
            # in place: gelu.out writes a strided ``out`` as if it were contiguous when ``h`` is (its oneDNN path,
            # torch 2.13 CPU)
            return aten.gelu_.default(out if out is h else out.copy_(h), approximate=approximate)
        return aten.gelu.out(h, approximate=approximate, out=out)
    if name == "relu":
        return F.relu(h) if out is None else aten.clamp_min.out(h, 0, out=out)
    if name == "relu2":
        return torch.square(F.relu(h)) if out is None else aten.clamp_min.out(h, 0, out=out).square_()
    raise ValueError(f"activation {name!r} has no plain form; use silu, gelu, gelu_tanh, relu or relu2")


def split_gate_up(h_NH: torch.Tensor, glu: str) -> tuple[torch.Tensor, torch.Tensor]:
    if glu == "interleaved":
        return h_NH[..., 0::2], h_NH[..., 1::2]
    gate, up = h_NH.chunk(2, dim=-1)
    return gate, up


def clamp_gate_up(gate: torch.Tensor, up: torch.Tensor, spec: ExpertSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """gate and up as the activation reads them: gate at most ``spec.limit``, up within +-limit (GPT-OSS,
    DeepSeek-V4), or unchanged when the spec has no limit."""
    if spec.limit is None:
        return gate, up
    return gate.clamp(max=spec.limit), up.clamp(min=-spec.limit, max=spec.limit)


def gated_activation(gate: torch.Tensor, up: torch.Tensor, spec: ExpertSpec) -> torch.Tensor:
    gate, up = clamp_gate_up(gate, up, spec)
    if spec.activation == "gpt_oss":
        return (up + 1) * (gate * torch.sigmoid(gate * spec.alpha))
    a = act_fn(spec.activation, gate)
    if torch.is_grad_enabled() and (a.requires_grad or up.requires_grad):
        return a * up
    return a.mul_(up)          # no autograd here (e.g. inside the custom op): one [N, F] buffer, not two


def expert_activation(h_NH: torch.Tensor, spec: ExpertSpec) -> torch.Tensor:
    if not spec.gated:
        return act_fn(spec.activation, h_NH)
    return gated_activation(*split_gate_up(h_NH, spec.glu), spec)


def act_backward(name: str, grad: torch.Tensor, h: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The activation's vector-Jacobian product, written into ``out`` when given (which may be ``grad`` itself).
    Explicit overloads: resolving an ``OpOverloadPacket`` costs about as much as the call itself."""
    aten = torch.ops.aten
    if name == "silu":
        return aten.silu_backward.default(grad, h) if out is None else \
            aten.silu_backward.grad_input(grad, h, grad_input=out)
    if name in ("gelu", "gelu_tanh"):
        approximate = "none" if name == "gelu" else "tanh"
        return aten.gelu_backward.default(grad, h, approximate=approximate) if out is None else \
            aten.gelu_backward.grad_input(grad, h, approximate=approximate, grad_input=out)
    if name == "relu":
        return aten.threshold_backward.default(grad, h, 0) if out is None else \
            aten.threshold_backward.grad_input(grad, h, 0, grad_input=out)
    if name == "relu2":
        return torch.mul(F.relu(h).mul_(2), grad, out=out)
    raise ValueError(f"activation {name!r} has no plain form; use silu, gelu, gelu_tanh, relu or relu2")


def gated_activation_backward(gate: torch.Tensor, up: torch.Tensor, dA_NF: torch.Tensor, spec: ExpertSpec,
                              act_gate: Optional[torch.Tensor] = None,
                              out: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> tuple[torch.Tensor, ...]:
    """(d_gate, d_up), written into the buffers ``out`` when given. ``act_gate``: ``act_fn(spec.activation, g)`` of
    the clamped gate ``g`` (``clamp_gate_up``) when the caller already has it (not for gpt_oss), so it is not
    computed again."""
    g, u = clamp_gate_up(gate, up, spec)
    d_gate_out, d_up_out = (None, None) if out is None else out
    if spec.activation == "gpt_oss":
        sig = torch.sigmoid(g * spec.alpha)
        d_up = torch.mul(dA_NF, g * sig, out=d_up_out)
        d_gate = torch.mul(dA_NF * (u + 1), sig + spec.alpha * g * sig * (1 - sig), out=d_gate_out)
    else:
        d_up = torch.mul(dA_NF, act_fn(spec.activation, g) if act_gate is None else act_gate, out=d_up_out)
        d_gate = act_backward(spec.activation, torch.mul(dA_NF, u, out=d_gate_out), g, out=d_gate_out)
    if spec.limit is not None:  # a clamped value passes no gradient
        d_up.mul_((up >= -spec.limit) & (up <= spec.limit))
        d_gate.mul_(gate <= spec.limit)
    return d_gate, d_up


def expert_activation_backward(h_NH: torch.Tensor, dA_NF: torch.Tensor, spec: ExpertSpec,
                               act_gate: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``dh`` for ``h_NH``; for a GLU its gate and up halves are written in place into one new buffer (no
    concatenation copy)."""
    if not spec.gated:
        return act_backward(spec.activation, dA_NF, h_NH)
    dh_NH = torch.empty(h_NH.shape, dtype=h_NH.dtype, device=h_NH.device)
    gated_activation_backward(*split_gate_up(h_NH, spec.glu), dA_NF, spec, act_gate,
                              out=split_gate_up(dh_NH, spec.glu))
    return dh_NH
