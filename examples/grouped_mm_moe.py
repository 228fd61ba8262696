"""An MoE written on ``F.grouped_mm`` the way torchtitan lays one out, compiled with ``backend="moe_fuser"``.

The block keeps fp32 weights and runs its grouped matmuls in bf16 (``grouped_mm`` takes bf16), as torchtitan's
grouped experts do: a router module (fp32 sigmoid scores, a selection-only load-balancing bias, renormalised and
scaled weights, per-expert counts for the balancing statistics), the pairs sorted by expert, the routing weight
applied to each expert's input rows, three grouped matmuls over the per-expert offsets, a shared expert, and
one ``scatter_add`` into the shared expert's output. moe_fuser finds all of it in the graph (pattern
``handwritten.grouped_mm``) and replaces it with one fused op; the statistics buffer keeps updating.

Prints what was fused, checks a training step against eager, and times eager, ``torch.compile`` (inductor) and
``torch.compile(backend="moe_fuser")``, forward and training step (medians).

    python examples/grouped_mm_moe.py                      # d_model 512, d_ff 1024, 8 experts top-2, 2048 tokens
    python examples/grouped_mm_moe.py --experts 64 --top-k 8 --d-ff 256
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import moe_fuser


class Router(nn.Module):
    """Token-choice top-k: fp32 sigmoid scores, top-k of scores + a selection-only bias, the chosen scores
    renormalised and scaled; also the per-expert token counts."""

    def __init__(self, d_model: int, num_experts: int, top_k: int, scale: float = 1.0):
        super().__init__()
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self.num_experts, self.top_k, self.scale = num_experts, top_k, scale

    def forward(self, x: torch.Tensor, bias: torch.Tensor):
        scores = torch.sigmoid(self.gate(x).to(torch.float32))
        _, ids = torch.topk(scores + bias, k=self.top_k, dim=1)
        weights = scores.gather(dim=1, index=ids)
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20) * self.scale
        counts = torch.histc(ids.view(-1).float(), bins=self.num_experts, min=0, max=self.num_experts)
        return weights, ids, counts


class GroupedExperts(nn.Module):
    """SwiGLU experts as stacked [E, out, in] weights, run by grouped matmuls over per-expert row offsets."""

    def __init__(self, d_model: int, d_ff: int, num_experts: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(num_experts, d_ff, d_model) / d_model ** 0.5)
        self.w2 = nn.Parameter(torch.randn(num_experts, d_model, d_ff) / d_ff ** 0.5)
        self.w3 = nn.Parameter(torch.randn(num_experts, d_ff, d_model) / d_model ** 0.5)

    def forward(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
        h = F.silu(F.grouped_mm(rows.bfloat16(), self.w1.bfloat16().transpose(-2, -1), offs=offs))
        h = h * F.grouped_mm(rows.bfloat16(), self.w3.bfloat16().transpose(-2, -1), offs=offs)
        return F.grouped_mm(h, self.w2.bfloat16().transpose(-2, -1), offs=offs).type_as(rows)


class GroupedMoE(nn.Module):
    def __init__(self, d_model: int, d_ff: int, num_experts: int = 8, top_k: int = 2):
        super().__init__()
        self.d_model, self.num_experts, self.top_k = d_model, num_experts, top_k
        self.router = Router(d_model, num_experts, top_k)
        self.experts = GroupedExperts(d_model, d_ff, num_experts)
        self.shared = nn.Sequential(nn.Linear(d_model, d_ff, bias=False), nn.SiLU(),
                                    nn.Linear(d_ff, d_model, bias=False))
        self.register_buffer("expert_bias", torch.randn(num_experts) * 0.01)
        self.register_buffer("tokens_per_expert", torch.zeros(num_experts))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, S, D = h.shape
        x = h.view(-1, D)
        weights, ids, counts = self.router(x, self.expert_bias)
        with torch.no_grad():
            self.tokens_per_expert.add_(counts)
        order = torch.argsort(ids.view(-1), stable=True)          # (token, slot) pairs sorted by expert
        index = (order // self.top_k).reshape(-1, 1).expand(-1, D)
        rows = torch.gather(x, dim=0, index=index)
        rows = (rows.to(torch.float32) * weights.view(-1)[order].reshape(-1, 1)).to(x.dtype)
        routed = self.experts(rows, counts)
        out = self.shared(x).scatter_add(dim=0, index=index, src=routed)
        return out.view(B, S, D)


def _median_ms(fn, iters: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _train_step(model, fn, x):
    def step():
        for p in model.parameters():
            p.grad = None
        fn(x).float().pow(2).mean().backward()
    return step


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--no-inductor", action="store_true", help="skip the plain torch.compile column")
    p.add_argument("--inner", default="inductor", choices=("inductor", "aot_eager", "eager"),
                   help="moe_fuser's inner compiler (default inductor)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = GroupedMoE(args.d_model, args.d_ff, args.experts, args.top_k)
    x = torch.randn(args.batch, args.seq, args.d_model)

    report = moe_fuser.explain(model, x)
    print(report)
    torch._dynamo.reset()

    fused = torch.compile(model, backend="moe_fuser", options={"inner": args.inner})
    results = {}
    for name, fn in (("eager", model), ("fused", fused)):
        for p_ in model.parameters():
            p_.grad = None
        out = fn(x)
        out.float().pow(2).mean().backward()
        results[name] = (out.detach(), [p_.grad.clone() for p_ in model.parameters()])
    (want, want_g), (got, got_g) = results["eager"], results["fused"]
    err = _rel(got, want)
    grad_err = max(_rel(a, b) for a, b in zip(got_g, want_g))
    print(f"\nfused vs eager: relative error {err:.1e} (output), {grad_err:.1e} (worst parameter gradient)")

    columns = {"eager": model}
    if not args.no_inductor:
        columns["torch.compile (inductor)"] = "inductor"
    columns["torch.compile (moe_fuser)"] = fused
    rows = {}
    for name, fn in columns.items():
        if fn == "inductor":
            # dynamo keeps compiled code per function, not per torch.compile call: after a reset the inductor
            # column compiles its own code instead of finding (and running) moe_fuser's
            torch._dynamo.reset()
            fn = torch.compile(model)
        with torch.no_grad():
            fwd = _median_ms(lambda: fn(x), args.iters)
        rows[name] = (fwd, _median_ms(_train_step(model, fn, x), args.iters))
    print(f"\n{tuple(x.shape)} fp32 weights, bf16 grouped matmuls, E={args.experts} top-{args.top_k}, "
          f"median of {args.iters} (ms):")
    print(f"  {'':<27} {'forward':>9} {'train step':>11}")
    for name, (fwd, train) in rows.items():
        print(f"  {name:<27} {fwd:9.2f} {train:11.2f}   {rows['eager'][0] / fwd:5.2f}x / "
              f"{rows['eager'][1] / train:5.2f}x vs eager")
    return {"report": report, "error": err, "grad_error": grad_err, "ms": rows}


if __name__ == "__main__":
    main()
