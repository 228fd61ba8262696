"""Routing: router logits -> (topk_weights, topk_ids), as plain differentiable PyTorch.

Entry point: ``route(router_logits_TE, spec, selection_bias_E)``. Routing is cheap next to the experts, so it
stays ordinary tensor code: autograd differentiates it, inductor fuses it, and the gradient reaches the router
logits through ``topk_weights``. It runs in ``RouterSpec.dtype`` (fp32 by default: the seed's pitfall 3, near-tie
flips in fp16/bf16) whatever the logits' dtype, and hands fp32 weights to the expert op.

Also here: capacity (Switch-style token dropping) and the router statistics (tokens per expert).

Legend: T tokens, E experts, K top-k, G token groups for capacity.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..spec import CapacitySpec, RouterSpec

__all__ = ["RouterStats", "apply_capacity", "route", "router_stats"]


class RouterStats(NamedTuple):
    """What load-balancing losses and monitoring need. ``tokens_per_expert`` counts kept (token, slot) pairs;
    dropped pairs (capacity) have id -1 in ``topk_ids``."""

    topk_weights: torch.Tensor
    topk_ids: torch.Tensor
    tokens_per_expert: torch.Tensor


def _group_mask(scores_TE: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    """True for experts in the ``topk_groups`` best of ``num_groups`` groups, per token."""
    T, E = scores_TE.shape
    grouped = scores_TE.view(T, spec.num_groups, E // spec.num_groups)
    if spec.group_score == "max":
        group_scores = grouped.amax(dim=-1)
    else:
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
    best_groups = group_scores.topk(spec.topk_groups, dim=-1, sorted=False).indices
    group_keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
    return group_keep.unsqueeze(-1).expand_as(grouped).reshape(T, E)


def route(router_logits_TE: torch.Tensor, spec: RouterSpec,
          selection_bias_E: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(topk_weights_TK, topk_ids_TK)``: weights in the routing dtype (fp32 by default), ids int64."""
    dtype = router_logits_TE.dtype if spec.dtype is None else torch.promote_types(spec.dtype, router_logits_TE.dtype)
    logits = router_logits_TE.to(dtype)
    if spec.topk_first:
        values_TK, ids_TK = _top(logits, spec)
        if spec.scoring == "softmax":    # sums to 1: no renormalisation
            weights_TK = values_TK.softmax(dim=-1)
        else:
            weights_TK = values_TK.sigmoid()
            if spec.renormalize:
                weights_TK = renormalize(weights_TK, spec)
    else:
        scores_TE = logits.softmax(dim=-1) if spec.scoring == "softmax" else logits.sigmoid()
        select_TE = scores_TE
        if selection_bias_E is not None:
            select_TE = scores_TE + selection_bias_E   # promoted as the model's own `scores + bias` is
        if spec.num_groups > 1:
            select_TE = select_TE.masked_fill(~_group_mask(select_TE, spec), float("-inf"))
        if selection_bias_E is None and spec.num_groups == 1:
            weights_TK, ids_TK = _top(scores_TE, spec)
        else:
            ids_TK = _top(select_TE, spec)[1]
            weights_TK = scores_TE.gather(1, ids_TK)
        if spec.renormalize:
            weights_TK = renormalize(weights_TK, spec)
    if spec.scaling_factor != 1.0:
        weights_TK = weights_TK * spec.scaling_factor
    return round_weights(weights_TK, spec), ids_TK


def _top(scores_TE: torch.Tensor, spec: RouterSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, ids) of the top ``spec.top_k`` scores per token: ``topk``, or for ``first_max`` the max as
    torch.max takes it (ties to the lowest id, as the model's max/argmax), ``[T, 1]``."""
    if spec.first_max:
        return scores_TE.max(dim=-1, keepdim=True)
    return scores_TE.topk(spec.top_k, dim=-1)


def renormalize(weights_TK: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    """``w / max(sum(w) + eps, renorm_min)`` over the k, as the spec's router renormalises."""
    denom = weights_TK.sum(dim=-1, keepdim=True)
    if spec.eps:
        denom = denom + spec.eps
    if spec.renorm_min:
        denom = denom.clamp(min=spec.renorm_min)
    return weights_TK / denom


def round_weights(weights_TK: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    """The weights rounded to ``spec.weights_dtype`` (as the model's own cast rounds them), in their dtype."""
    if spec.weights_dtype is None or spec.weights_dtype == weights_TK.dtype:
        return weights_TK
    return weights_TK.to(spec.weights_dtype).to(weights_TK.dtype)


def apply_capacity(topk_ids_TK: torch.Tensor, num_experts: int, capacity: CapacitySpec,
                   token_groups: int = 1) -> torch.Tensor:
    """Mark pairs beyond an expert's capacity with id -1. Positions are counted first come first served in
    token order (slot-major within a token), separately in each of ``token_groups`` equal token groups (one per
    sequence for Switch Transformers)."""
    T, K = topk_ids_TK.shape
    one_hot = torch.nn.functional.one_hot(topk_ids_TK.clamp(min=0), num_experts) * (topk_ids_TK >= 0).unsqueeze(-1)
    one_hot = one_hot.view(token_groups, (T // token_groups) * K, num_experts)
    position = one_hot.cumsum(dim=1).view(T, K, num_experts)
    position_TK = (position * one_hot.view(T, K, num_experts)).sum(-1)
    keep = position_TK <= capacity.capacity
    return torch.where(keep, topk_ids_TK, torch.full_like(topk_ids_TK, -1))


def router_stats(topk_weights_TK: torch.Tensor, topk_ids_TK: torch.Tensor, num_experts: int) -> RouterStats:
    kept = topk_ids_TK >= 0
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=topk_ids_TK.device)
    counts.scatter_add_(0, torch.where(kept, topk_ids_TK, num_experts).flatten(),
                        torch.ones_like(topk_ids_TK).flatten())
    return RouterStats(topk_weights_TK, topk_ids_TK, counts[:num_experts])
