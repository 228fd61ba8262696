"""moe_fuser: a torch.compile backend that finds Mixture-of-Experts layers and runs them as one fused op."""

from .explain import explain
from .ops import RouterStats, fused_moe, moe_forward
from .patterns import register_pattern
from .spec import CapacitySpec, ExpertSpec, MoESpec, MoEWeights, RouterSpec, SharedExpertSpec

__version__ = "0.1.0"

__all__ = [
    "CapacitySpec",
    "ExpertSpec",
    "MoESpec",
    "MoEWeights",
    "RouterSpec",
    "RouterStats",
    "SharedExpertSpec",
    "explain",
    "fused_moe",
    "moe_forward",
    "register_pattern",
]
