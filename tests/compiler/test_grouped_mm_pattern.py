"""The hand-written grouped-matmul MoE (pairs sorted by expert, per-expert offsets, ``F.grouped_mm``): each style the
pattern claims is fused (count asserted) and trains eager-equal at two token counts; offsets it cannot prove
per-expert are left alone, with the reason, and stay eager-equal. ``grouped_mm`` takes bf16 on CPU: the layers
run in bf16, or keep fp32 weights and cast to bf16 around the grouped matmuls (torchtitan's form)."""

import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import moe_fuser
from moe_models import TOL, Recorder, check_train_step, load_example

BF16 = torch.bfloat16
D, F_ = 16, 24


class GroupedMoE(nn.Module):
    """Router -> sort the (token, slot) pairs by expert -> offsets -> grouped_mm experts -> one combine.

    counts: "bincount" | "histc" (max E-1) | "histc_e" (max E) | "histc_sorted" (of the sorted ids) | "one_hot"
    (of the [T, K] ids, summed over both dims) | "one_hot_flat"
    order: "argsort" | "sort";  offs: "to" (cumsum(0).to(int32)) | "dtype" (cumsum(0, dtype=int32))
    gather: "index" | "index_select" | "gather";  gate: "separate" (w1, w3) | "concat" (chunk) | "plain"
    weight: "output" | "output_col" (``[order][:, None]``) | "input" (torchtitan: fp32 product, cast back)
    combine: "index_add" | "index_add_" | "index_add_result" (its result read, its index computed again) |
    "scatter_add" | "scatter_add_";  shared: add into a shared expert's output
    router: "softmax_topk_renorm" | "softmax_topk" | "topk_softmax" | "sigmoid_bias" (selection bias, gather,
    renormalise, scale)
    layout: "linear" ([E, out, in], transpose(-2, -1) for the matmul) | "mT" (the same, ``.mT``) | "kn" ([E, in, out]
    as is)
    mixed: fp32 parameters, hidden states and weights cast to bf16 for the grouped matmuls (``.type_as`` back)
    twist: "descending" | "flip" (counts reversed) | "other_index" (combined at the token index reversed): not an
    MoE the op may replace."""

    def __init__(self, E=4, k=2, counts="bincount", order="argsort", offs="to", gather="index", gate="separate",
                 weight="output", combine="index_add", shared=False, router="softmax_topk_renorm", layout="linear",
                 mixed=False, act="silu", twist=None):
        super().__init__()
        self.E, self.k, self.counts, self.order, self.offs, self.gather = E, k, counts, order, offs, gather
        self.gate_kind, self.weight, self.combine, self.router, self.layout = gate, weight, combine, router, layout
        self.mixed, self.act, self.twist = mixed, getattr(F, act), twist
        self.gate = nn.Linear(D, E, bias=False)
        H = 2 * F_ if gate == "concat" else F_

        def stacked(out, inp):
            w = torch.randn(E, out, inp) / inp ** 0.5
            return nn.Parameter(w.transpose(1, 2).contiguous() if layout == "kn" else w)
        self.w1 = stacked(H, D)
        self.w3 = stacked(F_, D) if gate == "separate" else None
        self.w2 = stacked(D, F_)
        if router == "sigmoid_bias":
            self.register_buffer("expert_bias", torch.randn(E) * 0.1)
        self.shared = nn.Sequential(nn.Linear(D, F_, bias=False), nn.SiLU(), nn.Linear(F_, D, bias=False)) \
            if shared else None

    def route(self, x):
        logits = self.gate(x).float()
        if self.router == "topk_softmax":
            v, ids = logits.topk(self.k, dim=-1)
            return v.softmax(-1), ids
        if self.router == "sigmoid_bias":
            scores = torch.sigmoid(logits)
            _, ids = torch.topk(scores + self.expert_bias, k=self.k, dim=1)
            w = scores.gather(1, ids)
            return w / (w.sum(-1, keepdim=True) + 1e-20) * 2.5, ids
        w, ids = logits.softmax(-1).topk(self.k, dim=-1)
        return (w / w.sum(-1, keepdim=True) if self.router == "softmax_topk_renorm" else w), ids

    def mm(self, rows, w, offs):
        w = {"linear": lambda: w.transpose(-2, -1), "mT": lambda: w.mT, "kn": lambda: w}[self.layout]()
        w = w.to(BF16) if self.mixed else w    # cast after the transpose (torchtitan casts before it)
        return F.grouped_mm(rows, w, offs=offs)

    def forward(self, h):
        B, S, _ = h.shape
        x = h.reshape(-1, D)
        w, ids = self.route(x)
        flat = ids.view(-1)
        if self.order == "argsort":
            order = flat.argsort(stable=True, descending=self.twist == "descending")
        else:
            sorted_ids, order = flat.sort(descending=self.twist == "descending")
        if self.counts == "bincount":
            counts = torch.bincount(flat, minlength=self.E)
        elif self.counts == "one_hot":
            counts = F.one_hot(ids, self.E).sum((0, 1))
        elif self.counts == "one_hot_flat":
            counts = F.one_hot(flat, self.E).sum(0)
        else:
            src = sorted_ids if self.counts == "histc_sorted" else flat
            top = self.E if self.counts == "histc_e" else self.E - 1
            counts = torch.histc(src.float(), bins=self.E, min=0, max=top)
        if self.twist == "flip":
            counts = counts.flip(0)
        if self.offs == "to":
            offs = counts.cumsum(0).to(torch.int32)
        else:
            offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
        tok = order // self.k
        index = tok.reshape(-1, 1).expand(-1, D)
        if self.gather == "index":
            xs = x[tok]
        elif self.gather == "index_select":
            xs = x.index_select(0, tok)
        else:
            xs = torch.gather(x, 0, index)
        w_sorted = w.view(-1)[order]
        if self.weight == "input":
            xs = (xs.to(torch.float32) * w_sorted.reshape(-1, 1)).to(x.dtype)
        xs = xs.to(BF16) if self.mixed else xs
        hid = self.mm(xs, self.w1, offs)
        if self.gate_kind == "separate":
            a = self.act(hid) * self.mm(xs, self.w3, offs)
        elif self.gate_kind == "concat":
            g, u = hid.chunk(2, dim=-1)
            a = self.act(g) * u
        else:
            a = self.act(hid)
        y = self.mm(a, self.w2, offs)
        y = y.type_as(x) if self.mixed else y
        if self.weight == "output":
            y = y * w.view(-1)[order, None].to(y.dtype)
        elif self.weight == "output_col":
            y = y * w_sorted[:, None].to(y.dtype)
        out = self.shared(x) if self.shared is not None else torch.zeros_like(x)
        if self.twist == "other_index":
            tok = tok.flip(0)
            index = tok.reshape(-1, 1).expand(-1, D)
        if self.combine == "index_add":
            out = out.index_add(0, tok, y)
        elif self.combine == "index_add_":
            out.index_add_(0, tok, y)
        elif self.combine == "index_add_result":   # the in-place write's result, at order // k computed again
            out = out.index_add_(0, tok if self.twist == "other_index" else order // self.k, y)
        elif self.combine == "scatter_add":
            out = out.scatter_add(0, index, y)
        else:
            out.scatter_add_(0, index, y)
        return out.view(B, S, D)


def _run(model, fused=1, inner="aot_eager"):
    model = model.to(torch.float32 if model.mixed else BF16)
    rec = Recorder(inner)
    compiled = torch.compile(model, backend="moe_fuser", options={"inner": rec})
    for B, S in ((2, 5), (3, 7)):
        dtype = torch.float32 if model.mixed else BF16
        check_train_step(model, compiled, torch.randn(B, S, D, dtype=dtype), TOL[BF16])
    assert rec.graphs and rec.num_fused == fused * len(rec.graphs), (rec.num_fused, len(rec.graphs))
    return rec


@pytest.mark.parametrize("kw", [
    dict(),                                                                  # bincount, argsort, SwiGLU, index_add
    dict(counts="histc", order="sort", offs="dtype", gather="index_select", gate="concat", combine="index_add_"),
    dict(counts="histc_e", gather="gather", weight="input", combine="scatter_add", router="sigmoid_bias",
         shared=True, mixed=True),                                           # torchtitan's MoE
    dict(layout="mT", mixed=True, shared=True, combine="index_add_", counts="one_hot"),
    dict(counts="histc_sorted", order="sort", gate="plain", act="gelu", weight="output_col", combine="scatter_add_",
         layout="kn", router="topk_softmax"),
    dict(k=1, E=3, weight="input", router="softmax_topk", combine="index_add_result"),
])
def test_grouped_mm_styles_fuse_and_train_eager_equal(kw):
    _run(GroupedMoE(**kw))


def test_under_inductor():
    _run(GroupedMoE(gate="concat", shared=True), inner="inductor")


def test_explain_names_the_pattern():
    report = moe_fuser.explain(GroupedMoE(weight="input").to(BF16), torch.randn(2, 5, D, dtype=BF16))
    assert report.num_fused == 1 and not report.rejected, report
    row = report.fused[0]
    assert (row.pattern, row.num_experts, row.top_k, row.router) == ("handwritten.grouped_mm", 4, 2,
                                                                     "softmax-topk+renorm")
    assert any("routing weight on the experts' input" in n for n in row.notes), row.notes


@pytest.mark.parametrize("twist,why", [("descending", "ascending"), ("flip", "per-expert count"),
                                       ("other_index", "another index")])
def test_offsets_it_cannot_prove_are_left_alone(twist, why):
    """Sorted descending or with reversed counts, run e of the rows meets another expert's weights; combined at
    the pair index, the rows land on other tokens: the layer computes something else than an MoE, which the op
    must not replace. explain says why; compiled, it stays eager-equal."""
    model = GroupedMoE(twist=twist).to(BF16)
    report = moe_fuser.explain(model, torch.randn(2, 5, D, dtype=BF16))
    assert report.num_fused == 0
    reasons = [r.reason for r in report.rejected if r.pattern == "handwritten.grouped_mm"]
    assert reasons and why in reasons[0], report.rejected
    torch._dynamo.reset()
    _run(model, fused=0)


@pytest.mark.parametrize("seed", range(6))
def test_fuzz_fused_and_equal_or_untouched_and_equal(seed):
    """Random grouped-matmul layers over every form above; one in four twisted so that it is no MoE and must be
    left alone. Never wrong."""
    rng = random.Random(seed)
    E = rng.choice([2, 3, 4, 6])
    k = rng.randint(1, min(3, E))
    pick = {name: rng.choice(choices) for name, choices in dict(
        counts=["bincount", "histc", "histc_e", "histc_sorted", "one_hot", "one_hot_flat"], order=["argsort", "sort"], offs=["to", "dtype"],
        gather=["index", "index_select", "gather"], gate=["separate", "concat", "plain"],
        weight=["output", "output_col", "input"],
        combine=["index_add", "index_add_", "index_add_result", "scatter_add", "scatter_add_"],
        # (renormalised top-1 weights are constant: the router's gradient is rounding noise, no relative check holds)
        router=["softmax_topk_renorm", "softmax_topk", "topk_softmax", "sigmoid_bias"] if k > 1 else ["softmax_topk"],
        layout=["linear", "mT", "kn"], act=["silu", "gelu", "relu"]).items()}
    if pick["counts"] == "histc_sorted":
        pick["order"] = "sort"
    twist = rng.choice(["descending", "flip", "other_index"]) if rng.random() < 0.25 else None
    model = GroupedMoE(E=E, k=k, shared=rng.random() < 0.3, mixed=rng.random() < 0.3, twist=twist, **pick)
    _run(model, fused=0 if twist else 1)


class _Layers(nn.Module):
    """``examples/grouped_mm_moe.py``'s torchtitan-style block at ``layers.0.moe`` behind a residual."""

    def __init__(self):
        super().__init__()
        moe = load_example("grouped_mm_moe").GroupedMoE(D, F_, num_experts=4, top_k=2)
        self.layers = nn.ModuleList([nn.ModuleDict({"moe": moe})])

    def forward(self, h):
        return h + self.layers[0]["moe"](h)


def test_torchtitan_style_block_fuses_trains_and_keeps_its_statistics():
    """The block in a model: fused under its module path, trains eager-equal at two token counts, and its
    tokens-per-expert buffer (read from the router's counts, outside the fused region) updates as in eager."""
    model = _Layers()
    report = moe_fuser.explain(model, torch.randn(2, 5, D))
    assert report.num_fused == 1 and report.fused[0].module_path == "layers.0.moe", report
    torch._dynamo.reset()
    moe = model.layers[0]["moe"]
    moe.tokens_per_expert.zero_()
    rec = Recorder()
    compiled = torch.compile(model, backend="moe_fuser", options={"inner": rec})
    for B, S in ((2, 5), (3, 7)):
        check_train_step(model, compiled, torch.randn(B, S, D), TOL[BF16])
    assert rec.graphs and rec.num_fused == len(rec.graphs), (rec.num_fused, len(rec.graphs))
    # each step ran eager once and compiled once: both counted 2 * (10 + 21) pairs
    assert moe.tokens_per_expert.sum().item() == 2 * 2 * (10 + 21)
