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
                                          (None, "relu", True), ("concat", "relu2", False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layouts_match_reference(monkeypatch, padded, glu, act, bias, dtype):
    monkeypatch.setattr(cpu, "PADDED_MAX_MEAN_ROWS", 10**9 if padded else 0)
    monkeypatch.setattr(cpu, "PADDED_MAX_WASTE", float("inf"))
    # Forward and backward then stream several expert groups (each group writes / reads its rows of the saved h).
    monkeypatch.setattr(cpu, "STREAM_MIN_ROWS", 1)
    monkeypatch.setattr(cpu, "PADDED_STREAM_BYTES", 1)
    used = []
    init = cpu._Grouping.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        used.append(self.padded)

    monkeypatch.setattr(cpu._Grouping, "__init__", spy)
    seen = _streamed(monkeypatch)
    case = Case(T=45, D=24, F=20, E=6, k=3, dtype=dtype, glu=glu, activation=act, bias=bias)
    x, logits, kw = case.make(requires_grad=True)
    out = moe_fuser.fused_moe(x, logits, **kw, impl="cpu")
    assert len(seen) > 1  # the forward that saves for backward streamed
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


def _streamed(monkeypatch) -> list:
    """Record the (padded?, experts, rows) of each expert group the lowering streams."""
    seen = []
    groups = cpu._Grouping.groups

    def spy(self, row_bytes):
        for sub in groups(self, row_bytes):
            seen.append((sub.padded, len(sub.segs), sub.n))
            yield sub

    monkeypatch.setattr(cpu._Grouping, "groups", spy)
    return seen


def _inference_matches_reference(case: Case):
    """fused_moe(impl="cpu") without grad equals the reference on the case's fresh inputs, which it returns."""
    x, logits, kw = case.make()
    with torch.no_grad():
        out = moe_fuser.fused_moe(x, logits, **kw, impl="cpu")
    assert rel_err(out, moe_fuser.fused_moe(x, logits, **kw, impl="reference")) < 1e-5
    return x, logits, kw


@pytest.mark.parametrize("glu,bias", [("separate", False), ("concat", True), (None, True)])
def test_inference_streams_expert_groups(monkeypatch, glu, bias):
    """Without grad the ragged layout runs expert groups one after another (each <= the largest expert's rows,
    with the minimum group size lowered to 1 here)."""
    monkeypatch.setattr(cpu, "PADDED_MAX_MEAN_ROWS", 0)
    monkeypatch.setattr(cpu, "STREAM_MIN_ROWS", 1)
    seen = _streamed(monkeypatch)
    _, logits, _ = _inference_matches_reference(Case(T=60, D=24, F=20, E=7, k=2, dtype=torch.float32, glu=glu,
                                                     bias=bias))
    assert len(seen) > 1 and sum(n for _, _, n in seen) == 120 and not any(p for p, _, _ in seen)
    counts = torch.bincount(logits.softmax(-1).topk(2).indices.flatten(), minlength=7)
    assert max(n for _, _, n in seen) <= counts.max()


@pytest.mark.parametrize("glu,bias", [("separate", True), ("concat", False), (None, True)])
def test_padded_layout_streams_groups_of_experts(monkeypatch, glu, bias):
    """The padded layout runs several experts per bmm, in groups whose gathered rows fill at most
    PADDED_STREAM_BYTES (each group padded to its own largest expert), inference and backward, equal to the
    reference."""
    monkeypatch.setattr(cpu, "PADDED_MAX_MEAN_ROWS", 10**9)
    monkeypatch.setattr(cpu, "PADDED_MAX_WASTE", float("inf"))
    monkeypatch.setattr(cpu, "PADDED_STREAM_BYTES", 40 * 24 * 4)  # 40 rows of D=24 fp32
    seen = _streamed(monkeypatch)
    x, logits, kw = _inference_matches_reference(Case(T=61, D=24, F=20, E=9, k=2, dtype=torch.float32, glu=glu,
                                                      bias=bias))
    counts = torch.bincount(logits.softmax(-1).topk(2).indices.flatten(), minlength=9)
    per = max(1, 40 // int(counts.max()))
    assert all(p for p, _, _ in seen) and [e for _, e, _ in seen][:-1] == [per] * (len(seen) - 1) and len(seen) > 1
    assert sum(n for _, _, n in seen) == 122
    seen.clear()
    xg, lg = x.clone().requires_grad_(), logits.clone().requires_grad_()
    wk = {k: v.clone().requires_grad_() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    out = moe_fuser.fused_moe(xg, lg, **wk, impl="cpu")
    ref = moe_fuser.fused_moe(xg, lg, **wk, impl="reference")
    grad = torch.randn_like(out)
    ins = leaves(xg, lg, wk)
    for g, w in zip(torch.autograd.grad(out, ins, grad), torch.autograd.grad(ref, ins, grad)):
        assert rel_err(g, w) < 1e-5
    assert len(seen) > 1 and all(p for p, _, _ in seen)  # the backward streamed padded groups
