"""The reference lowering: the experts as the natural eager loop, in plain differentiable PyTorch.

This is the oracle every other lowering is tested against, and what ``impl="reference"`` runs. It is written
for clarity, not speed: one boolean mask per expert, a gather, the FFN, and an ``index_add_`` of the weighted
result, accumulated in fp32 and cast back to the input dtype (to ``ExpertSpec.combine_dtype`` when set).
Autograd differentiates it, so it also gives the reference gradients (float64 included, for gradcheck).

Legend: T tokens, D model dim, F expert hidden dim, E experts, K top-k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.activations import expert_activation
from ..spec import ExpertSpec

__all__ = ["expert_param", "experts_reference"]


def expert_param(ws, e: int):
    """Expert ``e``'s tensor from a stacked ``[E, ...]`` tensor or a per-expert list; None stays None."""
    if ws is None:
        return None
    return ws[e]


def experts_reference(x_TD: torch.Tensor, topk_weights_TK: torch.Tensor, topk_ids_TK: torch.Tensor,
                      w1, w2, w3, b1, b2, b3, spec: ExpertSpec) -> torch.Tensor:
    out_TD = torch.zeros(x_TD.shape, dtype=torch.promote_types(x_TD.dtype, torch.float32), device=x_TD.device)
    for e in range(spec.num_experts):
        tok, slot = torch.where(topk_ids_TK == e)
        xe = x_TD[tok]
        h = F.linear(xe, w1[e], expert_param(b1, e))
        if spec.glu == "separate":
            h = torch.cat([h, F.linear(xe, w3[e], expert_param(b3, e))], dim=-1)
        y = F.linear(expert_activation(h, spec), w2[e], expert_param(b2, e))
        out_TD = out_TD.index_add(0, tok, y.to(out_TD.dtype) * topk_weights_TK[tok, slot, None].to(out_TD.dtype))
    return out_TD.to(spec.combine_dtype or x_TD.dtype)
