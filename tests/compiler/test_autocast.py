"""Models compiled and run under ``torch.autocast`` (mixed-precision training: fp32 weights, bf16 matmuls).

The fused op must compute the experts in the precision the graph's own matmuls ran in: bf16 where the model's
``nn.Linear`` experts are autocast, the weights' fp32 where they are not (transformers' grouped_mm fallback on
CPU). Each case trains eager-equal (bf16 tolerance, both runs under autocast) at two token counts, and explain
reports the dtype, also where autocast is switched off inside the MoE."""

import sys
import warnings
from pathlib import Path

import pytest
import torch

import moe_fuser

from moe_models import LoopMoE, Recorder, Variant, load_example, rel_err

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "patterns"))
import tiny_hf  # noqa: E402
from test_model_zoo import tiny_model  # noqa: E402

TOL = 2e-2
BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def _train_step_under_autocast(model, compiled, x, model_call=False):
    """Forward under autocast, backward outside it, as a mixed-precision training step runs: outputs, input and
    parameter gradients of eager and compiled agree (idle experts: no gradient in either, or zeros compiled).

    Where eager's own bf16 arithmetic moves a value far from the fp32 model (the Switch layer's gate gradient
    flows through bf16 routing weights: ~8% off), the fused op, which accumulates routing-weight gradients in
    fp32, may differ from eager by up to twice that, and must be no further from the fp32 model than eager is."""
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    eager = (lambda ids: model(input_ids=ids).logits) if model_call else model
    for fn, autocast in ((eager, True), (compiled, True), (eager, False)):
        xi = x if model_call else x.clone().requires_grad_(True)   # token ids: no gradient
        with torch.autocast(**BF16, enabled=autocast):
            out = fn(xi)
        outs = [o for o in torch.utils._pytree.tree_leaves(out) if o.is_floating_point()]
        loss = sum((o.float() * torch.linspace(0.5, 1.5, o.numel()).view_as(o)).sum() for o in outs)
        results.append(outs + list(torch.autograd.grad(loss, ([] if model_call else [xi]) + params,
                                                       allow_unused=True)))
    for i, (ref, got, fp32) in enumerate(zip(*results)):
        if ref is None:
            assert got is None or not got.any()
            continue
        own = rel_err(ref, fp32)
        assert got.dtype == ref.dtype and rel_err(got, ref) <= max(TOL, 2 * own), (i, rel_err(got, ref), own)
        assert rel_err(got, fp32) <= own + TOL, (i, rel_err(got, fp32), own)


def _compile_and_check(model, x_shapes, dim, fused=1):
    rec = Recorder()
    compiled = torch.compile(model, backend="moe_fuser", options={"inner": rec}, dynamic=True)
    for shape in x_shapes:
        _train_step_under_autocast(model, compiled, torch.randn(*shape, dim))
    assert rec.graphs and rec.num_fused == fused * len(rec.graphs), (rec.num_fused, len(rec.graphs))
    return rec


def _explained(model, x):
    with torch.autocast(**BF16):
        return moe_fuser.explain(model, x)


@pytest.mark.parametrize("ffn", ["sequential", "swiglu", "stacked", "stacked_kn"])
def test_autocast_linear_experts_fuse_in_bf16(ffn):
    model = LoopMoE(Variant(ffn=ffn, router="mixtral_f32"))
    report = _explained(model, torch.randn(2, 5, 16))
    assert report.num_fused == 1 and report.matches[0].dtype == torch.bfloat16, report
    assert any("autocast" in note for note in report.matches[0].notes), report
    torch._dynamo.reset()
    _compile_and_check(model, [(2, 5), (3, 7)], 16)


def test_seed_switch_layer_under_autocast_with_inductor():
    model = load_example("switch_transformer").SwitchLayer(d_model=32, d_ff=64)
    rec = Recorder("inductor")
    compiled = torch.compile(model, backend="moe_fuser", options={"inner": rec}, dynamic=True)
    for B, S in ((2, 5), (3, 7)):
        _train_step_under_autocast(model, compiled, torch.randn(B, S, 32))
    assert rec.num_fused == len(rec.graphs) >= 1


def test_loop_summing_in_fp32_under_autocast_computes_what_eager_does():
    """Under autocast the seed's Switch layer multiplies its bf16 expert outputs by fp32 routing weights and adds
    them into an fp32 buffer. The op forms and sums them in fp32 too (``ExpertSpec.combine_dtype``), so the
    forward equals eager's; summing in bf16, it was 2e-3 off. (With inductor as the inner compiler the graph's
    bf16 renormalisation of the routing weights is computed in fp32 and rounded once, which eager rounds twice:
    that differs from eager by a bf16 ulp whatever the op does.)"""
    model = load_example("switch_transformer").SwitchLayer(d_model=32, d_ff=64, top_k=2)
    x = torch.randn(3, 7, 32)
    report = _explained(model, x)
    assert "weighted expert outputs summed in float32, as the model forms them" in report.matches[0].notes, report
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="moe_fuser", options={"inner": "aot_eager"})
    with torch.no_grad(), torch.autocast(**BF16):
        assert torch.equal(compiled(x)[0], model(x)[0])


def test_grouped_mm_experts_keep_the_graphs_fp32():
    """transformers' grouped_mm fallback is not autocast on CPU: the graph computes the experts in fp32 and so does
    the fused op (while the router's and shared expert's Linears run in bf16)."""
    blk = tiny_hf.block("qwen2_moe", impl="grouped_mm")
    report = _explained(blk, torch.randn(2, 7, 32))
    assert report.num_fused == 1 and report.matches[0].dtype == torch.float32, report
    torch._dynamo.reset()
    _compile_and_check(blk, [(2, 7), (3, 5)], 32)


def test_experts_with_autocast_switched_off_fuse_in_fp32():
    """Experts run under ``torch.autocast(enabled=False)`` inside an autocast model (a precision choice some models
    make for their router or experts): the graph computes them in fp32, and so does the fused op, although it
    sits in the autocast region."""
    model = LoopMoE(Variant(twist="expert_autocast_off"))
    report = _explained(model, torch.randn(2, 5, 16))
    assert report.num_fused == 1 and report.matches[0].dtype == torch.float32, report
    torch._dynamo.reset()
    _compile_and_check(model, [(2, 5), (3, 7)], 16)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "hy_v4", "beam"])
def test_zoo_model_under_autocast_computes_what_eager_does(model_type):
    """Under autocast a model's router logits are bf16. Qwen3-MoE casts its fp32 routing weights back to them
    (the op rounds its weights the same way); HY-V4 and Beam add an fp32 correction bias to bf16 scores (the op
    selects in the promoted dtype too). Each used to move the logits by 4e-3 to 2e-1; they now match eager."""
    model = tiny_model(model_type)
    ids = torch.randint(0, 64, (2, 7))
    compiled = torch.compile(model, backend="moe_fuser", options={"inner": "aot_eager"})
    with torch.no_grad(), torch.autocast(**BF16):
        report = moe_fuser.explain(model, input_ids=ids)
        assert report.num_fused >= 1, report
        assert rel_err(compiled(input_ids=ids).logits, model(input_ids=ids).logits) <= 1e-6


def test_router_with_autocast_switched_off_fuses():
    """ERNIE-4.5 routes under ``autocast(enabled=False)`` (in fp32) inside an autocast model: fused, and a training
    step through the whole model matches eager."""
    model = tiny_model("ernie4_5_moe").train()
    ids = torch.randint(0, 64, (2, 7))
    with torch.autocast(**BF16):
        report = moe_fuser.explain(model, input_ids=ids)
    assert report.num_fused == 1, report
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="moe_fuser", options={"inner": "aot_eager"})
    _train_step_under_autocast(model, lambda x: compiled(input_ids=x).logits, ids, model_call=True)


def test_verify_judges_autocast_outputs_by_the_experts_precision():
    """The fp32 output of a layer whose experts run in bf16 differs from the original graph's by bf16 rounding (here
    the loop sums bf16 products in fp32, the op in bf16): verify accepts that (bf16 tolerance) instead of falling
    back."""
    model = LoopMoE(Variant(ffn="swiglu", router="mixtral_f32", twist="weight_in_expert_dtype"))
    x = torch.randn(2, 5, 16)
    compiled = torch.compile(model, backend="moe_fuser", options={"inner": "aot_eager", "verify": True})
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with torch.autocast(**BF16):
            out, ref = compiled(x)[0], model(x)[0]
    assert out.dtype == torch.float32 and 1e-4 < rel_err(out, ref) <= TOL


def test_qwen2_rounding_of_its_routing_weights_is_reproduced():
    """Qwen2-MoE's routed experts stay fp32 under CPU autocast, but its router rounds the routing weights to the
    bf16 logits' dtype and its shared expert runs in bf16: the fused op rounds the weights the same way and runs
    the shared expert in bf16, so the fp32 output matches the original graph's to fp32 rounding (it differed by
    bf16 rounding, ~1e-3, while the op kept the weights in fp32), and verify passes."""
    blk = tiny_hf.block("qwen2_moe", impl="grouped_mm")
    compiled = torch.compile(blk, backend="moe_fuser", options={"inner": "aot_eager", "verify": True})
    x = torch.randn(2, 7, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with torch.autocast(**BF16):
            out, ref = compiled(x)[0], blk(x)[0]
    assert out.dtype == torch.float32 and rel_err(out, ref) <= 1e-5
