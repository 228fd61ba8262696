"""Triton lowering cases, run in Triton's CPU interpreter (TRITON_INTERPRET=1; see test_triton.py).

Every case compares with the plain-PyTorch reference (``impl="reference"``) or the ATen lowering on fresh random
inputs: forward and backward, fp32 / fp16 / bf16, every GLU layout and activation, biases, per-expert lists,
dropped pairs (capacity) and experts that receive no token, both combines. Shapes are small (the interpreter is
~1000x slower than ATen) and block tiles are 16 so that experts span several blocks, slabs and K steps.

bf16: the interpreter computes bf16 ``tl.dot`` wrongly, so the kernels cast bf16 tiles to fp32 before each dot
when interpreted; and its fp32 -> bf16 conversion truncates instead of rounding to nearest (about twice the
rounding error of a GPU), hence bf16's looser tolerance here.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run with TRITON_INTERPRET=1 (tests/lowering/test_triton.py does)", allow_module_level=True)
triton = pytest.importorskip("triton", reason="triton is not installed")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ops"))
from _moe_cases import Case, leaves, rel_err  # noqa: E402

import moe_fuser  # noqa: E402
from moe_fuser import lowering  # noqa: E402
from moe_fuser.kernels import triton_moe, tuning  # noqa: E402
from moe_fuser.lowering.cpu import CpuLowering  # noqa: E402
from moe_fuser.lowering.cuda import TritonLowering  # noqa: E402
from moe_fuser.spec import ExpertSpec  # noqa: E402

CPU = torch.device("cpu")
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 4e-2}


def _tiles(n, k, group):
    return {"BLOCK_N": n, "BLOCK_K": k, "GROUP_M": group, "num_warps": 4, "num_stages": 2}


SMALL = {"BLOCK_M": 16, "gate_up": _tiles(16, 16, 2), "down": _tiles(16, 16, 2), "down_bwd": _tiles(16, 16, 1),
         "dx": _tiles(16, 32, 1), "wgrad": {"BLOCK_M": 16, **_tiles(32, 16, 2)}}


@pytest.fixture
def small_tiles(monkeypatch):
    low = lowering.select("triton", CPU)
    monkeypatch.setattr(low, "configs", SMALL)
    return low


def test_auto_selection_picks_triton_under_the_interpreter():
    assert lowering.select(None, CPU).name == "triton"
    assert triton_moe.INTERPRET


def test_align_is_a_stable_sort_cut_into_blocks():
    E, bm = 7, 16
    ids = torch.randint(0, 5, (53, 3))  # experts 5 and 6 get nothing
    ids[torch.rand(ids.shape) < 0.2] = -1
    ids[0, 0] = E + 2  # outside [0, E): treated as dropped
    al = triton_moe.align(ids.flatten(), E, bm)
    key = torch.where((ids < 0) | (ids >= E), E, ids).flatten()
    assert torch.equal(al.order_N, torch.argsort(key, stable=True))
    counts = torch.bincount(key, minlength=E + 1)
    assert al.starts_G1.tolist() == [0] + torch.cumsum(counts, 0).tolist()
    kept = key < E
    assert torch.equal(al.inv_N[al.order_N].long(), torch.where(kept[al.order_N], torch.arange(key.numel()), -1))
    group, row0, nrows = al.blocks_3B.long()
    used = group >= 0
    assert used.sum() == sum((c + bm - 1) // bm for c in counts.tolist()) and not used[used.sum():].any()
    for g in range(E + 1):
        rows = [r for b in torch.where(group == g)[0].tolist() for r in range(row0[b], row0[b] + nrows[b])]
        assert rows == list(range(al.starts_G1[g], al.starts_G1[g + 1])), g


CASES = [
    Case(T=37, D=32, F=40, E=4, k=2, dtype=torch.float32, glu="separate", activation="silu"),
    Case(T=29, D=48, F=24, E=5, k=2, dtype=torch.float16, glu="concat", activation="gelu", bias=True),
    Case(T=23, D=32, F=40, E=3, k=2, dtype=torch.bfloat16, glu="interleaved", activation="gpt_oss", bias=True),
    Case(T=31, D=24, F=40, E=6, k=3, dtype=torch.float32, glu=None, activation="gelu_tanh", as_list=True),
    Case(T=26, D=32, F=20, E=4, k=1, dtype=torch.float16, glu=None, activation="relu"),
    Case(T=27, D=16, F=24, E=4, k=2, dtype=torch.float32, glu=None, activation="relu2", bias=True),
    Case(T=25, D=32, F=24, E=4, k=2, dtype=torch.bfloat16, glu="concat", activation="silu", limit=1.0),
    Case(T=21, D=16, F=32, E=4, k=2, dtype=torch.float32, glu="separate", activation="gelu_tanh", bias=True),
]


def _name(c):
    return (f"{str(c.dtype)[6:]}-{c.glu}-{c.activation}-E{c.E}k{c.k}" + ("-bias" if c.bias else "")
            + ("-list" if c.as_list else "") + (f"-limit{c.limit}" if c.limit is not None else ""))


def _check_grads(out, ref, ins, dtype):
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, ins, grad, allow_unused=True)
    want = torch.autograd.grad(ref, ins, grad, allow_unused=True)
    for i, (g, w) in enumerate(zip(got, want)):
        if w is None:
            assert g is None or g.abs().max() == 0, i
            continue
        err = (g.double() - w.double()).norm()
        assert err <= 2 * TOL[dtype] * w.double().norm() + 1e-6 * w.numel() ** 0.5, (i, rel_err(g, w))


@pytest.mark.parametrize("case", CASES, ids=_name)
def test_forward_and_backward_match_reference(case, small_tiles):
    x, logits, kw = case.make(requires_grad=True)
    out = moe_fuser.fused_moe(x, logits, **kw, impl="triton")
    ref = moe_fuser.fused_moe(x, logits, **kw, impl="reference")
    assert out.dtype == x.dtype and out.shape == x.shape
    assert rel_err(out, ref) < TOL[case.dtype]
    _check_grads(out, ref, leaves(x, logits, kw), case.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dropped_pairs_and_idle_experts(dtype, small_tiles):
    """Capacity drops pairs (id -1, zero and passthrough); experts 4..7 receive no token at all."""
    case = Case(T=40, D=32, F=24, E=8, k=2, dtype=dtype, glu="concat", activation="silu", bias=True)
    x, logits, kw = case.make(requires_grad=True)
    idle = torch.full((40, 8), 0.0, dtype=dtype)
    idle[:, 4:] = -1e4
    logits = (logits + idle).detach().requires_grad_()
    for dropped in ("zero", "passthrough"):
        args = dict(**kw, capacity=6, dropped=dropped)
        out, stats = moe_fuser.fused_moe(x, logits, **args, impl="triton", return_router_stats=True)
        assert (stats.topk_ids < 0).any() and stats.tokens_per_expert[4:].sum() == 0
        ref = moe_fuser.fused_moe(x, logits, **args, impl="reference")
        assert rel_err(out, ref) < TOL[dtype]
        _check_grads(out, ref, leaves(x, logits, kw), dtype)


@pytest.mark.parametrize("glu", ["separate", "interleaved"])
def test_lowering_contract_matches_aten(glu):
    """The lowering contract, against the ATen lowering: the same out and order, h as defined below, and the same
    backward tuple (each lowering fed its own h); with the default (tuned-data) block config, both combines, and
    external routing with ids -1."""
    T, D, F, E, K = 19, 32, 24, 5, 2
    spec = ExpertSpec(num_experts=E, activation="silu", glu=glu, bias=True)
    H = 2 * F
    x = torch.randn(T, D)
    ids = torch.randint(0, E - 1, (T, K))
    ids[::4, 1] = -1
    weights = torch.rand(T, K)
    w1 = torch.randn(E, F if glu == "separate" else H, D) / D ** 0.5
    w2 = torch.randn(E, D, F) / F ** 0.5
    w3 = torch.randn(E, F, D) / D ** 0.5 if glu == "separate" else None
    b1 = torch.randn(E, w1.shape[1]) * 0.1
    b2 = torch.randn(E, D) * 0.1
    b3 = torch.randn(E, F) * 0.1 if glu == "separate" else None
    ws = (w1, w2, w3, b1, b2, b3)
    cpu = CpuLowering()
    want_out, cpu_h, want_order = cpu.forward(x, weights, ids, *ws, spec)
    grad = torch.randn(T, D)
    want = cpu.backward(grad, x, weights, ids, cpu_h, want_order, *ws, spec, (True, True, True))
    # h: the first projection of the kept rows in sorted order ([gate | up] columns, or w1's own row order for
    # fused gate_up weights), zero in the dropped rows. Only this lowering's backward reads it.
    n = int((ids >= 0).sum())
    pair_n = want_order[:n]
    e_n, x_n = ids.flatten()[pair_n], x[pair_n // K]
    want_h = torch.einsum("nd,nhd->nh", x_n, w1[e_n]) + b1[e_n]
    if glu == "separate":
        want_h = torch.cat([want_h, torch.einsum("nd,nfd->nf", x_n, w3[e_n]) + b3[e_n]], dim=1)
    for combine in ("gather", "atomic"):
        low = TritonLowering(combine=combine)
        out, h, order = low.forward(x, weights, ids, *ws, spec)
        assert torch.equal(order, want_order)
        assert torch.allclose(h[:n], want_h, atol=1e-5) and h[n:].abs().max() == 0
        assert torch.allclose(out, want_out, atol=1e-5)
        got = low.backward(grad, x, weights, ids, h, order, *ws, spec, (True, True, True))
        for i, (g, w) in enumerate(zip(got, want)):
            assert (g is None) == (w is None), i
            if w is not None:
                assert torch.allclose(g, w, atol=1e-4, rtol=1e-4), (i, (g - w).abs().max())
    only_x = TritonLowering().backward(grad, x, weights, ids, h, order, *ws, spec, (True, False, False))
    assert torch.allclose(only_x[0], want[0], atol=1e-4) and all(g is None for g in only_x[1:])


def test_gather_combine_is_deterministic_and_empty_batch_works(small_tiles):
    x, logits, kw = Case(T=33, D=32, F=24, E=4, k=3, dtype=torch.float32).make()
    a = moe_fuser.fused_moe(x, logits, **kw, impl="triton")
    b = moe_fuser.fused_moe(x, logits, **kw, impl="triton")
    assert torch.equal(a, b)
    x, logits, kw = Case(T=0, D=32, F=24, E=4, k=2, dtype=torch.float32).make(requires_grad=True)
    out = moe_fuser.fused_moe(x, logits, **kw, impl="triton")
    grads = torch.autograd.grad(out.sum(), leaves(x, logits, kw), allow_unused=True)
    assert out.shape == (0, 32) and all(g is None or g.abs().sum() == 0 for g in grads)


def test_block_configs_are_data():
    cfg = tuning.block_config(8, 14336, 4096, torch.bfloat16, CPU, T=16)
    assert cfg["BLOCK_M"] == 16
    assert tuning.block_config(8, 14336, 4096, torch.bfloat16, CPU, T=5000)["BLOCK_M"] == 128
    assert tuning.block_config(8, 64, 32, torch.float32, CPU, T=16, override={"BLOCK_M": 32})["BLOCK_M"] == 32
    assert tuning.config_name(8, 14336, 4096, torch.bfloat16, "NVIDIA_H200") == \
        "E=8,N=14336,K=4096,dtype=bfloat16,device=NVIDIA_H200.json"
    configs = Path(tuning.__file__).parent / "configs"
    files = sorted(configs.glob("*.json"))
    assert configs / "default.json" in files
    for f in files:  # every committed file parses and each entry is complete once merged with the default
        table = tuning._load(f.name)
        for T in table:
            tuning.validate_config({**tuning._nearest(tuning._load("default.json"), T), **table[T]})
    with pytest.raises(ValueError, match="BLOCK_M must be a power of two"):
        tuning.block_config(8, 64, 32, torch.float32, CPU, T=16, override={"BLOCK_M": 24})


def test_float64_runs_the_aten_path_both_ways():
    x, logits, kw = Case(T=9, D=8, F=12, E=3, k=2, dtype=torch.float64, bias=True).make(requires_grad=True)
    out = moe_fuser.fused_moe(x, logits, **kw, impl="triton")
    ref = moe_fuser.fused_moe(x, logits, **kw, impl="reference")
    assert rel_err(out, ref) < 1e-12
    ins = leaves(x, logits, kw)
    for i, (g, w) in enumerate(zip(torch.autograd.grad(out.sum(), ins), torch.autograd.grad(ref.sum(), ins))):
        assert rel_err(g, w) < (1e-6 if i == 1 else 1e-10), i  # i == 1: logits, routed in fp32
