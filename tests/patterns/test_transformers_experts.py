"""The transformers v5 experts family: Mixtral, Qwen2-MoE, DeepSeek-V3, GPT-OSS and Nemotron-H, built from tiny
configs, are fused (count and exact MoESpec asserted) and train eager-equal at two token counts, through ``grouped_mm`` and
``batched_mm``, fp32 and bf16; what the family must not model is left alone, eager-equal, with a reason."""

import types

import pytest
import torch
import torch.nn.functional as F

import moe_fuser
from moe_fuser.spec import ExpertSpec, MoESpec, RouterSpec, SharedExpertSpec
from tiny_hf import TOL, FusedSpecs, block, block_step, build, train_step

F32, BF16 = torch.float32, torch.bfloat16


def expected_spec(family: str, dtype: torch.dtype = F32, **cfg) -> MoESpec:
    """What each model computes (read from its transformers source), as the family must describe it."""
    if family == "mixtral":
        # softmax(logits.float()) -> topk -> renormalise; SwiGLU over the concatenated gate_up_proj.
        return MoESpec(RouterSpec(top_k=2, renormalize=True, dtype=F32),
                       ExpertSpec(8, activation=cfg.get("act", "silu"), glu="concat"))
    if family == "qwen2_moe":
        # softmax(dtype=float) -> topk (renormalised only with norm_topk_prob) -> rounded to the hidden states'
        # dtype; sigmoid-gated shared expert.
        return MoESpec(RouterSpec(top_k=2, renormalize=cfg.get("norm", False), dtype=F32,
                                  weights_dtype=None if dtype == F32 else dtype),
                       ExpertSpec(8, activation="silu", glu="concat"),
                       shared=SharedExpertSpec("silu", glu=True, gated=True))
    if family == "deepseek_v3":
        # fp32 logits -> sigmoid -> + e_score_correction_bias for selection -> top-2-sum group scores -> best
        # groups -> topk -> gather unbiased scores -> / (sum + 1e-20) -> * routed_scaling_factor; shared MLP.
        groups = cfg.get("groups", (4, 2))
        return MoESpec(RouterSpec(top_k=2, scoring="sigmoid", renormalize=cfg.get("norm", True),
                                  num_groups=groups[0], topk_groups=groups[1],
                                  group_score="top2_sum", scaling_factor=2.5,
                                  selection_bias=True, dtype=F32),
                       ExpertSpec(8, activation="silu", glu="concat"),
                       shared=SharedExpertSpec("silu", glu=True, gated=False))
    if family == "gpt_oss":
        # linear (+bias) -> topk on the logits -> softmax over the k in the logits' dtype; interleaved gate/up,
        # per-expert biases, clamped SwiGLU (alpha 1.702, limit 7).
        return MoESpec(RouterSpec(top_k=2, topk_first=True, renormalize=False, dtype=F32 if dtype == F32 else None),
                       ExpertSpec(8, activation="gpt_oss", glu="interleaved", bias=True, alpha=1.702, limit=7.0))
    if family == "nemotron_h":
        # DeepSeek-V3's router; plain (not gated) relu2 experts and a relu2 shared MLP on the unflattened input.
        return MoESpec(RouterSpec(top_k=2, scoring="sigmoid", renormalize=True, num_groups=4, topk_groups=2,
                                  group_score="top2_sum", scaling_factor=2.5, selection_bias=True, dtype=F32),
                       ExpertSpec(8, activation="relu2"),
                       shared=SharedExpertSpec("relu2", glu=False, gated=False))
    raise AssertionError(family)


def _compile(model, rec, **kw):
    return torch.compile(model, backend="moe_fuser", options={"inner": rec}, **kw)


def _assert_fused(rec: FusedSpecs, spec: MoESpec, per_graph: int = 1):
    moe_graphs = [g for g in rec.per_graph if g]
    assert moe_graphs, "nothing was fused"
    assert all(len(g) == per_graph for g in moe_graphs), [len(g) for g in rec.per_graph]
    assert not rec.leftover, f"expert ops left unfused: {rec.leftover}"
    for s in rec.specs:
        assert s == spec, f"\n got  {s}\n want {spec}"


def _fused_eager_equal(blk, dtype: torch.dtype, spec: MoESpec, sizes=((2, 5), (3, 7))):
    """The compiled block trains eager-equal at each (batch, seq) size, its MoE fused as ``spec``."""
    rec = FusedSpecs()
    compiled = _compile(blk, rec)
    for B, S in sizes:
        errs = block_step(blk, compiled, torch.randn(B, S, 32).to(dtype))
        assert max(errs.values()) <= TOL[dtype], errs
    _assert_fused(rec, spec)


def _left_alone(blk, why: str):
    """explain refuses the fp32 block's MoE with a reason containing ``why``; compiled, nothing is fused and the
    block trains eager-equal."""
    x = torch.randn(2, 5, 32)
    report = moe_fuser.explain(blk, x)
    assert report.num_fused == 0
    reasons = [r.reason for r in report.rejected if r.pattern == "transformers.grouped_mm"]
    assert reasons and why in reasons[0], report.rejected
    rec = FusedSpecs()
    errs = block_step(blk, _compile(blk, rec), x)
    assert max(errs.values()) <= TOL[F32], errs
    assert not rec.specs


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss", "nemotron_h"])
def test_whole_model_trains_eager_equal(family):
    """A whole *ForCausalLM (grouped_mm, its default): fused, logits/aux loss/router logits/grads eager-equal."""
    layers = 2 if family == "mixtral" else 1
    model = build(family, F32, "grouped_mm", num_hidden_layers=layers)
    rec = FusedSpecs()
    compiled = _compile(model, rec)
    for T in (5, 11):
        errs = train_step(model, compiled, torch.randint(0, 64, (2, T)))
        assert max(errs.values()) <= TOL[F32], errs
        # The first layer's router logits (returned for the aux loss) come from code the rewrite leaves alone.
        if "first_router_logits" in errs:   # models that return router logits
            assert errs["first_router_logits"] == 0.0, "the router logits returned for the aux loss changed"
    _assert_fused(rec, expected_spec(family), per_graph=layers)
    # Two token counts cost dynamo's usual one recompile, no more.
    assert len([g for g in rec.per_graph if g]) == 2


@pytest.mark.parametrize("impl,dtype", [("grouped_mm", BF16), ("batched_mm", F32), ("batched_mm", BF16)])
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss", "nemotron_h"])
def test_block_matrix(family, impl, dtype):
    """Each family's MoE block through both implementations and both dtypes (bf16 graphs use torch._grouped_mm,
    fp32 ones transformers' grouped_mm_fallback)."""
    _fused_eager_equal(block(family, dtype, impl), dtype, expected_spec(family, dtype))


@pytest.mark.parametrize("family,overrides,expected", [
    ("mixtral", {"hidden_act": "gelu"}, {"act": "gelu"}),
    ("mixtral", {"hidden_act": "gelu_pytorch_tanh"}, {"act": "gelu_tanh"}),
    ("mixtral", {"hidden_act": "relu2"}, {"act": "relu2"}),
    ("qwen2_moe", {"norm_topk_prob": True}, {"norm": True}),
    ("deepseek_v3", {"n_group": 1, "topk_group": 1, "norm_topk_prob": False}, {"groups": (1, 1), "norm": False}),
])
def test_config_variants(family, overrides, expected):
    """Config switches that change what the model computes change the spec accordingly."""
    _fused_eager_equal(block(family, F32, "grouped_mm", **overrides), F32, expected_spec(family, **expected),
                       sizes=((2, 5), (1, 9)))


@pytest.mark.parametrize("impl,dtype", [("grouped_mm", F32), ("grouped_mm", BF16), ("batched_mm", F32)])
def test_expert_parallel_sentinel_masking_fuses(impl, dtype):
    """transformers' expert-parallel sentinel masking (ids >= E add nothing: in every graph of transformers 5.17,
    behind ``_is_expert_parallel`` in later versions) is the identity behind a recognised router, whose ids are a
    top-k over E scores: fused, eager-equal."""
    blk = block("mixtral", dtype, impl)
    blk.experts._is_expert_parallel = True
    _fused_eager_equal(blk, dtype, expected_spec("mixtral", dtype))


def test_sentinel_masking_behind_an_unknown_router_is_left_alone():
    """Behind a router moe_fuser does not recognise the ids could be sentinels, which the op does not model:
    refused with the reason, eager-equal."""
    blk = block("mixtral", F32, "grouped_mm")
    blk.experts._is_expert_parallel = True

    def route(self, h):
        logits = F.linear(h.reshape(-1, self.hidden_dim), self.weight)
        vals, ids = torch.topk(logits, self.top_k, dim=-1)
        return logits, torch.sigmoid(vals) * 0.5, ids
    blk.gate.forward = types.MethodType(route, blk.gate)
    _left_alone(blk, "sentinel")


def test_unsupported_activation_is_left_alone():
    """An expert activation the op does not have (tanh) is refused with the reason, and stays eager-equal."""
    _left_alone(block("mixtral", F32, "grouped_mm", hidden_act="tanh"), "unsupported expert activation")


def test_bare_block_eager_loop_is_reported_unfused():
    """A bare block has no experts implementation: transformers' eager loop iterates a data-dependent tensor,
    which no dynamo setting captures whole. explain says so (and how to fix it); the block stays eager-equal."""
    blk = block("mixtral", F32, None)
    x = torch.randn(2, 5, 32)
    report = moe_fuser.explain(blk, x)
    assert report.num_fused == 0
    rows = [r for r in report.rejected if r.pattern == "transformers.eager_loop"]
    assert rows, report.rejected
    assert "data-dependent" in rows[0].reason and "grouped_mm" in rows[0].reason
    torch._dynamo.reset()
    errs = block_step(blk, _compile(blk, FusedSpecs()), x)
    assert max(errs.values()) <= TOL[F32], errs


def test_explain_reports_each_family():
    """explain() names the block, family, router kind, E, k and activation of a fused whole model, and reports
    no other pattern's failed candidate there (the hand-written grouped_mm pattern leaves the block alone)."""
    model = build("deepseek_v3", F32)
    report = moe_fuser.explain(model, torch.randint(0, 64, (1, 6)))
    assert report.num_fused == 1 and report.rejected == [], report.rejected
    row = report.fused[0]
    assert (row.module_path, row.family, row.pattern) == ("model.layers.0.mlp", "transformers",
                                                          "transformers.grouped_mm")
    assert (row.num_experts, row.top_k) == (8, 2)
    assert row.router.startswith("sigmoid-topk(groups 2/4)")


def test_dynamic_true_needs_float_attributes_specialised(caplog):
    """Under dynamic=True dynamo passes GPT-OSS's clamp limit as a graph input: the experts are refused, and the
    reason names the setting that keeps floats constants; with it, one dynamic graph is fused and trains
    eager-equal at two token counts."""
    blk = block("gpt_oss", F32, "grouped_mm")
    with caplog.at_level("INFO", logger="moe_fuser"):
        rec = FusedSpecs()
        _compile(blk, rec, dynamic=True)(torch.randn(2, 5, 32))
    assert not rec.specs and "specialize_float = True" in caplog.text
    torch._dynamo.reset()
    with torch._dynamo.config.patch(specialize_float=True):
        rec = FusedSpecs()
        compiled = _compile(blk, rec, dynamic=True)
        for S in (5, 9):
            errs = block_step(blk, compiled, torch.randn(2, S, 32))
            assert max(errs.values()) <= TOL[F32], errs
    _assert_fused(rec, expected_spec("gpt_oss"))
    assert len(rec.per_graph) == 1


def test_transposed_weights_train_under_inductor():
    """GPT-OSS's transposed [E, in, out] expert weights reach the op as views; inductor (which checks the op's
    fake strides against the real ones) compiles forward and backward, eager-equal."""
    blk = block("gpt_oss", F32, "grouped_mm")
    rec = FusedSpecs(inner="inductor")
    errs = block_step(blk, _compile(blk, rec), torch.randn(2, 5, 32))
    assert max(errs.values()) <= TOL[F32], errs
    _assert_fused(rec, expected_spec("gpt_oss"))
