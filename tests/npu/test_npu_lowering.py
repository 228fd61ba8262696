"""The npu lowering, run through the torch_npu emulator, against ``impl="reference"``: forward and backward.

Every test compares on fresh random inputs and also asserts which path ran: ``FALLBACKS`` counts each decision
to leave the fused ops, so a test of the fused path fails if the lowering quietly fell back to ATen.
"""

import types

import pytest
import torch

import moe_fuser
from moe_fuser import lowering
from moe_fuser.lowering import npu as npu_lowering
from moe_fuser.spec import ExpertSpec, MoESpec, RouterSpec

TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float64: 1e-10}


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def make(T, D, F, E, k, dtype, glu="separate", activation="silu", bias=False, as_list=False, router=None):
    H = 2 * F if glu in ("concat", "interleaved") else F

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape) * scale).to(dtype).requires_grad_()

    def experts(out, inp):
        return [rnd(out, inp, scale=inp ** -0.5) for _ in range(E)] if as_list else rnd(E, out, inp, scale=inp ** -0.5)

    x, logits = rnd(T, D), rnd(T, E)
    kw = dict(w1=experts(H, D), w2=experts(D, F), top_k=k, activation=activation, **(router or {}))
    if glu == "separate":
        kw["w3"] = experts(F, D)
    elif glu:
        kw["gate_up"] = glu
    if bias:
        kw.update(b1=rnd(E, H, scale=0.1), b2=rnd(E, D, scale=0.1))
        if glu == "separate":
            kw["b3"] = rnd(E, F, scale=0.1)
    return x, logits, kw


def leaves(x, logits, kw):
    out = [x, logits]
    for name in ("w1", "w2", "w3", "b1", "b2", "b3"):
        v = kw.get(name)
        if v is not None:
            out.extend(v if isinstance(v, list) else [v])
    return out


def assert_matches_reference(x, logits, kw, dtype, **extra):
    out = moe_fuser.fused_moe(x, logits, **kw, **extra, impl="npu")
    ref = moe_fuser.fused_moe(x, logits, **kw, **extra, impl="reference")
    assert out.dtype == x.dtype and out.shape == x.shape
    assert rel(out, ref) < TOL[dtype]
    grad = torch.randn_like(out)
    ins = leaves(x, logits, kw)
    got = torch.autograd.grad(out, ins, grad, allow_unused=True)
    want = torch.autograd.grad(ref, ins, grad, allow_unused=True)
    for i, (g, w) in enumerate(zip(got, want)):
        err = (g.double() - w.double()).norm()
        assert err <= 2 * TOL[dtype] * w.double().norm() + 1e-6 * w.numel() ** 0.5, f"gradient of input {i}"


@pytest.fixture
def fallbacks():
    npu_lowering.FALLBACKS.clear()
    return npu_lowering.FALLBACKS


@pytest.mark.parametrize("glu,act,bias,as_list,dtype", [
    ("separate", "silu", False, False, torch.float32),
    ("separate", "silu", True, True, torch.float32),
    ("concat", "silu", True, False, torch.bfloat16),
    (None, "gelu", True, False, torch.float32),
    ("interleaved", "gpt_oss", False, True, torch.float16),
    ("concat", "gelu_tanh", False, False, torch.float32),
])
def test_fused_ops_match_reference_forward_and_backward(glu, act, bias, as_list, dtype, fallbacks):
    x, logits, kw = make(T=13, D=24, F=20, E=6, k=2, dtype=dtype, glu=glu, activation=act, bias=bias,
                         as_list=as_list)
    assert_matches_reference(x, logits, kw, dtype)
    assert not any(stage in ("experts", "routing") for stage, _ in fallbacks)


@pytest.mark.parametrize("router", [
    dict(renormalize=False, routed_scaling_factor=1.5),
    dict(topk_first=True),
    dict(scoring="sigmoid", num_groups=4, topk_groups=2, group_score="top2_sum", routed_scaling_factor=2.5),
    dict(scoring="sigmoid", num_groups=1),
    dict(num_groups=4, topk_groups=2, group_score="max"),
])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gating_ops_route_like_route_and_pass_the_logit_gradient(router, with_bias, fallbacks):
    if with_bias and router.get("topk_first"):
        pytest.skip("a selection bias needs a router that selects on scores (topk_first refuses it)")
    x, logits, kw = make(T=17, D=16, F=12, E=16, k=3, dtype=torch.float32, router=router)
    extra = dict(selection_bias=torch.randn(16) * 0.1) if with_bias else {}
    assert_matches_reference(x, logits, kw, torch.float32, **extra)
    assert not fallbacks


def test_capacity_drops_become_a_zero_weighted_last_group(fallbacks):
    x, logits, kw = make(T=24, D=16, F=12, E=4, k=2, dtype=torch.float32, bias=True)
    for dropped in ("zero", "passthrough"):
        assert_matches_reference(x, logits, kw, torch.float32, capacity=5, dropped=dropped, capacity_groups=2)
    assert not fallbacks


def test_both_finalize_index_layouts_agree(monkeypatch):
    """CHOICES is the one place for version-dependent arguments: the row-major index (drop_pad_mode=2, newer
    releases) gives the same result as the portable column-major one."""
    x, logits, kw = make(T=9, D=8, F=10, E=5, k=3, dtype=torch.float32, bias=True)
    portable = moe_fuser.fused_moe(x, logits, **kw, impl="npu")
    monkeypatch.setattr(npu_lowering, "CHOICES", npu_lowering.OpChoices(finalize_drop_pad_mode=2))
    assert_matches_reference(x, logits, kw, torch.float32)
    torch.testing.assert_close(moe_fuser.fused_moe(x, logits, **kw, impl="npu"), portable)


def test_violated_constraints_fall_back_and_say_why(fallbacks):
    x, logits, kw = make(T=6, D=8, F=6, E=4, k=2, dtype=torch.float64, bias=True)
    assert_matches_reference(x, logits, kw, torch.float64)
    assert {stage for stage, _ in fallbacks} == {"experts", "routing"}
    assert any("float64" in why for _, why in fallbacks)
    fallbacks.clear()
    x, logits, kw = make(T=6, D=8, F=6, E=4, k=2, dtype=torch.float32,
                         router=dict(scoring="sigmoid", renormalize=False))
    assert_matches_reference(x, logits, kw, torch.float32)
    assert list(fallbacks) == [("routing", "sigmoid router without renormalisation: npu_moe_gating_top_k always "
                                           "renormalises sigmoid weights")]
    fallbacks.clear()
    x, logits, kw = make(T=6, D=8, F=6, E=4, k=2, dtype=torch.float32,
                         router=dict(scoring="sigmoid", topk_first=True, renormalize=False))
    assert_matches_reference(x, logits, kw, torch.float32)
    assert list(fallbacks) == [("routing", "top-k of the logits then a sigmoid of the k (Llama 4): no gating op "
                                           "computes it")]


def test_a_top1_by_max_routes_on_aten():
    """A model's max/argmax top-1 gives ties to the lowest expert id; the gating op's tie order is topk's, so such
    a router (RouterSpec.first_max, set by the compiler) stays on ATen, saying why."""
    plan, why = npu_lowering.route_plan(RouterSpec(top_k=1, first_max=True), 8, torch.float32, False)
    assert plan is None and "max/argmax" in why[0]
    assert npu_lowering.route_plan(RouterSpec(top_k=1), 8, torch.float32, False)[0] is not None


def test_a_bias_in_another_dtype_routes_on_aten(fallbacks):
    """bf16 scores plus an fp32 correction bias (a model under autocast) select in fp32; the gating op, which takes
    the bias in the scores' dtype, would round it, so routing stays on ATen and says why."""
    x, logits, kw = make(T=17, D=16, F=12, E=16, k=3, dtype=torch.bfloat16,
                         router=dict(scoring="sigmoid", num_groups=4, topk_groups=2, group_score="top2_sum",
                                     router_dtype=None))
    assert_matches_reference(x, logits, kw, torch.bfloat16, selection_bias=torch.randn(16) * 0.1)
    (stage, why), = fallbacks
    assert stage == "routing" and "would round the bias" in why, why


def test_explain_constraints_lists_each_fallback():
    deepseek_tiny = MoESpec(RouterSpec(top_k=2, scoring="sigmoid", num_groups=2, topk_groups=1, selection_bias=True),
                            ExpertSpec(num_experts=4, glu="separate"))
    lines = npu_lowering.explain_constraints(deepseek_tiny, dtype=torch.bfloat16, hidden_size=64, ffn_size=32)
    assert lines == ["routing -> ATen route(): npu_moe_gating_top_k needs more than 2 experts per group (E=4, "
                     "groups=2)"]
    mixtral = MoESpec(RouterSpec(top_k=2), ExpertSpec(num_experts=8, glu="separate"))
    assert npu_lowering.explain_constraints(mixtral, dtype=torch.bfloat16, hidden_size=4096, ffn_size=14336) == []
    lines = npu_lowering.explain_constraints(
        MoESpec(RouterSpec(top_k=2), ExpertSpec(num_experts=200, activation="gelu")), dtype=torch.float32,
        hidden_size=64, ffn_size=70000, weights_as_list=True, ep_world_size=3, training=True, soc="A3")
    assert any(line.startswith("experts -> ATen lowering 'cpu': 200 per-expert") for line in lines)
    assert any("H >= 65536" in line for line in lines)
    ep = [line for line in lines if line.startswith("expert parallel")]
    assert any("inference only" in line for line in ep) and any("divisible" in line for line in ep)
    assert any("float32" in line for line in ep)
    # a compiled EP layer's spec counts its local experts: MC2 is judged on the global E and the placement
    local = MoESpec(RouterSpec(top_k=2, external=True), ExpertSpec(num_experts=2, glu="separate"))
    kw = dict(dtype=torch.bfloat16, hidden_size=1024, ffn_size=64, ep_world_size=2, tokens_per_rank=8, soc="A3")
    assert npu_lowering.explain_constraints(local, ep_num_experts=4, **kw) == []
    assert npu_lowering.explain_constraints(local, ep_num_experts=4, ep_even_placement=False, **kw) == [
        "expert parallel -> all_to_all_single + npu_moe_re_routing: MC2 needs E=4 divisible by the 2 ranks, expert e "
        "on rank e // (E/R)"]


def test_too_many_per_expert_tensors_fall_back_to_aten(fallbacks):
    x, logits, kw = make(T=40, D=4, F=4, E=130, k=1, dtype=torch.float32, glu=None, as_list=True)
    out = moe_fuser.fused_moe(x, logits, **kw, impl="npu")
    torch.testing.assert_close(out, moe_fuser.fused_moe(x, logits, **kw, impl="reference"))
    assert any("128-tensor list" in why for _, why in fallbacks)


def test_auto_selection_and_the_test_only_cpu_switch(monkeypatch):
    assert lowering.select(None, torch.device("cpu")).name == "npu"          # emulator + MOE_FUSER_NPU_EMULATOR=1
    # torch.device("npu") exists only once torch_npu renames the privateuse1 backend; available() reads .type
    assert npu_lowering.NpuLowering().available(types.SimpleNamespace(type="npu")) is None
    monkeypatch.delenv("MOE_FUSER_NPU_EMULATOR")
    assert lowering.select(None, torch.device("cpu")).name == "cpu"
    with pytest.raises(ValueError, match="npu tensors"):
        lowering.select("npu", torch.device("cpu"))


def test_empty_batch(fallbacks):
    x, logits, kw = make(T=0, D=8, F=6, E=4, k=2, dtype=torch.float32)
    out = moe_fuser.fused_moe(x, logits, **kw, impl="npu")
    assert out.shape == (0, 8)
    grads = torch.autograd.grad(out.sum(), leaves(x, logits, kw), allow_unused=True)
    assert all(g is None or g.abs().sum() == 0 for g in grads) and not fallbacks


def test_compiles_with_torchair_as_inner_compiler():
    import torchair

    backend = npu_lowering.get_inner_compiler({})
    assert torchair.BUILT[-1].mode == "reduce-overhead"
    x, logits, kw = make(T=11, D=16, F=12, E=4, k=2, dtype=torch.float32)

    def layer(x, logits):
        return moe_fuser.fused_moe(x, logits, **kw, impl="npu")

    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    out = compiled(x, logits)
    torch.testing.assert_close(out, layer(x, logits))
    graph = str(torchair.COMPILED[-1].graph)
    assert "grouped_experts" in graph
    gx, = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(gx, torch.autograd.grad(layer(x, logits).sum(), x)[0])
    assert npu_lowering.get_inner_compiler({"mode": "max-autotune"}) and torchair.BUILT[-1].mode == "max-autotune"
    with pytest.raises(ValueError, match="unknown"):
        npu_lowering.get_inner_compiler({"npu_mode": "max-autotune"})


class HandWrittenMoE(torch.nn.Module):
    """The seed's style: a gate, softmax -> top-k -> renormalise, a loop over ModuleList experts."""

    def __init__(self, D=16, F=24, E=4, k=2):
        super().__init__()
        self.k = k
        self.gate = torch.nn.Linear(D, E, bias=False)
        self.experts = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(D, F, bias=False), torch.nn.SiLU(),
                                                               torch.nn.Linear(F, D, bias=False)) for _ in range(E))

    def forward(self, x):
        p = torch.softmax(self.gate(x), dim=-1, dtype=torch.float)
        w, ids = torch.topk(p, self.k, dim=-1)
        w = (w / w.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(ids == e)
            out.index_add_(0, tok, expert(x[tok]) * w[tok, slot, None])
        return out


def test_moe_fuser_backend_with_inner_npu_runs_the_npu_ops_under_torchair(npu_emulator, monkeypatch):
    import torchair

    calls = []
    for name in ("npu_moe_gating_top_k_softmax", "npu_moe_init_routing_v2", "npu_moe_finalize_routing"):
        op = getattr(npu_emulator, name)
        monkeypatch.setattr(npu_emulator, name, lambda *a, _op=op, _n=name, **k: calls.append(_n) or _op(*a, **k))
    model, x = HandWrittenMoE(), torch.randn(10, 16, requires_grad=True)
    compiled = torch.compile(model, backend="moe_fuser", options={"inner": "npu"})
    out = compiled(x)
    assert torchair.BUILT[-1].mode == "reduce-overhead" and torchair.COMPILED
    assert {"npu_moe_gating_top_k_softmax", "npu_moe_init_routing_v2", "npu_moe_finalize_routing"} <= set(calls)
    want = model(x)
    torch.testing.assert_close(out, want)
    g = torch.randn_like(out)
    got_grads = torch.autograd.grad(out, [x, model.gate.weight], g)
    want_grads = torch.autograd.grad(want, [x, model.gate.weight], g)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)


def test_explain_shows_npu_fallbacks(npu_emulator):
    """A plain (non-GLU) SiLU expert has no npu_swiglu: explain's row names the lowering and the ATen stage."""
    report = moe_fuser.explain(HandWrittenMoE(), torch.randn(10, 16))
    assert report.num_fused == 1
    row = report.fused[0]
    assert row.lowering == "npu"
    assert any(n.startswith("experts -> ATen activation") for n in row.notes), row.notes
    assert "experts -> ATen activation" in str(report)
