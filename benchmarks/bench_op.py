"""Benchmark of ``moe_fuser.fused_moe`` on CPU against the eager loop, transformers' grouped_mm and the GEMM floor.

Columns (each one MoE layer of SwiGLU experts, ``expert(x) = w2 @ (silu(w1 @ x) * (w3 @ x))``, bias-free):

- ``eager``: the hand-written loop users write: an ``nn.ModuleList`` of Mixtral-style expert modules (three
  ``nn.Linear``: w1 gate, w3 up, w2 down), and per expert ``torch.where(ids == e)``, index the token rows, the FFN,
  multiply by the routing weight, ``index_add_`` into the output (experts with no token are skipped);
- ``hf``: transformers' ``grouped_mm`` experts implementation: a ``MixtralExperts`` built from a
  ``MixtralConfig(experts_implementation="grouped_mm")``, called as a v5 model's sparse MoE block calls it
  (fused ``gate_up_proj [E, 2F, D] = cat(w1, w3)``, ``down_proj [E, D, F]``). In eager mode on CPU with
  torch > 2.10 it takes ``F.grouped_mm`` for fp32 and bf16 alike (its ``grouped_mm_fallback`` is only for
  non-bf16 under torch.compile or old torch); the path taken is printed and written to the CSV;
- ``fused``: ``moe_fuser.fused_moe(x, logits, w1, w2, w3, top_k=K)`` with stacked ``w1, w3 [E, F, D]``,
  ``w2 [E, D, F]`` (separate gate and up), ``impl=None`` (the CPU lowering);
- ``fused_list`` (``fusL``): the same call on the eager column's own ``ModuleList`` weights, as per-expert lists
  (what the compiler hands the op for a model written that way): no copy, ragged layout only, and ``h`` saved per
  expert and let go of during the backward (see ``moe_fuser.lowering.cpu``);
- ``floor``: the GEMMs alone, on the same routed row counts: rows pre-gathered and contiguous per expert,
  everything arranged outside the timed region. Forward: ``x@w1^T, x@w3^T, a@w2^T`` per expert; training adds
  the six backward GEMMs per expert (``dA = dy@w2``, ``dW2 = dy^T a``, ``dx = dh1@w1 + dh3@w3`` (two),
  ``dW1 = dh1^T x``, ``dW3 = dh3^T x``). No gather, activation, routing or combine: a lower bound, not an MoE.
  Three plain formulations run in every round and the fastest is the floor (``by`` column; all in the CSV):
  ``mm`` (one ``mm`` per expert and GEMM into pre-allocated outputs: the literal definition), ``gmm`` (one
  ``F.grouped_mm`` per GEMM kind, gate and up concatenated) and ``bmm`` (rows zero-padded to the largest count,
  one ``bmm`` per GEMM kind): with ~16 rows per expert a batched call beats 128 small ``mm`` calls, so the
  literal definition alone would be no floor there. In fp32, where the CPU lowering's native GEMMs run
  (``moe_fuser.kernels.cpu_gemm``), a fourth, ``native``: ``mm``'s GEMMs in one native call per step of
  independent GEMMs, tiles spread over the threads, as the op runs them; the op is measured against the
  fastest way its GEMMs run, not only torch's.
- ``fusA`` (``--aten-gemms``): ``fused`` with the native GEMMs switched off (``cpu_gemm.ENABLED``): the op's
  GEMMs in ``torch.mm`` / ``torch._grouped_mm``, side by side with ``fused``.

The router is the same in the first three columns: the logits ``[T, E]`` are an input (in the model's dtype),
``softmax`` in fp32, ``topk``, renormalise (inside ``fused_moe``; a shared ``route`` function for the others).
dtypes: ``fp32`` and ``bf16`` (inputs and weights in that dtype), and, on request, ``amp``: fp32 inputs and weights
with every column's forward under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (mixed-precision training;
the floor's GEMMs on bf16 copies, so the casts the columns pay are outside the floor).
Modes: ``fwd`` is inference (``torch.no_grad``); ``train`` is a training step: forward with every weight, the
hidden states and the logits requiring grad, then ``out.backward(g)`` with a fresh random ``g`` (grads reset to
None before each step, untimed).

Timing and peak memory come from ``_common`` (interleaved rounds in random order, medians; the ratio columns
are medians of per-round ratios, which cancel the machine's drifts between rounds; peak = maximum of
live CPU bytes allocated during one call, read from the profiler's allocation events: see its docstring).
Memory is not measured for the floor (its buffers are pre-allocated by design). This machine is shared: the
cores other processes keep busy while a cell is timed are measured (``busy_elsewhere`` in the CSV) and the
table flags noisy cells; ``--wait-quiet`` waits for a quiet machine, ``--threads 1`` is robust to load.

Allocator: ``--malloc cached`` runs every column with glibc keeping and reusing large blocks (``_common``'s
docstring says why training steps of the stacked-weight op depend on it); the table header and the CSV say which
mode ran.

Output: a table on stdout, ``<out>/<name>.csv`` (one row per config x dtype x mode, with versions, CPU model
and thread count) and ``<out>/<name>.png``; ``--profile`` also prints the top ops of fused, floor and eager.

    python benchmarks/bench_op.py             # all: ~5 min on a quiet 2-core machine, more under load
    python benchmarks/bench_op.py --configs fine --dtype bf16 --mode train --iters 5
    python benchmarks/bench_op.py --dtype bf16 --malloc cached
    python benchmarks/bench_op.py --configs fine --dtype fp32 --mode train --profile --no-memory
    python benchmarks/bench_op.py --dtype amp --malloc cached     # mixed precision: fp32 weights, bf16 autocast
    python benchmarks/bench_op.py --configs fine,decode --dtype fp32 --aten-gemms   # native GEMMs against ATen's

Legend: T tokens, D model dim, F expert hidden dim, E experts, K top-k, n = T*K routed rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from _common import (Variant, environment, interleaved_timings, median, peak_bytes, ratio_quartiles, results_dir,
                     run_profiled, use_malloc, wait_until_quiet, write_csv)

import moe_fuser
from moe_fuser.kernels import cpu_gemm


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    E: int
    K: int
    D: int
    F: int
    T: int

    def label(self) -> str:
        return f"{self.name} E={self.E} k={self.K} D={self.D} F={self.F} T={self.T}"


CONFIGS = {c.name: c for c in (
    Config("dense", E=8, K=2, D=1024, F=3584, T=512),
    Config("fine", E=64, K=8, D=1024, F=256, T=512),
    Config("decode", E=8, K=2, D=1024, F=3584, T=4),
    Config("e128", E=128, K=8, D=512, F=128, T=256),
)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# "amp": fp32 inputs and weights, every column's forward under torch.autocast("cpu", dtype=torch.bfloat16) (mixed
# precision training); the floor's GEMMs run on bf16 copies. Not part of "all" (the acceptance table is fp32 and bf16).
AMP = "amp"
MODES = ("fwd", "train")
VARIANTS = ("eager", "hf", "fused", "fused_list")
SPEED_TOL = 1.10  # acceptance: fused within 1.10x of the GEMM floor
QUIET_CORES = 0.3  # other processes' load under which the machine counts as quiet enough to time on


def route(logits_TE: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax in fp32 -> top-k -> renormalise: the router of the eager and hf columns."""
    p_TE = torch.softmax(logits_TE.float(), dim=-1)
    w_TK, ids_TK = torch.topk(p_TE, k, dim=-1)
    return w_TK / w_TK.sum(dim=-1, keepdim=True), ids_TK


class SwiGLUExpert(nn.Module):
    def __init__(self, D: int, F_: int, dtype: torch.dtype):
        super().__init__()
        self.w1 = nn.Linear(D, F_, bias=False, dtype=dtype)
        self.w3 = nn.Linear(D, F_, bias=False, dtype=dtype)
        self.w2 = nn.Linear(F_, D, bias=False, dtype=dtype)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def eager_moe(x_TD, logits_TE, experts: nn.ModuleList, k: int):
    w_TK, ids_TK = route(logits_TE, k)
    w_TK = w_TK.to(x_TD.dtype)
    out_TD = torch.zeros_like(x_TD)
    for e, expert in enumerate(experts):
        tok, slot = torch.where(ids_TK == e)
        if tok.numel() == 0:
            continue
        out_TD.index_add_(0, tok, expert(x_TD[tok]) * w_TK[tok, slot, None])
    return out_TD


def hf_moe(x_TD, logits_TE, experts: nn.Module, k: int):
    w_TK, ids_TK = route(logits_TE, k)
    return experts(x_TD, ids_TK, w_TK)


def hf_experts(cfg: Config, w1, w2, w3, dtype) -> tuple[nn.Module, str]:
    """transformers' MixtralExperts with the grouped_mm implementation and our weights; plus the path it takes."""
    import transformers.integrations.moe as hf_moe_mod
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    hf_cfg = MixtralConfig(hidden_size=cfg.D, intermediate_size=cfg.F, num_local_experts=cfg.E,
                           num_experts_per_tok=cfg.K, hidden_act="silu", experts_implementation="grouped_mm")
    m = MixtralExperts(hf_cfg).to(dtype)
    with torch.no_grad():
        m.gate_up_proj.copy_(torch.cat([w1, w3], dim=1))
        m.down_proj.copy_(w2)
    offs = torch.zeros(cfg.E, dtype=torch.int32)
    if hf_moe_mod._can_use_grouped_mm(torch.empty(0, cfg.D, dtype=dtype), m.down_proj, offs):
        path = "F.grouped_mm" if hasattr(F, "grouped_mm") else "torch._grouped_mm"
    else:
        path = "grouped_mm_fallback"
    return m, path


class Floor:
    """The GEMMs alone on the routed row counts, in three plain formulations and, in fp32 where the lowering's
    native GEMMs run, a fourth (see the module docstring).

    ``mm``: per expert, ``mm`` on contiguous rows with separate w1/w3 into pre-allocated outputs (9 GEMMs per
    expert in training); ``gmm``: one ``F.grouped_mm`` per GEMM kind over the same ragged rows, gate and up
    concatenated (``[E, 2F, D]``, arranged outside the timed region); ``bmm``: rows padded to the largest count,
    ``[E, C, X]``, one ``bmm`` per GEMM kind into pre-allocated outputs (more rows, fewer calls). All inputs are
    random, pre-gathered and pre-sorted; the floor of a cell is the fastest of them. ``native``: ``mm``'s GEMMs in
    one ``cpu_gemm.mm`` call per step whose GEMMs are independent (forward: both first projections, then the
    second; backward: ``dA`` and ``dW2``, then ``dx``'s first term with ``dW1`` and ``dW3``, then its second).
    """

    def __init__(self, counts: list[int], w1, w2, w3, gen: torch.Generator):
        E, F_, D = w1.shape
        n, C = sum(counts), max(counts)
        dt = w1.dtype
        self.kinds = ("mm", "gmm", "bmm") + (("native",) if dt == torch.float32 and cpu_gemm.available() else ())
        rnd = lambda *s: torch.randn(*s, generator=gen).to(dt)  # noqa: E731
        self.w1, self.w2, self.w3 = w1.detach(), w2.detach(), w3.detach()
        self.w13 = torch.cat([self.w1, self.w3], dim=1)  # [E, 2F, D]
        self.offs = torch.tensor(counts).cumsum(0).to(torch.int32)
        self.ranges = [(e, s, s + c) for e, (s, c) in enumerate(zip(_cumsum0(counts), counts)) if c]
        # ragged rows (mm, gmm)
        self.x_nD, self.a_nF, self.dy_nD, self.dh_n2F = rnd(n, D), rnd(n, F_), rnd(n, D), rnd(n, 2 * F_)
        self.dh1_nF, self.dh3_nF = self.dh_n2F[:, :F_].contiguous(), self.dh_n2F[:, F_:].contiguous()
        self.h1_nF, self.h3_nF, self.y_nD = (torch.empty(n, F_, dtype=dt), torch.empty(n, F_, dtype=dt),
                                             torch.empty(n, D, dtype=dt))
        self.dA_nF, self.dx_nD = torch.empty(n, F_, dtype=dt), torch.empty(n, D, dtype=dt)
        self.dw1, self.dw2, self.dw3 = torch.empty_like(w1), torch.empty_like(w2), torch.empty_like(w3)
        self.dw13 = torch.empty_like(self.w13)
        # padded rows (bmm)
        self.x_ECD, self.a_ECF = rnd(E, C, D), rnd(E, C, F_)
        self.dy_ECD, self.dh_EC2F = rnd(E, C, D), rnd(E, C, 2 * F_)
        self.h_EC2F, self.y_ECD = torch.empty(E, C, 2 * F_, dtype=dt), torch.empty(E, C, D, dtype=dt)
        self.dA_ECF, self.dx_ECD = torch.empty(E, C, F_, dtype=dt), torch.empty(E, C, D, dtype=dt)

    def step(self, kind: str, mode: str):
        fwd, bwd = getattr(self, f"_{kind}_fwd"), getattr(self, f"_{kind}_bwd")
        if mode == "fwd":
            return fwd

        def train():
            fwd()
            bwd()
        return train

    def _mm_fwd(self):
        for e, s, t in self.ranges:
            torch.mm(self.x_nD[s:t], self.w1[e].t(), out=self.h1_nF[s:t])
            torch.mm(self.x_nD[s:t], self.w3[e].t(), out=self.h3_nF[s:t])
            torch.mm(self.a_nF[s:t], self.w2[e].t(), out=self.y_nD[s:t])

    def _mm_bwd(self):
        for e, s, t in self.ranges:
            torch.mm(self.dy_nD[s:t], self.w2[e], out=self.dA_nF[s:t])
            torch.mm(self.dy_nD[s:t].t(), self.a_nF[s:t], out=self.dw2[e])
            torch.mm(self.dh1_nF[s:t], self.w1[e], out=self.dx_nD[s:t])
            self.dx_nD[s:t].addmm_(self.dh3_nF[s:t], self.w3[e])
            torch.mm(self.dh1_nF[s:t].t(), self.x_nD[s:t], out=self.dw1[e])
            torch.mm(self.dh3_nF[s:t].t(), self.x_nD[s:t], out=self.dw3[e])

    def _each(self, *gemms):
        """Per expert, the (a, b, out) of each GEMM function ``gemms`` gives for (e, rows)."""
        return [g(e, slice(s, t)) for e, s, t in self.ranges for g in gemms]

    def _native_fwd(self):
        cpu_gemm.mm(self._each(lambda e, r: (self.x_nD[r], self.w1[e].t(), self.h1_nF[r]),
                               lambda e, r: (self.x_nD[r], self.w3[e].t(), self.h3_nF[r])))
        cpu_gemm.mm(self._each(lambda e, r: (self.a_nF[r], self.w2[e].t(), self.y_nD[r])))

    def _native_bwd(self):
        cpu_gemm.mm(self._each(lambda e, r: (self.dy_nD[r], self.w2[e], self.dA_nF[r]),
                               lambda e, r: (self.dy_nD[r].t(), self.a_nF[r], self.dw2[e])))
        cpu_gemm.mm(self._each(lambda e, r: (self.dh1_nF[r], self.w1[e], self.dx_nD[r]),
                               lambda e, r: (self.dh1_nF[r].t(), self.x_nD[r], self.dw1[e]),
                               lambda e, r: (self.dh3_nF[r].t(), self.x_nD[r], self.dw3[e])))
        cpu_gemm.mm(self._each(lambda e, r: (self.dh3_nF[r], self.w3[e], self.dx_nD[r])), accumulate=True)

    def _gmm_fwd(self):
        F.grouped_mm(self.x_nD, self.w13.transpose(1, 2), offs=self.offs)
        F.grouped_mm(self.a_nF, self.w2.transpose(1, 2), offs=self.offs)

    def _gmm_bwd(self):
        F.grouped_mm(self.dy_nD, self.w2, offs=self.offs)
        F.grouped_mm(self.dy_nD.t(), self.a_nF, offs=self.offs)
        F.grouped_mm(self.dh_n2F, self.w13, offs=self.offs)
        F.grouped_mm(self.dh_n2F.t(), self.x_nD, offs=self.offs)

    def _bmm_fwd(self):
        torch.bmm(self.x_ECD, self.w13.transpose(1, 2), out=self.h_EC2F)
        torch.bmm(self.a_ECF, self.w2.transpose(1, 2), out=self.y_ECD)

    def _bmm_bwd(self):
        torch.bmm(self.dy_ECD, self.w2, out=self.dA_ECF)
        torch.bmm(self.dy_ECD.transpose(1, 2), self.a_ECF, out=self.dw2)
        torch.bmm(self.dh_EC2F, self.w13, out=self.dx_ECD)
        torch.bmm(self.dh_EC2F.transpose(1, 2), self.x_ECD, out=self.dw13)


def _cumsum0(counts):
    s = 0
    for c in counts:
        yield s
        s += c


class Case:
    """One config x dtype: the inputs, the weights in every layout, and a step function per variant and mode."""

    def __init__(self, cfg: Config, dtype_name: str, seed: int, aten_gemms: bool = False):
        gen = torch.Generator().manual_seed(seed)
        self.dtype_name, self.amp = dtype_name, dtype_name == AMP
        dtype = torch.float32 if self.amp else DTYPES[dtype_name]
        E, K, D, F_, T = cfg.E, cfg.K, cfg.D, cfg.F, cfg.T
        rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=gen) * scale).to(dtype)  # noqa: E731
        self.cfg, self.dtype = cfg, dtype
        self.x_TD = rnd(T, D).requires_grad_()
        self.logits_TE = rnd(T, E).requires_grad_()
        self.grad_TD = rnd(T, D)
        self.w1 = nn.Parameter(rnd(E, F_, D, scale=D ** -0.5))
        self.w3 = nn.Parameter(rnd(E, F_, D, scale=D ** -0.5))
        self.w2 = nn.Parameter(rnd(E, D, F_, scale=F_ ** -0.5))
        self.experts = nn.ModuleList(SwiGLUExpert(D, F_, dtype) for _ in range(E))
        with torch.no_grad():
            for e, ex in enumerate(self.experts):
                ex.w1.weight.copy_(self.w1[e])
                ex.w3.weight.copy_(self.w3[e])
                ex.w2.weight.copy_(self.w2[e])
        self.hf, self.hf_path = hf_experts(cfg, self.w1, self.w2, self.w3, dtype)
        _, ids_TK = route(self.logits_TE.detach(), K)
        counts = torch.bincount(ids_TK.flatten(), minlength=E).tolist()
        self.experts_hit = sum(c > 0 for c in counts)
        floor_w = [w.detach().to(torch.bfloat16 if self.amp else dtype) for w in (self.w1, self.w2, self.w3)]
        self.floor = Floor(counts, *floor_w, gen)
        self.variants = VARIANTS + (("fused_aten",) if aten_gemms else ())
        self.floors = tuple(f"floor_{kind}" for kind in self.floor.kinds)
        self.fns = {
            "eager": lambda x, lg: eager_moe(x, lg, self.experts, K),
            "hf": lambda x, lg: hf_moe(x, lg, self.hf, K),
            "fused": lambda x, lg: moe_fuser.fused_moe(x, lg, self.w1, self.w2, self.w3, top_k=K),
            "fused_list": lambda x, lg: moe_fuser.fused_moe(x, lg, *self.expert_lists(), top_k=K),
        }

    def expert_lists(self):
        """The ModuleList experts' weights as per-expert lists (w1, w2, w3): the parameters themselves."""
        return tuple([getattr(ex, name).weight for ex in self.experts] for name in ("w1", "w2", "w3"))

    def _leaves(self):
        return [self.x_TD, self.logits_TE, self.w1, self.w2, self.w3, *self.experts.parameters(),
                *self.hf.parameters()]

    def clear_grads(self):
        for p in self._leaves():
            p.grad = None

    def step(self, variant: str, mode: str):
        """(run, setup) for one call of a variant in a mode."""
        if variant.startswith("floor_"):
            return self.floor.step(variant[len("floor_"):], mode), None
        if variant == "fused_aten":   # forward and backward with the native GEMMs off
            run, setup = self.step("fused", mode)

            def aten(run=run):
                cpu_gemm.ENABLED = False
                try:
                    return run()
                finally:
                    cpu_gemm.ENABLED = True
            return aten, setup
        fn = self.fns[variant]
        if self.amp:
            fn = _autocast(fn)
        if mode == "fwd":
            def run():
                with torch.no_grad():
                    return fn(self.x_TD, self.logits_TE)
            return run, None

        def train():
            out = fn(self.x_TD, self.logits_TE)
            out.backward(self.grad_TD)
        return train, self.clear_grads

    def errors(self) -> dict[str, float]:
        """Forward max |variant - eager| / max |eager| for hf and fused (a sanity check, not a test)."""
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.amp):
            ref = self.fns["eager"](self.x_TD, self.logits_TE).float()
            scale = ref.abs().max().clamp_min(1e-30)
            return {v: float((self.fns[v](self.x_TD, self.logits_TE).float() - ref).abs().max() / scale)
                    for v in ("hf", "fused", "fused_list")}


def measure(case: Case, mode: str, args) -> dict:
    variants = {v: Variant(*case.step(v, mode)) for v in case.variants + case.floors}
    timed = interleaved_timings(variants, rounds=args.iters, warmup=args.warmup, min_rounds=args.min_iters,
                                max_seconds=args.max_seconds, max_busy=QUIET_CORES, seed=args.seed)
    row = {f"{v}_ms": median(timed.times[v]) * 1e3 for v in case.variants + case.floors}
    row["busy_elsewhere"], row["dropped_rounds"] = timed.busy_elsewhere, timed.dropped
    best = min(case.floors, key=lambda v: row[f"{v}_ms"])
    row["floor_ms"], row["floor_by"] = row[f"{best}_ms"], best[len("floor_"):]
    row["rounds"] = timed.rounds
    for v in VARIANTS:
        if args.no_memory:
            row[f"{v}_mib"] = float("nan")
        else:
            run, setup = case.step(v, mode)
            row[f"{v}_mib"] = peak_bytes(run, setup) / 2 ** 20
    case.clear_grads()
    def paired(a: str, b: str) -> float:
        return ratio_quartiles(timed.times[a], timed.times[b])[1]

    for v in ("fused", "fused_list"):
        row[f"{v}/eager"] = paired(v, "eager")
        row[f"{v}/floor"] = paired(v, best)
        row[f"mem {v}/eager"] = row[f"{v}_mib"] / row["eager_mib"]
    row["hf/floor"] = paired("hf", best)
    row["eager/floor"] = paired("eager", best)
    if "fused_aten" in case.variants:
        row["fused/fused_aten"] = paired("fused", "fused_aten")
    row["ok"], row["ok_list"] = _verdict(row, "fused"), _verdict(row, "fused_list")
    return row


def _verdict(row, v: str) -> str:
    """The acceptance of fused variant ``v`` in one cell: "yes", or "NO" and the failed targets (t: slower than
    eager, f: over SPEED_TOL x the floor, m: more peak memory than eager)."""
    fails = ""
    if row[f"{v}/eager"] > 1.0:
        fails += "t"
    if row[f"{v}/floor"] > SPEED_TOL:
        fails += "f"
    if not math.isnan(row[f"mem {v}/eager"]) and row[f"mem {v}/eager"] > 1.0:
        fails += "m"
    return "yes" if not fails else "NO:" + fails


def profile_cell(case: Case, mode: str, floor: str, rows: int = 15) -> None:
    """Top ops (self CPU time) of fused, the fastest floor and eager over a few calls: where fused spends beyond
    the GEMMs, and what the eager loop does differently."""
    reps = 3
    for v in ("fused", floor, "eager"):
        run, setup = case.step(v, mode)
        prof = run_profiled(run, setup, reps=reps)
        case.clear_grads()
        print(f"\n--- profile: {v}, {case.cfg.label()} {case.dtype_name} {mode} ({reps} calls) ---")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def _autocast(fn):
    def run(*args):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fn(*args)
    return run


def print_table(rows: list[dict], env: dict) -> None:
    print(f"\ntorch {env['torch']}, transformers {env['transformers']}, moe_fuser {env['moe_fuser']} "
          f"({env['git']}); "
          f"CPU {env['cpu']}, {env['threads']} threads, {env['malloc']} malloc; medians in ms, peak MiB")
    head = ["config", "dtype", "mode", "eager", "hf", "fused", "fusL", "floor", "by", "fus/eag", "fus/flr",
            "fL/eag", "fL/flr", "eag/flr", "hf/flr", "eagMiB", "hfMiB", "fusMiB", "fLMiB", "ok", "okL"]
    fmt = "{:<7}{:<6}{:<6}" + "{:>9}" * 5 + "{:>5}" + "{:>8}" * 10 + "  {:<7}{}"
    print(fmt.format(*head))
    for r in rows:
        print(fmt.format(r["config"], r["dtype"], r["mode"],
                         *(f"{r[f'{v}_ms']:.2f}" for v in VARIANTS + ("floor",)), r["floor_by"],
                         *(f"{r[k]:.2f}" for k in ("fused/eager", "fused/floor", "fused_list/eager",
                                                   "fused_list/floor", "eager/floor", "hf/floor")),
                         *(f"{r[f'{v}_mib']:.1f}" for v in VARIANTS), r["ok"], r["ok_list"]))
    noisy = [f"{r['config']}/{r['dtype']}/{r['mode']}" for r in rows if not r["busy_elsewhere"] < QUIET_CORES]
    if noisy:
        print(f"NOISY: other processes kept >= {QUIET_CORES} cores busy while timing {', '.join(noisy)}; rerun on a "
              "quiet machine (--wait-quiet 600) or with --threads 1")
    n_ok = sum(r["ok"] == "yes" for r in rows)
    n_list = sum(r["ok_list"] == "yes" for r in rows)
    print(f"acceptance (fused <= eager, <= {SPEED_TOL:.2f}x floor, peak <= eager; NO:t/f/m says which failed): "
          f"fused {n_ok}/{len(rows)}, fusL {n_list}/{len(rows)} cells pass")
    aten = [r for r in rows if "fused/fused_aten" in r]
    if aten:
        print("\nfused with its native GEMMs (cpu_gemm) and with ATen's (fusA): medians in ms, per-round ratio")
        fmt = "{:<7}{:<6}{:<6}" + "{:>9}" * 3
        print(fmt.format("config", "dtype", "mode", "fused", "fusA", "fus/fusA"))
        for r in aten:
            print(fmt.format(r["config"], r["dtype"], r["mode"], f"{r['fused_ms']:.2f}", f"{r['fused_aten_ms']:.2f}",
                             f"{r['fused/fused_aten']:.3f}"))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    labels = [f"{r['config']}\n{r['dtype']} {r['mode']}" + ("" if r["busy_elsewhere"] < QUIET_CORES else "\n(noisy)")
              for r in rows]
    xs = range(len(rows))
    fig, (ax_t, ax_m) = plt.subplots(2, 1, figsize=(max(8, 0.9 * len(rows)), 8), sharex=True)
    width = 0.2
    for i, v in enumerate(VARIANTS):
        ax_t.bar([x + (i - 1.5) * width for x in xs], [r[f"{v}/floor"] for r in rows], width, label=v)
        ax_m.bar([x + (i - 1.5) * width for x in xs], [r[f"{v}_mib"] / r["eager_mib"] for r in rows], width,
                 label=v)
    ax_t.axhline(1.0, color="k", lw=0.8)
    ax_t.axhline(SPEED_TOL, color="r", ls="--", lw=0.8, label=f"{SPEED_TOL:.2f}x floor")
    ax_t.set_yscale("log")
    ax_t.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax_t.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax_t.set_ylabel("median time / GEMM floor")
    ax_t.legend(fontsize=8)
    ax_m.axhline(1.0, color="k", lw=0.8)
    ax_m.set_ylabel("peak memory / eager")
    ax_m.set_xticks(list(xs))
    ax_m.set_xticklabels(labels, fontsize=7)
    fig.suptitle("MoE layer on CPU: eager loop, transformers grouped_mm, moe_fuser.fused_moe (stacked, lists)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _choices(value: str, allowed, what: str, all_of=None) -> list[str]:
    items = [s.strip() for s in value.split(",") if s.strip()]
    if "all" in items:
        return list(allowed if all_of is None else all_of)
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise SystemExit(f"--{what}: unknown {bad or value!r}; choose from {', '.join(allowed)} or all "
                         "(comma-separated)")
    return items


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="all", help=f"comma list of {', '.join(CONFIGS)} (default all)")
    p.add_argument("--dtype", default="all", help="comma list of fp32, bf16 (all: both), amp (fp32 weights under "
                                                  "bf16 autocast)")
    p.add_argument("--mode", default="all", help="comma list of fwd, train (default all)")
    p.add_argument("--iters", type=int, default=15, help="timed rounds per cell at most (default 15)")
    p.add_argument("--min-iters", type=int, default=5, help="timed rounds per cell at least (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    p.add_argument("--max-seconds", type=float, default=20.0,
                   help="stop timing a cell after this many seconds once --min-iters rounds ran (default 20)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--malloc", choices=("system", "cached"), default="system",
                   help="CPU allocator settings: the process's own, or glibc told to keep and reuse large blocks "
                        "(see benchmarks/_common.py; default system)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="before each cell, wait up to SECONDS for other processes to use < 0.3 cores (default 0)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument("--profile", action="store_true", help="print the top ops of fused, floor and eager per cell")
    p.add_argument("--aten-gemms", action="store_true",
                   help="also time fused with its native GEMMs off (fusA: torch.mm / torch._grouped_mm)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/)")
    p.add_argument("--name", default="bench_op", help="file stem of the CSV and PNG (default bench_op)")
    args = p.parse_args(argv)
    use_malloc(args.malloc)
    configs = [CONFIGS[c] for c in _choices(args.configs, CONFIGS, "configs")]
    dtypes = _choices(args.dtype, {**DTYPES, AMP: None}, "dtype", all_of=DTYPES)
    modes = _choices(args.mode, MODES, "mode")
    if args.iters < 1 or args.min_iters < 1 or args.warmup < 0:
        raise SystemExit("--iters and --min-iters must be >= 1 and --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers
    env = environment(transformers=transformers.__version__, moe_fuser=moe_fuser.__version__)
    out_dir = results_dir(args.out)
    rows = []
    t_start = time.perf_counter()
    for cfg in configs:
        for dt_name in dtypes:
            case = Case(cfg, dt_name, args.seed, args.aten_gemms)
            err = case.errors()
            tol = 1e-4 if dt_name == "fp32" else 3e-2
            for v, e in err.items():
                if e > tol:
                    print(f"WARNING: {v} differs from eager by {e:.2e} (relative) on {cfg.name} {dt_name}",
                          file=sys.stderr)
            for mode in modes:
                if args.wait_quiet:
                    wait_until_quiet(QUIET_CORES, args.wait_quiet)
                t0 = time.perf_counter()
                row = {"config": cfg.name, "E": cfg.E, "K": cfg.K, "D": cfg.D, "F": cfg.F, "T": cfg.T,
                       "dtype": dt_name, "mode": mode, "experts_hit": case.experts_hit}
                row.update(measure(case, mode, args))
                row.update({"hf_err": err["hf"], "fused_err": err["fused"], "fused_list_err": err["fused_list"],
                            "hf_path": case.hf_path})
                rows.append(row)
                print(f"[{time.perf_counter() - t_start:6.0f}s] {cfg.label()} {dt_name} {mode}: "
                      f"eager {row['eager_ms']:.2f} hf {row['hf_ms']:.2f} fused {row['fused_ms']:.2f} "
                      f"floor {row['floor_ms']:.2f} ({row['floor_by']}) ms ({row['rounds']} rounds kept, "
                      f"{row['dropped_rounds']} dropped, {time.perf_counter() - t0:.0f}s, "
                      f"{row['busy_elsewhere']:.2f} cores busy elsewhere)", flush=True)
                if args.profile:
                    profile_cell(case, mode, f"floor_{row['floor_by']}")
            del case
    print_table(rows, env)
    csv_path, png_path = out_dir / f"{args.name}.csv", out_dir / f"{args.name}.png"
    write_csv(csv_path, rows, env)
    try:
        plot(rows, png_path)
        wrote = f"{csv_path} and {png_path}"
    except ImportError:   # the table and the CSV are the results; the plot needs the bench extra
        wrote = f"{csv_path} (no plot: matplotlib is not installed; pip install -e \".[bench]\")"
    print(f"hf path: {sorted({r['hf_path'] for r in rows})}; wrote {wrote} ({time.perf_counter() - t_start:.0f}s)")


if __name__ == "__main__":
    main()
