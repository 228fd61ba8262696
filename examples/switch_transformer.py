"""The seed article's Switch Transformer layer, unchanged, compiled with ``backend="moe_fuser"``.

The layer is written the hand-written way the article starts from: a bias-free ``nn.Linear`` gate (computed in
fp32, the article's pitfall 3), top-k with a ``renormalize`` flag, a Python loop over an ``nn.ModuleList`` of
``Sequential(Linear, SiLU, Linear)`` experts with ``torch.where`` dispatch and ``index_add_`` combine, and the
Switch load-balancing loss. moe_fuser captures the loop whole, recognises it, and replaces it with one fused op;
the loss keeps working (it reads the router probabilities, which stay in the graph).

Prints what was fused (``moe_fuser.explain``), checks the fused layer against eager, and times eager,
``torch.compile`` (inductor) and ``torch.compile(backend="moe_fuser")`` (medians).

    python examples/switch_transformer.py                  # CPU-sized: d_model 512, d_ff 2048, [4, 256, 512]
    python examples/switch_transformer.py --article        # the article's sizes: 4096/16384, [4, 2048, 4096]
    python examples/switch_transformer.py --draw moe.svg   # also draw the fused region before/after
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import moe_fuser


class SwitchLayer(nn.Module):
    def __init__(self, d_model: int, d_ff: int, num_experts: int = 8, top_k: int = 1, renormalize: bool = True):
        super().__init__()
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self.experts = nn.ModuleList([
            nn.Sequential(nn.Linear(d_model, d_ff, bias=False), nn.SiLU(), nn.Linear(d_ff, d_model, bias=False))
            for _ in range(num_experts)])

    def forward(self, h: torch.Tensor):
        B, S, D = h.shape
        x = h.reshape(-1, D)
        gate_logits = F.linear(x.float(), self.gate.weight.float())     # the gate in fp32 (pitfall 3)
        probs = gate_logits.softmax(dim=-1)
        topk_w, topk_ids = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            topk_w = topk_w / topk_w.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            tok, slot = torch.where(topk_ids == e)
            out.index_add_(0, tok, self.experts[e](x[tok]) * topk_w[tok, slot, None].to(x.dtype))
        # Switch load-balancing loss: n_experts * sum_i(freq_i * mean_prob_i), top-1 frequencies.
        freq = F.one_hot(topk_ids[:, 0], self.num_experts).float().mean(0)
        aux_loss = self.num_experts * (freq * probs.mean(0)).sum()
        return out.view(B, S, D), aux_loss


def _median_ms(fn, x, iters: int, warmup: int = 2) -> float:
    with torch.no_grad():
        for _ in range(warmup):
            fn(x)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ff", type=int, default=2048)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--article", action="store_true", help="the article's sizes (slow on a CPU)")
    p.add_argument("--no-inductor", action="store_true", help="skip the plain torch.compile column")
    p.add_argument("--inner", default="inductor", choices=("inductor", "aot_eager", "eager"),
                   help="moe_fuser's inner compiler (default inductor)")
    p.add_argument("--draw", default=None, help="render the fused region before/after (.svg or .png)")
    args = p.parse_args(argv)
    if args.article:
        args.d_model, args.d_ff, args.batch, args.seq = 4096, 16384, 4, 2048
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    layer = SwitchLayer(args.d_model, args.d_ff, args.experts, args.top_k).to(dtype).eval()
    x = torch.randn(args.batch, args.seq, args.d_model, dtype=dtype)

    report = moe_fuser.explain(layer, x)
    print(report)
    if args.draw:
        print(f"drawn: {report.draw(args.draw)}")

    fused = torch.compile(layer, backend="moe_fuser", options={"inner": args.inner})
    with torch.no_grad():
        (want, want_aux), (got, got_aux) = layer(x), fused(x)
    err = float((got.double() - want.double()).norm() / want.double().norm())
    print(f"\nfused vs eager: relative error {err:.1e} (output), aux loss {float(want_aux):.6f} vs {float(got_aux):.6f}")

    rows = {"eager": _median_ms(layer, x, args.iters)}
    fused_ms = _median_ms(fused, x, args.iters)
    if not args.no_inductor:
        # dynamo keeps compiled code per function, not per torch.compile call: after a reset the inductor
        # column compiles its own code instead of finding (and running) moe_fuser's
        torch._dynamo.reset()
        rows["torch.compile (inductor)"] = _median_ms(torch.compile(layer), x, args.iters)
    rows["torch.compile (moe_fuser)"] = fused_ms
    print(f"\nforward, {tuple(x.shape)} {args.dtype}, E={args.experts} top-{args.top_k}, median of {args.iters}:")
    for name, ms in rows.items():
        print(f"  {name:<27} {ms:9.2f} ms   {rows['eager'] / ms:5.2f}x vs eager")
    return {"report": report, "error": err, "ms": rows}


if __name__ == "__main__":
    main()
