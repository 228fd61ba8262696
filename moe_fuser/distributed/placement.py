"""Where experts live under expert parallelism (EP), and which ranks share a node.

``ExpertPlacement`` maps each of the E global experts to the rank that owns it. Placement may be uneven: 8 experts
on 3 ranks is ``(3, 3, 2)`` experts per rank (the seed's pitfall 1, "AllToAll shape mismatch", cannot happen here
because every exchange carries its own split sizes). A rank holds only its own experts' weights, stacked (or
listed) in increasing global expert id: local expert ``i`` of rank ``r`` is ``placement.local_experts(r)[i]``.

``Topology`` says which ranks share a node (a block of ``ranks_per_node`` consecutive ranks). The exchange uses it
to send a token across the slow inter-node link at most once per node (see ``moe_fuser.distributed.dispatch``).
``ranks_per_node`` is given, or detected once per process group by gathering each rank's node identity (host
name, boot id and network namespace, so that network namespaces on one host count as nodes, as in the testbed);
a grouping that is not equal consecutive blocks falls back to one rank per node (a flat exchange) and says so.

Entry points: ``resolve_placement(owners, num_experts, world_size)``, ``detect_ranks_per_node(group)`` (the op
calls it at its first run when ``ranks_per_node`` is not given: a collective at run time, never while compiling).
"""

from __future__ import annotations

import logging
import os
import socket
import zlib
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch.distributed as dist

__all__ = ["ExpertPlacement", "Topology", "detect_ranks_per_node", "resolve_placement"]

log = logging.getLogger("moe_fuser")


@dataclass(frozen=True)
class ExpertPlacement:
    """``owner[e]`` is the rank holding global expert ``e``. Build with ``balanced`` or ``from_owners``."""

    owner: tuple[int, ...]
    world_size: int

    def __post_init__(self) -> None:
        if not self.owner:
            raise ValueError("an expert placement needs at least one expert")
        bad = [r for r in self.owner if not (isinstance(r, int) and 0 <= r < self.world_size)]
        if bad:
            raise ValueError(f"expert placement names ranks {sorted(set(bad))} outside the group of "
                             f"{self.world_size} ranks; give each expert an owner rank in [0, {self.world_size})")

    @staticmethod
    def balanced(num_experts: int, world_size: int) -> "ExpertPlacement":
        """Consecutive blocks, the first ``E % world`` ranks one expert more: 8 on 3 ranks -> 3, 3, 2."""
        base, extra = divmod(num_experts, world_size)
        owner: list[int] = []
        for r in range(world_size):
            owner += [r] * (base + (r < extra))
        return ExpertPlacement(tuple(owner), world_size)

    @staticmethod
    def from_owners(owners: Sequence[int], world_size: int) -> "ExpertPlacement":
        return ExpertPlacement(tuple(int(r) for r in owners), world_size)

    @property
    def num_experts(self) -> int:
        return len(self.owner)

    def local_experts(self, rank: int) -> tuple[int, ...]:
        return tuple(e for e, r in enumerate(self.owner) if r == rank)

    def num_local(self, rank: int) -> int:
        return sum(1 for r in self.owner if r == rank)

    def local_index(self) -> tuple[int, ...]:
        """For each global expert, its index among its owner's local experts."""
        seen = [0] * self.world_size
        out = []
        for r in self.owner:
            out.append(seen[r])
            seen[r] += 1
        return tuple(out)

    def fingerprint(self) -> int:
        return zlib.crc32(repr(self.owner).encode())


Placement = Union[None, ExpertPlacement, Sequence[int]]


def resolve_placement(placement: Placement, num_experts: Optional[int], world_size: int) -> ExpertPlacement:
    """None -> balanced over the group; a sequence -> the owner rank of each expert; an ExpertPlacement as is."""
    if placement is None:
        if num_experts is None:
            raise ValueError("the number of experts is unknown: pass router_logits [T, E] or expert_placement")
        return ExpertPlacement.balanced(num_experts, world_size)
    if not isinstance(placement, ExpertPlacement):
        placement = ExpertPlacement.from_owners(placement, world_size)
    if placement.world_size != world_size:
        raise ValueError(f"the expert placement is for {placement.world_size} ranks but the group has "
                         f"{world_size}; build it for this group")
    if num_experts is not None and placement.num_experts != num_experts:
        raise ValueError(f"the expert placement covers {placement.num_experts} experts but the router has "
                         f"{num_experts}; give one owner rank per expert")
    return placement


@dataclass(frozen=True)
class Topology:
    """``world_size`` ranks in ``num_nodes`` nodes of ``ranks_per_node`` consecutive ranks each."""

    world_size: int
    ranks_per_node: int

    def __post_init__(self) -> None:
        if self.ranks_per_node < 1 or self.world_size % self.ranks_per_node:
            raise ValueError(f"ranks_per_node={self.ranks_per_node} must divide the group size {self.world_size}"
                             " (nodes are blocks of consecutive ranks); give a divisor or None to detect")

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.ranks_per_node

    def node(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def peers(self, rank: int) -> list[int]:
        """The ranks with this rank's local index on every node, in node order (its inter-node partners)."""
        local = rank % self.ranks_per_node
        return [b * self.ranks_per_node + local for b in range(self.num_nodes)]

    def node_ranks(self, rank: int) -> list[int]:
        b = self.node(rank)
        return list(range(b * self.ranks_per_node, (b + 1) * self.ranks_per_node))


def _node_identity() -> str:
    try:
        boot = open("/proc/sys/kernel/random/boot_id").read().strip()
    except OSError:
        boot = ""
    try:
        netns = str(os.stat("/proc/self/ns/net").st_ino)
    except OSError:
        netns = ""
    return f"{socket.gethostname()}|{boot}|{netns}"


_DETECTED: dict[tuple, int] = {}


def detect_ranks_per_node(group: dist.ProcessGroup) -> int:
    """Gather every rank's node identity once per group (a collective: every rank calls it); cached by group
    name, world size and rank."""
    name = (group.group_name, dist.get_world_size(group), dist.get_rank(group))
    if name not in _DETECTED:
        ids: list[Optional[str]] = [None] * dist.get_world_size(group)
        dist.all_gather_object(ids, _node_identity(), group=group)
        world = len(ids)
        rpn = 1
        for cand in range(world, 0, -1):
            if world % cand == 0 and all(
                    len({ids[b * cand + i] for i in range(cand)}) == 1 for b in range(world // cand)) and \
                    len({ids[b * cand] for b in range(world // cand)}) == world // cand:
                rpn = cand
                break
        if rpn == 1 and len(set(ids)) < world:
            log.info("moe_fuser: ranks sharing a node are not in equal consecutive blocks (%s); using a flat "
                     "exchange (give ranks_per_node to override)", ids)
        _DETECTED[name] = rpn
    return _DETECTED[name]
