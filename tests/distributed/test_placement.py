"""Expert placement and node topology (no processes needed)."""

import pytest

from moe_fuser.distributed import ExpertPlacement, Topology
from moe_fuser.distributed.placement import resolve_placement


def test_balanced_uneven():
    p = ExpertPlacement.balanced(8, 3)
    assert [p.num_local(r) for r in range(3)] == [3, 3, 2]
    assert p.local_experts(2) == (6, 7)
    assert p.local_index() == (0, 1, 2, 0, 1, 2, 0, 1)


def test_custom_owners_and_empty_rank():
    p = resolve_placement([2, 0, 2, 0], 4, 3)
    assert p.local_experts(0) == (1, 3) and p.local_experts(1) == () and p.local_experts(2) == (0, 2)
    assert p.local_index() == (0, 0, 1, 1)


@pytest.mark.parametrize("owners, E, world, msg", [
    ([0, 1, 3], 3, 3, "outside the group"),
    ([0, 1], 3, 2, "covers 2 experts but the router has 3"),
])
def test_bad_placements(owners, E, world, msg):
    with pytest.raises(ValueError, match=msg):
        resolve_placement(owners, E, world)


def test_topology():
    t = Topology(6, 2)
    assert t.num_nodes == 3 and t.node(3) == 1
    assert t.peers(3) == [1, 3, 5] and t.node_ranks(3) == [2, 3]
    with pytest.raises(ValueError, match="must divide"):
        Topology(6, 4)
