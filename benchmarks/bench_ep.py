"""Expert parallelism: the seed's hand-written EP layer vs moe_fuser's fused EP op, per layer, on every rank.

Run one process per rank (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` in the environment, as
``benchmarks/ep_testbed/ep_testbed.sh`` and torchrun set them), or ``--launch N`` for N ranks on this host's
loopback. Rank 0 prints the table and writes ``ep_<link>.csv``.

Variants (columns of the table, one row each):
  hand-written eager      ``ep_seed.SeedEPMoE``: gate, all-to-all dispatch of every (token, slot), experts one
                          by one, all-to-all back, weighted sum (in-place collectives forward-only, functional
                          ones for the training step)
  hand-written inductor   the same under ``torch.compile(backend="inductor")`` (scalar outputs captured)
  fused (direct call)     ``moe_fuser.fused_moe(..., ep_group=...)`` on the same module's weights
  moe_fuser compiled      ``torch.compile(seed_layer, backend="moe_fuser")``: the compiler must rewrite the
                          hand-written EP into the fused op (the rewrite count is printed)

Columns: median time per layer (the slowest rank's, each round starting at a barrier), speed-up over
hand-written eager, bytes sent across nodes per layer (all ranks; fused: counted by the exchange, hand-written:
rows of pairs whose expert is on another node, both ways, + ids), peak memory per rank (the CPU allocator's
peak of live bytes during one call, max over ranks: ``_common.peak_bytes``), and the floor
``max(T_compute, node egress / link bandwidth)``: T_compute is the time the fused op spends in its expert
computation (median over the timed calls, max over ranks), the egress the most bytes one node sends over its
link in the fused run.
On loopback there is no link limit: the floor is T_compute.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch._dynamo
import torch.distributed as dist
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (Variant, compile_column, environment, interleaved_medians, median, peak_bytes,  # noqa
                     results_dir, write_csv)
from ep_seed import SeedEPMoE  # noqa: E402

import moe_fuser  # noqa: E402
from moe_fuser.distributed import traffic  # noqa: E402
from moe_fuser.rewrite import counters  # noqa: E402

CONFIGS = {"8x2": dict(E=8, k=2, F=1024), "64x8": dict(E=64, k=8, F=256)}


class FusedEP(nn.Module):
    """The seed layer's own weights through ``fused_moe(ep_group=...)``: per-expert lists, never stacked."""

    def __init__(self, seed: SeedEPMoE, ranks_per_node: int, chunks):
        super().__init__()
        self.seed, self.rpn, self.chunks = seed, ranks_per_node, chunks

    def forward(self, x):
        s = self.seed
        return moe_fuser.fused_moe(x, s.gate(x), [e[0].weight for e in s.experts], [e[2].weight for e in s.experts],
                                   top_k=s.top_k, ep_group=s.group, ranks_per_node=self.rpn,
                                   overlap_chunks=self.chunks)


def seed_inter_node_bytes(seed: SeedEPMoE, x, rpn: int, train: bool) -> int:
    """Bytes the hand-written layer sends across nodes for this rank's tokens (rows there and back, ids)."""
    with torch.no_grad():
        ids = seed.gate(x).float().softmax(-1).topk(seed.top_k).indices
    rank = dist.get_rank(seed.group)
    crossing = int((seed.owner[ids] // rpn != rank // rpn).sum())
    row = x.shape[1] * x.element_size()
    return crossing * (2 * row + 8) + (crossing * 2 * row if train else 0)


def all_max(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def node_egress(bytes_sent: int, rpn: int) -> tuple[int, int]:
    """(total over ranks, the largest sum over one node's ranks)."""
    world = dist.get_world_size()
    t = torch.zeros(world, dtype=torch.float64)
    t[dist.get_rank()] = bytes_sent
    dist.all_reduce(t)
    return int(t.sum()), int(t.view(-1, rpn).sum(1).max())


def make_variants(cfg, args, group, rpn, train, x, grad):
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    seed = SeedEPMoE(args.d_model, cfg["F"], cfg["E"], cfg["k"], group,
                     collectives="functional" if train else "inplace").to(dtype)
    fused = FusedEP(seed, rpn, args.overlap_chunks)
    mods = {}
    for name in args.variants:
        if name == "hand-written eager":
            mods[name] = seed
        elif name == "hand-written inductor":
            mods[name] = compile_column(seed, "inductor", backend="inductor")
        elif name == "fused (direct call)":
            mods[name] = fused
        elif name == "moe_fuser compiled":
            mods[name] = compile_column(seed, "moe_fuser", backend="moe_fuser")
    params = list(seed.parameters())

    def clear():
        for p in params:
            p.grad = None
        x.grad = None
        dist.barrier(group)

    def runner(m):
        if train:
            return lambda: m(x).backward(grad)
        return lambda: m(x)

    def guarded(name, m):
        def run():
            with torch.set_grad_enabled(train):
                return runner(m)()
        return Variant(run, clear)

    return seed, {n: guarded(n, m) for n, m in mods.items()}


def _counting(run, calls: list):
    """``run`` that records the EP op's compute seconds and inter-node bytes of each call."""
    def counted():
        c0, b0 = traffic["compute_seconds"], traffic["inter_node_bytes"]
        out = run()
        calls.append((traffic["compute_seconds"] - c0, traffic["inter_node_bytes"] - b0))
        return out
    return counted


def bench_rank(args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout))
    group, rank, world = dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    rpn = args.ranks_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    link_gbit = args.link_gbit if args.link_gbit > 0 else None
    if args.capture_scalars:
        torch._dynamo.config.capture_scalar_outputs = True
        torch._dynamo.config.capture_dynamic_output_shape_ops = True
    rows = []
    dtype = getattr(torch, args.dtype)
    for cname in args.configs:
        cfg = CONFIGS[cname]
        for mode in args.modes:
            train = mode == "train"
            torch.manual_seed(1 + rank)
            x = torch.randn(args.tokens, args.d_model, dtype=dtype, requires_grad=train)
            grad = torch.randn(args.tokens, args.d_model, dtype=dtype)
            seed, variants = make_variants(cfg, args, group, rpn, train, x, grad)
            failed, notes = {}, {}
            for name, v in list(variants.items()):     # first call: compiles; a failure drops the variant
                try:
                    fused_before = counters["fused"]
                    v.setup()
                    v.run()
                    ok = 1.0
                    if name == "moe_fuser compiled":
                        notes[name] = f"{counters['fused'] - fused_before} region(s) fused"
                except Exception as exc:  # noqa: BLE001 - reported in the table
                    failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
                    ok = 0.0
                if all_max([1.0 - ok])[0] > 0:
                    failed.setdefault(name, "failed on another rank")
                    variants.pop(name)
            calls = {name: [] for name in variants}    # per call: (compute seconds, inter-node bytes)
            timed = {name: Variant(_counting(v.run, calls[name]), v.setup) for name, v in variants.items()}
            times = interleaved_medians(timed, rounds=args.iters, warmup=args.warmup)
            per_variant = {}
            for name, ts in times.items():
                per_variant[name] = median(all_max(ts))
            for name, v in variants.items():
                v.setup()
                peak = peak_bytes(v.run)
                if name.startswith("hand-written"):
                    sent = seed_inter_node_bytes(seed, x, rpn, train)
                    compute_s = float("nan")
                else:   # the timed calls' median compute time (not the profiled call's: the profiler slows it)
                    compute_s = median([c for c, _ in calls[name][-args.iters:]])
                    sent = calls[name][-1][1]
                total, egress = node_egress(sent, rpn)
                peak_max = all_max([float(peak)])[0]
                compute_max = all_max([compute_s])[0]
                floor = float("nan")
                if not name.startswith("hand-written"):
                    floor = max(compute_max, egress / (link_gbit * 1e9 / 8)) if link_gbit else compute_max
                rows.append(dict(config=f"E={cfg['E']} k={cfg['k']} F={cfg['F']}", mode=mode, variant=name,
                                 ms=per_variant[name] * 1e3, inter_node_MB=total / 1e6, peak_MB=peak_max / 1e6,
                                 floor_ms=floor * 1e3, egress_MB=egress / 1e6, note=notes.get(name, "")))
            for name, why in failed.items():
                rows.append(dict(config=f"E={cfg['E']} k={cfg['k']} F={cfg['F']}", mode=mode, variant=name,
                                 ms=float("nan"), inter_node_MB=float("nan"), peak_MB=float("nan"),
                                 floor_ms=float("nan"), egress_MB=float("nan"), note=why))
    if rank == 0:
        link = f"{args.link_gbit:g} Gbit/s" if link_gbit else "loopback"
        report(rows, args, world, rpn, link)
    dist.barrier()
    dist.destroy_process_group()


def report(rows, args, world, rpn, link):
    print(f"\nEP layer, {world} ranks = {world // rpn} node(s) x {rpn}, link {link}, T={args.tokens} tokens/rank, "
          f"D={args.d_model}, {args.dtype}, 1 thread/rank, median of {args.iters}")
    hdr = (f"{'config':<20} {'mode':<8} {'variant':<22} {'ms/layer':>9} {'speed-up':>8} {'x-node MB':>9} "
           f"{'peak MB/rank':>12} {'floor ms':>9} {'/floor':>7}")
    print(hdr)
    print("-" * len(hdr))
    base = {(r["config"], r["mode"]): r["ms"] for r in rows if r["variant"] == "hand-written eager"}
    for r in rows:
        b = base.get((r["config"], r["mode"]), float("nan"))
        r["speedup"] = b / r["ms"] if r["ms"] == r["ms"] else float("nan")
        r["over_floor"] = r["ms"] / r["floor_ms"] if r["floor_ms"] == r["floor_ms"] else float("nan")
        line = (f"{r['config']:<20} {r['mode']:<8} {r['variant']:<22} {r['ms']:9.1f} {r['speedup']:8.2f} "
                f"{r['inter_node_MB']:9.2f} {r['peak_MB']:12.1f} {r['floor_ms']:9.1f} {r['over_floor']:7.2f}")
        print(line + (f"   ({r['note']})" if r.get("note") else ""))
    out = results_dir(args.out) / f"ep_{'testbed' if 'Gbit' in link else 'loopback'}.csv"
    env = environment(world=str(world), ranks_per_node=str(rpn), link=link, tokens=str(args.tokens))
    write_csv(out, [{k: v for k, v in r.items() if k != "note"} | {"note": r.get("note", "")} for r in rows], env)
    print(f"wrote {out}")


def launch(args, argv):
    """``--launch N``: N ranks of this script on 127.0.0.1 (one node unless --ranks-per-node says otherwise)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rest = [a for i, a in enumerate(argv) if a != "--launch" and (i == 0 or argv[i - 1] != "--launch")]
    procs = []
    for r in range(args.launch):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(args.launch), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, __file__, *rest], env=env))
    codes = [p.wait() for p in procs]
    sys.exit(max(codes))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--launch", type=int, default=0, help="start this many ranks on loopback")
    ap.add_argument("--configs", default="8x2,64x8", help=f"comma list of {sorted(CONFIGS)}")
    ap.add_argument("--modes", default="forward,train")
    ap.add_argument("--variants", default="hand-written eager,hand-written inductor,fused (direct call),"
                                          "moe_fuser compiled",
                    help="comma list: 'hand-written eager', 'hand-written inductor', 'fused (direct call)', "
                         "'moe_fuser compiled'")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--overlap-chunks", type=int, default=None, help="None: automatic")
    ap.add_argument("--ranks-per-node", type=int, default=0, help="0: $LOCAL_WORLD_SIZE or all ranks")
    ap.add_argument("--link-gbit", type=float, default=float(os.environ.get("EP_TESTBED_RATE_GBIT", 0)),
                    help="inter-node link rate for the floor (0: loopback, no link)")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--no-capture-scalars", dest="capture_scalars", action="store_false",
                    help="leave dynamo's capture_scalar_outputs / dynamic-output-shape capture off")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    args.configs = args.configs.split(",")
    args.modes = args.modes.split(",")
    args.variants = [v.strip() for v in args.variants.split(",")]
    if args.launch:
        launch(args, argv)
    bench_rank(args)


if __name__ == "__main__":
    main()
