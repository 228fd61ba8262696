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
        err = float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12))
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


def _check_fused_moe(rank, world, owner, seed, tol):
    """The public entry: fused_moe(..., ep_group=..., impl="npu") (moe_fuser.distributed's exchange around the npu
    lowering's grouped experts), forward and backward, against the single-process reference."""
    import moe_fuser

    E, T, D, F_ = len(owner), 12, 16, 8
    g = torch.Generator().manual_seed(seed)
    x, logits = torch.randn(T * world, D, generator=g), torch.randn(T * world, E, generator=g)
    w1, w2, w3 = (torch.randn(E, F_, D, generator=g) * 0.3, torch.randn(E, D, F_, generator=g) * 0.3,
                  torch.randn(E, F_, D, generator=g) * 0.3)
    ref = moe_fuser.fused_moe(x, logits, w1, w2, w3, top_k=2, impl="reference")
    local = [e for e in range(E) if owner[e] == rank]
    mine = slice(rank * T, (rank + 1) * T)
    x_r = x[mine].clone().requires_grad_()
    out = moe_fuser.fused_moe(x_r, logits[mine], w1[local], w2[local], w3[local], top_k=2, impl="npu",
                              ep_group=dist.group.WORLD, expert_placement=list(owner))
    err = float((out.detach() - ref[mine]).norm() / ref[mine].norm())
    assert err < tol, f"rank {rank}: fused_moe(ep_group, impl='npu') relative error {err:.2e}"
    x_all = x.clone().requires_grad_()
    (want,) = torch.autograd.grad(moe_fuser.fused_moe(x_all, logits, w1, w2, w3, top_k=2, impl="reference").sum(),
                                  x_all)
    (got,) = torch.autograd.grad(out.sum(), x_r)
    assert float((got - want[mine]).norm() / want[mine].norm()) < tol, f"rank {rank}: input gradient"


def ep_cases(rank: int, world: int, port: int, cases: list, results) -> None:
    """Run ``cases`` (dicts of _check_case arguments plus ``expect``: substrings of the only EP fallback reasons
    allowed, the first one required) on this rank."""
    try:
        _setup(rank, world, port)
        from moe_fuser.lowering import npu as npu_lowering

        for case in cases:
            case = dict(case)
            if case.pop("fused_moe", False):
                _check_fused_moe(rank, world, **case)
                continue
            expect = case.pop("expect")
            npu_lowering.FALLBACKS.clear()
            _check_case(rank, world, **case)
            got = sorted({why for stage, why in npu_lowering.FALLBACKS if stage == "expert parallel"})
            unexpected = [why for why in got if not any(e in why for e in expect)]
            assert not unexpected and (not expect or any(expect[0] in why for why in got)), \
                f"rank {rank}: expected fallbacks {expect}, got {got}"
        dist.barrier()
        results.put((rank, None))
    except Exception:
        results.put((rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
