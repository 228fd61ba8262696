"""Llama 4's MoE block (transformers' ``Llama4TextMoe``: every expert on every token, the routing weight on the
input) is fused as the op with ``weight_on_input`` and trains eager-equal at two token counts, fp32 and bf16, under
inductor; a whole tiny Llama 4 model too; a near miss is left alone with the reason."""

import pytest
import torch
import transformers
from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

import moe_fuser
from moe_fuser.spec import ExpertSpec, MoESpec, RouterSpec
from tiny_hf import TOL, FusedSpecs, block_step, randomize, rel_err, train_step

F32, BF16 = torch.float32, torch.bfloat16


def llama4_config(**overrides):
    c = dict(hidden_size=32, intermediate_size=48, intermediate_size_mlp=64, num_local_experts=8,
             num_experts_per_tok=1, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
             vocab_size=64, max_position_embeddings=64, interleave_moe_layer_step=1)
    c.update(overrides)
    return transformers.Llama4TextConfig(**c)


def expected(k: int, dtype: torch.dtype, act: str = "silu") -> MoESpec:
    # topk on the logits -> scatter into -inf -> sigmoid(.float()) -> .to(the logits' dtype): top-k then sigmoid,
    # routed in fp32, the score rounded to the model's dtype; SwiGLU over gate_up_proj [E, D, 2F] (in x out).
    return MoESpec(RouterSpec(top_k=k, scoring="sigmoid", topk_first=True, renormalize=False, dtype=F32,
                              weights_dtype=dtype),
                   ExpertSpec(8, activation=act, glu="concat"), weight_on_input=True)


def _compile(model, rec, **kw):
    return torch.compile(model, backend="moe_fuser", options={"inner": rec}, **kw)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_block_fuses_and_trains_eager_equal(dtype, k):
    blk = randomize(Llama4TextMoe(llama4_config(num_experts_per_tok=k))).to(dtype)
    rec = FusedSpecs(inner="inductor")
    compiled = _compile(blk, rec)
    for T in (10, 21):     # the block takes [T, D]
        errs = block_step(blk, compiled, torch.randn(T, 32).to(dtype))
        assert max(errs.values()) <= TOL[dtype], errs
    assert rec.specs and all(s == expected(k, dtype) for s in rec.specs), rec.specs
    assert not rec.leftover, rec.leftover
    assert len([g for g in rec.per_graph if g]) == 2   # dynamo's one recompile for the second size, no more


def test_whole_model_trains_eager_equal_and_explains():
    model = randomize(transformers.Llama4ForCausalLM(llama4_config()))
    ids = torch.randint(0, 64, (2, 7))
    report = moe_fuser.explain(model, ids)
    assert report.num_fused == 2, report
    row = report.fused[0]
    assert (row.pattern, row.num_experts, row.top_k, row.router) == ("transformers.llama4", 8, 1, "topk-sigmoid")
    assert row.module_path == "model.layers.0.feed_forward"
    assert any("weight on the experts' input" in n for n in row.notes), row.notes
    torch._dynamo.reset()
    errs = train_step(model, _compile(model, FusedSpecs()), ids)
    assert max(errs.values()) <= TOL[F32], errs


def test_dense_soft_routing_is_left_alone():
    """The same dense block with softmax scores (every expert weighted: no zero rows, a soft MoE) is not a
    routed MoE: refused with the reason, eager-equal."""
    blk = randomize(Llama4TextMoe(llama4_config()))

    def soft_router(hidden_states):
        logits = torch.nn.functional.linear(hidden_states, blk.router.weight)
        return logits.softmax(-1), logits
    blk.router.forward = soft_router
    x = torch.randn(9, 32)
    report = moe_fuser.explain(blk, x)
    assert report.num_fused == 0
    reasons = [r.reason for r in report.rejected if r.pattern == "transformers.llama4"]
    assert reasons and "sigmoid of the scattered top-k logits" in reasons[0], report.rejected
    torch._dynamo.reset()
    rec = FusedSpecs()
    errs = block_step(blk, _compile(blk, rec), x)
    assert max(errs.values()) <= TOL[F32], errs
    assert not rec.specs


@pytest.mark.parametrize("k", [1, 2])
def test_block_under_autocast_equals_eager(k):
    """Under bf16 autocast the block scales fp32 rows by bf16-rounded scores and returns the sum of its bf16 expert
    matmuls: the op forms the same rows, computes the experts in bf16 and hands back bf16 (the region's output
    dtype, not the hidden states'): the forward equals eager's, the gradients within bf16 rounding."""
    blk = randomize(Llama4TextMoe(llama4_config(num_experts_per_tok=k)))
    rec = FusedSpecs()
    compiled = _compile(blk, rec)
    x = torch.randn(12, 32)
    results = []
    for fn in (blk, compiled):
        blk.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=BF16):
            out, _ = fn(xi)
        out.float().pow(2).sum().backward()
        results.append((out.detach(), xi.grad, {n: p.grad for n, p in blk.named_parameters() if p.grad is not None}))
    (want, dx_want, g_want), (got, dx_got, g_got) = results
    assert [s.weight_on_input for s in rec.specs] == [True]
    assert got.dtype == want.dtype == BF16 and torch.equal(got, want)
    assert g_got.keys() == g_want.keys()
    assert max(rel_err(dx_got, dx_want), *(rel_err(g_got[n], g_want[n]) for n in g_want)) <= TOL[BF16]
