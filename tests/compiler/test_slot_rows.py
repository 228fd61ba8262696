"""One row per (token, slot) pair (DeepSeek-MoE's training path, ``patterns/slot_rows.py``): each style fuses (count
asserted) and trains eager-equal at two token counts; departures are left alone, eager-equal, with the reason."""

import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import moe_fuser
from moe_models import ASSIGN, TOL, LoopMoE, Recorder, Variant, check_train_step


class GatedMLP(nn.Module):
    """DeepSeek's expert MLP."""

    def __init__(self, D, F_):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(D, F_, bias=False), nn.Linear(D, F_, bias=False)
        self.down_proj = nn.Linear(F_, D, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class AddAuxiliaryLoss(torch.autograd.Function):
    """DeepSeek's: the layer's output carries its auxiliary loss into the backward."""

    @staticmethod
    def forward(ctx, x, loss):
        ctx.dtype = loss.dtype
        return x

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, torch.ones(1, dtype=ctx.dtype, device=grad_output.device)


class SlotRowsMoE(nn.Module):
    """DeepSeek-MoE's gate (fp32 softmax, top-k, optional renormalisation and scaling) and training loop."""

    def __init__(self, D=16, F_=24, E=4, k=2, gated=True, buffer="empty_like", view="shape", column="unsqueeze",
                 norm=True, scale=1.0, skip_expert=False, extra_scale=False, remote=False):
        super().__init__()
        self.remote = remote   # DeepSeek-V2's remote code: AddAuxiliaryLoss and shared experts
        self.shared_experts = GatedMLP(D, 2 * F_) if remote else None
        self.k, self.norm, self.scale, self.buffer, self.view, self.column = k, norm, scale, buffer, view, column
        self.skip_expert, self.extra_scale = skip_expert, extra_scale
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList(GatedMLP(D, F_) if gated else
                                     nn.Sequential(nn.Linear(D, F_), nn.GELU(), nn.Linear(F_, D)) for _ in range(E))

    def forward(self, hidden_states):
        orig_shape = hidden_states.shape
        x = hidden_states.view(-1, orig_shape[-1])
        scores = F.linear(x.float(), self.gate.weight.float()).softmax(dim=-1, dtype=torch.float32)
        topk_weight, topk_idx = torch.topk(scores, k=self.k, dim=-1, sorted=False)
        if self.k > 1 and self.norm:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        topk_weight = topk_weight * self.scale
        flat_topk_idx = topk_idx.view(-1)
        xs = x.repeat_interleave(self.k, dim=0)
        y = torch.empty_like(xs) if self.buffer == "empty_like" else xs.new_zeros(xs.shape)
        experts = list(self.experts)[:-1] if self.skip_expert else self.experts
        for i, expert in enumerate(experts):
            y[flat_topk_idx == i] = expert(xs[flat_topk_idx == i])
        y = y.view(*topk_weight.shape, -1) if self.view == "shape" else y.reshape(x.shape[0], self.k, x.shape[1])
        w = topk_weight.unsqueeze(-1) if self.column == "unsqueeze" else topk_weight[..., None]
        y = y * w
        if self.extra_scale:
            y = y * 2.0
        y = y.sum(dim=1).to(hidden_states.dtype).view(*orig_shape)
        # DeepSeek's sequence-level auxiliary loss: expert counts per sequence by scatter_add_ along dim 1
        B, S = orig_shape[:2]
        ce = torch.zeros(B, scores.shape[-1]).scatter_add_(1, topk_idx.view(B, -1), torch.ones(B, S * self.k))
        aux_loss = (ce * scores.view(B, S, -1).mean(dim=1)).sum(dim=1).mean()
        if self.remote:
            return AddAuxiliaryLoss.apply(y, aux_loss) + self.shared_experts(hidden_states)
        return y, aux_loss


def _run(model, dtype=torch.float32, fused=1, inner="aot_eager"):
    model = model.to(dtype)
    rec = Recorder(inner)
    compiled = torch.compile(model, backend="moe_fuser", options={"inner": rec}, dynamic=True)
    for B, S in ((2, 5), (3, 7)):
        check_train_step(model, compiled, torch.randn(B, S, 16, dtype=dtype), TOL[dtype])
    assert rec.graphs and rec.num_fused == fused * len(rec.graphs), (rec.num_fused, len(rec.graphs))
    return rec


@pytest.mark.parametrize("kw", [
    dict(),                                                           # SwiGLU MLPs, empty_like, view(*w.shape, -1)
    dict(gated=False, buffer="new_zeros", view="reshape", column="getitem", norm=False),   # Linear-GELU-Linear
    dict(k=1, E=3, scale=2.5),                                        # top-1, DeepSeek-V2's routed scaling
    dict(remote=True),                                                # AddAuxiliaryLoss, shared experts
])
def test_slot_rows_styles_fuse_and_train_eager_equal(kw):
    _run(SlotRowsMoE(**kw))


def test_bf16_under_inductor_combines_in_fp32():
    """bf16 experts times fp32 routing weights: the weighted rows are formed and summed in fp32, as the layer."""
    _run(SlotRowsMoE(), torch.bfloat16, inner="inductor")


def test_explain_names_the_pattern():
    report = moe_fuser.explain(SlotRowsMoE(), torch.randn(2, 5, 16))
    assert report.num_fused == 1 and not report.rejected, report
    row = report.fused[0]
    assert (row.pattern, row.num_experts, row.top_k, row.activation) == ("handwritten.slots", 4, 2, "silu-glu")


def test_top1_mask_assignments_are_left_to_the_loop_pattern():
    """``out[ids == e] = expert(x[ids == e]) * w[...]`` with 1-D top-1 ids is the loop pattern's form: fused there,
    and no word from this pattern."""
    report = moe_fuser.explain(LoopMoE(Variant(router="max_top1", loop="mask", combine=ASSIGN, k=1)),
                               torch.randn(2, 5, 16))
    assert report.num_fused == 1 and not report.rejected, report


@pytest.mark.parametrize("kw, reason", [
    (dict(buffer="new_zeros", skip_expert=True), "the weights hold 3"),   # rows of expert 3 stay zero
    (dict(extra_scale=True), "not summed over the slots"),
])
def test_departures_are_not_fused(kw, reason):
    model = SlotRowsMoE(**kw)
    _run(model, fused=0)
    report = moe_fuser.explain(model, torch.randn(2, 5, 16))
    assert any(reason in r.reason for r in report.rejected), report


@pytest.mark.parametrize("seed", range(6))
def test_fuzz_fused_and_equal(seed):
    rng = random.Random(seed)
    E = rng.choice([2, 3, 4, 6])
    model = SlotRowsMoE(E=E, k=rng.randint(1, min(3, E)), gated=rng.random() < 0.5,
                        buffer=rng.choice(["empty_like", "new_zeros"]), view=rng.choice(["shape", "reshape"]),
                        column=rng.choice(["unsqueeze", "getitem"]), norm=rng.random() < 0.5,
                        scale=rng.choice([1.0, 16.0]))
    torch.manual_seed(seed)
    _run(model, rng.choice([torch.float32, torch.bfloat16]))
