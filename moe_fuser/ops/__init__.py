"""The fused MoE op: routing, the grouped-experts custom op (torch.library) and the public entry points."""

from .fused import fused_moe, moe_forward
from .routing import RouterStats, route

__all__ = ["RouterStats", "fused_moe", "moe_forward", "route"]
