"""GPU check of the Triton lowering: correctness on CUDA against the reference, then the timing table.

Run on a CUDA machine from the repository root (moe_fuser need not be installed; no transformers needed):

    PYTHONUNBUFFERED=1 python benchmarks/gpu_check.py            # committed block configs
    PYTHONUNBUFFERED=1 python benchmarks/gpu_check.py --tune     # + a block-config sweep (tuned_configs.json)
    python benchmarks/gpu_check.py --dry-run                     # CPU: every code path, Triton interpreter, tiny

It finishes within ``--budget`` seconds (default 260): every phase checks the time left before it starts, a
SIGALRM ends the run 10 s after the budget (printing what it has), and a watchdog thread hard-exits 25 s after it
even if a kernel or compile hangs. Phases:

1. correctness: fused_moe(impl="triton") against impl="reference" on fresh random inputs (bf16, fp16, fp32; GLU
   layouts, activations, biases, dropped pairs, idle experts, both combines, the block configs of small and large
   T), forward and backward: relative error norms of the output and every gradient, NaN fails;
2. the forward table, bf16 SwiGLU (gate_up concatenated, as transformers stores it), given the routing (every
   column gets the same topk weights and ids): E=8 k=2 D=4096 F=14336 at T=16 and T=4096, E=64 k=8 D=2048 F=1408
   at T=4096. Columns: the eager hand-written loop (ModuleList style: per expert where + two linears +
   index_add), transformers' grouped_mm path (sort, histc, cumsum offsets, ``torch._grouped_mm``, re-implemented
   here), fused_moe triton, and the ceilings: ``torch.mm`` of the same FLOPs (all N rows through one expert's
   weights) and, for T=16, the HBM time of the touched expert weights at the measured copy bandwidth. Targets:
   >= 5x over the eager loop at T=4096, >= 80% of dense-matmul TFLOP/s at T=4096, >= 70% of HBM bandwidth at
   T=16; each is printed beside its number;
3. forward + backward for E=64 k=8 D=2048 F=1408 T=4096 (eager with per-expert parameters, grouped_mm,
   triton);
4. ``--tune``: for each table row a short sweep of BLOCK_M and the two forward GEMMs' tiles; with
   ``--tune-backward`` also a sweep of the three backward kernels' tiles on phase 3's training step (the best is
   kept only if its gradients still match ``grouped_mm``'s); written as JSON to ``$OUT/tuned_configs.json``
   (one table per file of ``moe_fuser/kernels/configs/``, keyed by its name: commit each there; one file comes
   back where names with ``=`` and ``,`` would not), plus a "tuned" column.

Timing: ``triton.testing.do_bench`` (median, L2 flushed before each run) on CUDA; on CPU (dry run) a median of
perf_counter runs. The final table prints last; with ``$OUT`` set it is also written as ``$OUT/gpu_check.csv``
(with device and versions). Exit status 1 if a correctness check failed or a benchmark raised.
"""

from __future__ import annotations

import argparse
import csv
import faulthandler
import json
import math
import os
import signal
import statistics
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

START = time.monotonic()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes: check the script")
    p.add_argument("--tune", action="store_true", help="sweep block configs, write the best to $OUT/tuned_configs.json")
    p.add_argument("--budget", type=float, default=260.0, help="seconds for the whole run (default 260)")
    p.add_argument("--rep-ms", type=int, default=100, help="do_bench repetition time per measurement")
    p.add_argument("--skip-backward", action="store_true", help="no forward+backward timing")
    p.add_argument("--tune-backward", action="store_true",
                   help="sweep the backward kernels' tiles on the forward+backward step too")
    return p.parse_args(argv)


ARGS = parse_args()
os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # quiet torch.profiler's start/stop lines
if ARGS.dry_run:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from moe_fuser import fused_moe, lowering  # noqa: E402
from moe_fuser.kernels import tuning  # noqa: E402

OUT = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
DEV = torch.device("cpu" if ARGS.dry_run else "cuda")
BF16 = torch.bfloat16


class TimeUp(Exception):
    pass


def left() -> float:
    return ARGS.budget - (time.monotonic() - START)


def log(msg: str) -> None:
    print(f"[{time.monotonic() - START:6.1f}s] {msg}", flush=True)


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def free() -> None:
    if DEV.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------- timing


def timeit(fn, grad_to_none=None) -> float:
    """Median milliseconds of ``fn()``."""
    if DEV.type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=25, rep=ARGS.rep_ms, grad_to_none=grad_to_none,
                                             return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        for t in grad_to_none or ():
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


@contextmanager
def triton_settings(combine="gather", configs=None):
    """Run fused_moe(impl="triton") with this combine / block-config override (the registry's instance)."""
    low = lowering.select("triton", DEV)
    saved = (low.combine, low.configs)
    low.combine, low.configs = combine, configs
    try:
        yield low
    finally:
        low.combine, low.configs = saved


def rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return float("nan")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# -------------------------------------------------------------------------------- phase 1: correctness

TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}
if ARGS.dry_run:
    TOL[torch.bfloat16] = 4e-2  # the interpreter truncates fp32 -> bf16 instead of rounding


def make_moe(T, D, F_, E, k, dtype, glu="separate", act="silu", bias=False, grad=False, idle=0):
    """Fresh random (x, logits, fused_moe kwargs); ``idle`` last experts never get a token."""
    H = 2 * F_ if glu in ("concat", "interleaved") else F_

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device=DEV) * scale).to(dtype).requires_grad_(grad)

    x = rnd(T, D)
    logits = torch.randn(T, E, device=DEV)
    if idle:
        logits[:, E - idle:] = -1e4
    logits = logits.to(dtype).requires_grad_(grad)
    kw = dict(w1=rnd(E, H, D, scale=D ** -0.5), w2=rnd(E, D, F_, scale=F_ ** -0.5), top_k=k, activation=act)
    if glu == "separate":
        kw["w3"] = rnd(E, F_, D, scale=D ** -0.5)
    elif glu:
        kw["gate_up"] = glu
    if bias:
        kw["b1"], kw["b2"] = rnd(E, H, scale=0.1), rnd(E, D, scale=0.1)
        if glu == "separate":
            kw["b3"] = rnd(E, F_, scale=0.1)
    return x, logits, kw


def correctness_cases():
    if ARGS.dry_run:
        return [
            dict(name="bf16 separate silu", T=24, D=32, F_=48, E=4, k=2, dtype=BF16),
            dict(name="fp16 interleaved gpt_oss bias capacity", T=24, D=32, F_=40, E=4, k=2,
                 dtype=torch.float16, glu="interleaved", act="gpt_oss", bias=True, capacity=8, idle=1),
            dict(name="fp32 plain gelu atomic", T=16, D=32, F_=24, E=6, k=3, dtype=torch.float32, glu=None,
                 act="gelu", combine="atomic"),
        ]
    return [
        dict(name="bf16 separate silu (T=16 tiles)", T=16, D=512, F_=352, E=8, k=2, dtype=BF16),
        dict(name="bf16 concat silu (T=512 tiles)", T=300, D=512, F_=352, E=8, k=2, dtype=BF16, glu="concat"),
        dict(name="bf16 concat silu atomic (T=4096 tiles)", T=2048, D=1024, F_=768, E=8, k=2, dtype=BF16,
             glu="concat", combine="atomic"),
        dict(name="fp16 interleaved gpt_oss bias capacity idle", T=256, D=256, F_=192, E=16, k=4,
             dtype=torch.float16, glu="interleaved", act="gpt_oss", bias=True, capacity=40, idle=3),
        dict(name="fp32 plain gelu_tanh bias E=64 k=8", T=200, D=256, F_=96, E=64, k=8, dtype=torch.float32,
             glu=None, act="gelu_tanh", bias=True, idle=8),
        dict(name="bf16 separate relu bias", T=128, D=384, F_=256, E=8, k=2, dtype=BF16, act="relu", bias=True),
    ]


def check_case(c) -> tuple[bool, str]:
    x, logits, kw = make_moe(c["T"], c["D"], c["F_"], c["E"], c["k"], c["dtype"], c.get("glu", "separate"),
                             c.get("act", "silu"), c.get("bias", False), grad=True, idle=c.get("idle", 0))
    extra = dict(capacity=c["capacity"]) if "capacity" in c else {}
    with triton_settings(combine=c.get("combine", "gather")):
        out = fused_moe(x, logits, **kw, **extra, impl="triton")
        ref = fused_moe(x, logits, **kw, **extra, impl="reference")
        names = ["x", "logits"] + [n for n in ("w1", "w2", "w3", "b1", "b2", "b3") if n in kw]
        ins = [x, logits] + [kw[n] for n in names[2:]]
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, ins, g, allow_unused=True)
        want = torch.autograd.grad(ref, ins, g, allow_unused=True)
    tol = TOL[c["dtype"]]
    errs = {"out": rel_err(out, ref)}
    for n, a, b in zip(names, got, want):
        errs["d" + n] = rel_err(a, b) if b is not None else (0.0 if a is None else float(a.abs().max()))
    # dlogits flows through the routing softmax: cancellation makes its relative error larger
    ok = all(math.isfinite(v) and v <= (3 * tol if n == "dlogits" else tol) for n, v in errs.items())
    return ok, " ".join(f"{n}={v:.1e}" for n, v in errs.items())


def run_correctness(budget_s: float) -> tuple[int, int, int]:
    """(passed, failed, skipped) cases."""
    log(f"phase 1: correctness vs reference on {DEV} (budget {budget_s:.0f}s)")
    counts, stop = [0, 0, 0], time.monotonic() + budget_s
    for c in correctness_cases():
        if time.monotonic() > stop or left() < 60:
            log(f"  SKIP {c['name']}: time guard")
            counts[2] += 1
            continue
        t0 = time.monotonic()
        try:
            ok, msg = check_case(c)
        except TimeUp:
            raise
        except Exception as exc:  # keep going: the table is still worth having
            ok, msg = False, f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        counts[0 if ok else 1] += 1
        log(f"  {'PASS' if ok else 'FAIL'} {c['name']}: {msg} ({time.monotonic() - t0:.1f}s)")
        free()
    return tuple(counts)


# --------------------------------------------------------------------------------- phase 2: forward table


def bench_shapes():
    if ARGS.dry_run:
        return [dict(E=4, k=2, D=32, F_=48, T=8, role="decode"), dict(E=4, k=2, D=32, F_=48, T=64, role="prefill"),
                dict(E=8, k=4, D=32, F_=16, T=64, role="prefill")]
    return [dict(E=8, k=2, D=4096, F_=14336, T=16, role="decode"),
            dict(E=8, k=2, D=4096, F_=14336, T=4096, role="prefill"),
            dict(E=64, k=8, D=2048, F_=1408, T=4096, role="prefill")]


def label(s) -> str:
    return f"E={s['E']} k={s['k']} D={s['D']} F={s['F_']} T={s['T']}"


def routed(T, E, k):
    logits = torch.randn(T, E, device=DEV)
    w, ids = torch.softmax(logits, -1).topk(k, -1)
    return (w / w.sum(-1, keepdim=True)).contiguous(), ids.contiguous()


def eager_loop(x, topk_w, topk_ids, w_gate, w_up, w_down):
    """The hand-written ModuleList-style loop: per expert where -> gather -> two linears -> index_add."""
    out = torch.zeros_like(x)
    for e in range(len(w_gate)):
        tok, slot = torch.where(topk_ids == e)
        xe = x[tok]
        y = F.linear(F.silu(F.linear(xe, w_gate[e])) * F.linear(xe, w_up[e]), w_down[e])
        out.index_add_(0, tok, y * topk_w[tok, slot, None].to(y.dtype))
    return out


def grouped_mm_path(x, topk_w, topk_ids, gate_up, down):
    """transformers' grouped_mm experts forward (integrations/moe.py), re-implemented."""
    T, K = topk_ids.shape
    E = gate_up.shape[0]
    ids, perm = torch.sort(topk_ids.reshape(-1))
    xs = x[perm // K]
    sw = topk_w.reshape(-1)[perm]
    hist_in = ids.int() if x.device.type == "cuda" else ids.float()
    offs = torch.cumsum(torch.histc(hist_in, bins=E, min=0, max=E - 1), 0, dtype=torch.int32)
    gate, up = torch._grouped_mm(xs, gate_up.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
    y = torch._grouped_mm(F.silu(gate) * up, down.transpose(-2, -1), offs=offs) * sw.unsqueeze(-1)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=x.device)
    return y[inv].view(T, K, -1).sum(1).to(x.dtype)


def fused(x, topk_w, topk_ids, gate_up, down):
    return fused_moe(x, None, gate_up, down, top_k=topk_ids.shape[1], gate_up="concat", topk_weights=topk_w,
                     topk_ids=topk_ids, impl="triton")


def copy_bandwidth() -> float:
    """Bytes/s of a device-to-device copy (read + write) of a large buffer."""
    n = (1 << 30) if DEV.type == "cuda" else (1 << 24)
    src = torch.empty(n, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    ms = timeit(lambda: dst.copy_(src))
    del src, dst
    free()
    return 2 * n / (ms * 1e-3)


def kernel_breakdown(fn, calls: int = 3) -> str:
    """Device time per Triton kernel (per call) under torch.profiler, and the sum: what the GEMMs cost versus
    alignment and combine, and (against the timed ms) how much is launch overhead."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(calls):
            fn()
        sync()
    parts = []
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0) or 0
        if ev.key.endswith("_kernel") and us > 0:
            parts.append((us / calls / 1e3, ev.key))
    if not parts:
        return "no device kernel events"
    parts.sort(reverse=True)
    return f"sum {sum(p[0] for p in parts):.3f} ms: " + ", ".join(f"{k} {ms:.3f}" for ms, k in parts)


def bench_forward(s, copy_bw: float) -> dict:
    E, k, D, F_, T = s["E"], s["k"], s["D"], s["F_"], s["T"]
    row = dict(config=label(s), role=s["role"])
    gate_up = (torch.randn(E, 2 * F_, D, device=DEV) * D ** -0.5).to(BF16)
    down = (torch.randn(E, D, F_, device=DEV) * F_ ** -0.5).to(BF16)
    x = torch.randn(T, D, device=DEV).to(BF16)
    topk_w, topk_ids = routed(T, E, k)
    N = T * k
    flops = 6.0 * N * D * F_

    out_eager = eager_loop(x, topk_w, topk_ids, gate_up[:, :F_], gate_up[:, F_:], down)
    out_triton = fused(x, topk_w, topk_ids, gate_up, down)
    sync()
    row["err_vs_eager"] = rel_err(out_triton, out_eager)
    del out_eager, out_triton
    cols = {
        "eager_ms": lambda: eager_loop(x, topk_w, topk_ids, gate_up[:, :F_], gate_up[:, F_:], down),
        "grouped_mm_ms": lambda: grouped_mm_path(x, topk_w, topk_ids, gate_up, down),
        "triton_ms": lambda: fused(x, topk_w, topk_ids, gate_up, down),
    }
    for name, fn in cols.items():
        try:
            row[name] = timeit(fn)
        except TimeUp:
            raise
        except Exception as exc:
            log(f"  {name} failed: {type(exc).__name__}: {str(exc)[:200]}")
            row[name] = float("nan")
        free()
    if left() > 60:
        try:
            row["triton_kernels"] = kernel_breakdown(cols["triton_ms"])
        except TimeUp:
            raise
        except Exception as exc:
            row["triton_kernels"] = f"profiler failed: {type(exc).__name__}: {str(exc)[:120]}"
        log(f"  triton kernels: {row['triton_kernels']}")
    if s["role"] == "prefill":
        try:
            with triton_settings(combine="atomic"):
                row["triton_atomic_ms"] = timeit(cols["triton_ms"])
        except TimeUp:
            raise
        except Exception as exc:
            log(f"  triton atomic failed: {type(exc).__name__}: {str(exc)[:200]}")
    xa = torch.randn(N, D, device=DEV).to(BF16)
    aa = torch.randn(N, F_, device=DEV).to(BF16)
    row["dense_mm_ms"] = timeit(lambda: (torch.mm(xa, gate_up[0].t()), torch.mm(aa, down[0].t())))
    del xa, aa
    row["tflops_triton"] = flops / (row["triton_ms"] * 1e-3) / 1e12
    row["tflops_dense"] = flops / (row["dense_mm_ms"] * 1e-3) / 1e12
    row["pct_dense"] = 100 * row["tflops_triton"] / row["tflops_dense"]
    row["x_eager"] = row["eager_ms"] / row["triton_ms"]
    row["x_grouped_mm"] = row["grouped_mm_ms"] / row["triton_ms"]
    touched = int(torch.unique(topk_ids).numel())
    weight_bytes = touched * 3 * F_ * D * 2
    row["hbm_ms"] = weight_bytes / copy_bw * 1e3
    row["pct_hbm"] = 100 * row["hbm_ms"] / row["triton_ms"]
    row["_tensors"] = (x, topk_w, topk_ids, gate_up, down)
    return row


# ---------------------------------------------------------------------------- phase 3: forward + backward


def bench_backward(s) -> dict:
    E, k, D, F_, T = s["E"], s["k"], s["D"], s["F_"], s["T"]
    row = dict(config=label(s) + " fwd+bwd")
    gate_up = (torch.randn(E, 2 * F_, D, device=DEV) * D ** -0.5).to(BF16).requires_grad_()
    down = (torch.randn(E, D, F_, device=DEV) * F_ ** -0.5).to(BF16).requires_grad_()
    gates = [gate_up[e, :F_].detach().clone().requires_grad_() for e in range(E)]
    ups = [gate_up[e, F_:].detach().clone().requires_grad_() for e in range(E)]
    downs = [down[e].detach().clone().requires_grad_() for e in range(E)]
    x = torch.randn(T, D, device=DEV).to(BF16).requires_grad_()
    topk_w, topk_ids = routed(T, E, k)
    topk_w.requires_grad_()
    g = torch.randn(T, D, device=DEV).to(BF16)

    out_t = fused(x, topk_w, topk_ids, gate_up, down)
    out_t.backward(g)
    out_g = grouped_mm_path(x, topk_w, topk_ids, gate_up, down)
    want = torch.autograd.grad(out_g, [x, topk_w, gate_up, down], g)
    got = [x.grad, topk_w.grad, gate_up.grad, down.grad]
    row["grad_errs_vs_grouped_mm"] = " ".join(f"{n}={rel_err(a, b):.1e}" for n, a, b in
                                              zip(("dx", "dweights", "dgate_up", "ddown"), got, want))
    del out_t, out_g, want, got
    leaves = [x, topk_w, gate_up, down]
    fns = {
        "eager_ms": (lambda: eager_loop(x, topk_w, topk_ids, gates, ups, downs).backward(g),
                     [x, topk_w] + gates + ups + downs),
        "grouped_mm_ms": (lambda: grouped_mm_path(x, topk_w, topk_ids, gate_up, down).backward(g), leaves),
        "triton_ms": (lambda: fused(x, topk_w, topk_ids, gate_up, down).backward(g), leaves),
    }
    for name, (fn, ts) in fns.items():
        if left() < 25:
            log(f"  SKIP {name}: time guard")
            row[name] = float("nan")
            continue
        try:
            row[name] = timeit(fn, grad_to_none=ts)
        except TimeUp:
            raise
        except Exception as exc:
            log(f"  {name} failed: {type(exc).__name__}: {str(exc)[:200]}")
            row[name] = float("nan")
        free()
    row["tflops_triton"] = 3 * 6.0 * T * k * D * F_ / (row["triton_ms"] * 1e-3) / 1e12
    row["x_eager"] = row["eager_ms"] / row["triton_ms"]
    row["x_grouped_mm"] = row["grouped_mm_ms"] / row["triton_ms"]
    row["_tensors"] = (x, topk_w, topk_ids, gate_up, down, g)
    return row


# --------------------------------------------------------------------------------------- phase 4: tuning


def _t(n, k, g, w, st):
    return {"BLOCK_N": n, "BLOCK_K": k, "GROUP_M": g, "num_warps": w, "num_stages": st}


def candidates(role: str):
    """(BLOCK_Ms, gate_up tiles, down tiles) to sweep, the committed default first."""
    if ARGS.dry_run:
        return [16], [_t(16, 16, 1, 4, 2), _t(32, 16, 2, 4, 2)], [_t(16, 16, 1, 4, 2), _t(32, 32, 2, 4, 2)]
    if role == "decode":
        return ([16], [_t(64, 128, 1, 4, 4), _t(32, 128, 1, 4, 4), _t(64, 256, 1, 4, 3), _t(128, 128, 1, 4, 3),
                       _t(64, 64, 1, 4, 5), _t(32, 256, 1, 4, 4)],
                [_t(64, 128, 1, 4, 4), _t(32, 128, 1, 4, 4), _t(64, 256, 1, 4, 3), _t(128, 128, 1, 4, 3),
                 _t(32, 256, 1, 4, 4), _t(64, 64, 1, 4, 5)])
    return ([128, 64], [_t(64, 64, 8, 8, 4), _t(64, 64, 8, 4, 4), _t(128, 64, 8, 8, 3), _t(64, 128, 8, 8, 3),
                        _t(32, 64, 8, 4, 4), _t(128, 32, 8, 8, 4), _t(128, 64, 8, 8, 4), _t(128, 64, 8, 4, 3),
                        _t(128, 128, 8, 8, 2), _t(128, 64, 16, 8, 3)],
            [_t(128, 64, 8, 8, 4), _t(128, 64, 8, 4, 4), _t(256, 64, 8, 8, 3), _t(64, 64, 8, 4, 4),
             _t(128, 128, 8, 8, 3), _t(256, 32, 8, 8, 4), _t(256, 64, 8, 8, 4), _t(256, 128, 8, 8, 2),
             _t(128, 64, 8, 8, 3), _t(256, 64, 16, 8, 3)])


def sweep(best: dict, options: dict, run, grad_to_none=None, what: str = "tuning") -> tuple[dict, float]:
    """Coordinate sweep: for each key of ``options`` in turn, each of its values in place of ``best``'s, keeping
    the fastest ``run()`` (timed under that configuration). A configuration that fails to run (e.g. out of shared
    memory for its tile) counts as infinitely slow; the time guard ends the sweep early. (best, its ms)."""
    def measure(cfg):
        if left() < 20:
            raise TimeoutError("time guard")
        with triton_settings(configs=cfg):
            try:
                return timeit(run, grad_to_none=grad_to_none)
            except TimeUp:
                raise
            except Exception as exc:
                log(f"    {json.dumps({k: cfg[k] for k in options})}: {type(exc).__name__}: {str(exc)[:120]}")
                return float("inf")

    best_ms = measure(best)
    try:
        for key, values in options.items():
            for value in values:
                cfg = {**best, key: value}
                ms = measure(cfg)
                if ms < best_ms:
                    best, best_ms = cfg, ms
    except TimeoutError:
        log(f"  {what} stopped by the time guard")
    return best, best_ms


def tune(row, s) -> tuple[dict, float]:
    """Coordinate sweep: gate_up tiles, then down tiles, then BLOCK_M; the best configuration and its ms."""
    x, topk_w, topk_ids, gate_up, down = row["_tensors"]
    base = tuning.block_config(s["E"], s["F_"], s["D"], BF16, DEV, s["T"])
    bms, gus, dns = candidates(s["role"])
    best, best_ms = sweep({**base, "BLOCK_M": bms[0], "gate_up": gus[0], "down": dns[0]},
                          {"gate_up": gus[1:], "down": dns[1:], "BLOCK_M": bms[1:]},
                          lambda: fused(x, topk_w, topk_ids, gate_up, down))
    log(f"  best {best_ms:.3f} ms: BLOCK_M={best['BLOCK_M']} gate_up={best['gate_up']} down={best['down']}")
    return best, best_ms


BACKWARD_KERNELS = ("down_bwd", "dx", "wgrad")


def _w(m, n, k, g, w, st):
    return {"BLOCK_M": m, **_t(n, k, g, w, st)}


def backward_candidates(base: dict) -> dict:
    """Per backward kernel, the tiles to sweep, the configuration in use first."""
    if ARGS.dry_run:
        lists = {"down_bwd": [_t(32, 16, 1, 4, 2)], "dx": [_t(32, 16, 1, 4, 2)], "wgrad": [_w(16, 32, 16, 1, 4, 2)]}
    else:
        lists = {"down_bwd": [_t(64, 64, 8, 8, 3), _t(64, 64, 8, 4, 4), _t(128, 64, 8, 8, 3), _t(32, 128, 8, 8, 3),
                              _t(64, 128, 8, 8, 3)],
                 "dx": [_t(256, 64, 8, 8, 3), _t(128, 64, 8, 4, 4), _t(128, 128, 8, 8, 2), _t(64, 64, 8, 4, 4)],
                 "wgrad": [_w(128, 128, 64, 8, 8, 3), _w(128, 128, 64, 8, 8, 4), _w(128, 256, 64, 8, 8, 3),
                           _w(64, 128, 64, 8, 4, 4), _w(128, 128, 128, 8, 8, 2), _w(256, 128, 64, 8, 8, 3)]}
    return {k: [base[k]] + [c for c in lists[k] if c != base[k]] for k in BACKWARD_KERNELS}


def tune_backward(row, s) -> tuple[Optional[dict], float]:
    """Coordinate sweep of the backward kernels' tiles on the training step: (the best tiles, or None when the
    best breaks the gradients, and its ms)."""
    x, topk_w, topk_ids, gate_up, down, g = row.pop("_tensors")
    leaves = [x, topk_w, gate_up, down]
    base = tuning.block_config(s["E"], s["F_"], s["D"], BF16, DEV, s["T"])
    cands = backward_candidates(base)

    def step():
        fused(x, topk_w, topk_ids, gate_up, down).backward(g)

    best, best_ms = sweep({k: v[0] for k, v in cands.items()}, {k: v[1:] for k, v in cands.items()}, step,
                          grad_to_none=leaves, what="backward tuning")
    for t in leaves:
        t.grad = None
    with triton_settings(configs=best):
        step()
    got = [t.grad for t in leaves]
    want = torch.autograd.grad(grouped_mm_path(x, topk_w, topk_ids, gate_up, down), leaves, g)
    errs = [rel_err(a, b) for a, b in zip(got, want)]
    ok = all(e <= TOL[BF16] for e in errs)
    log(f"  best backward {best_ms:.3f} ms: {best}; grads vs grouped_mm "
        f"{' '.join(f'{e:.1e}' for e in errs)} -> {'kept' if ok else 'DROPPED (gradients differ)'}")
    return (best if ok else None), best_ms


def write_configs(tuned: list[tuple[dict, dict, float, str]]) -> None:
    """(shape, the swept entries, their ms, the key for the ms) -> ``$OUT/tuned_configs.json``."""
    if OUT is None:
        log("$OUT is not set: tuned configs not written")
        return
    files: dict[str, dict] = {}
    dev = tuning.device_name(DEV)
    committed = Path(tuning.__file__).parent / "configs"
    for s, cfg, ms, ms_key in tuned:
        name = tuning.config_name(s["E"], s["F_"], s["D"], BF16, dev)
        if name not in files:  # start from the committed table: a sweep of some kernels keeps the others
            old = json.loads((committed / name).read_text()) if (committed / name).is_file() else {}
            files[name] = {**old, "_about": f"benchmarks/gpu_check.py --tune on {dev}, torch {torch.__version__}, "
                                            f"triton {triton_version()}"}
        entry = files[name].setdefault(str(s["T"]), {})
        entry.update(cfg)
        entry[ms_key] = round(ms, 4)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "tuned_configs.json").write_text(json.dumps(files, indent=2) + "\n")
    log(f"wrote $OUT/tuned_configs.json: {', '.join(files)}")


# ------------------------------------------------------------------------------------------------ output


def triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return "absent"


def environment() -> dict:
    env = dict(torch=torch.__version__, triton=triton_version(), device=tuning.device_name(DEV))
    if DEV.type == "cuda":
        p = torch.cuda.get_device_properties(DEV)
        env.update(capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2 ** 30, 1),
                   sms=p.multi_processor_count)
    return env


def fmt(v, spec=".3f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else format(v, spec)
    return str(v)


def target(ok: bool) -> str:
    return "ok" if ok else "MISS"


def print_table(rows, tuned_ms, copy_bw) -> None:
    head = ["config", "eager ms", "grouped_mm ms", "triton ms", "tuned ms", "dense mm ms", "x eager (ceiling)",
            "x grouped_mm", "TFLOP/s", "% dense mm", "HBM floor ms", "% HBM", "err vs eager", "targets"]
    lines = []
    for r in rows:
        goals = []
        if r["role"] == "prefill":
            goals.append(f">=5x eager {target(r['x_eager'] >= 5)}")
            goals.append(f">=80% dense {target(r['pct_dense'] >= 80)}")
        else:
            goals.append(f">=70% HBM {target(r['pct_hbm'] >= 70)}")
        lines.append([r["config"], fmt(r["eager_ms"]), fmt(r["grouped_mm_ms"]), fmt(r["triton_ms"]),
                      fmt(tuned_ms.get(r["config"])), fmt(r["dense_mm_ms"]),
                      fmt(r["x_eager"], ".2f") + f" ({fmt(r['eager_ms'] / r['dense_mm_ms'], '.1f')})",
                      fmt(r["x_grouped_mm"], ".2f"), fmt(r["tflops_triton"], ".1f") + f" / {r['tflops_dense']:.1f}",
                      fmt(r["pct_dense"], ".0f"),
                      fmt(r["hbm_ms"]), fmt(r["pct_hbm"], ".0f"), fmt(r["err_vs_eager"], ".1e"), "; ".join(goals)])
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    print()
    print(f"Forward, bf16 SwiGLU, routing given; medians; copy bandwidth {copy_bw / 1e9:.0f} GB/s; "
          f"TFLOP/s = triton / dense mm; x eager ceiling = eager / dense mm (the speed-up at dense-matmul speed); "
          f"{environment()}")
    print(" | ".join(h.ljust(w) for h, w in zip(head, widths)))
    print("-+-".join("-" * w for w in widths))
    for l in lines:
        print(" | ".join(c.ljust(w) for c, w in zip(l, widths)))


def write_csv(rows) -> None:
    if OUT is None:
        return
    OUT.mkdir(parents=True, exist_ok=True)
    env = environment()
    keys = sorted({k for r in rows for k in r if not k.startswith("_")})
    with open(OUT / "gpu_check.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys + sorted(env))
        w.writeheader()
        for r in rows:
            w.writerow({**{k: v for k, v in r.items() if not k.startswith("_")}, **env})
    log("wrote $OUT/gpu_check.csv")


# -------------------------------------------------------------------------------------------------- main


def _alarm(signum, frame):
    raise TimeUp()


def main() -> int:
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(max(1, int(ARGS.budget - (time.monotonic() - START) + 10)))
    faulthandler.dump_traceback_later(max(1.0, ARGS.budget - (time.monotonic() - START) + 25), exit=True)
    if DEV.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run on CPU")
        return 2
    log(f"gpu_check: {environment()}, budget {ARGS.budget:.0f}s, tune={ARGS.tune}, dry_run={ARGS.dry_run}")
    torch.manual_seed(0)
    rows, bwd_rows, tuned_ms, tuned, copy_bw, checks, errors = [], [], {}, [], float("nan"), (0, 0, 0), 0
    tuned_bwd: list = []
    try:
        checks = run_correctness(budget_s=min(100.0, 0.4 * ARGS.budget))
        copy_bw = copy_bandwidth()
        log(f"phase 2: forward table (copy bandwidth {copy_bw / 1e9:.0f} GB/s)")
        for s in bench_shapes():
            if left() < 30:
                log(f"  SKIP {label(s)}: time guard")
                continue
            t0 = time.monotonic()
            try:
                row = bench_forward(s, copy_bw)
            except TimeUp:
                raise
            except Exception:
                traceback.print_exc()
                log(f"  {label(s)} failed (above); next configuration")
                errors += 1
                free()
                continue
            rows.append(row)
            log(f"  {row['config']}: eager {row['eager_ms']:.3f} grouped_mm {row['grouped_mm_ms']:.3f} triton "
                f"{row['triton_ms']:.3f} (atomic {row.get('triton_atomic_ms', float('nan')):.3f}) dense "
                f"{row['dense_mm_ms']:.3f} ms, err {row['err_vs_eager']:.1e} ({time.monotonic() - t0:.1f}s)")
            if not ARGS.tune:
                row.pop("_tensors")
                free()
        if not ARGS.skip_backward:
            s = bench_shapes()[-1]
            if left() < (90 if ARGS.tune else 45):
                log("phase 3: SKIP forward+backward: time guard")
            else:
                log(f"phase 3: forward+backward {label(s)}")
                for r in rows:  # room for the training step
                    r.pop("_tensors", None)
                free()
                try:
                    bwd_rows.append(bench_backward(s))
                    b = bwd_rows[-1]
                    log(f"  eager {b['eager_ms']:.3f} grouped_mm {b['grouped_mm_ms']:.3f} triton "
                        f"{b['triton_ms']:.3f} ms; grads vs grouped_mm: {b['grad_errs_vs_grouped_mm']}")
                    if ARGS.tune_backward:
                        log("  backward block-config sweep")
                        cfg, ms = tune_backward(b, s)
                        b["tuned_ms"] = ms
                        if cfg is not None:
                            tuned_bwd.append((s, {k: cfg[k] for k in BACKWARD_KERNELS}, ms, "_ms_backward"))
                    b.pop("_tensors", None)
                except TimeUp:
                    raise
                except Exception:
                    traceback.print_exc()
                    log("  forward+backward failed (above)")
                    errors += 1
                free()
        if ARGS.tune:
            log("phase 4: block-config sweep")
            for s, r in zip(bench_shapes(), rows):
                if "_tensors" not in r:
                    x_ = routed(s["T"], s["E"], s["k"])
                    r["_tensors"] = (torch.randn(s["T"], s["D"], device=DEV).to(BF16), *x_,
                                     (torch.randn(s["E"], 2 * s["F_"], s["D"], device=DEV) * s["D"] ** -0.5).to(BF16),
                                     (torch.randn(s["E"], s["D"], s["F_"], device=DEV) * s["F_"] ** -0.5).to(BF16))
                if left() < 30:
                    log(f"  SKIP {r['config']}: time guard")
                    break
                log(f"  {r['config']}")
                cfg, ms = tune(r, s)
                r.pop("_tensors")
                free()
                tuned.append((s, {k: cfg[k] for k in ("BLOCK_M", "gate_up", "down")}, ms, "_ms"))
                tuned_ms[r["config"]] = ms
                r["tuned_ms"] = ms
        if tuned or tuned_bwd:
            write_configs(tuned + tuned_bwd)
    except TimeUp:
        log("TIME UP: printing what was measured")
    except Exception:
        traceback.print_exc()
        log("run aborted by the error above: printing what was measured")
        errors += 1
    signal.alarm(0)
    if bwd_rows:
        print("\nForward + backward (bf16 SwiGLU, routing given; triton TFLOP/s counts 3x the forward FLOPs):")
        for b in bwd_rows:
            print(f"  {b['config']}: eager {fmt(b['eager_ms'])} ms | grouped_mm {fmt(b['grouped_mm_ms'])} ms | "
                  f"triton {fmt(b['triton_ms'])} ms (backward tiles tuned: {fmt(b.get('tuned_ms'))} ms) | "
                  f"x eager {fmt(b['x_eager'], '.2f')} | x grouped_mm {fmt(b['x_grouped_mm'], '.2f')} | "
                  f"{fmt(b['tflops_triton'], '.1f')} TFLOP/s | grads vs "
                  f"grouped_mm {b['grad_errs_vs_grouped_mm']}")
    for r in rows:
        if "triton_atomic_ms" in r:
            print(f"  combine: {r['config']}: gather {fmt(r['triton_ms'])} ms, atomic {fmt(r['triton_atomic_ms'])} ms")
    write_csv(rows + bwd_rows)
    status = "FAIL" if checks[1] else ("PASS" if checks[0] else "NOT RUN")
    print(f"\ncorrectness: {status} ({checks[0]} passed, {checks[1]} failed, {checks[2]} skipped by the time guard); "
          f"benchmark errors: {errors}; total {time.monotonic() - START:.0f}s")
    if rows:
        print_table(rows, tuned_ms, copy_bw)
    faulthandler.cancel_dump_traceback_later()
    return 1 if checks[1] or errors else 0


if __name__ == "__main__":
    sys.exit(main())
