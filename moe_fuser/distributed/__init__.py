"""Expert parallelism (EP): experts spread over the ranks of a torch.distributed process group.

Entry point: ``moe_fuser.fused_moe(..., ep_group=group)`` (or ``moe_forward(..., ep_group=group)``), which runs
``ep_moe.ep_moe_forward``. Inside: ``placement`` (which rank owns which expert, which ranks share a node),
``dispatch`` (the counts exchange and the two-level, deduplicated, chunk-overlapped all-to-all: communication
only) and ``ep_moe`` (the custom op that puts the exchange around the device lowering's grouped experts, with
its backward). Any backend works (gloo, NCCL, HCCL): only ``all_to_all_single`` and ``all_gather`` are used.
"""

from .dispatch import ExpertParallelError, TokenDispatcher, traffic
from .ep_moe import ep_experts, ep_moe_forward
from .placement import ExpertPlacement, Topology, detect_ranks_per_node

__all__ = ["ExpertParallelError", "ExpertPlacement", "Topology", "TokenDispatcher", "detect_ranks_per_node",
           "ep_experts", "ep_moe_forward", "traffic"]
