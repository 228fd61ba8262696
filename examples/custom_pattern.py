"""Teach moe_fuser an MoE style it does not know, with ``moe_fuser.register_pattern``.

The model: a "dense-masked" MoE. It runs *every* expert on *every* token with einsums over stacked weights and
zeroes the unselected ones with a [T, E] gate matrix scattered from the top-k:

    gates_TE = zeros_like(logits).scatter(1, topk_ids, topk_weights)
    h_TEF    = einsum("td,efd->tef", x, W1);  y_TED = einsum("tef,edf->ted", silu(h), W2)
    out_TD   = einsum("te,ted->td", gates_TE, y_TED)

No built-in family matches it (the einsums are not per-expert loops or grouped matmuls), so it runs as written:
E/k times the FLOPs it needs. The pattern below recognises it in ~50 lines: it anchors on the final einsum, walks
back with the helpers moe_fuser gives pattern writers (``op``/``val`` from ``moe_fuser.fx.graph``, the router
recogniser), and returns a ``Match``. The driver then proves the region closed and rewrites it; the model is
fused and eager-equal.

Run: python examples/custom_pattern.py
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import moe_fuser
from moe_fuser.fx.graph import is_op, val
from moe_fuser.patterns import Match, MatchContext, Rejection
from moe_fuser.patterns.routers import recognise_router
from moe_fuser.spec import ExpertSpec, MoESpec, MoEWeights


class DenseMaskedMoE(nn.Module):
    def __init__(self, d_model: int = 64, d_ff: int = 128, num_experts: int = 8, top_k: int = 2):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(d_model, num_experts, bias=False)
        self.W1 = nn.Parameter(torch.randn(num_experts, d_ff, d_model) / d_model ** 0.5)
        self.W2 = nn.Parameter(torch.randn(num_experts, d_model, d_ff) / d_ff ** 0.5)

    def forward(self, x):
        logits = self.router(x)
        w, ids = logits.softmax(dim=-1).topk(self.top_k, dim=-1)
        gates = torch.zeros_like(logits).scatter(1, ids, w)
        h = torch.einsum("td,efd->tef", x, self.W1)
        y = torch.einsum("tef,edf->ted", F.silu(h), self.W2)
        return torch.einsum("te,ted->td", gates, y)


def _einsum(node, equation: str) -> bool:
    return is_op(node, "einsum") and node.args[0] == equation


def dense_masked_moe(ctx: MatchContext):
    """Pattern: find(ctx) yields a Match per dense-masked MoE and a Rejection per near miss."""
    for out in ctx.nodes_of("einsum"):
        if not _einsum(out, "te,ted->td"):
            continue
        gates, y = out.args[1], out.args[2]
        if not (_einsum(y, "tef,edf->ted") and is_op(y.args[1], "silu") and _einsum(y.args[1].args[0], "td,efd->tef")):
            yield Rejection("custom", "dense_masked", f"{out.name}: experts are not einsum-silu-einsum")
            continue
        act, h = y.args[1], y.args[1].args[0]
        x, W1, W2 = h.args[1], h.args[2], y.args[2]
        if not (is_op(gates, "scatter") and is_op(gates.args[0], "zeros_like") and gates.args[1] == 1):
            yield Rejection("custom", "dense_masked", f"{out.name}: gates are not scattered from a top-k")
            continue
        ids, w = gates.args[2], gates.args[3]
        router = recognise_router(w, ids)
        if router.external:
            yield Rejection("custom", "dense_masked", f"router not recognised: {router.reason}")
            continue
        E = val(W1).shape[0]
        spec = MoESpec(router=router.spec, experts=ExpertSpec(num_experts=E, activation="silu"))
        yield Match(family="custom", pattern="dense_masked", spec=spec, x=x, output=out,
                    region=frozenset({out, y, act, h, gates, gates.args[0]}) | router.nodes,
                    weights=MoEWeights(w1=W1, w2=W2), router_logits=router.logits)


def main() -> None:
    torch.manual_seed(0)
    model = DenseMaskedMoE()
    x = torch.randn(256, 64)

    print("before register_pattern:")
    print(moe_fuser.explain(model, x))

    moe_fuser.register_pattern(dense_masked_moe, name="examples.dense_masked", family="custom")
    report = moe_fuser.explain(model, x)
    print("\nafter register_pattern:")
    print(report)

    compiled = torch.compile(model, backend="moe_fuser", options={"inner": "aot_eager"})
    with torch.no_grad():
        want, got = model(x), compiled(x)
    err = float((got - want).norm() / want.norm())
    print(f"\nfused vs eager: relative error {err:.1e}")
    assert report.num_fused == 1 and err < 1e-4
    with torch.no_grad():
        for name, fn in (("eager (dense)", model), ("moe_fuser", compiled)):
            fn(x)
            t0 = time.perf_counter()
            for _ in range(20):
                fn(x)
            print(f"{name:>14}: {(time.perf_counter() - t0) / 20 * 1e3:.2f} ms per forward")


if __name__ == "__main__":
    main()
