"""Benchmark of the compiler: eager vs ``torch.compile`` (inductor) vs ``torch.compile(backend="moe_fuser")``.

Models (unchanged user code, random weights, no download):

- ``switch``: the seed's hand-written Switch layer (``examples/switch_transformer.py``: fp32 gate, top-k,
  ``torch.where`` loop over a ``ModuleList`` of ``Sequential(Linear, SiLU, Linear)`` experts, load-balancing loss);
- ``mixtral``: a small transformers ``MixtralForCausalLM`` built from a config (grouped_mm experts, v5);
- ``llama4``: a small transformers ``Llama4ForCausalLM`` (top-1 of ``--experts``, as Llama 4 routes; transformers
  runs every expert on every token, moe_fuser the chosen one);
- ``grouped``: ``examples/grouped_mm_moe.py``, an MoE written on ``F.grouped_mm`` as torchtitan lays one out (fp32
  weights, bf16 grouped matmuls, sigmoid router with a selection bias, shared expert, ``scatter_add`` combine);
- ``dense``: a small transformers ``LlamaForCausalLM`` with the same shapes: no MoE. It shows what the pass costs
  a graph it does not rewrite (compile time; its generated code is identical to inductor's, see
  ``tests/compiler/test_backend.py``).

Per model and mode (``fwd``: inference under ``no_grad``; ``train``: forward + backward of a scalar loss, grads
reset untimed), columns ``eager``, ``inductor``, ``moe_fuser``: median time per call (``benchmarks/_common``:
interleaved rounds in random order, rounds during which other processes were busy dropped) and peak CPU memory of one call (profiler allocation events). Compile time:
the first call after ``torch._dynamo.reset()`` with inductor's caches off (after one throwaway compile, so
both columns compile warm; the dense model's compiles are repeated, alternating, and the median kept), and,
for ``moe_fuser``, the time spent
in the pass itself (pattern matching + rewrite, timed around ``fuse_graph``) as a share of the compile.

Allocator: ``--malloc cached`` runs every column with glibc keeping and reusing large blocks. With the system
settings, training steps in one process disturb each other's heap: the CPU lowering's training step at the Switch
layer's sizes ran 18.6 ms alone and about 24 ms interleaved with the eager loop (some 6000 page faults per step
instead of ~100), so the interleaved ratio then measures glibc's trimming heuristics as much as the code. The
header and the CSV say which mode ran.

Verdict lines: moe_fuser no slower (within ``--speed-tol``) and no more memory than inductor on the MoE models;
the pass adds under 5% to the compile of the non-MoE model. "No slower" is judged on the median of the per-round
ratio moe_fuser / inductor (both timed back to back in each round; quartiles printed and in the CSV): on this
shared machine the whole model's time drifts by up to 30% between minutes, which a ratio of two medians can
turn into a few percent either way.

    python benchmarks/bench_compile.py                         # all models, fwd + train (a few minutes)
    python benchmarks/bench_compile.py --models switch --modes fwd --threads 1 --wait-quiet 120
    python benchmarks/bench_compile.py --models switch mixtral --autocast bf16   # mixed precision
Writes ``benchmarks/results/bench_compile.csv``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path
from typing import Optional

import torch

import moe_fuser.backend as mf_backend
from _common import (Variant, compile_column, environment, interleaved_timings, median, peak_bytes,
                     ratio_quartiles, results_dir, use_malloc, wait_until_quiet, write_csv)

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ("eager", "inductor", "moe_fuser")
QUIET_CORES = 0.3        # a timed round during which other processes kept this many cores busy is dropped


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_example", ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod   # dynamo finds the globals of inlined functions through their module's name
    spec.loader.exec_module(mod)
    return mod


def _switch_layer(args):
    model = _example("switch_transformer").SwitchLayer(args.hidden, 4 * args.hidden, args.experts, args.top_k)
    x = torch.randn(args.batch, args.tokens, args.hidden)
    return model, (lambda m: m(x)), (lambda out: out[0].float().pow(2).mean() + 0.01 * out[1])


def _grouped(args):
    model = _example("grouped_mm_moe").GroupedMoE(args.hidden, 4 * args.hidden, args.experts, args.top_k)
    x = torch.randn(args.batch, args.tokens, args.hidden)
    return model, (lambda m: m(x)), (lambda out: out.float().pow(2).mean())


def _hf(args, moe: bool):
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    common = dict(vocab_size=512, hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=4096)
    if moe:
        model = MixtralForCausalLM(MixtralConfig(intermediate_size=2 * args.hidden, num_local_experts=args.experts,
                                                 num_experts_per_tok=args.top_k, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(intermediate_size=2 * args.hidden, **common))
    ids = torch.randint(0, 512, (args.batch, args.tokens))
    return model, (lambda m: m(input_ids=ids)), (lambda out: out.logits.float().pow(2).mean())


def _llama4(args):
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    model = Llama4ForCausalLM(Llama4TextConfig(
        vocab_size=512, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        intermediate_size_mlp=2 * args.hidden, num_hidden_layers=args.layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=args.hidden // 4, num_local_experts=args.experts, num_experts_per_tok=1,
        interleave_moe_layer_step=1, max_position_embeddings=4096))
    ids = torch.randint(0, 512, (args.batch, args.tokens))
    return model, (lambda m: m(input_ids=ids)), (lambda out: out.logits.float().pow(2).mean())


MODELS = {"switch": _switch_layer, "mixtral": lambda a: _hf(a, True), "llama4": _llama4, "grouped": _grouped,
          "dense": lambda a: _hf(a, False)}


class _PassTimer:
    """Times moe_fuser's pass (fuse_graph) inside the backend."""

    def __init__(self):
        self.seconds = 0.0
        self._orig = mf_backend.fuse_graph

    def __enter__(self):
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return self._orig(*a, **k)
            finally:
                self.seconds += time.perf_counter() - t0
        mf_backend.fuse_graph = timed
        return self

    def __exit__(self, *exc):
        mf_backend.fuse_graph = self._orig


def _compiled(model, column):
    if column == "eager":
        return model
    return compile_column(model, column, backend="inductor" if column == "inductor" else "moe_fuser")


def _step(model, fn, call, loss_of, mode, autocast: Optional[torch.dtype]):
    """One timed call: the forward under ``torch.autocast`` when ``autocast`` names a dtype (entered per call, as
    a training loop does; the backward runs outside it)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def setup():
        for p in params:
            p.grad = None

    def forward():
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            return call(fn)

    if mode == "fwd":
        def run():
            with torch.no_grad():
                return forward()
        return Variant(run)

    def run():
        loss = loss_of(forward())
        loss.backward()
        return loss.detach()
    return Variant(run, setup)


def bench_model(name, args, rows):
    for mode in args.modes:
        torch.manual_seed(args.seed)
        model, call, loss_of = MODELS[name](args)
        model.train(mode == "train")
        variants, compile_s, pass_s = {}, {}, {}
        # A throwaway compile first, so one-time process costs (imports, inductor's first-use setup) do not
        # land on whichever column compiles first.
        torch._dynamo.reset()
        warm = _step(model, _compiled(model, "inductor"), call, loss_of, mode, args.autocast)
        warm.setup()
        warm.run()
        columns = [c for c in COLUMNS if not (name == "dense" and c == "eager" and not args.dense_timing)]
        reps = args.compile_reps if name == "dense" else 1
        compiles = {c: [] for c in columns}
        for _ in range(reps):                              # alternate the columns' compiles, keep the median
            for column in columns:
                torch._dynamo.reset()
                fn = _compiled(model, column)
                v = _step(model, fn, call, loss_of, mode, args.autocast)
                with torch._inductor.config.patch(fx_graph_cache=False, autotune_local_cache=False), \
                        _PassTimer() as timer:
                    v.setup()
                    t0 = time.perf_counter()
                    v.run()                                # first call: compiles
                    compiles[column].append(time.perf_counter() - t0)
                pass_s[column] = timer.seconds
                variants[column] = v
        compile_s = {c: median(ts) for c, ts in compiles.items()}
        if name == "dense" and not args.dense_timing:
            times = {c: [float("nan")] for c in variants}
            paired = (float("nan"),) * 3
            peaks = {c: float("nan") for c in variants}
            busy, kept = float("nan"), ""
        else:
            if args.wait_quiet:
                wait_until_quiet(QUIET_CORES, args.wait_quiet)
            timing = interleaved_timings(variants, rounds=args.iters, warmup=2, max_seconds=args.max_seconds,
                                         max_busy=QUIET_CORES, seed=args.seed)
            times, busy, kept = timing.times, timing.busy_elsewhere, f"{timing.rounds}/{timing.rounds + timing.dropped}"
            peaks = {c: peak_bytes(v.run, v.setup) for c, v in variants.items()}
            paired = ratio_quartiles(times["moe_fuser"], times["inductor"])
        for column in variants:
            rows.append({"model": name, "mode": mode, "column": column,
                         "ms": round(median(times[column]) * 1e3, 3),
                         "peak_mib": round(peaks[column] / 2**20, 2),
                         "compile_s": round(compile_s[column], 3) if column != "eager" else "",
                         "pass_s": round(pass_s[column], 4) if column == "moe_fuser" else "",
                         **{k: round(q, 4) if column == "moe_fuser" else "" for k, q in
                            zip(("vs_inductor_q25", "vs_inductor_paired", "vs_inductor_q75"), paired)},
                         "busy_elsewhere": round(busy, 2), "rounds_kept": kept})


def report(rows, args):
    print(f"\n{'model':<8} {'mode':<5} {'column':<10} {'ms':>10} {'peak MiB':>9} {'compile s':>10} {'pass s':>8} "
          f"{'busy':>5} {'rounds':>7}")
    for r in rows:
        print(f"{r['model']:<8} {r['mode']:<5} {r['column']:<10} {r['ms']:>10.2f} {r['peak_mib']:>9.2f} "
              f"{str(r['compile_s']):>10} {str(r['pass_s']):>8} {r['busy_elsewhere']:>5} {r['rounds_kept']:>7}")
    print()
    by = {(r["model"], r["mode"], r["column"]): r for r in rows}
    verdicts = []
    for (model, mode, column), r in by.items():
        if column != "moe_fuser":
            continue
        ind = by.get((model, mode, "inductor"))
        if model == "dense":
            share = r["pass_s"] / ind["compile_s"] if ind and ind["compile_s"] else float("nan")
            total = r["compile_s"] / ind["compile_s"] - 1 if ind and ind["compile_s"] else float("nan")
            ok = share < 0.05
            verdicts.append(ok)
            print(f"dense {mode}: pass {r['pass_s'] * 1e3:.1f} ms = {share:.2%} of inductor's compile "
                  f"({ind['compile_s']:.1f} s); whole compile {total:+.1%} (noise included) -> "
                  f"{'OK' if ok else 'FAIL'} (< 5%)")
            continue
        speed = r["vs_inductor_paired"]
        mem = r["peak_mib"] <= ind["peak_mib"] * 1.001
        ok = speed <= 1 + args.speed_tol and mem
        verdicts.append(ok)
        print(f"{model} {mode}: moe_fuser {speed:.3f}x inductor's time (per-round ratio, quartiles "
              f"{r['vs_inductor_q25']:.3f}-{r['vs_inductor_q75']:.3f}; ratio of medians {r['ms'] / ind['ms']:.3f}), "
              f"{r['peak_mib']:.1f} vs {ind['peak_mib']:.1f} MiB peak -> {'OK' if ok else 'FAIL'}")
    busy = [r["busy_elsewhere"] for r in rows if r["busy_elsewhere"] == r["busy_elsewhere"]]
    print(f"acceptance: {sum(verdicts)}/{len(verdicts)} pass"
          + (f" (mean busy cores elsewhere in kept rounds up to {max(busy):.2f})" if busy else ""))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--modes", nargs="+", default=["fwd", "train"], choices=["fwd", "train"])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tokens", type=int, default=128, help="sequence length")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--max-seconds", type=float, default=60.0, help="per model and mode, after warm-up")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="wait up to SECONDS for other processes to use < 0.3 cores before timing")
    p.add_argument("--speed-tol", type=float, default=0.03, help="allowed slowdown vs inductor (noise)")
    p.add_argument("--dense-timing", action="store_true", help="also time the dense model's calls")
    p.add_argument("--compile-reps", type=int, default=3,
                   help="compiles per column for the dense model (median; the overhead check needs it)")
    p.add_argument("--malloc", choices=("system", "cached"), default="system",
                   help="CPU allocator settings: the process's own, or glibc told to keep and reuse large blocks "
                        "(see benchmarks/_common.py; default system)")
    p.add_argument("--autocast", choices=("bf16",), default=None,
                   help="run the models' forward under torch.autocast (fp32 weights, bf16 matmuls)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.autocast = {None: None, "bf16": torch.bfloat16}[args.autocast]
    use_malloc(args.malloc)
    if args.threads:
        torch.set_num_threads(args.threads)
    # First use of each backend in the process (imports, registries) is a one-time cost: pay it up front.
    for backend in ("inductor", "moe_fuser"):
        torch.compile(lambda t: t * 2 + 1, backend=backend)(torch.randn(4))
    rows = []
    for name in args.models:
        bench_model(name, args, rows)
        print(f"done: {name}", file=sys.stderr)
    import transformers
    env = environment(transformers=transformers.__version__)
    env["autocast"] = str(args.autocast).replace("torch.", "") if args.autocast else "off"
    print(f"torch {env['torch']}, transformers {env['transformers']}, {env['cpu']}, {env['threads']} threads, "
          f"{env['malloc']} malloc, autocast {env['autocast']}, git {env['git']}")
    report(rows, args)
    path = results_dir(args.out) / "bench_compile.csv"
    write_csv(path, rows, env)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
