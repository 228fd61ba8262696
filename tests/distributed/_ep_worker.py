"""One rank of a multi-process EP test: ``python _ep_worker.py SCENARIO RANK WORLD PORT``.

Each scenario runs several checks in one process group (process start-up is the slow part) and prints one line
``RESULT <json>``. Every rank builds the *whole* problem from one seed (all ranks' tokens, all experts), keeps its
share (its tokens, its local experts) for the EP call, and runs the single-process reference
(``fused_moe(..., impl="reference")``) on the gathered inputs: outputs and gradients are compared on its share.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

import moe_fuser

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks"))
from moe_fuser.distributed import ExpertParallelError, ExpertPlacement, traffic


def tokens(world: int) -> list[int]:
    return [23 + 7 * r for r in range(world)]   # uneven token counts per rank


def make_problem(world, E, K, D=16, F=24, dtype=torch.float32, seed=0, glu=True, bias=False):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    w = dict(w1=rnd(E, F, D, scale=0.25), w2=rnd(E, D, F, scale=0.25))
    if glu:
        w["w3"] = rnd(E, F, D, scale=0.25)
    if bias:
        w["b1"], w["b2"] = rnd(E, F, scale=0.1), rnd(E, D, scale=0.1)
    xs = [rnd(t, D) for t in tokens(world)]
    logits = [rnd(t, E) for t in tokens(world)]
    grads = [rnd(t, D) for t in tokens(world)]
    return w, xs, logits, grads


def external_routing(logits, K):
    """Top-k of the softmax, with every fifth pair dropped (id -1)."""
    tw, ti = logits.float().softmax(-1).topk(K)
    return tw, torch.where(torch.arange(ti.numel()).view(ti.shape) % 5 == 3, -1, ti)


def max_err(a, b):
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def call(x, logits, weights: dict, K, activation, tw=None, ti=None, **kw):
    weights = dict(weights)
    w1, w2, w3 = weights.pop("w1"), weights.pop("w2"), weights.pop("w3", None)
    return moe_fuser.fused_moe(x, logits, w1, w2, w3, top_k=K, activation=activation, topk_weights=tw,
                               topk_ids=ti, **weights, **kw)


def check_case(group, rank, world, E, K, owners=None, rpn=None, chunks=None, dtype=torch.float32, glu=True,
               bias=False, as_list=False, external=False, activation="silu", compile_backend=None, autocast=False,
               **options):
    """EP forward + backward vs the reference on gathered inputs: the max abs errors per tensor. ``autocast``:
    both forwards under ``torch.autocast`` (bf16), fp32 inputs and weights; ``options``: more ``fused_moe``
    arguments, for both."""
    autocast_ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    w, xs, logits, grads = make_problem(world, E, K, dtype=dtype, glu=glu, bias=bias)
    placement = ExpertPlacement.from_owners(owners, world) if owners else ExpertPlacement.balanced(E, world)
    local = list(placement.local_experts(rank))
    mine = {k: v[local].clone().requires_grad_() for k, v in w.items()}
    x = xs[rank].clone().requires_grad_()
    lg = logits[rank].clone().requires_grad_()
    tw = ti = None
    if external:
        tw, ti = external_routing(logits[rank], K)
        tw.requires_grad_()
        lg = None

    def ep(x, lg, tw, ti):
        ws = {k: list(v.unbind(0)) for k, v in mine.items()} if as_list and local else mine
        return call(x, lg, ws, K, activation, tw, ti, ep_group=group, expert_placement=placement,
                    overlap_chunks=chunks, ranks_per_node=rpn, **options)

    fn = ep if compile_backend is None else torch.compile(ep, backend=compile_backend, fullgraph=True)
    with autocast_ctx:
        out = fn(x, lg, tw, ti)
    (out.float() * grads[rank].float()).sum().backward()

    X = torch.cat(xs).requires_grad_()
    W = {k: v.clone().requires_grad_() for k, v in w.items()}
    if external:
        pairs = [external_routing(lgr, K) for lgr in logits]
        TW = torch.cat([p[0] for p in pairs]).requires_grad_()
        ref = call(X, None, W, K, activation, TW, torch.cat([p[1] for p in pairs]), impl="reference", **options)
    else:
        L = torch.cat(logits).requires_grad_()
        with autocast_ctx:
            ref = call(X, L, W, K, activation, impl="reference", **options)
    (ref.float() * torch.cat(grads).float()).sum().backward()
    start = sum(tokens(world)[:rank])
    sl = slice(start, start + tokens(world)[rank])
    errs = {"out": max_err(out, ref[sl]), "dx": max_err(x.grad, X.grad[sl]),
            "drouter": max_err(tw.grad, TW.grad[sl]) if external else max_err(lg.grad, L.grad[sl]),
            "scale": float(ref.float().abs().max())}
    for name, v in mine.items():
        errs["d" + name] = max_err(v.grad, W[name].grad[local]) if local else 0.0
    return errs


def autocast_experts_dtype(group, rank, world):
    """The dtype the EP experts op receives its rows in when fp32 inputs are called under bf16 autocast, and the
    output's."""
    from moe_fuser.distributed import ep_moe
    seen, real = [], ep_moe.ep_experts

    def recording(x, *args, **kwargs):
        seen.append(str(x.dtype))
        return real(x, *args, **kwargs)
    ep_moe.ep_experts = recording
    try:
        w, xs, logits, _ = make_problem(world, 4, 2)
        placement = ExpertPlacement.balanced(4, world)
        mine = {k: v[list(placement.local_experts(rank))] for k, v in w.items()}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = call(xs[rank], logits[rank], mine, 2, "silu", ep_group=group, expert_placement=placement)
    finally:
        ep_moe.ep_experts = real
    return {"experts": seen, "out": str(out.dtype)}


def idle_expert_grads(group, rank, world):
    """Per-expert weight lists in eager mode, expert 3 (rank 1's second) given no token: which local weights have
    no gradient (``grad is None``), per weight list."""
    w, xs, logits, grads = make_problem(world, 4, 2)
    placement = ExpertPlacement.balanced(4, world)
    local = list(placement.local_experts(rank))
    mine = {k: [v[e].clone().requires_grad_() for e in local] for k, v in w.items()}
    lg = logits[rank].clone()
    lg[:, 3] = -1e4
    out = call(xs[rank].clone().requires_grad_(), lg, mine, 2, "silu", ep_group=group, expert_placement=placement)
    (out * grads[rank]).sum().backward()
    return {k: [p.grad is None for p in v] for k, v in mine.items()}


def inter_node_traffic(group, rank, world, E, K, rpn, owners=None):
    """Forward-only EP call; returns (measured inter-node bytes summed over ranks, bytes the dedup scheme must
    send: 2 rows per (token, other node) + 12 B per pair to another node, and what the seed's scheme sends:
    2 rows per (token, slot) whose expert is on another node)."""
    w, xs, logits, _ = make_problem(world, E, K)
    placement = ExpertPlacement.from_owners(owners, world) if owners else ExpertPlacement.balanced(E, world)
    local = list(placement.local_experts(rank))
    traffic["inter_node_bytes"] = 0
    with torch.no_grad():
        call(xs[rank], logits[rank], {k: v[local] for k, v in w.items()}, K, "silu", ep_group=group,
             expert_placement=placement, ranks_per_node=rpn)
    measured = torch.tensor([traffic["inter_node_bytes"]])
    dist.all_reduce(measured, group=group)
    row = xs[0].shape[1] * xs[0].element_size()
    owner_E = torch.tensor(placement.owner)
    expect = seed = 0
    for r in range(world):
        node_TK = owner_E[logits[r].float().softmax(-1).topk(K).indices] // rpn
        other_TK = node_TK != r // rpn
        for t in range(node_TK.shape[0]):
            expect += 2 * row * len(set(node_TK[t][other_TK[t]].tolist())) + 12 * int(other_TK[t].sum())
        seed += 2 * row * int(other_TK.sum())
    return {"measured": int(measured), "expected": expect, "seed_style": seed}


def mismatch(group, rank, world, **diff):
    """Ranks calling with different configurations: every rank must raise ValueError naming the difference."""
    E, K, dtype, D = diff.get("E", 6), diff.get("K", 2), diff.get("dtype", torch.float32), diff.get("D", 16)
    w, xs, logits, _ = make_problem(world, E, K, D=D, dtype=dtype)
    placement = ExpertPlacement.from_owners(diff["owners"], world) if "owners" in diff else \
        ExpertPlacement.balanced(E, world)
    local = list(placement.local_experts(rank))
    try:
        call(xs[rank], logits[rank], {k: v[local] for k, v in w.items()}, K, "silu", ep_group=group,
             expert_placement=placement, ranks_per_node=1)
    except ValueError as exc:
        return str(exc)
    return "no error"


def stall_or_die(group, rank, world, victim: int, die: bool, timeout_s: float):
    """Rank ``victim`` dies (or sleeps past the timeout) instead of calling; the others must raise
    ExpertParallelError within a bounded time. Returns (error message, seconds) on the other ranks."""
    w, xs, logits, _ = make_problem(world, 6, 2)
    placement = ExpertPlacement.balanced(6, world)
    local = list(placement.local_experts(rank))
    if rank == victim:
        if die:
            os._exit(3)
        time.sleep(timeout_s * 3)
        return {"victim": True, "_exit_now": True}
    t0 = time.monotonic()
    try:
        call(xs[rank], logits[rank], {k: v[local] for k, v in w.items()}, 2, "silu", ep_group=group,
             expert_placement=placement, ranks_per_node=1, ep_timeout=timeout_s)
        return {"error": None, "_exit_now": True}
    except ExpertParallelError as exc:
        return {"error": str(exc), "seconds": time.monotonic() - t0, "_exit_now": True}


def bad_inputs(group, rank, world):
    """Errors every rank raises before any collective (so the group stays usable): the ValueError messages."""
    w, xs, logits, _ = make_problem(world, 5, 2)
    placement = ExpertPlacement.balanced(5, world)
    local = list(placement.local_experts(rank))
    mine = {k: v[local] for k, v in w.items()}
    cases = {
        "all_experts_passed": dict(weights=w),
        "reference_impl": dict(impl="reference"),
        "chunks_zero": dict(overlap_chunks=0),
        "capacity": dict(capacity=4),
        "ranks_per_node": dict(ranks_per_node=3),
        "placement_size": dict(expert_placement=[0, 1, 0]),
        "placement_rank": dict(expert_placement=[0, 1, 0, 1, world]),
    }
    out = {}
    for name, kw in cases.items():
        kw = dict(kw)
        ws = kw.pop("weights", mine)
        kw.setdefault("expert_placement", placement)
        try:
            call(xs[rank], logits[rank], ws, 2, "silu", ep_group=group, **kw)
            out[name] = "no error"
        except ValueError as exc:
            out[name] = str(exc)
    return out


class _MatmulExpert(torch.nn.Module):
    """An expert holding [in, out] weights, projecting with ``x @ w``."""

    def __init__(self, D: int, F_: int):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(D, F_) / D ** 0.5)
        self.w2 = torch.nn.Parameter(torch.randn(F_, D) / F_ ** 0.5)

    def forward(self, x):
        return torch.nn.functional.silu(x @ self.w1) @ self.w2


def compiled_seed(group, rank, world, collectives: str, placement: str = "buffer", inner: str = "aot_eager",
                  autocast: bool = False, matmul_experts: bool = False):
    """The seed's hand-written EP layer under torch.compile(backend="moe_fuser"): how many regions were fused,
    what explain says, and the largest difference to the same layer in eager (output, and gradients of the
    input and of the local experts' weights for the autograd-capable functional collectives), relative to the
    largest eager value. ``autocast``: both forwards under bf16 autocast, fp32 inputs and weights;
    ``matmul_experts``: experts of [in, out] weights (``_MatmulExpert``) instead of Linears."""
    import torch._dynamo
    from ep_seed import SeedEPMoE
    from moe_fuser.rewrite import counters

    torch.manual_seed(0)
    layer = SeedEPMoE(16, 24, 5, 2, group, collectives=collectives)
    if placement == "floordiv":     # owner = ids // n instead of a buffer lookup (5 experts won't divide: use 6)
        torch.manual_seed(0)
        layer = SeedEPMoE(16, 24, 6, 2, group, collectives=collectives)
        layer.forward = _floordiv_forward.__get__(layer)
    if matmul_experts:
        layer.experts = torch.nn.ModuleList(_MatmulExpert(16, 24) for _ in layer.local_ids)
    x = torch.randn(19 + 4 * rank, 16, requires_grad=True)
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    with amp:
        report = moe_fuser.explain(layer, x.detach())
    torch._dynamo.reset()
    before = counters["fused"]
    compiled = torch.compile(layer, backend="moe_fuser", options={"inner": inner})
    with amp:
        out = compiled(x)
        fused = counters["fused"] - before
        ref = layer(x)
    res = {"fused": fused, "explain_fused": report.num_fused, "explain": str(report),
           "out": max_err(out, ref) / ref.abs().max().item(), "dtype": str(out.dtype)}
    if collectives == "functional":
        g = torch.randn_like(out)
        out.backward(g)
        got = [x.grad.clone()] + [p.grad.clone() for p in layer.experts.parameters()]
        x.grad = None
        layer.zero_grad()
        ref.backward(g)
        want = [x.grad] + [p.grad for p in layer.experts.parameters()]
        res["grads"] = max(max_err(a, b) / b.abs().max().item() for a, b in zip(got, want))
    return res


def ddp_switch(group, rank, world):
    """The seed's Switch layer under DistributedDataParallel with buckets so small that dynamo's DDP graph split
    cuts its MoE apart (unfused before moe_fuser fused ahead of the split), compiled with moe_fuser: how many
    regions were fused, how many pieces the split made, and the largest relative difference of one training
    step's gradients to eager DDP's (both all-reduced across the ranks)."""
    import copy

    import torch._dynamo
    from moe_fuser.rewrite import counters
    from torch.nn.parallel import DistributedDataParallel as DDP

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "compiler"))
    from moe_models import load_example

    example = load_example("switch_transformer")
    torch.manual_seed(0)
    layer = example.SwitchLayer(64, 512, 8, 2)   # 2 MiB of expert weights: DDP's smallest buckets hold 1 MiB
    models = [DDP(copy.deepcopy(layer), process_group=group, bucket_cap_mb=1) for _ in range(2)]
    torch._dynamo.reset()
    before, graphs_before = counters["fused"], counters["graphs"]
    compiled = torch.compile(models[1], backend="moe_fuser", options={"inner": "aot_eager"})
    x = torch.randn(2, 5 + rank, 64)
    grads = []
    for model, fn in zip(models, (models[0], compiled)):
        out, aux = fn(x)
        (out.pow(2).mean() + 0.01 * aux).backward()
        grads.append([p.grad for p in model.parameters()])
    errs = [float((b - a).norm() / a.norm()) for a, b in zip(*grads) if a is not None and a.norm() > 0]
    return {"fused": counters["fused"] - before, "grad_rel_err": max(errs),
            "pieces": counters["graphs"] - graphs_before - 1}   # graphs the pass saw after the whole one


def _floordiv_forward(self, x):
    """The seed layer with ``dest = flat_ids // n`` (balanced placement, no owner buffer)."""
    T, D = x.shape
    k = self.top_k
    n = self.owner.shape[0] // self.world
    probs = self.gate(x).float().softmax(dim=-1)
    weights, ids = probs.topk(k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    flat_ids = ids.flatten()
    dest = flat_ids // n
    order = torch.argsort(dest, stable=True)
    send_counts = torch.histc(dest.float(), bins=self.world, min=0, max=self.world - 1).long()
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=self.group)
    send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
    recv_x = self._a2a(x[order // k], recv_splits, send_splits)
    recv_ids = torch.empty(sum(recv_splits), dtype=flat_ids.dtype)
    dist.all_to_all_single(recv_ids, flat_ids[order], recv_splits, send_splits, group=self.group)
    out = torch.zeros_like(recv_x)
    for i, e in enumerate(self.local_ids):
        rows = torch.where(recv_ids == e)[0]
        out[rows] = self.experts[i](recv_x[rows])
    back = self._a2a(out, send_splits, recv_splits)
    y = torch.empty_like(back)
    y[order] = back
    return (y.view(T, k, D) * weights[..., None]).sum(dim=1)


# ---- scenarios: one process group each ---------------------------------------------------------------------

def scenario_two(group, rank, world):
    res = {"cases": {
        "topk_uneven_glu": check_case(group, rank, world, E=5, K=2),                   # 3 + 2 experts
        "top1_list_bias_chunks3": check_case(group, rank, world, E=4, K=1, owners=[1, 1, 1, 0], rpn=1,
                                             chunks=3, glu=False, bias=True, as_list=True, activation="gelu"),
        "external_dropped": check_case(group, rank, world, E=5, K=2, owners=[1, 0, 1, 0, 1], external=True),
        "bf16_chunks2": check_case(group, rank, world, E=8, K=2, dtype=torch.bfloat16, chunks=2),
        "compiled_aot_eager": check_case(group, rank, world, E=5, K=2, rpn=1, chunks=2,
                                         compile_backend="aot_eager"),
        "bf16_autocast": check_case(group, rank, world, E=5, K=2, chunks=2, autocast=True),
        "weight_on_input": check_case(group, rank, world, E=5, K=2, chunks=2, apply_router_weight_on_input=True,
                                      scoring="sigmoid", topk_first=True, renormalize=False),
    }}
    res["autocast"] = autocast_experts_dtype(group, rank, world)
    res["mismatch"] = {
        "top_k": mismatch(group, rank, world, K=2 + rank),
        "dtype": mismatch(group, rank, world, dtype=(torch.float32, torch.bfloat16)[rank]),
        "hidden": mismatch(group, rank, world, D=16 + 8 * rank),
        "experts": mismatch(group, rank, world, E=6 + 2 * rank),
        "placement": mismatch(group, rank, world, owners=([0, 0, 0, 1, 1, 1], [1, 1, 1, 0, 0, 0])[rank]),
    }
    res["idle_grads"] = idle_expert_grads(group, rank, world)
    res["bad_inputs"] = bad_inputs(group, rank, world)
    res["compiled_seed"] = {"inplace": compiled_seed(group, rank, world, "inplace"),
                            # inductor: its generated code checks the op's fake output shapes
                            "functional": compiled_seed(group, rank, world, "functional", inner="inductor"),
                            "floordiv_setitem": compiled_seed(group, rank, world, "inplace", "floordiv"),
                            "functional_autocast": compiled_seed(group, rank, world, "functional", autocast=True),
                            "functional_matmul": compiled_seed(group, rank, world, "functional",
                                                               matmul_experts=True)}
    res["ddp"] = ddp_switch(group, rank, world)
    res["stall"] = stall_or_die(group, rank, world, victim=1, die=False, timeout_s=2.0)
    return res


def scenario_three(group, rank, world):
    return {"cases": {
        "topk_8_on_3": check_case(group, rank, world, E=8, K=2, chunks=2),               # 3 + 3 + 2, one node
        "top1_8_on_3_flat": check_case(group, rank, world, E=8, K=1, rpn=1),
        "rank_without_experts": check_case(group, rank, world, E=7, K=3, owners=[0, 2, 0, 2, 2, 0, 0], rpn=1),
    }}


def scenario_four(group, rank, world):
    res = {"cases": {
        "two_level": check_case(group, rank, world, E=8, K=3, rpn=2, chunks=2),
        "two_level_uneven_empty_rank": check_case(group, rank, world, E=6, K=2, owners=[0, 0, 0, 3, 3, 1],
                                                  rpn=2, chunks=3),
        "top1_flat": check_case(group, rank, world, E=8, K=1, rpn=1),
    }}
    res["traffic_two_level"] = inter_node_traffic(group, rank, world, E=16, K=4, rpn=2)
    res["traffic_flat"] = inter_node_traffic(group, rank, world, E=16, K=4, rpn=1)
    res["dead"] = stall_or_die(group, rank, world, victim=3, die=True, timeout_s=30.0)
    return res


SCENARIOS = {"two": scenario_two, "three": scenario_three, "four": scenario_four}


def main():
    scenario, rank, world, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        result = SCENARIOS[scenario](dist.group.WORLD, rank, world)
    except Exception:
        print("RESULT " + json.dumps({"error": traceback.format_exc()}), flush=True)
        os._exit(1)
    exit_now = any(isinstance(v, dict) and v.pop("_exit_now", False) for v in result.values())
    print("RESULT " + json.dumps(result), flush=True)
    if exit_now:   # the group is broken on purpose (a stalled or dead peer): leave without a barrier
        os._exit(0)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
