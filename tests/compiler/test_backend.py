"""The backend: registration by entry point, options, capture scoped to moe_fuser, untouched graphs compile
exactly as under plain inductor, verify."""

import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import moe_fuser
from moe_fuser import rewrite
from moe_fuser.patterns.base import Match, unregister_pattern
from moe_models import LoopMoE, Recorder, Variant, rel_err


def test_listed_by_dynamo():
    assert "moe_fuser" in torch._dynamo.list_backends()


def test_entry_point_works_without_importing_moe_fuser():
    """A fresh interpreter that never imports moe_fuser: the name resolves, the hand-written loop is captured
    whole on the very first call (the capture settings reach dynamo through torch.compile) and fused."""
    script = textwrap.dedent("""
        import sys, torch, torch.nn as nn
        class MoE(nn.Module):
            def __init__(self):
                super().__init__()
                self.gate = nn.Linear(8, 4, bias=False)
                self.experts = nn.ModuleList(nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
                                             for _ in range(4))
            def forward(self, x):
                w, ids = self.gate(x).softmax(-1).topk(2, -1)
                out = torch.zeros_like(x)
                for e in range(4):
                    tok, slot = torch.where(ids == e)
                    out.index_add_(0, tok, self.experts[e](x[tok]) * w[tok, slot, None])
                return out
        m = MoE()
        x = torch.randn(10, 8)
        assert "moe_fuser" not in sys.modules
        y = torch.compile(m, backend="moe_fuser", options={"inner": "eager"})(x)
        from moe_fuser.rewrite import counters
        print("fused", counters["fused"], "err", float((y - m(x)).abs().max()))
        print("capture after call", torch._dynamo.config.capture_scalar_outputs)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    fused_line, capture_line = proc.stdout.strip().splitlines()[-2:]
    words = fused_line.split()
    assert words[1] == "1" and float(words[3]) < 1e-5, proc.stdout
    assert capture_line.endswith("False")       # the settings do not outlive the call


def test_capture_settings_are_scoped_to_moe_fuser_calls():
    seen = []

    def inner(gm, example_inputs):
        seen.append(torch._dynamo.config.capture_scalar_outputs)
        return gm.forward

    model = LoopMoE(Variant())
    torch.compile(model, backend="moe_fuser", options={"inner": inner})(torch.randn(2, 3, 16))
    assert seen == [True]
    assert torch._dynamo.config.capture_scalar_outputs is False
    assert torch._dynamo.config.capture_dynamic_output_shape_ops is False
    # A plain backend in the same process still breaks on the loop, as it always did.
    torch._dynamo.reset()
    rec = Recorder("eager")
    torch.compile(model, backend=rec)(torch.randn(2, 3, 16))
    assert all("index_add_" not in gm.code for gm in rec.graphs)


def test_code_the_capture_settings_cannot_trace_runs_as_under_plain_dynamo():
    """Listing a tensor of data-dependent length (``bincount(...).tolist()``) fails outright under the capture
    settings, where plain dynamo breaks the graph: the frame is traced again without them and runs, as under
    inductor; the settings are back on for the next frame of the same call (the loop is still fused)."""
    def count_then_moe(model, ids, x):
        sizes = torch.bincount(ids.flatten(), minlength=4).tolist()
        return model(x)[0] * sizes[0], sizes

    model = LoopMoE(Variant())
    ids, x = torch.randint(0, 4, (5, 2)), torch.randn(2, 3, 16)
    rec = Recorder("eager")
    got, got_sizes = torch.compile(count_then_moe, backend="moe_fuser", options={"inner": rec})(model, ids, x)
    want, want_sizes = count_then_moe(model, ids, x)
    assert got_sizes == want_sizes and rel_err(got, want) <= 1e-6
    assert rec.num_fused == 1


class EinsumExperts(nn.Module):
    """A loop whose experts project with ``einsum``, which inductor cannot lower over the unbacked row counts the
    capture settings give (it guards on the count being 1), and scale their output (not fused: a departure)."""

    def __init__(self, D=16, F_=24, E=4):
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.w1 = nn.Parameter(torch.randn(E, D, F_) / D ** 0.5)
        self.w2 = nn.Parameter(torch.randn(E, F_, D) / F_ ** 0.5)

    def forward(self, x):
        w, ids = self.gate(x).softmax(-1).topk(2, -1)
        out = torch.zeros_like(x)
        for e in range(self.w1.shape[0]):
            tok, slot = torch.where(ids == e)
            h = F.silu(torch.einsum("nd,df->nf", x[tok], self.w1[e]))
            out.index_add_(0, tok, torch.einsum("nf,fd->nd", h, self.w2[e]) * w[tok, slot, None] * 2.0)
        return out


def test_inner_compiler_failing_on_an_unfused_captured_graph_runs_as_under_plain_dynamo(caplog):
    """The inner compiler fails on a data-dependent guard in a graph the capture settings made and nothing was
    fused in: the frame is traced again without them and runs as under plain torch.compile."""
    model, x = EinsumExperts(), torch.randn(10, 16)
    with caplog.at_level("INFO", logger="moe_fuser"):
        got = torch.compile(model, backend="moe_fuser")(x)
    assert "tracing it again as plain dynamo does" in caplog.text
    assert rel_err(got, model(x)) <= 1e-6


def test_capture_off_leaves_the_loop_eager():
    model = LoopMoE(Variant())
    rec = Recorder("eager")
    x = torch.randn(2, 3, 16)
    out, _ = torch.compile(model, backend="moe_fuser", options={"inner": rec, "capture": False})(x)
    assert rec.num_fused == 0
    assert rel_err(out, model(x)[0]) < 1e-6


def test_pattern_family_switch():
    model = LoopMoE(Variant())
    rec = Recorder("eager")
    x = torch.randn(2, 3, 16)
    out, _ = torch.compile(model, backend="moe_fuser",
                           options={"inner": rec, "patterns": {"handwritten": False}})(x)
    assert rec.graphs and rec.num_fused == 0
    assert rel_err(out, model(x)[0]) < 1e-6


@pytest.mark.parametrize("options, message", [
    ({"bogus": 1}, "unknown moe_fuser option"),
    ({"inner": "tvm"}, "options['inner']='tvm' is unknown"),
    ({"patterns": {"no_such_family": False}}, "unknown families/patterns"),
    ({"patterns": ["handwritten"]}, "must map family or pattern names"),
    ({"impl": "triton"}, "cannot run on device cpu"),
    ({"inner": "npu"}, "needs torch_npu"),
])
def test_bad_options_fail_loudly(options, message):
    model = LoopMoE(Variant())
    with pytest.raises(Exception, match=message.replace("[", r"\[").replace("]", r"\]")):
        torch.compile(model, backend="moe_fuser", options={"inner": "eager", **options})(torch.randn(2, 3, 16))


def test_impl_option_forces_the_lowering():
    report = moe_fuser.explain(LoopMoE(Variant()), torch.randn(2, 3, 16), options={"impl": "reference"})
    assert [r.lowering for r in report.fused] == ["reference"]


class NotAnMoE(nn.Module):
    """Attention-free transformer-ish block with an index_add_ scatter the MoE patterns must decline."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 32)

    def forward(self, x, idx):
        h = self.down(F.gelu(self.up(self.norm(x))))
        pooled = torch.zeros(4, 32).index_add_(0, idx, h)
        return x + h, pooled


def test_graphs_without_moe_compile_exactly_as_plain_inductor():
    from torch._inductor.utils import run_and_get_code

    model, x, idx = NotAnMoE(), torch.randn(12, 32), torch.randint(0, 4, (12,))
    codes, graphs = {}, {}
    for backend in ("inductor", "moe_fuser"):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        with torch._inductor.config.patch(fx_graph_cache=False):
            fn = torch.compile(model, backend=backend)
            _, codes[backend] = run_and_get_code(fn, x, idx)
        graphs[backend] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs["moe_fuser"] == graphs["inductor"] == 1

    def normalised(code):               # "# AOT ID: ['0_forward']" counts compiles in the process
        return [re.sub(r"^# AOT ID: .*$", "", c, flags=re.M) for c in code]
    assert normalised(codes["moe_fuser"]) == normalised(codes["inductor"])


def _wrong_pattern(ctx):
    """Claims the hand-written loop computes relu experts (it computes silu): only verify can tell."""
    from moe_fuser.patterns.handwritten import HandwrittenLoop
    for item in HandwrittenLoop().find(ctx):
        if isinstance(item, Match):
            item.spec = item.spec.replace(experts=item.spec.experts.__class__(
                num_experts=item.spec.num_experts, activation="relu"))
            item.family, item.pattern = "custom", "tests.wrong"
            yield item


def test_verify_falls_back_on_a_wrong_rewrite():
    moe_fuser.register_pattern(_wrong_pattern, name="tests.wrong", family="custom", priority=100)
    try:
        model = LoopMoE(Variant())
        x = torch.randn(2, 3, 16)
        compiled = torch.compile(model, backend="moe_fuser", options={"inner": "aot_eager", "verify": True})
        with pytest.warns(RuntimeWarning, match="disagrees with the original"):
            out, _ = compiled(x)
        assert rel_err(out, model(x)[0]) < 1e-5
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out2, _ = compiled(x)             # from now on the original graph, silently
        assert rel_err(out2, model(x)[0]) < 1e-5
    finally:
        unregister_pattern("tests.wrong")


def test_verify_runs_the_original_eagerly_where_the_inner_compiler_fails_on_it(caplog):
    """The fused op can replace the very code the inner compiler fails on (transformers 5.17's grouped_mm
    fallback under autocast): verify then compares with the original graph run eagerly, and the model runs."""
    def inner(gm, example_inputs):
        if any("index_add" in str(n.target) for n in gm.graph.nodes):
            raise RuntimeError("cannot compile the hand-written loop")
        return gm.forward

    model = LoopMoE(Variant(ffn="swiglu"))
    x = torch.randn(2, 3, 16)
    compiled = torch.compile(model, backend="moe_fuser", options={"inner": inner, "verify": True})
    with warnings.catch_warnings(), caplog.at_level("WARNING", logger="moe_fuser"):
        warnings.simplefilter("error", RuntimeWarning)
        out, _ = compiled(x)
    assert "runs the original graph eagerly" in caplog.text and "cannot compile the hand-written loop" in caplog.text
    assert rel_err(out, model(x)[0]) < 1e-5


def test_verify_passes_a_correct_rewrite():
    model = LoopMoE(Variant(ffn="swiglu"))
    x = torch.randn(2, 3, 16)
    before = rewrite.counters["fused"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out, _ = torch.compile(model, backend="moe_fuser", options={"inner": "aot_eager", "verify": True})(x)
    assert rewrite.counters["fused"] == before + 1
    assert rel_err(out, model(x)[0]) < 1e-5
