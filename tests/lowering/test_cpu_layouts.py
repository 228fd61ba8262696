"""The CPU lowering's two grouping layouts (ragged mm per expert, padded bmm) against the reference."""

import sys
from pathlib import Path

import pytest
import torch

import moe_fuser
from moe_fuser.lowering import cpu

sys.path.insert(0, str(Path(__file__).parents[1] / "ops"))
from _moe_cases import Case, leaves, rel_err  # noqa: E402


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("glu,act,bias", [("separate", "silu", False), ("separate", "gelu", True),
                                          ("concat", "gelu_tanh", True), ("interleaved", "gpt_oss", False),
                                          (None, "relu", True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layouts_match_reference(monkeypatch, padded, glu, act, bias, dtype):
    monkeypatch.setattr(cpu, "PADDED_MAX_MEAN_ROWS", 10**9 if padded else 0)
    monkeypatch.setattr(cpu, "PADDED_MAX_WASTE", float("inf"))
    monkeypatch.setattr(cpu, "STREAM_MIN_ROWS", 1)  # the ragged backward then streams several expert groups
    used = []
    init = cpu._Grouping.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        used.append(self.padded)

    monkeypatch.setattr(cpu._Grouping, "__init__", spy)
    case = Case(T=45, D=24, F=20, E=6, k=3, dtype=dtype, glu=glu, activation=act, bias=bias)
    x, logits, kw = case.make(requires_grad=True)
    out = moe_fuser.fused_moe(x, logits, **kw, impl="cpu")
    ref = moe_fuser.fused_moe(x, logits, **kw, impl="reference")
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(out, ref) < tol
    grad = torch.randn_like(out)
    ins = leaves(x, logits, kw)
    for g, w in zip(torch.autograd.grad(out, ins, grad), torch.autograd.grad(ref, ins, grad)):
        assert (g.double() - w.double()).norm() <= 2 * tol * w.double().norm() + 1e-6
    assert used == [padded, padded]  # forward and backward took the layout asked for


def test_padded_layout_needs_every_expert_active():
    ids = torch.tensor([[0, 1], [1, 0], [0, 1]])
    assert not cpu._Grouping(ids, 4, stacked=True).padded  # experts 2, 3 idle: their weights are never read
    assert cpu._Grouping(ids, 2, stacked=True).padded
    assert not cpu._Grouping(ids, 2, stacked=False).padded  # per-expert lists are never stacked


@pytest.mark.parametrize("glu,bias", [("separate", False), ("concat", True), (None, True)])
def test_inference_streams_expert_groups(monkeypatch, glu, bias):
    """Without grad the ragged layout runs expert groups one after another (each <= the largest expert's rows,
    with the minimum group size lowered to 1 here)."""
    monkeypatch.setattr(cpu, "PADDED_MAX_MEAN_ROWS", 0)
    monkeypatch.setattr(cpu, "STREAM_MIN_ROWS", 1)
    seen = []
    chunks = cpu._Grouping.chunks

    def spy(self, max_rows):
        for sub in chunks(self, max_rows):
            seen.append(sub.n)
            yield sub

    monkeypatch.setattr(cpu._Grouping, "chunks", spy)
    x, logits, kw = Case(T=60, D=24, F=20, E=7, k=2, dtype=torch.float32, glu=glu, bias=bias).make()
    with torch.no_grad():
        out = moe_fuser.fused_moe(x, logits, **kw, impl="cpu")
    ref = moe_fuser.fused_moe(x, logits, **kw, impl="reference")
    assert rel_err(out, ref) < 1e-5
    assert len(seen) > 1 and sum(seen) == 120
    counts = torch.bincount(logits.softmax(-1).topk(2).indices.flatten(), minlength=7)
    assert max(seen) <= counts.max()
