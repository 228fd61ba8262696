"""Rank bodies for the NPU expert-parallel tests (spawned processes, gloo over 127.0.0.1, emulated torch_npu).

Every rank builds the same global problem from a seed, runs its share through ``npu_expert_parallel`` and
compares with the single-process reference (``experts_reference`` over all tokens and experts): output, input
gradient, routing-weight gradient and the gradients of its own experts' weights.

The module name must stay unique under tests/: pytest (prepend import mode) puts every test directory on
``sys.path``, and a spawned rank imports this module *by name* to unpickle its target, searching the path it
inherited. Named ``_ep_worker`` like tests/distributed's worker, it was shadowed by that one whenever
tests/distributed came first on the path (e.g. ``pytest tests/npu tests/distributed``): the ranks died
unpickling ``ep_cases``.
"""

from __future__ import annotations

import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

EMULATOR_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "npu_emulator")


def _setup(rank: int, world: int, port: int):
    os.environ["MOE_FUSER_NPU_EMULATOR"] = "1"
    if EMULATOR_DIR not in sys.path:
        sys.path.insert(0, EMULATOR_DIR)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)


def _problem(seed, T_per_rank, world, D, F_, E, k, dtype, bias):
    from moe_fuser.ops.routing import route
    from moe_fuser.spec import RouterSpec

    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    T = T_per_rank * world
    x = rnd(T, D)
    weights, ids = route(torch.randn(T, E, generator=g), RouterSpec(top_k=k))
    ws = dict(w1=rnd(E, F_, D, scale=D ** -0.5), w2=rnd(E, D, F_, scale=F_ ** -0.5), w3=rnd(E, F_, D, scale=D ** -0.5))
    if bias:
        ws.update(b1=rnd(E, F_, scale=0.1), b2=rnd(E, D, scale=0.1), b3=rnd(E, F_, scale=0.1))
    return x, weights, ids, ws


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _check_case(rank, world, owner, dtype, train, T_per_rank, D, F_, E, k, bias, seed, tol):
    from moe_fuser.distributed.placement import ExpertPlacement
    from moe_fuser.lowering import npu as npu_lowering
    from moe_fuser.lowering.reference import experts_reference
    from moe_fuser.spec import ExpertSpec

    spec = ExpertSpec(num_experts=E, glu="separate", bias=bias)
    x, weights, ids, ws = _problem(seed, T_per_rank, world, D, F_, E, k, dtype, bias)
    leaves = [x, weights, *ws.values()]
    for t in leaves:
        t.requires_grad_(train)
    ref = experts_reference(x, weights, ids, ws["w1"], ws["w2"], ws["w3"], ws.get("b1"), ws.get("b2"), ws.get("b3"),
                            spec)
    mine = slice(rank * T_per_rank, (rank + 1) * T_per_rank)
    local = torch.tensor(ExpertPlacement(tuple(owner), world).local_experts(rank), dtype=torch.int64)
    x_r, w_r = x[mine].detach().requires_grad_(train), weights[mine].detach().requires_grad_(train)
    ws_r = {n: v[local].detach().requires_grad_(train) for n, v in ws.items()}
    with torch.set_grad_enabled(train):
        out = npu_lowering.npu_expert_parallel(x_r, w_r, ids[mine], **ws_r, spec=spec, group=dist.group.WORLD,
                                               placement=ExpertPlacement(tuple(owner), world))
    assert out.dtype == dtype and out.shape == x_r.shape

    def close(a, b, what):
        err = _rel(a, b)
        assert err < tol, f"rank {rank}: {what} relative error {err:.2e} >= {tol}"

    close(out, ref[mine], "output")
    if train:
        grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
        want = torch.autograd.grad(ref, leaves, grad)
        got = torch.autograd.grad(out, [x_r, w_r, *ws_r.values()], grad[mine])
        close(got[0], want[0][mine], "input gradient")
        close(got[1], want[1][mine], "routing-weight gradient")
        for name, g_local, g_all in zip(ws, got[2:], want[2:]):
            close(g_local, g_all[local], f"{name} gradient")


def _check_fused_moe(rank, world, owner, dtype, train, T, D, F_, k, seed, tol, owner_tensor=False, dropped=False):
    """The public entry: ``fused_moe(..., ep_group=..., impl="npu")`` on this rank's tokens and experts equals
    ``fused_moe(..., impl="reference")`` on all of them: the output and, when training, the gradients of the
    hidden states, the router logits (or external top-k weights) and this rank's expert weights. Fresh random
    non-zero inputs; ``dropped``: an external router whose every fifth pair is dropped (id -1)."""
    import moe_fuser
    from moe_fuser.ops.routing import route
    from moe_fuser.spec import RouterSpec

    E = len(owner)
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    x, logits = rnd(T * world, D), rnd(T * world, E)
    ws = dict(w1=rnd(E, F_, D, scale=D ** -0.5), w2=rnd(E, D, F_, scale=F_ ** -0.5), w3=rnd(E, F_, D, scale=D ** -0.5))
    router = dict(router_logits=logits)
    if dropped:
        tw, ti = route(logits.float(), RouterSpec(top_k=k))
        ti = torch.where(torch.arange(ti.numel()).view(ti.shape) % 5 == 3, -1, ti)
        router = dict(router_logits=None, topk_weights=tw.to(dtype), topk_ids=ti)
    leaves = dict(x=x, **{n: t for n, t in router.items() if t is not None and t.is_floating_point()}, **ws)
    for t in leaves.values():
        t.requires_grad_(train)
    ref = moe_fuser.fused_moe(x, top_k=k, impl="reference", **{n: v for n, v in router.items()}, **ws)

    local = [e for e in range(E) if owner[e] == rank]
    mine = slice(rank * T, (rank + 1) * T)
    shard = {n: (v[mine] if v is not None else None) for n, v in router.items()}
    x_r = x[mine].detach().requires_grad_(train)
    shard = {n: (v.detach().requires_grad_(train) if v is not None and v.is_floating_point() else v)
             for n, v in shard.items()}
    ws_r = {n: v[local].detach().requires_grad_(train) for n, v in ws.items()}
    placement = torch.tensor(owner) if owner_tensor else list(owner)
    with torch.set_grad_enabled(train):
        out = moe_fuser.fused_moe(x_r, top_k=k, impl="npu", ep_group=dist.group.WORLD, expert_placement=placement,
                                  **shard, **ws_r)
    assert out.dtype == dtype and out.shape == x_r.shape
    err = _rel(out, ref[mine])
    assert err < tol, f"rank {rank}: fused_moe(ep_group, impl='npu') output relative error {err:.2e} >= {tol}"
    if train:
        grad = rnd(T * world, D)
        names = list(leaves)
        want = dict(zip(names, torch.autograd.grad(ref, list(leaves.values()), grad)))
        mine_leaves = dict(x=x_r, **{n: t for n, t in shard.items() if n in leaves}, **ws_r)
        got = dict(zip(names, torch.autograd.grad(out, [mine_leaves[n] for n in names], grad[mine])))
        for n in names:
            w = want[n][local] if n in ws else want[n][mine]
            err = _rel(got[n], w)
            assert err < tol, f"rank {rank}: gradient of {n}: relative error {err:.2e} >= {tol}"


def _check_mismatch(rank, world):
    """Ranks that disagree on the layer's configuration (top_k here), or pass all experts instead of theirs,
    get a ValueError naming it on every rank: nothing hangs, and the group stays usable."""
    import moe_fuser

    E, D, F_ = 4, 16, 8
    x, logits = torch.randn(6, D), torch.randn(6, E)
    ws = dict(w1=torch.randn(2, F_, D), w2=torch.randn(2, D, F_), w3=torch.randn(2, F_, D))
    errors = {}
    for what, kw in (("top_k", dict(top_k=2 + rank)),
                     ("experts", dict(top_k=2, expert_placement=torch.tensor([0, 0, 1, 1]), w1=torch.randn(E, F_, D),
                                      w2=torch.randn(E, D, F_), w3=torch.randn(E, F_, D)))):
        try:
            moe_fuser.fused_moe(x, logits, impl="npu", ep_group=dist.group.WORLD, ep_timeout=30,
                                **{**ws, **kw})
        except ValueError as exc:
            errors[what] = str(exc)
    assert "disagree on top_k (rank 0: 2, rank 1: 3)" in errors.get("top_k", ""), errors
    assert f"rank {rank} holds 4 experts but the placement gives it 2" in errors.get("experts", ""), errors


def _check_stall(rank, world, timeout_s=2.0):
    """Rank 1 stops calling the layer (it sleeps past the timeout): rank 0 raises ExpertParallelError naming the
    step within a bounded time instead of hanging. The group is broken afterwards: run it last."""
    import moe_fuser
    from moe_fuser.distributed import ExpertParallelError

    if rank == 1:
        time.sleep(3 * timeout_s)
        return
    t0 = time.monotonic()
    try:
        moe_fuser.fused_moe(torch.randn(6, 16), torch.randn(6, 4), torch.randn(2, 8, 16), torch.randn(2, 16, 8),
                            top_k=2, impl="npu", ep_group=dist.group.WORLD, ep_timeout=timeout_s)
    except ExpertParallelError as exc:
        seconds = time.monotonic() - t0
        assert "the configuration exchange" in str(exc) and seconds < 5 * timeout_s, (seconds, str(exc))
    else:
        raise AssertionError("rank 0 got no error although rank 1 never called the layer")


def _check_compiled(rank, world, seed, tol):
    """The compiler's EP rewrite with the npu lowering: the seed's hand-written EP layer (functional collectives,
    fp32) under torch.compile(backend="moe_fuser") is fused into one op that runs the npu lowering's all_to_all
    path (MC2 is inference-only), equal to eager forward and backward; explain names the lowering and why MC2 is
    not used. Then a model's own fused_moe(..., ep_group, impl="npu") call traced whole by dynamo."""
    import torch._dynamo

    import moe_fuser
    from moe_fuser.lowering import npu as npu_lowering

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                    "benchmarks"))
    from ep_seed import SeedEPMoE

    torch.manual_seed(seed)
    layer = SeedEPMoE(16, 24, 4, 2, dist.group.WORLD, collectives="functional")
    x = torch.randn(9 + 4 * rank, 16, requires_grad=True)
    report = moe_fuser.explain(layer, x.detach())
    assert report.num_fused == 1 and report.fused[0].lowering == "npu", str(report)
    notes = report.fused[0].notes
    assert any(n.startswith("expert parallel -> all_to_all_single + npu_moe_re_routing") and "bfloat16" in n
               for n in notes), notes
    torch._dynamo.reset()
    npu_lowering.EP_PATHS.clear()
    compiled = torch.compile(layer, backend="moe_fuser", options={"inner": "aot_eager"})
    out = compiled(x)
    assert dict(npu_lowering.EP_PATHS) == {"all_to_all": 1}, dict(npu_lowering.EP_PATHS)
    assert any(stage == "expert parallel" and "inference only" in why for stage, why in npu_lowering.FALLBACKS)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, *layer.experts.parameters()], g)
    ref = layer(x)
    want = torch.autograd.grad(ref, [x, *layer.experts.parameters()], g)
    assert _rel(out, ref) < tol, f"rank {rank}: compiled output relative error {_rel(out, ref):.2e}"
    for i, (a, b) in enumerate(zip(got, want)):
        assert _rel(a, b) < tol, f"rank {rank}: compiled gradient {i} relative error {_rel(a, b):.2e}"

    # a model's own fused_moe(..., ep_group, impl="npu") call, traced whole (fullgraph) and trained
    def layer_call(x, logits, w1, w2, w3):
        return moe_fuser.fused_moe(x, logits, w1, w2, w3, top_k=2, impl="npu", ep_group=dist.group.WORLD)

    args = [torch.randn(7 + rank, 16, requires_grad=True), torch.randn(7 + rank, 4, requires_grad=True),
            *(torch.randn(2, *shape).mul_(0.3).requires_grad_() for shape in ((8, 16), (16, 8), (8, 16)))]
    npu_lowering.EP_PATHS.clear()
    out = torch.compile(layer_call, backend="aot_eager", fullgraph=True)(*args)
    assert dict(npu_lowering.EP_PATHS) == {"all_to_all": 1}, dict(npu_lowering.EP_PATHS)
    ref = layer_call(*args)
    g = torch.randn_like(out)
    for i, (a, b) in enumerate(zip(torch.autograd.grad(out, args, g), torch.autograd.grad(ref, args, g))):
        assert _rel(a, b) < tol, f"rank {rank}: traced fused_moe gradient {i} relative error {_rel(a, b):.2e}"
    assert _rel(out, ref) < tol, f"rank {rank}: traced fused_moe output relative error {_rel(out, ref):.2e}"


def _check_path(rank, path, expect, calls_before):
    """The EP layer took the npu lowering's ``path`` (and not moe_fuser's own exchange), leaving MC2 only for
    the reasons in ``expect`` (substrings; the first one required)."""
    from moe_fuser.distributed import traffic
    from moe_fuser.lowering import npu as npu_lowering

    assert dict(npu_lowering.EP_PATHS) == {path: 1}, f"rank {rank}: EP paths {dict(npu_lowering.EP_PATHS)}"
    assert traffic["calls"] == calls_before, f"rank {rank}: moe_fuser's own exchange ran"
    got = sorted({why for stage, why in npu_lowering.FALLBACKS if stage == "expert parallel"})
    unexpected = [why for why in got if not any(e in why for e in expect)]
    assert not unexpected and (not expect or any(expect[0] in why for why in got)), \
        f"rank {rank}: expected fallbacks {expect}, got {got}"


def ep_cases(rank: int, world: int, port: int, cases: list, results) -> None:
    """Run ``cases`` on this rank: dicts of ``_check_case`` arguments (``npu_expert_parallel`` directly), or with
    ``check`` = "fused_moe" (``_check_fused_moe``), "mismatch", "stall" (last: it breaks the group) or
    "compiled"; ``path`` (with ``expect``,
    substrings of the only EP fallback reasons allowed, the first one required) asserts the EP path taken."""
    try:
        _setup(rank, world, port)
        from moe_fuser.distributed import traffic
        from moe_fuser.lowering import npu as npu_lowering

        checks = {"lowering": _check_case, "fused_moe": _check_fused_moe, "mismatch": _check_mismatch,
                  "stall": _check_stall, "compiled": _check_compiled}
        for case in cases:
            case = dict(case)
            check, path, expect = case.pop("check", "lowering"), case.pop("path", None), case.pop("expect", [])
            npu_lowering.FALLBACKS.clear()
            npu_lowering.EP_PATHS.clear()
            calls = traffic["calls"]
            checks[check](rank, world, **case)
            if path:
                _check_path(rank, path, expect, calls)
            if check == "stall":   # the group is broken on purpose: report and leave without a barrier
                results.put((rank, None))
                results.close()
                results.join_thread()
                os._exit(0)
        dist.barrier()
        results.put((rank, None))
    except Exception:
        results.put((rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
