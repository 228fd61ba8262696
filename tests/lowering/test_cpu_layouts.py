"""The CPU lowering's two grouping layouts (ragged mm per expert, padded bmm) against the reference."""

import sys
from pathlib import Path

import pytest
import torch

import moe_fuser
from moe_fuser.lowering import cpu
from moe_fuser.lowering.reference import experts_reference
from moe_fuser.ops.experts import _spec, grouped_experts
from moe_fuser.spec import ExpertSpec

sys.path.insert(0, str(Path(__file__).parents[1] / "ops"))
sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
from _common import peak_bytes  # noqa: E402  (the benchmarks' profiler-based peak of live CPU bytes)
from _moe_cases import Case, leaves, rel_err  # noqa: E402


def _padded_rows(monkeypatch, rows: int) -> None:
    """Let the padded layout take up to ``rows`` mean rows per expert, whatever the dtype (0: never)."""
    monkeypatch.setattr(cpu, "PADDED_MAX_MEAN_ROWS", {dt: rows for dt in (torch.float32, torch.bfloat16)})


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("glu,act,bias", [("separate", "silu", False), ("separate", "gelu", True),
                                          ("concat", "gelu_tanh", True), ("interleaved", "gpt_oss", False),
                                          (None, "relu", True), ("concat", "relu2", False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layouts_match_reference(monkeypatch, padded, glu, act, bias, dtype):
    _padded_rows(monkeypatch, 10**9 if padded else 0)
    monkeypatch.setattr(cpu, "PADDED_MAX_WASTE", float("inf"))
    # Forward and backward then stream several expert groups (each group writes / reads its rows of the saved h).
    monkeypatch.setattr(cpu, "TRAIN_STREAM_MIN_ROWS", 1)
    monkeypatch.setattr(cpu, "TRAIN_FORWARD_BUDGET", 0.0)
    monkeypatch.setattr(cpu, "PADDED_STREAM_BYTES", 1)
    used = []
    init = cpu._Grouping.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        used.append(self.padded)

    monkeypatch.setattr(cpu._Grouping, "__init__", spy)
    seen = _streamed(monkeypatch)
    case = Case(T=45, D=24, F=20, E=6, k=3, dtype=dtype, glu=glu, activation=act, bias=bias)
    x, logits, kw = case.make(requires_grad=True)
    out = moe_fuser.fused_moe(x, logits, **kw, impl="cpu")
    assert len(seen) > 1  # the forward that saves for backward streamed
    ref = moe_fuser.fused_moe(x, logits, **kw, impl="reference")
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(out, ref) < tol
    grad = torch.randn_like(out)
    ins = leaves(x, logits, kw)
    for g, w in zip(torch.autograd.grad(out, ins, grad), torch.autograd.grad(ref, ins, grad)):
        assert (g.double() - w.double()).norm() <= 2 * tol * w.double().norm() + 1e-6
    assert used == [padded, padded]  # forward and backward took the layout asked for


@pytest.mark.parametrize("padded,as_list,bias", [(False, False, False), (True, False, False), (False, True, False),
                                                 (False, False, True)])
@pytest.mark.parametrize("glu", ["separate", "concat", None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_kernel_and_aten_agree(monkeypatch, padded, as_list, bias, glu, dtype):
    """SiLU experts run their elementwise work in ``moe_fuser.kernels.cpu_glu`` (the forward's activation; the
    backward's one pass, also where weight lists let go of saved chunks) and, with the kernels unavailable, in
    plain ATen: both match the reference, forward and gradients. With a second-projection bias the kernel leaves
    the activation unweighted (the bias gradient reads the weighted output gradient)."""
    if not cpu.cpu_glu.available():
        pytest.skip("the native kernels are not built here (tests/kernels/test_cpu_glu.py says why)")
    _padded_rows(monkeypatch, 10**9 if padded else 0)
    monkeypatch.setattr(cpu, "PADDED_MAX_WASTE", float("inf"))
    monkeypatch.setattr(cpu, "TRAIN_STREAM_MIN_ROWS", 1)
    calls = []
    for name in ("silu_glu", "silu_backward"):
        fn = getattr(cpu.cpu_glu, name)
        monkeypatch.setattr(cpu.cpu_glu, name, lambda *a, fn=fn, name=name, **k: calls.append(name) or fn(*a, **k))
    x, logits, kw = Case(T=45, D=24, F=20, E=6, k=3, dtype=dtype, glu=glu, as_list=as_list,
                         bias=bias).make(requires_grad=True)
    ref = moe_fuser.fused_moe(x, logits, **kw, impl="reference")
    grad = torch.randn_like(ref)
    ins = leaves(x, logits, kw)
    want = torch.autograd.grad(ref, ins, grad)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for kernel in (True, False):
        if not kernel:
            monkeypatch.setattr(cpu, "_silu_kernel", lambda *a: False)
        calls.clear()
        out = moe_fuser.fused_moe(x, logits, **kw, impl="cpu")
        assert rel_err(out, ref) < tol
        for g, w in zip(torch.autograd.grad(out, ins, grad), want):
            assert (g.double() - w.double()).norm() <= 2 * tol * w.double().norm() + 1e-6
        assert set(calls) == ({"silu_glu", "silu_backward"} if kernel else set())


@pytest.mark.parametrize("as_list", [False, True])
@pytest.mark.parametrize("glu", ["separate", None])
def test_native_gemms_and_torch_mm_agree(monkeypatch, as_list, glu):
    """Float32 expert GEMMs of a ragged group (both projections, the input gradient, accumulated for separate
    w1/w3, and the weight gradients) run in ``moe_fuser.kernels.cpu_gemm``, one call per group and GEMM, and, where
    it declines, one ``torch.mm`` per expert: both match the reference, forward and gradients."""
    if not cpu.cpu_gemm.available():
        pytest.skip("the native library is not built here (tests/kernels/test_cpu_gemm.py says why)")
    _padded_rows(monkeypatch, 0)
    monkeypatch.setattr(cpu, "TRAIN_STREAM_MIN_ROWS", 1)
    ran = []
    native = cpu.cpu_gemm.mm
    monkeypatch.setattr(cpu.cpu_gemm, "mm", lambda items, accumulate=False: ran.append((len(items), accumulate))
                        or native(items, accumulate))
    x, logits, kw = Case(T=45, D=24, F=20, E=6, k=3, dtype=torch.float32, glu=glu,
                         as_list=as_list).make(requires_grad=True)
    ref = moe_fuser.fused_moe(x, logits, **kw, impl="reference")
    grad = torch.randn_like(ref)
    ins = leaves(x, logits, kw)
    want = torch.autograd.grad(ref, ins, grad)
    for on in (True, False):
        if not on:
            monkeypatch.setattr(cpu.cpu_gemm, "mm", lambda items, accumulate=False: False)
        ran.clear()
        out = moe_fuser.fused_moe(x, logits, **kw, impl="cpu")
        assert rel_err(out, ref) < 1e-5
        for g, w in zip(torch.autograd.grad(out, ins, grad), want):
            assert (g.double() - w.double()).norm() <= 2e-5 * w.double().norm() + 1e-6
        assert bool(ran) == on and (not on or (glu == "separate") == any(acc for _, acc in ran))


@pytest.mark.parametrize("batched", [False, True])
def test_mixed_precision_weight_grads_through_small_temporaries(batched):
    """Under mixed precision a weight gradient's bf16 product reaches its fp32 buffer through temporaries of
    1/MIXED_WGRAD_PIECES of it, for ``mm`` (row slices) and ``bmm`` (expert slices): one whole product next to the
    fresh gradient put the Switch layer's autocast training peak above inductor's. The result is the product."""
    E = 16 if batched else 1
    a, b = (torch.randn(E, 96, n, dtype=torch.bfloat16) for n in (64, 80))
    out = torch.empty(E, 64, 80)
    mm, args = (torch.bmm, (a.transpose(1, 2), b, out)) if batched else (torch.mm, (a[0].t(), b[0], out[0]))
    peak = peak_bytes(lambda: cpu._mm_into(mm, *args))
    assert 0 < peak <= out.numel() * 2 / cpu.MIXED_WGRAD_PIECES   # bf16: 2 bytes per element
    assert rel_err(out, a.float().transpose(1, 2) @ b.float()) < 1e-2


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("as_list", [False, True])
def test_combine_dtype_weights_and_sums_in_it(monkeypatch, padded, as_list):
    """bf16 experts with ``combine_dtype=float32`` (a loop under autocast adding bf16 expert outputs times fp32
    routing weights into an fp32 buffer): the op forms and sums the weighted outputs in fp32, as the reference
    does, forward and training forward; gradients as the reference's to bf16 precision. Summing in bf16 instead
    is ~1e-3 off, which the test would see."""
    _padded_rows(monkeypatch, 10**9 if padded else 0)
    monkeypatch.setattr(cpu, "PADDED_MAX_WASTE", float("inf"))
    x, logits, kw = Case(T=45, D=24, F=20, E=6, k=3, dtype=torch.bfloat16, glu="separate",
                         as_list=as_list).make(requires_grad=True)
    tw, ti = logits.float().softmax(-1).topk(3)
    ws = (kw["w1"], kw["w2"], kw["w3"])
    spec = ExpertSpec(6, glu="separate", combine_dtype=torch.float32)
    ref = experts_reference(x, tw, ti, *ws, None, None, None, spec)
    with torch.no_grad():
        assert rel_err(grouped_experts(x, tw, ti, *ws, spec=spec, impl="cpu"), ref) < 1e-6
        assert rel_err(grouped_experts(x, tw, ti, *ws, spec=ExpertSpec(6, glu="separate"), impl="cpu"), ref) > 1e-4
    out = grouped_experts(x, tw, ti, *ws, spec=spec, impl="cpu")
    assert out.dtype == torch.float32 and rel_err(out, ref) < 1e-6
    grad = torch.randn_like(out)
    ins = leaves(x, logits, kw)
    got = torch.autograd.grad(out, ins, grad, retain_graph=True)   # the routing is shared with ref
    for g, w in zip(got, torch.autograd.grad(ref, ins, grad)):
        assert g.dtype == w.dtype and rel_err(g, w) < 2e-2


def test_combine_dtype_on_a_lowering_without_it(monkeypatch):
    """A lowering without ``combine_dtypes`` (triton, npu) sums in the compute dtype; the op casts its output to
    the combine dtype and its output gradient back (the CPU lowering stands in, its support switched off)."""
    monkeypatch.setattr(cpu.CpuLowering, "combine_dtypes", False)
    x, logits, kw = Case(T=29, D=24, F=20, E=5, k=2, dtype=torch.bfloat16, glu="separate").make(requires_grad=True)
    tw, ti = logits.float().softmax(-1).topk(2)
    ws = (kw["w1"], kw["w2"], kw["w3"])
    spec = ExpertSpec(5, glu="separate", combine_dtype=torch.float32)
    out = grouped_experts(x, tw, ti, *ws, spec=spec, impl="cpu")
    ref = experts_reference(x, tw, ti, *ws, None, None, None, spec)
    assert out.dtype == torch.float32 and 0 < rel_err(out, ref) < 2e-2
    grad = torch.randn_like(out)
    ins = leaves(x, logits, kw)
    got = torch.autograd.grad(out, ins, grad, retain_graph=True)
    for g, w in zip(got, torch.autograd.grad(ref, ins, grad)):
        assert g.dtype == w.dtype and rel_err(g, w) < 2e-2


def test_padded_layout_needs_every_expert_active():
    ids = torch.tensor([[0, 1], [1, 0], [0, 1]])
    bf16 = torch.bfloat16
    assert not cpu._Grouping(ids, 4, stacked=True, dtype=bf16).padded  # experts 2, 3 idle: their weights unread
    assert cpu._Grouping(ids, 2, stacked=True, dtype=bf16).padded
    assert not cpu._Grouping(ids, 2, stacked=False, dtype=bf16).padded  # per-expert lists are never stacked


def test_padded_layout_rows_per_expert_depend_on_dtype():
    """32 rows per expert: padded for bf16 (its batched GEMM beats per-expert mm there), ragged for fp32 (whose
    batched GEMM is no faster per row, so the padding would be pure waste) and never for fp16."""
    ids = torch.arange(4).repeat_interleave(32).view(-1, 1)
    assert cpu._Grouping(ids, 4, stacked=True, dtype=torch.bfloat16).padded
    assert not cpu._Grouping(ids, 4, stacked=True, dtype=torch.float32).padded
    assert not cpu._Grouping(ids, 4, stacked=True, dtype=torch.float16).padded
    assert cpu._Grouping(ids[::2], 4, stacked=True, dtype=torch.float32).padded   # 16 rows each


def _streamed(monkeypatch) -> list:
    """Record the (padded?, experts, rows) of each expert group the lowering streams."""
    seen = []
    groups = cpu._Grouping.groups

    def spy(self, *args):
        subs = groups(self, *args)
        seen.extend((sub.padded, len(sub.segs), sub.n) for sub in subs)
        return subs

    monkeypatch.setattr(cpu._Grouping, "groups", spy)
    return seen


def _inference_matches_reference(case: Case):
    """fused_moe(impl="cpu") without grad equals the reference on the case's fresh inputs, which it returns."""
    x, logits, kw = case.make()
    with torch.no_grad():
        out = moe_fuser.fused_moe(x, logits, **kw, impl="cpu")
    assert rel_err(out, moe_fuser.fused_moe(x, logits, **kw, impl="reference")) < 1e-5
    return x, logits, kw


@pytest.mark.parametrize("as_list", [True, False])
@pytest.mark.parametrize("glu,bias", [("separate", False), ("concat", True), (None, True)])
def test_inference_streams_expert_groups(monkeypatch, glu, bias, as_list):
    """Without grad the ragged layout runs expert groups one after another: for weight lists (a loop over experts
    replaced) each within the largest expert's rows; for stacked weights within what the first projection's
    output and the activation of all T*K pairs take (H + F elements a pair), which the code such weights come
    from holds at once, so several experts per group. Rows of xs, h and y count (the activation overwrites h)."""
    _padded_rows(monkeypatch, 0)
    monkeypatch.setattr(cpu, "INFER_STREAM_MIN_BYTES", 0)
    seen = _streamed(monkeypatch)
    T, D, F_ = 60, 24, 20
    _, logits, _ = _inference_matches_reference(Case(T=T, D=D, F=F_, E=7, k=2, dtype=torch.float32, glu=glu,
                                                     bias=bias, as_list=as_list))
    assert len(seen) > 1 and sum(n for _, _, n in seen) == 2 * T and not any(p for p, _, _ in seen)
    counts = torch.bincount(logits.softmax(-1).topk(2).indices.flatten(), minlength=7)
    if as_list:
        assert max(n for _, _, n in seen) <= counts.max()
        return
    H = 2 * F_ if glu else F_
    budget_rows = 2 * T * (H + F_) // (2 * D + H)
    assert budget_rows > counts.max() and counts.max() < max(n for _, _, n in seen) <= budget_rows


def test_stacked_weights_infer_all_pairs_at_once_with_grouped_mm(monkeypatch):
    """Stacked fp32 weights whose pairs fit the budget above run as one group, each projection one call for all
    experts, equal to the reference: the native GEMMs where they run, else torch._grouped_mm (not one mm per
    expert); bf16 weights stored [in, out] (where its CPU kernel is slow) and biased projections keep one mm per
    expert."""
    _padded_rows(monkeypatch, 0)
    seen, calls, native = _streamed(monkeypatch), [], []
    grouped_mm, gemms = torch._grouped_mm, cpu.cpu_gemm.mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: (calls.append(a[0].shape), grouped_mm(*a, **k))[1])
    monkeypatch.setattr(cpu.cpu_gemm, "mm", lambda items, accumulate=False: native.append(len(items)) or
                        gemms(items, accumulate))
    case = Case(T=40, D=16, F=32, E=6, k=2, dtype=torch.float32, glu="concat")
    if cpu.cpu_gemm.available():
        _inference_matches_reference(case)
        assert [n for _, _, n in seen] == [80] and calls == [] and native == [6, 6]
        monkeypatch.setattr(cpu, "_native_gemms", lambda dtype: False)
        seen.clear()
    _inference_matches_reference(case)
    assert [n for _, _, n in seen] == [80] and calls == [(80, 16), (80, 32)]
    calls.clear()
    _inference_matches_reference(Case(T=40, D=16, F=32, E=6, k=2, dtype=torch.float32, glu="concat", bias=True))
    assert calls == []
    bf16 = torch.bfloat16
    rows, ws = torch.randn(8, 16, dtype=bf16), torch.randn(3, 32, 16, dtype=bf16)
    assert cpu._grouped_mm_fits(rows, ws.transpose(1, 2)) and not cpu._grouped_mm_fits(rows, ws.transpose(1, 2)
                                                                                      .contiguous())
    assert cpu._grouped_mm_fits(rows.float(), ws.transpose(1, 2).contiguous().float())
    assert not cpu._grouped_mm_fits(rows[:, 1:], ws[:, :, 1:].transpose(1, 2))   # 16-byte strides only
    assert not cpu._grouped_mm_fits(rows, [w.t() for w in ws])   # per-expert lists: never stacked


def test_inference_lets_go_of_the_first_projection_before_the_combine(monkeypatch):
    """Inference over stacked weights in one group holds at most the first projection's output (which the
    activation overwrites) and the second's at once, N * (H + D) elements and a few small routing tensors: the
    activation is let go of before the combine allocates the [T, D] output (which it did not, in a Mixtral
    forward under autocast: 7.7 against inductor's 7.5 MiB)."""
    _padded_rows(monkeypatch, 0)
    seen = _streamed(monkeypatch)
    T, D, F, k = 256, 128, 128, 2
    x, logits, kw = Case(T=T, D=D, F=F, E=4, k=k, dtype=torch.float32, glu="concat").make()
    with torch.no_grad():
        peak = peak_bytes(lambda: moe_fuser.fused_moe(x, logits, **kw, impl="cpu"))
    assert len(seen) == 1
    assert peak < 4 * (T * k * (2 * F + D) + T * D // 2)   # fp32; the output alone would add T * D

@pytest.mark.parametrize("wide", [False, True])
def test_inference_groups_tiny_experts_within_the_output_size(monkeypatch, wide):
    """Tiny experts of a weight list with narrow rows share a group whose temporaries (rows of xs, h and y: 2D + 2F
    elements for a GLU whose activation overwrites h) fit in the [T, D] output; wide rows (decode: F >> D) go one
    expert at a time (without the bytes every group may hold, see the next test)."""
    _padded_rows(monkeypatch, 0)
    monkeypatch.setattr(cpu, "INFER_STREAM_MIN_BYTES", 0)
    seen = _streamed(monkeypatch)
    T, D, F_, E = (6, 16, 96, 4) if wide else (64, 32, 8, 32)
    _, logits, _ = _inference_matches_reference(Case(T=T, D=D, F=F_, E=E, k=2, dtype=torch.float32,
                                                     glu="separate", as_list=True))
    counts = torch.bincount(logits.softmax(-1).topk(2).indices.flatten(), minlength=E)
    budget_rows = T * D // (2 * D + 2 * F_)
    assert sum(n for _, _, n in seen) == 2 * T
    assert all(n <= max(int(counts.max()), budget_rows) for _, _, n in seen)
    if wide:
        assert budget_rows == 0 and len(seen) == int((counts > 0).sum())   # one group per active expert
    else:
        assert budget_rows > counts.max() and len(seen) > 1
        assert max(n for _, _, n in seen) > counts.max()   # several experts per group, beyond the largest's rows


def test_inference_groups_up_to_the_minimum_bytes(monkeypatch):
    """Decode-like rows (a few tokens, F >> D) of a weight list whose temporaries together fit in
    INFER_STREAM_MIN_BYTES run as one group, not one per expert; beyond it the groups stay within it."""
    _padded_rows(monkeypatch, 0)
    seen = _streamed(monkeypatch)
    case = Case(T=6, D=16, F=96, E=4, k=2, dtype=torch.float32, glu="separate", as_list=True)
    _inference_matches_reference(case)
    assert [n for _, _, n in seen] == [12]
    row_bytes = (2 * 16 + 2 * 96) * 4
    monkeypatch.setattr(cpu, "INFER_STREAM_MIN_BYTES", 5 * row_bytes)
    seen.clear()
    _, logits, _ = _inference_matches_reference(case)
    counts = torch.bincount(logits.softmax(-1).topk(2).indices.flatten(), minlength=4)
    assert sum(n for _, _, n in seen) == 12 and len(seen) > 1
    assert all(n <= max(5, int(counts.max())) for _, _, n in seen)


def test_training_forward_groups_within_the_saved_size(monkeypatch):
    """The training forward of stacked weights runs groups whose temporaries (rows of xs, then a and y: D + F
    elements) stay within TRAIN_FORWARD_BUDGET times the saved h (H elements per row): one group at 1.0 for a GLU
    (H = 2F >= D + F here), groups of the largest expert's rows at 0; the backward streams its own groups. Both
    equal to the reference."""
    _padded_rows(monkeypatch, 0)
    monkeypatch.setattr(cpu, "TRAIN_STREAM_MIN_ROWS", 1)
    seen = _streamed(monkeypatch)
    case = Case(T=64, D=16, F=24, E=8, k=2, dtype=torch.float32, glu="concat")
    x, logits, kw = case.make(requires_grad=True)
    counts = torch.bincount(logits.softmax(-1).topk(2).indices.flatten(), minlength=8)
    for budget in (1.0, 0.0):
        monkeypatch.setattr(cpu, "TRAIN_FORWARD_BUDGET", budget)
        seen.clear()
        out = moe_fuser.fused_moe(x, logits, **kw, impl="cpu")
        assert sum(n for _, _, n in seen) == 128
        assert len(seen) == 1 if budget else (len(seen) > 1 and all(n <= counts.max() for _, _, n in seen))
        ref = moe_fuser.fused_moe(x, logits, **kw, impl="reference")
        assert rel_err(out, ref) < 1e-5
        grad = torch.randn_like(out)
        ins = leaves(x, logits, kw)
        for g, w in zip(torch.autograd.grad(out, ins, grad), torch.autograd.grad(ref, ins, grad)):
            assert rel_err(g, w) < 1e-5

@pytest.mark.parametrize("as_list", [False, True])
@pytest.mark.parametrize("glu", ["concat", "separate", None])
def test_spent_backward_writes_over_the_saved_rows(monkeypatch, glu, as_list):
    """A backward that autograd will not run again writes the silu's gradient over the saved rows (no buffer)
    and so streams groups widened by (D + F + H) / (D + F); with retain_graph it leaves them intact (a second
    backward is equal) and keeps the groups of one expert. Gradients equal the reference's every time."""
    if not cpu.cpu_glu.available():
        pytest.skip("the native kernels are not built here (tests/kernels/test_cpu_glu.py says why)")
    _padded_rows(monkeypatch, 0)
    monkeypatch.setattr(cpu, "TRAIN_STREAM_MIN_ROWS", 1)
    groups, over = [], []
    ffn_backward, silu_backward = cpu._ffn_backward, cpu.cpu_glu.silu_backward

    def spy_group(G, *args):
        groups.append((G.n, args[-1]))   # the last: whether the saved rows may be overwritten
        return ffn_backward(G, *args)

    def spy_kernel(gate, up, dA, weight, a, d_gate, d_up, *args):
        over.append(d_gate.data_ptr() == gate.data_ptr())
        return silu_backward(gate, up, dA, weight, a, d_gate, d_up, *args)

    monkeypatch.setattr(cpu, "_ffn_backward", spy_group)
    monkeypatch.setattr(cpu.cpu_glu, "silu_backward", spy_kernel)
    D, F, E = 8, 32, 6   # widened groups of two experts, even for a plain silu
    x, logits, kw = Case(T=45, D=D, F=F, E=E, k=3, dtype=torch.float32, glu=glu,
                         as_list=as_list).make(requires_grad=True)
    ref = moe_fuser.fused_moe(x, logits, **kw, impl="reference")
    grad = torch.randn_like(ref)
    ins = leaves(x, logits, kw)
    want = torch.autograd.grad(ref, ins, grad)
    counts = torch.bincount(logits.softmax(-1).topk(3).indices.flatten(), minlength=E).tolist()
    widen = (D + F + (2 * F if glu else F)) / (D + F)
    out = moe_fuser.fused_moe(x, logits, **kw, impl="cpu")
    for retain in (True, True, False):
        groups.clear()
        over.clear()
        for g, w in zip(torch.autograd.grad(out, ins, grad, retain_graph=retain), want):
            assert rel_err(g, w) < 1e-5
        assert over and set(over) == {not retain} and {o for _, o in groups} == {not retain}
        assert sum(n for n, _ in groups) == 135
        if retain:   # groups of at most the largest expert's rows: one expert each here
            assert len(groups) == sum(c > 0 for c in counts)
        else:
            assert all(n <= int(max(counts) * widen) for n, _ in groups)
            assert as_list or len(groups) < sum(c > 0 for c in counts)

@pytest.mark.parametrize("glu,bias", [("separate", True), ("concat", False), (None, True)])
def test_padded_layout_streams_groups_of_experts(monkeypatch, glu, bias):
    """The padded layout runs several experts per bmm, in groups whose gathered rows fill at most
    PADDED_STREAM_BYTES (each group padded to its own largest expert), inference and backward, equal to the
    reference."""
    _padded_rows(monkeypatch, 10**9)
    monkeypatch.setattr(cpu, "PADDED_MAX_WASTE", float("inf"))
    monkeypatch.setattr(cpu, "PADDED_STREAM_BYTES", 40 * 24 * 4)  # 40 rows of D=24 fp32
    seen = _streamed(monkeypatch)
    x, logits, kw = _inference_matches_reference(Case(T=61, D=24, F=20, E=9, k=2, dtype=torch.float32, glu=glu,
                                                      bias=bias))
    counts = torch.bincount(logits.softmax(-1).topk(2).indices.flatten(), minlength=9)
    per = max(1, 40 // int(counts.max()))
    assert all(p for p, _, _ in seen) and [e for _, e, _ in seen][:-1] == [per] * (len(seen) - 1) and len(seen) > 1
    assert sum(n for _, _, n in seen) == 122
    seen.clear()
    xg, lg = x.clone().requires_grad_(), logits.clone().requires_grad_()
    wk = {k: v.clone().requires_grad_() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    out = moe_fuser.fused_moe(xg, lg, **wk, impl="cpu")
    ref = moe_fuser.fused_moe(xg, lg, **wk, impl="reference")
    grad = torch.randn_like(out)
    ins = leaves(xg, lg, wk)
    for g, w in zip(torch.autograd.grad(out, ins, grad), torch.autograd.grad(ref, ins, grad)):
        assert rel_err(g, w) < 1e-5
    assert len(seen) > 1 and all(p for p, _, _ in seen)  # the backward streamed padded groups


def _training_step_matches_reference(x, logits, kw, retain: bool = False):
    """Forward + backward of fused_moe(impl="cpu") equal to the reference's; with ``retain``, two backward passes
    through the same graph, both equal."""
    out = moe_fuser.fused_moe(x, logits, **kw, impl="cpu")
    ref = moe_fuser.fused_moe(x, logits, **kw, impl="reference")
    assert rel_err(out, ref) < 1e-5
    grad = torch.randn_like(out)
    ins = leaves(x, logits, kw)
    want = torch.autograd.grad(ref, ins, grad)
    for _ in range(2 if retain else 1):
        got = torch.autograd.grad(out, ins, grad, retain_graph=retain, allow_unused=True)
        for g, w in zip(got, want):   # None: an idle expert's weight (the reference's gradient is zero)
            assert w.abs().max() == 0 if g is None else rel_err(g, w) < 1e-5
    return out, grad, ins


@pytest.mark.parametrize("glu,act,bias", [("separate", "silu", False), ("concat", "gelu", True),
                                          (None, "relu", True)])
def test_weight_lists_save_in_chunks_and_let_go(monkeypatch, glu, act, bias):
    """Per-expert weight lists: the training forward saves h as one tensor per range of experts (some empty:
    idle experts), the backward lets go of each once used, unless the graph is retained; gradients equal the
    reference's either way, and a backward through an already released graph says what to do."""
    saved, released = [], []
    forward, release = cpu.CpuLowering.forward, cpu._release

    def spy_forward(self, *args, chunks=1, **kwargs):
        out = forward(self, *args, chunks=chunks, **kwargs)
        saved.append([h.shape[0] for h in out[1]] if chunks > 1 else None)
        return out

    monkeypatch.setattr(cpu.CpuLowering, "forward", spy_forward)
    monkeypatch.setattr(cpu, "_release", lambda t: (released.append(t.shape[0]), release(t)))
    case = Case(T=9, D=24, F=20, E=11, k=2, dtype=torch.float32, glu=glu, activation=act, bias=bias,
                as_list=True)
    x, logits, kw = case.make(requires_grad=True)
    _training_step_matches_reference(x, logits, kw, retain=True)
    assert released == []  # retained: every chunk stays for the next backward
    ids = logits.softmax(-1).topk(2).indices.flatten()
    counts = torch.bincount(ids, minlength=11).tolist()
    want = [sum(counts[lo:hi]) for lo, hi in cpu.expert_chunks(11, cpu.MAX_SAVE_CHUNKS)]
    assert len(want) == 8 and 0 in want
    assert saved[0] == want
    _training_step_matches_reference(x, logits, kw)
    assert sorted(released, reverse=True) == released == sorted([n for n in want if n], reverse=True)
    # The lowering's backward handed a chunk already let go of says what to do.
    low, spec = cpu.CpuLowering(), _spec(11, act, glu or "", bias, 1.702, float("inf"))
    weights, ids = logits.detach().softmax(-1).topk(2)
    ws = [kw.get(name) for name in ("w1", "w2", "w3", "b1", "b2", "b3")]
    with torch.no_grad():
        out, hs, order = low.forward(x, weights, ids, *ws, spec, chunks=8)
        cpu._release(hs[want.index(max(want))])
        with pytest.raises(RuntimeError, match="retain_graph=True"):
            low.backward(torch.randn_like(out), x, weights, ids, hs, order, *ws, spec, (True, True, True))


@pytest.mark.parametrize("glu", [None, "separate"])
def test_weight_lists_training_peak_memory(monkeypatch, glu):
    """Saving h per expert and letting go of it during the backward keeps a ModuleList-style training step's peak
    near its gradients: below the same step with h saved whole, by most of h."""
    case = Case(T=256, D=64, F=256, E=8, k=2, dtype=torch.float32, glu=glu, as_list=True)
    x, logits, kw = case.make(requires_grad=True)
    ins = leaves(x, logits, kw)

    def step():
        moe_fuser.fused_moe(x, logits, **kw, impl="cpu").sum().backward()
        for t in ins:
            t.grad = None

    step()
    chunked = peak_bytes(step)
    monkeypatch.setattr(cpu, "MAX_SAVE_CHUNKS", 1)
    step()
    whole = peak_bytes(step)
    h_bytes = case.T * case.k * case.F * (2 if glu else 1) * 4
    assert chunked < whole - 0.6 * h_bytes, (chunked, whole, h_bytes)
