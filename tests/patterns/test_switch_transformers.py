"""transformers' Switch Transformers sparse MLP: top-1 with per-sequence expert capacity. The capturable form
(transformers 4's forward over transformers' own router and experts) is fused with the exact spec and trains
eager-equal while tokens are being dropped; transformers 5's form cannot be captured whole and is reported."""

import pytest
import torch

import moe_fuser
from moe_fuser.spec import CapacitySpec, ExpertSpec, MoESpec, RouterSpec
from tiny_hf import TOL, FusedSpecs, block_step, switch_v4_block, switch_v5_block


def _dropped(blk, x) -> int:
    """How many tokens the router's capacity drops (no expert column set in the dispatch mask)."""
    with torch.no_grad():
        mask = blk.router(x)[0]
    return int((mask.sum(-1) == 0).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_capacity_block_trains_eager_equal(dtype):
    """Fused (count and spec), forward and backward eager-equal at two token counts (batch and sequence length
    both change), with the capacity dropping tokens: they pass through scaled by their router probability."""
    blk = switch_v4_block(dtype, expert_capacity=2).train()
    rec = FusedSpecs()
    compiled = torch.compile(blk, backend="moe_fuser", options={"inner": rec})
    dropped = 0
    for B, S in ((2, 5), (3, 9)):
        x = torch.randn(B, S, 32).to(dtype)
        dropped += _dropped(blk, x)
        errs = block_step(blk, compiled, x)
        assert max(errs.values()) <= TOL[dtype], errs
    assert dropped > 0, "the test must exercise dropped tokens"
    want = MoESpec(RouterSpec(top_k=1, renormalize=False, dtype=torch.float32, first_max=True),
                   ExpertSpec(4, activation="relu", glu=None),
                   capacity=CapacitySpec(capacity=2, dropped="passthrough"))
    assert [len(g) for g in rec.per_graph] == [1, 1]
    assert all(s == want for s in rec.specs), rec.specs


def test_tied_router_scores_go_where_argmax_sends_them():
    """The router's argmax gives a tie to the lowest expert id (topk would not, for some of these tokens): with
    three experts' router rows equal, every token ties, and the fused block still equals eager."""
    blk = switch_v4_block(torch.float32, expert_capacity=64).train()
    with torch.no_grad():
        blk.router.classifier.weight[[1, 2, 3]] = blk.router.classifier.weight[0].abs() + 1.0
    x = torch.randn(2, 24, 32).abs()
    ties = blk.router.classifier(x).softmax(-1)
    assert not torch.equal(ties.topk(1).indices.flatten(), ties.argmax(-1).flatten())   # topk would differ
    rec = FusedSpecs()
    errs = block_step(blk, torch.compile(blk, backend="moe_fuser", options={"inner": rec}), x)
    assert len(rec.specs) == 1 and max(errs.values()) <= TOL[torch.float32], errs


def test_explain_and_gelu_experts():
    """explain() shows the family, top-1 and the capacity; the experts' activation follows the config."""
    blk = switch_v4_block(dense_act_fn="gelu_pytorch_tanh").eval()
    report = moe_fuser.explain(blk, torch.randn(2, 6, 32))
    assert report.num_fused == 1, report
    row = report.fused[0]
    assert (row.family, row.top_k, row.num_experts) == ("switch_transformers", 1, 4)
    assert row.activation.startswith("gelu_tanh") and "capacity" in row.activation


def test_active_expert_dropout_is_refused():
    """Expert dropout in training mode is something the op does not do: refused, with the reason."""
    blk = switch_v4_block(dropout_rate=0.1).train()
    report = moe_fuser.explain(blk, torch.randn(2, 6, 32))
    assert report.num_fused == 0
    assert any("dropout is active" in r.reason for r in report.rejected), report.rejected


def test_transformers5_sparse_mlp_is_reported_unfused():
    """transformers 5's experts loop iterates a data-dependent tensor: no graph holds the experts. explain says
    why; the compiled block stays eager-equal (dropped tokens contribute zero in transformers 5)."""
    blk = switch_v5_block(expert_capacity=2).eval()
    x = torch.randn(2, 6, 32)
    report = moe_fuser.explain(blk, x)
    assert report.num_fused == 0
    rows = [r for r in report.rejected if r.pattern == "switch_transformers.sparse_mlp"]
    assert rows and "data-dependent" in rows[0].reason, report.rejected
    torch._dynamo.reset()
    rec = FusedSpecs()
    errs = block_step(blk, torch.compile(blk, backend="moe_fuser", options={"inner": rec}), x)
    assert max(errs.values()) <= TOL[torch.float32], errs
    assert not rec.specs
