"""register_pattern: the public way to teach moe_fuser a new MoE style (and what the driver still checks)."""

import warnings

import pytest
import torch

import moe_fuser
from moe_fuser.patterns import Match, Rejection, patterns_for, registered_patterns, unregister_pattern
from moe_models import Recorder, check_train_step, load_example


@pytest.fixture
def example():
    mod = load_example("custom_pattern")
    yield mod
    for name in ("examples.dense_masked", "tests.broken", "tests.bad_region", "tests.wrong_type"):
        if any(p.name == name for p in registered_patterns()):
            unregister_pattern(name)


def test_custom_pattern_fuses_and_trains(example):
    model = example.DenseMaskedMoE(d_model=16, d_ff=24, num_experts=4, top_k=2)
    x = torch.randn(10, 16)
    assert moe_fuser.explain(model, x).num_fused == 0
    moe_fuser.register_pattern(example.dense_masked_moe, name="examples.dense_masked", family="custom")
    rec = Recorder()
    compiled = torch.compile(model, backend="moe_fuser", options={"inner": rec}, dynamic=True)
    for T in (10, 17):
        check_train_step(model, compiled, torch.randn(T, 16), 1e-4)
    assert rec.graphs and rec.num_fused == len(rec.graphs)
    # the family switch turns it off again
    torch._dynamo.reset()
    rec2 = Recorder()
    torch.compile(model, backend="moe_fuser", options={"inner": rec2, "patterns": {"custom": False}})(x)
    assert rec2.num_fused == 0


def test_an_unclaimed_router_is_reported_until_a_pattern_claims_it(example):
    """Before register_pattern, explain names the router whose experts no pattern understood, and the way to teach
    moe_fuser their form (not an empty report); once the pattern fuses the block, the row is gone."""
    model, x = example.DenseMaskedMoE(d_model=16, d_ff=24, num_experts=4, top_k=2), torch.randn(6, 16)
    report = moe_fuser.explain(model, x)
    assert report.num_fused == 0 and [(r.family, r.pattern) for r in report.rejected] == [("unmatched", "router")]
    reason = report.rejected[0].reason
    assert "softmax-topk router (E=4, k=2)" in reason and "read by scatter" in reason and "register_pattern" in reason
    moe_fuser.register_pattern(example.dense_masked_moe, name="examples.dense_masked", family="custom")
    report = moe_fuser.explain(model, x)
    assert report.num_fused == 1 and not report.rejected, report
    report = moe_fuser.explain(model, x, options={"patterns": {"custom": False}})
    assert report.num_fused == 0 and "switched off by options['patterns']: custom" in report.rejected[0].reason


def test_a_top_k_that_is_no_router_is_not_reported():
    """Top-k of activations, or of a softmax over something other than a matmul by a parameter, is no router."""
    class TopKs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(16, 8)

        def forward(self, x):
            h = torch.relu(self.proj(x))
            v, i = h.topk(2, -1)                           # top-k of activations
            p, j = (x @ x.t()).softmax(-1).topk(2, -1)      # attention-like scores
            return v.sum() + p.sum() + i.sum() + j.sum()

    report = moe_fuser.explain(TopKs(), torch.randn(6, 16))
    assert report.num_fused == 0 and not report.rejected, report


def test_decorator_forms_and_registry(example):
    @moe_fuser.register_pattern(name="tests.broken", family="tests", priority=5)
    def broken(ctx):
        return []

    assert broken.name == "tests.broken" and broken.family == "tests"
    names = [p.name for p in patterns_for({})]
    assert "tests.broken" in names and "handwritten.loop" in names
    assert "tests.broken" not in [p.name for p in patterns_for({"tests": False})]
    assert "tests.broken" in [p.name for p in patterns_for({"tests": False, "tests.broken": True})]
    with pytest.raises(ValueError, match="already registered"):
        moe_fuser.register_pattern(lambda ctx: [], name="tests.broken")
    moe_fuser.register_pattern(lambda ctx: [], name="tests.broken", replace=True)
    with pytest.raises(ValueError, match="is not a pattern"):
        moe_fuser.register_pattern(object())
    with pytest.raises(ValueError, match="no pattern named"):
        unregister_pattern("tests.never_registered")


def test_a_raising_pattern_does_not_break_compilation(example):
    @moe_fuser.register_pattern(name="tests.broken", family="tests")
    def broken(ctx):
        raise RuntimeError("boom")
        yield

    model = example.DenseMaskedMoE(d_model=16, d_ff=24, num_experts=4)
    x = torch.randn(6, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = moe_fuser.explain(model, x)
    assert any("boom" in r.reason for r in report.rejected)


def test_driver_rejects_a_region_that_hides_an_op(example):
    """A pattern that forgets a node of the MoE (here: the silu) gets a rejection, not a wrong rewrite."""

    def sloppy(ctx):
        for m in example.dense_masked_moe(ctx):
            if isinstance(m, Match):
                m.region = frozenset(n for n in m.region if n.name != "silu")
                m.pattern = "tests.bad_region"
            yield m

    moe_fuser.register_pattern(sloppy, name="tests.bad_region", family="tests", priority=10)
    model = example.DenseMaskedMoE(d_model=16, d_ff=24, num_experts=4)
    report = moe_fuser.explain(model, torch.randn(6, 16))
    assert report.num_fused == 0
    assert any("silu" in r.reason for r in report.rejected), report


def test_pattern_must_yield_matches_or_rejections(example):
    moe_fuser.register_pattern(lambda ctx: [42], name="tests.wrong_type", family="tests")
    model = example.DenseMaskedMoE(d_model=16, d_ff=24, num_experts=4)
    with pytest.raises(Exception, match="yield Match or Rejection"):
        moe_fuser.explain(model, torch.randn(6, 16))


def test_rejections_are_reported(example):
    def refuse(ctx):
        yield Rejection("tests", "tests.broken", "not today", "somewhere")

    moe_fuser.register_pattern(refuse, name="tests.broken", family="tests")
    report = moe_fuser.explain(example.DenseMaskedMoE(d_model=16, d_ff=24, num_experts=4), torch.randn(6, 16))
    assert ("somewhere", "tests.broken", "not today") in [(r.module_path, r.pattern, r.reason)
                                                          for r in report.rejected]


def test_example_script_runs(capsys):
    mod = load_example("custom_pattern")
    try:
        mod.main()
    finally:
        unregister_pattern("examples.dense_masked")
    out = capsys.readouterr().out
    assert "1 MoE fused" in out and "relative error" in out
