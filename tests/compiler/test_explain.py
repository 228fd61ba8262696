"""explain(): the report's fields, its table, its drawing, and the moe_fuser logger."""

import logging
import shutil

import pytest
import torch
import torch.nn as nn

import moe_fuser
from moe_models import LoopMoE, MixtralV4Block, Variant


class TwoLayers(nn.Module):
    """A fusable Mixtral-v4 block in ``layers.0`` and an unfusable one (an extra scale) in ``layers.1``."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([MixtralV4Block(hidden=16, ffn=24, num_experts=4, top_k=2),
                                     LoopMoE(Variant(twist="extra_scale"))])

    def forward(self, x):
        h, _ = self.layers[0](x)
        h, aux = self.layers[1](x + h)
        return h, aux


def test_report_fields_and_table():
    report = moe_fuser.explain(TwoLayers(), torch.randn(2, 3, 16))
    assert report.num_fused == 1 and report.num_graphs == 1
    row = report.fused[0]
    assert (row.module_path, row.family, row.router, row.num_experts, row.top_k, row.activation, row.dtype,
            row.lowering) == ("layers.0", "handwritten", "softmax-topk+renorm", 4, 2, "silu-glu", "float32", "cpu")
    assert [(r.module_path, r.pattern) for r in report.rejected] == [("layers.1", "handwritten.loop")]
    assert "routing weight" in report.rejected[0].reason          # y * w * 2.0: the * 2.0 is not modelled
    text = str(report)
    for word in ("1 MoE fused", "layers.0", "softmax-topk+renorm", "silu-glu", "rejected", "layers.1"):
        assert word in text
    gm = report.graphs[0]
    assert isinstance(gm, torch.fx.GraphModule)
    assert sum(1 for n in gm.graph.nodes if hasattr(n.target, "spec")) == 1


def test_external_router_is_noted():
    report = moe_fuser.explain(LoopMoE(Variant(router="external")), torch.randn(2, 3, 16))
    assert report.fused[0].router == "external"
    assert any("router kept as written" in n for n in report.fused[0].notes)
    assert "router kept as written" in str(report)


def test_reproduced_router_details_are_noted():
    """A bf16 model that routes in fp32 and casts the weights back: explain says the op rounds them too."""
    model = LoopMoE(Variant(router="mixtral_f32", dtype=torch.bfloat16)).to(torch.bfloat16)
    report = moe_fuser.explain(model, torch.randn(2, 3, 16, dtype=torch.bfloat16))
    assert "routing weights rounded to bfloat16, as the model casts them" in report.fused[0].notes, report


def test_explain_logs_on_the_moe_fuser_logger(caplog):
    with caplog.at_level(logging.INFO, logger="moe_fuser"):
        moe_fuser.explain(TwoLayers(), torch.randn(2, 3, 16))
    messages = [r.getMessage() for r in caplog.records if r.name == "moe_fuser"]
    assert any("fused layers.0" in m for m in messages)
    assert any("not fusing layers.1" in m for m in messages)


def test_explain_leaves_a_compiled_model_alone():
    model = LoopMoE(Variant())
    compiled = torch.compile(model, backend="moe_fuser", options={"inner": "eager"})
    x = torch.randn(2, 3, 16)
    before = compiled(x)[0]
    moe_fuser.explain(model, x)
    assert torch.equal(compiled(x)[0], before)


@pytest.mark.parametrize("how", ["module.compile", "forward"])
def test_explain_sees_through_a_compile_in_place(how):
    """A model compiled in place (``model.compile()``, or transformers' ``generate`` recipe of compiling
    ``model.forward``) still shows its MoE, and keeps its own compile afterwards."""
    model = LoopMoE(Variant())
    if how == "module.compile":
        model.compile(backend="moe_fuser", options={"inner": "eager"})
        compiled = model._compiled_call_impl
    else:
        model.forward = compiled = torch.compile(model.forward, backend="moe_fuser", options={"inner": "eager"})
    report = moe_fuser.explain(model, torch.randn(2, 3, 16))
    assert report.num_fused == 1 and report.num_graphs == 1
    assert (model._compiled_call_impl if how == "module.compile" else model.forward) is compiled


def test_explain_says_when_no_graph_was_captured(caplog):
    class Disabled(LoopMoE):
        @torch.compiler.disable
        def forward(self, x):
            return super().forward(x)

    with caplog.at_level(logging.WARNING, logger="moe_fuser"):
        report = moe_fuser.explain(Disabled(Variant()), torch.randn(2, 3, 16))
    assert report.num_graphs == 0
    assert "no graph" in str(report)
    assert any("no graph" in r.getMessage() for r in caplog.records)


class SkipsIdleExperts(nn.Module):
    """A loop that skips experts without tokens: a data-dependent ``if`` in a loop, which dynamo cannot trace, so
    it runs the whole frame in eager (plain torch.compile too)."""

    def __init__(self, D=16, E=4, k=2):
        super().__init__()
        self.k = k
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList([nn.Sequential(nn.Linear(D, 24), nn.SiLU(), nn.Linear(24, D))
                                      for _ in range(E)])

    def forward(self, x):
        w, ids = self.gate(x).softmax(-1).topk(self.k)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(ids == e)
            if tok.numel() == 0:
                continue
            out.index_add_(0, tok, expert(x[tok]) * w[tok, slot, None])
        return out


class SkipsIdleExpertsInAHelper(SkipsIdleExperts):
    """The same loop in a function the forward calls: a frame of its own, which dynamo fails on and runs in eager,
    while the forward's router compiles."""

    def forward(self, x):
        w, ids = self.gate(x).softmax(-1).topk(self.k)
        return skip_idle_experts(self.experts, x, w, ids)


def skip_idle_experts(experts, x, w, ids):
    out = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        tok, slot = torch.where(ids == e)
        if tok.numel() == 0:
            continue
        out.index_add_(0, tok, expert(x[tok]) * w[tok, slot, None])
    return out


def test_explain_says_which_frame_dynamo_ran_in_eager_and_why(caplog):
    """No graph reaches the backend: the report names the frame, dynamo's reason and the line, with the fix for
    the expert loop's usual cause (not the torch.compiler.disable guess); the compiled model still equals eager."""
    model, x = SkipsIdleExperts(), torch.randn(10, 16)
    with caplog.at_level(logging.WARNING, logger="moe_fuser"):
        report = moe_fuser.explain(model, x)
    assert report.num_graphs == 0 and len(report.rejected) == 1
    row = report.rejected[0]
    assert row.pattern == "capture" and row.module_path.startswith("<frame forward, ")
    line = SkipsIdleExperts.forward.__code__.co_firstlineno + 5    # the `if tok.numel() == 0`
    assert "Data-dependent branching" in row.reason and f"test_explain.py:{line}" in row.reason
    assert "drop such a branch" in row.reason and "torch.compiler.disable" not in str(report)
    assert any("ran the call's frames in eager" in r.getMessage() for r in caplog.records)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(model, backend="moe_fuser")(x), model(x))


@pytest.mark.parametrize("cls", [SkipsIdleExperts, SkipsIdleExpertsInAHelper])
def test_explain_after_the_users_own_compile_still_says_why(cls):
    """Dynamo runs a frame it failed on in eager from then on, without trying again: explained after the user's
    own compile ran, the model shows no new failure; the report takes the earlier one, and says so (also for the
    frame of a function the forward calls)."""
    model, x = cls(), torch.randn(10, 16)
    torch.testing.assert_close(torch.compile(model, backend="moe_fuser")(x), model(x))   # the router compiled
    report = moe_fuser.explain(model, x)
    assert report.num_fused == 0 and len(report.rejected) == 1, report
    row = report.rejected[0]
    assert row.pattern == "capture" and "Data-dependent branching" in row.reason, report
    assert row.module_path.startswith("<frame forward" if cls is SkipsIdleExperts else "<frame skip_idle_experts")
    assert "earlier compile of this model" in row.reason and "torch.compiler.disable" not in str(report)


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz `dot` is not installed")
@pytest.mark.parametrize("suffix, magic", [(".svg", b"<svg"), (".png", b"\x89PNG")])
def test_draw_renders_before_and_after(tmp_path, suffix, magic):
    report = moe_fuser.explain(TwoLayers(), torch.randn(2, 3, 16))
    path = report.draw(tmp_path / f"moe{suffix}")
    data = path.read_bytes()
    assert magic in data[:400]
    dot = report.to_dot()
    assert "layers.0: before" in dot and "layers.0: after" in dot and "moe_fuser_fused_moe_0" in dot


def test_draw_without_fusion_says_why():
    report = moe_fuser.explain(LoopMoE(Variant(twist="skip_expert")), torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match="nothing was fused"):
        report.draw("unused.svg")
