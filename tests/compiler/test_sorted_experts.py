"""The hand-written sort-based MoE (pairs sorted by expert, split by the captured counts, one combine): each style
the pattern claims is fused (count asserted) and trains eager-equal at two token counts; a sort or a split it cannot
prove per-expert is left alone, with the reason, and stays eager-equal."""

import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import moe_fuser
from moe_models import TOL, Recorder, check_train_step

BF16 = torch.bfloat16


class SortedMoE(nn.Module):
    """Top-k softmax router; pairs sorted by expert; per-expert runs of a split; one index_add (ScatterMoE,
    JetMoE style). ``stacked``: ``W[e]`` of [E, out, in] parameters ("kn": ``parts[e] @ W[e]`` of [E, in, out]
    ones), else ModuleList Linears (with biases)."""

    def __init__(self, D=16, F_=24, E=4, k=2, stacked=True, glu=True, counts="scatter", order="sort",
                 combine="index_add", descending=False, router="topk_softmax", act="gelu", reversed_sizes=False):
        super().__init__()
        self.E, self.k, self.glu, self.router, self.act = E, k, glu, router, getattr(F, act)
        self.counts, self.order, self.combine, self.descending = counts, order, combine, descending
        self.reversed_sizes = reversed_sizes
        self.gate = nn.Linear(D, E, bias=False)
        H = 2 * F_ if glu else F_
        self.kn = stacked == "kn"
        if stacked:
            self.w1 = nn.Parameter(torch.randn(E, *((D, H) if self.kn else (H, D))) / D ** 0.5)
            self.w2 = nn.Parameter(torch.randn(E, *((F_, D) if self.kn else (D, F_))) / F_ ** 0.5)
            self.up = self.down = None
        else:
            self.up = nn.ModuleList(nn.Linear(D, H) for _ in range(E))
            self.down = nn.ModuleList(nn.Linear(F_, D) for _ in range(E))

    def _proj(self, rows, sizes, which):
        parts = rows.split(sizes, dim=0)
        if self.up is None:
            w = self.w1 if which == 1 else self.w2
            if self.kn:
                return torch.cat([parts[e] @ w[e] for e in range(self.E)], dim=0)
            return torch.cat([F.linear(parts[e], w[e]) for e in range(self.E)], dim=0)
        mods = self.up if which == 1 else self.down
        return torch.cat([mods[e](parts[e]) for e in range(self.E)], dim=0)

    def forward(self, h):
        B, S, D = h.shape
        x = h.reshape(-1, D)
        logits = self.gate(x).float()
        if self.router == "topk_softmax":
            v, ids = logits.topk(self.k, dim=1)
            w = v.softmax(dim=1)
        else:
            w, ids = logits.softmax(dim=1).topk(self.k, dim=1)
            if self.router == "softmax_topk_renorm":
                w = w / w.sum(dim=-1, keepdim=True)
        w = w.type_as(x)
        if self.counts == "scatter":
            sizes = torch.zeros(x.shape[0], self.E, dtype=w.dtype).scatter(1, ids, 1).long().sum(0).tolist()
        else:
            sizes = torch.bincount(ids.flatten(), minlength=self.E).tolist()
        if self.reversed_sizes:
            sizes = sizes[::-1]
        if self.order == "sort":
            _, order = ids.flatten().sort(0, descending=self.descending)
            tok = order.div(self.k, rounding_mode="trunc")
        else:
            order = ids.flatten().argsort()
            tok = order // self.k
        g = w.flatten()[order]
        hid = self._proj(x[tok], sizes, 1)
        if self.glu:
            gate, up = hid.chunk(2, dim=-1)
            a = F.silu(gate) * up
        else:
            a = self.act(hid)
        y = self._proj(a, sizes, 2) * g[:, None]
        if self.combine == "index_add":
            out = torch.zeros_like(x).index_add(0, tok, y)
        elif self.combine == "scatter_add_":
            out = torch.zeros_like(x)
            out.scatter_add_(0, tok[:, None].expand(-1, D), y)
        elif self.combine == "index_put":
            out = torch.zeros_like(x).index_put((tok,), y, accumulate=True)
        else:
            out = torch.zeros_like(x)
            out.index_add_(0, tok, y)
        return out.view(B, S, D)


def _run(model, dtype=torch.float32, fused=1, inner="aot_eager", autocast=False):
    model = model.to(dtype)
    rec = Recorder(inner)
    compiled = torch.compile(model, backend="moe_fuser", options={"inner": rec})
    for B, S in ((2, 5), (3, 7)):
        check_train_step(model, compiled, torch.randn(B, S, 16, dtype=dtype), TOL[BF16 if autocast else dtype],
                         autocast=autocast)
    assert rec.graphs and rec.num_fused == fused * len(rec.graphs), (rec.num_fused, len(rec.graphs))
    return rec


@pytest.mark.parametrize("kw", [
    dict(),                                                          # stacked W[e], SwiGLU, scatter counts, sort
    dict(stacked=False, glu=False),                                  # ModuleList Linears with biases, GELU
    dict(order="argsort", combine="index_add_"),                      # argsort + //, in-place combine
    dict(k=1, E=3),
    dict(stacked="kn", glu=False),                                   # [E, in, out] rows, parts[e] @ W[e]
    dict(combine="scatter_add_"),
    dict(stacked=False, combine="index_put"),                        # out = zeros.index_put(..., accumulate=True)
])
def test_sorted_styles_fuse_and_train_eager_equal(kw):
    _run(SortedMoE(**kw))


def test_bf16_under_inductor():
    _run(SortedMoE(), torch.bfloat16, inner="inductor")


def test_explain_names_the_pattern():
    report = moe_fuser.explain(SortedMoE(), torch.randn(2, 5, 16))
    assert report.num_fused == 1, report
    row = report.fused[0]
    assert (row.pattern, row.num_experts, row.top_k, row.router) == ("handwritten.sorted", 4, 2, "topk-softmax")


def test_bincount_counts_are_traced_as_plain_dynamo_does(caplog):
    """``bincount(ids, minlength=E).tolist()`` has a data-dependent length: under the capture settings dynamo fails
    outright on it (plain dynamo breaks the graph there). The frame is traced again without them: the layer runs,
    unfused, eager-equal, and the log and explain say why."""
    with caplog.at_level("INFO", logger="moe_fuser"):
        _run(SortedMoE(counts="bincount"), fused=0)
    assert "tracing it again as plain dynamo does" in caplog.text
    torch._dynamo.reset()
    report = moe_fuser.explain(SortedMoE(counts="bincount"), torch.randn(2, 5, 16))
    row = report.rejected[0]
    assert row.pattern == "capture" and row.module_path.startswith("<frame forward") and "bincount" in row.reason


@pytest.mark.parametrize("seed", range(8))
def test_fuzz_fused_and_equal_or_untouched_and_equal(seed):
    """Random sort-based layers (router, weights, activation, sort, combine, E, k, precision); one in four reverses
    its split sizes, so run e meets another expert's rows: it must be left alone. Never wrong."""
    rng = random.Random(seed)
    E = rng.choice([2, 3, 4, 6])
    k = rng.randint(1, min(3, E))
    precision = rng.choice(["fp32", "bf16", "amp"])
    twist = rng.random() < 0.25
    # (renormalised top-1 weights are constant 1: the router's gradient is rounding noise, no relative check holds)
    routers = ["topk_softmax", "softmax_topk"] + (["softmax_topk_renorm"] if k > 1 else [])
    model = SortedMoE(E=E, k=k, stacked=rng.random() < 0.5, glu=rng.random() < 0.5,
                      order=rng.choice(["sort", "argsort"]), combine=rng.choice(["index_add", "index_add_"]),
                      router=rng.choice(routers), act=rng.choice(["gelu", "silu", "relu"]), reversed_sizes=twist)
    _run(model, BF16 if precision == "bf16" else torch.float32, fused=0 if twist else 1,
         autocast=precision == "amp")


def test_descending_sort_is_left_alone():
    """Sorted descending, run e of the split holds expert E-1-e's pairs: the layer computes something else than
    an MoE (each run meets another expert's weights), which the op must not replace."""
    model = SortedMoE(descending=True)
    x = torch.randn(2, 5, 16)
    report = moe_fuser.explain(model, x)
    assert report.num_fused == 0
    reasons = [r.reason for r in report.rejected if r.pattern == "handwritten.sorted"]
    assert reasons and "ascending sort" in reasons[0], report.rejected
    torch._dynamo.reset()
    _run(model, fused=0)
