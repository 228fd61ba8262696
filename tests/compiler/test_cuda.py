"""The compiler on a CUDA device: models compiled with moe_fuser fuse onto the Triton lowering and train eager-equal.

The CPU suite checks the rewrite and the op's CPU lowering; the Triton kernels are checked against the reference
by ``tests/lowering/triton_cases.py`` (interpreter) and ``benchmarks/gpu_check.py`` (GPU). What only a GPU shows is
the whole path on CUDA tensors: a compiled model whose fused op dispatches to ``triton``, forward and backward
through inductor, with the dtypes transformers and autocast give there. CI has no GPU, so these tests skip there;
run them on a CUDA machine with ``python -m pytest tests/compiler/test_cuda.py``.
"""

import contextlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available() or importlib.util.find_spec("triton") is None:
    pytest.skip("needs a CUDA device and triton (CI has neither; run on a GPU machine)", allow_module_level=True)

import moe_fuser  # noqa: E402

from moe_models import TOL, LoopMoE, Recorder, Variant, load_example, rel_err  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "patterns"))
import tiny_hf  # noqa: E402

CUDA = torch.device("cuda")


def _loss(outs):
    return sum((o.float() * torch.linspace(0.5, 1.5, o.numel(), device=o.device).view_as(o)).sum()
               for o in outs if o.is_floating_point())


def _step(fn, x, params, autocast=None):
    """Forward (under autocast to ``autocast``'s dtype if given) and backward: the floating outputs, then the
    gradients of the input and of every parameter."""
    xi = x.clone().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=autocast) if autocast else contextlib.nullcontext():
        out = fn(xi)
    outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.is_floating_point()]
    return outs + list(torch.autograd.grad(_loss(outs), [xi] + params, allow_unused=True))


def _check_eager_equal(model, compiled, x, tol, autocast=None):
    """Compiled equals eager within ``tol``. Under autocast, where eager's own bf16 arithmetic moves a value far
    from the fp32 model (routing-weight gradients), the op, which keeps routing in fp32, may differ from eager
    by up to twice that distance (as in test_autocast.py)."""
    params = [p for p in model.parameters() if p.requires_grad]
    ref, got = (_step(fn, x, params, autocast) for fn in (model, compiled))
    fp32 = _step(model, x, params) if autocast else ref
    for i, (a, b, c) in enumerate(zip(got, ref, fp32)):
        if b is None:       # an expert no token reached: no gradient eagerly, zeros (or none) compiled
            assert a is None or not a.any(), i
            continue
        assert a is not None and a.dtype == b.dtype, (i, a)
        assert rel_err(a, b) <= max(tol, 2 * rel_err(b, c)), (i, rel_err(a, b), rel_err(b, c))


def _lowerings(model, *args) -> set:
    report = moe_fuser.explain(model, *args)
    torch._dynamo.reset()
    assert report.num_fused >= 1, report
    return {m.lowering for m in report.matches}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ffn", ["sequential", "swiglu", "stacked"])
def test_hand_written_loop_on_triton(ffn, dtype):
    model = LoopMoE(Variant(ffn=ffn, E=8, D=64, F=96, dtype=dtype)).to(CUDA, dtype)
    assert _lowerings(model, torch.randn(2, 5, 64, device=CUDA, dtype=dtype)) == {"triton"}
    rec = Recorder("inductor")
    compiled = torch.compile(model, backend="moe_fuser", options={"inner": rec}, dynamic=True)
    for tokens in (37, 129):
        _check_eager_equal(model, compiled, torch.randn(1, tokens, 64, device=CUDA, dtype=dtype), TOL[dtype])
    assert rec.num_fused == 1, rec.num_fused     # one compile serves both token counts


def test_seed_switch_layer_on_triton():
    # top-2: with top-1 and renormalisation the routing weight is p / p, so the gate's gradient through it is
    # rounding noise (about 1e-4 relative at D=64 between any two summation orders), not a check of the op.
    model = load_example("switch_transformer").SwitchLayer(d_model=64, d_ff=128, top_k=2).to(CUDA)
    rec = Recorder("inductor")
    compiled = torch.compile(model, backend="moe_fuser", options={"inner": rec}, dynamic=True)
    for tokens in (33, 100):
        _check_eager_equal(model, compiled, torch.randn(2, tokens, 64, device=CUDA), TOL[torch.float32])
    assert rec.num_fused == 1, rec.num_fused     # one compile serves both token counts


@pytest.mark.parametrize("ffn", ["sequential", "swiglu"])
def test_autocast_on_triton(ffn):
    """fp32 weights, bf16 matmuls under torch.autocast('cuda'): the op computes the experts in bf16."""
    model = LoopMoE(Variant(ffn=ffn, E=8, D=64, F=96, router="mixtral_f32")).to(CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        report = moe_fuser.explain(model, torch.randn(2, 5, 64, device=CUDA))
    torch._dynamo.reset()
    assert report.num_fused == 1 and report.matches[0].dtype == torch.bfloat16, report
    rec = Recorder("inductor")
    compiled = torch.compile(model, backend="moe_fuser", options={"inner": rec}, dynamic=True)
    for tokens in (40, 96):
        _check_eager_equal(model, compiled, torch.randn(1, tokens, 64, device=CUDA), TOL[torch.bfloat16],
                           autocast=torch.bfloat16)
    assert rec.num_fused == 1, rec.num_fused     # one compile serves both token counts


FAMILIES = ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"]


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_models_on_triton(family):
    """Whole tiny transformers models (grouped_mm experts) fused and trained eager-equal in fp32: logits, router
    logits, aux loss and every gradient, two sequence lengths, one recompile."""
    layers = 2 if family == "mixtral" else 1
    # One key/value head per query head: with tiny_hf's grouped heads, DeepSeek-V3's attention hands CUDA's SDPA
    # keys with more heads than queries in transformers 5.17 (a broadcast error while dynamo traces it), which has
    # nothing to do with the MoE.
    model = tiny_hf.build(family, num_hidden_layers=layers, num_key_value_heads=2).to(CUDA)
    assert _lowerings(model, torch.randint(0, 64, (2, 9), device=CUDA)) == {"triton"}
    specs = tiny_hf.FusedSpecs("inductor")
    # dynamo's default: static, then dynamic at the second length (dynamic=True would make GPT-OSS's float clamp
    # limit a graph input, which the pattern refuses; see test_transformers_experts.py for the CPU twin of this).
    compiled = torch.compile(model, backend="moe_fuser", options={"inner": specs})
    for seq in (9, 23):
        errs = tiny_hf.train_step(model, compiled, torch.randint(0, 64, (2, seq), device=CUDA))
        assert max(errs.values()) <= TOL[torch.float32], errs
    fused = [g for g in specs.per_graph if g]
    assert len(fused) == 2 and all(len(g) == layers for g in fused) and not specs.leftover, specs.per_graph


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_blocks_on_triton(family, dtype, impl):
    """Each family's MoE block in both dtypes and both experts implementations (bf16 grouped_mm is
    torch._grouped_mm on CUDA): fused, outputs and gradients eager-equal."""
    blk = tiny_hf.block(family, dtype, impl).to(CUDA)
    x = torch.randn(2, 13, 32, device=CUDA, dtype=dtype)
    assert _lowerings(blk, x) == {"triton"}
    rec = Recorder("inductor")
    compiled = torch.compile(blk, backend="moe_fuser", options={"inner": rec})    # default dynamic: see above
    for tokens in (13, 40):
        _check_eager_equal(blk, compiled, torch.randn(2, tokens, 32, device=CUDA, dtype=dtype), TOL[dtype])
    assert rec.num_fused == 2, rec.num_fused     # static, then dynamic
