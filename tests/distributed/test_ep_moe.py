"""Expert parallelism on gloo with 2, 3 and 4 processes: equal to the single-process reference, traffic
deduplicated, faults reported.

One process group per world size runs every check of that size (``_ep_worker.py``: each rank compares its share
of the EP forward and backward with ``fused_moe(..., impl="reference")`` on the gathered inputs).
"""

import pytest

from _launch import run_ranks

# fp32 with routing weights carried as fp32: errors are rounding only; bf16: relative to the output's scale
TOL = {"fp32": 2e-5, "bf16": 3e-2}


def _check_cases(results):
    for rank, res in enumerate(results):
        for name, errs in res["cases"].items():
            tol = TOL["bf16"] if name.startswith("bf16") else TOL["fp32"]
            scale = max(1.0, errs.pop("scale"))
            bad = {k: v for k, v in errs.items() if v > tol * scale}
            assert not bad, f"rank {rank}, case {name}: errors above {tol * scale:g}: {bad}"


@pytest.fixture(scope="module")
def two():
    return run_ranks("two", 2)


def test_two_ranks_equal_reference(two):
    """Uneven placement (5 experts on 2), top-1 and top-k, SwiGLU and biased GELU, per-expert lists, an
    external router with dropped pairs, bf16, bf16 autocast, the routing weight on the experts' input (Llama 4),
    forced chunking, and the op under torch.compile(aot_eager)."""
    _check_cases(two)


def test_autocast_runs_the_experts_in_bf16(two):
    """fp32 inputs under bf16 autocast: each rank's experts get bf16 rows, the output keeps fp32 (the values:
    case bf16_autocast of test_two_ranks_equal_reference, against the single-process op under autocast)."""
    for res in two:
        assert res["autocast"] == {"experts": ["torch.bfloat16"], "out": "torch.float32"}


def test_ddp_graph_split_does_not_cut_the_moe_apart(two):
    """Under DistributedDataParallel dynamo splits each graph at gradient-bucket boundaries before the backend sees
    it; moe_fuser fuses the whole graph first, the split still cuts the rewritten graph at the fused layer's
    weights (so all-reduce can overlap the backward), and the training step matches eager DDP."""
    for res in two:
        assert res["ddp"]["fused"] == 1 and res["ddp"]["pieces"] >= 2, res["ddp"]
        assert res["ddp"]["grad_rel_err"] <= 1e-4, res["ddp"]


def test_idle_local_experts_keep_no_gradient(two):
    """Eager mode with per-expert lists: a local expert that got no token keeps grad None, as in the
    single-process op and an eager loop; the others have gradients (their values: test_two_ranks_equal_reference)."""
    assert two[0]["idle_grads"] == {k: [False, False] for k in ("w1", "w2", "w3")}
    assert two[1]["idle_grads"] == {k: [False, True] for k in ("w1", "w2", "w3")}


def test_config_mismatch_is_reported_on_every_rank(two):
    for res in two:
        msgs = res["mismatch"]
        assert "disagree on top_k" in msgs["top_k"]
        assert "disagree on dtype" in msgs["dtype"]
        assert "disagree on hidden size D" in msgs["hidden"]
        assert "disagree on num_experts (rank 0: 6, rank 1: 8)" in msgs["experts"]
        assert "disagree on expert placement" in msgs["placement"]


def test_stalled_rank_times_out(two):
    waiting = two[0]["stall"]
    assert waiting["error"] and "did not finish within 2 s" in waiting["error"]
    assert waiting["seconds"] < 10


def test_three_ranks_uneven_equal_reference():
    """8 experts on 3 ranks (3+3+2), top-1 and top-2, and a rank that holds no expert."""
    _check_cases(run_ranks("three", 3))


@pytest.fixture(scope="module")
def four():
    return run_ranks("four", 4, expect_dead=(3,))


def test_four_ranks_two_level_equal_reference(four):
    _check_cases(four[:3])


def test_inter_node_traffic_is_deduplicated(four):
    """A token crosses to another node once per node (two-level) or once per rank (flat), not once per expert
    (the seed's scheme); the bytes counted by the exchange match that exactly."""
    for key in ("traffic_two_level", "traffic_flat"):
        t = four[0][key]
        assert t["measured"] == t["expected"], (key, t)
        assert t["measured"] < t["seed_style"], (key, t)


def test_dead_rank_fails_the_others_fast(four):
    for res in four[:3]:
        assert res["dead"]["error"] and "rank" in res["dead"]["error"]
        assert res["dead"]["seconds"] < 20


def test_bad_inputs_raise_value_errors_naming_the_fix(two):
    msgs = two[1]["bad_inputs"]
    assert "holds 5 experts but the placement gives it 2" in msgs["all_experts_passed"]
    assert "no expert-parallel form" in msgs["reference_impl"]
    assert "overlap_chunks=0" in msgs["chunks_zero"]
    assert "capacity" in msgs["capacity"] and "not supported" in msgs["capacity"]
    assert "ranks_per_node=3 must divide" in msgs["ranks_per_node"]
    assert "covers 3 experts but the router has 5" in msgs["placement_size"]
    assert "outside the group" in msgs["placement_rank"]


def test_compiled_seed_style_ep_is_fused_and_equal_to_eager(two):
    """benchmarks/ep_seed.py's hand-written EP layer under torch.compile(backend="moe_fuser"): the in-place
    legacy all_to_all_single (forward), the functional collectives (forward and backward), and a variant with
    ``ids // n`` placement and ``out[rows] = ...`` writes, the functional form under bf16 autocast and with experts
    that project by ``x @ w`` ([in, out] weights): one region fused per rank, equal to eager (relative to the largest value; to bf16 precision under autocast, where the op
    weights and sums a token's expert outputs in bf16 and the layer's own code does it in fp32)."""
    for rank, res in enumerate(two):
        for name, r in res["compiled_seed"].items():
            assert r["fused"] == 1 and r["explain_fused"] == 1, (rank, name, r["explain"])
            assert "expert parallel over process group" in r["explain"], r["explain"]
            tol = 2e-2 if name.endswith("autocast") else 1e-5
            assert r["out"] < tol, (rank, name, r)
            assert r.get("grads", 0.0) < tol, (rank, name, r)
            assert r["dtype"] == "torch.float32", (rank, name, r)
