"""A dense gate read per expert: makeMoE's sparse MoE, the popular from-scratch tutorial, with its data-dependent
``if flat_mask.any():`` removed as explain advises. Tokens are ``(ids == e).any(-1)`` as a boolean ``[B, S]`` mask,
the routing weight is column e of the dense ``[B*S, E]`` gate (``gate[flat_mask, e].unsqueeze(1)``) and the
weighted rows are added into a ``[B, S, D]`` buffer (``final[mask] += y.squeeze(1)``). Each style fuses (count
asserted) and trains eager-equal at two token counts; departures are left alone, eager-equal, with the reason."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import moe_fuser
from moe_models import TOL, Recorder, check_train_step, rel_err


class Expert(nn.Module):
    def __init__(self, D, dropout):
        super().__init__()
        tail = [] if dropout is None else [nn.Dropout(dropout)]
        self.net = nn.Sequential(nn.Linear(D, 4 * D), nn.ReLU(), nn.Linear(4 * D, D), *tail)

    def forward(self, x):
        return self.net(x)


class TopkRouter(nn.Module):
    """makeMoE's router: top-k of the logits, scattered into -inf, softmax (a dense gate, zero off the top-k);
    ``noisy``: its NoisyTopkRouter, with learned Gaussian noise on the logits."""

    def __init__(self, D, E, k, noisy=False):
        super().__init__()
        self.k, self.linear = k, nn.Linear(D, E)
        self.noise = nn.Linear(D, E) if noisy else None

    def forward(self, h):
        logits = self.linear(h)
        if self.noise is not None:
            logits = logits + torch.randn_like(logits) * F.softplus(self.noise(h))
        top_k_logits, indices = logits.topk(self.k, dim=-1)
        sparse_logits = torch.full_like(logits, float("-inf")).scatter(-1, indices, top_k_logits)
        return F.softmax(sparse_logits, dim=-1), indices


class SparseMoE(nn.Module):
    """``dropout``: the tutorial's dropout after each expert (None: none); ``flat``: the hidden states flattened
    first ([T, D] tokens, a [T] mask); ``column``: how the gate column is read; ``wrong_column``: each expert
    weighted by the next one's gate column; ``sorted_ids``: ids that are no top-k (could repeat an expert)."""

    def __init__(self, D=16, E=4, k=2, dropout=None, noisy=False, flat=False, column="unsqueeze",
                 wrong_column=False, sorted_ids=False):
        super().__init__()
        self.router = TopkRouter(D, E, k, noisy)
        self.experts = nn.ModuleList(Expert(D, dropout) for _ in range(E))
        self.flat, self.column, self.wrong_column, self.sorted_ids = flat, column, wrong_column, sorted_ids

    def forward(self, x):
        if self.flat:
            x = x.view(-1, x.size(-1))
        gating_output, indices = self.router(x)
        if self.sorted_ids:
            indices = indices.sort(dim=-1).values
        final_output = torch.zeros_like(x)
        flat_x = x.view(-1, x.size(-1))
        flat_gating_output = gating_output.view(-1, gating_output.size(-1))
        E = len(self.experts)
        for i, expert in enumerate(self.experts):
            expert_mask = (indices == i).any(dim=-1)
            flat_mask = expert_mask.view(-1)
            expert_output = expert(flat_x[flat_mask])
            col = (i + 1) % E if self.wrong_column else i
            if self.column == "unsqueeze":
                gating_scores = flat_gating_output[flat_mask, col].unsqueeze(1)
            else:
                gating_scores = flat_gating_output[flat_mask, col, None]
            weighted_output = expert_output * gating_scores
            final_output[expert_mask] += weighted_output.squeeze(1)
        return final_output


def _run(model, dtype=torch.float32, fused=1):
    model = model.to(dtype)
    rec = Recorder()
    compiled = torch.compile(model, backend="moe_fuser", options={"inner": rec}, dynamic=True)
    for B, S in ((2, 5), (3, 7)):
        check_train_step(model, compiled, torch.randn(B, S, 16, dtype=dtype), TOL[dtype])
    assert rec.graphs and rec.num_fused == fused * len(rec.graphs), (rec.num_fused, len(rec.graphs))


@pytest.mark.parametrize("kw", [dict(), dict(flat=True), dict(column="none_index", k=1, E=3), dict(k=3, E=5)])
def test_dense_gate_styles_fuse_and_train_eager_equal(kw):
    _run(SparseMoE(**kw))


def test_bf16_fuses_and_trains():
    _run(SparseMoE(), torch.bfloat16)


def test_makemoe_as_written_in_eval_fuses_with_its_noisy_router():
    """The tutorial's layer (noisy router, dropout in the experts) in eval mode: the router stays as written, its
    noise drawn from the same seed in both runs; explain says where the weights come from."""
    model = SparseMoE(dropout=0.1, noisy=True).eval()
    x = torch.randn(2, 5, 16)
    report = moe_fuser.explain(model, x)
    assert report.num_fused == 1 and not report.rejected, report
    row = report.fused[0]
    assert (row.router, row.num_experts, row.top_k) == ("external", 4, 2)
    assert any("dense gate" in n for n in row.notes), row.notes
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="moe_fuser", options={"inner": "aot_eager"})
    with torch.no_grad():
        torch.manual_seed(1)
        want = model(x)
        torch.manual_seed(1)
        got = compiled(x)
    assert rel_err(got, want) < TOL[torch.float32]


@pytest.mark.parametrize("kw, reason", [
    (dict(wrong_column=True), "routing weight column 1"),
    (dict(sorted_ids=True), "cannot prove the expert ids"),
])
def test_departures_are_not_fused(kw, reason):
    model = SparseMoE(**kw)
    _run(model, fused=0)
    report = moe_fuser.explain(model, torch.randn(2, 5, 16))
    assert any(reason in r.reason for r in report.rejected), report
