"""The hand-written loop family: every style it claims is fused (count asserted) and trains eager-equal at two
token counts; departures it must not model are left alone and still eager-equal."""

import logging

import pytest
import torch
import torch.nn.functional as F

import moe_fuser

from moe_models import (ACTS, ASSIGN, COMBINES, FFNS, LOOPS, NOT_SUMS, ROUTERS, TOL, TOP1_LOOPS, TOP1_ROUTERS, LoopMoE,
                        MatmulFFN, MixtralV4Block, Recorder, Variant, check_train_step, load_example, rel_err)


def _run(model, variant_dtype, shapes=((2, 5), (3, 7)), fused=1, inner="aot_eager", options=None, dynamic=True):
    """Train-step equality at two token counts (one dynamic compile; the default dynamic=None path, static
    then dynamic, is test_no_recompile_per_batch_size's)."""
    model = model.to(variant_dtype)
    rec = Recorder(inner)
    compiled = torch.compile(model, backend="moe_fuser", options={"inner": rec, **(options or {})},
                             dynamic=dynamic)
    for B, S in shapes:
        x = torch.randn(B, S, model_dim(model), dtype=variant_dtype)
        check_train_step(model, compiled, x, TOL[variant_dtype])
    assert rec.graphs, "the backend never saw a graph"
    assert rec.num_fused == fused * len(rec.graphs), (rec.num_fused, len(rec.graphs))
    return rec


def model_dim(model):
    return model.gate.in_features


@pytest.mark.parametrize("router", ROUTERS)
def test_routers_fuse(router):
    _run(LoopMoE(Variant(router=router)), torch.float32)


@pytest.mark.parametrize("loop,router", [(loop, "softmax_topk_renorm") for loop in LOOPS]
                         + [("one_hot_210", "max_top1"), ("nonzero", "max_top1")])
def test_dispatch_styles_fuse(loop, router):
    _run(LoopMoE(Variant(loop=loop, router=router)), torch.float32)


@pytest.mark.parametrize("combine", COMBINES)
def test_combine_styles_fuse(combine):
    _run(LoopMoE(Variant(combine=combine)), torch.float32)


def test_inplace_scatter_reduce_sum_fuses():
    model = LoopMoE(Variant(combine="scatter_reduce_"))
    rec = Recorder()
    compiled = torch.compile(model, backend="moe_fuser", options={"inner": rec})
    with torch.no_grad():
        for B, S in ((2, 5), (3, 7)):
            x = torch.randn(B, S, 16)
            assert rel_err(compiled(x)[0], model(x)[0]) < TOL[torch.float32]
    assert rec.num_fused == len(rec.graphs) > 0


@pytest.mark.parametrize("combine", NOT_SUMS)
def test_scatter_reduce_that_is_no_sum_is_not_fused(combine):
    """``scatter_reduce`` with ``amax``, or a sum that drops what the buffer held (``include_self=False``), is not
    the experts' sum: left alone, eager-equal, with the reason."""
    model = LoopMoE(Variant(combine=combine))
    _run(model, torch.float32, fused=0)
    report = moe_fuser.explain(model, torch.randn(2, 5, 16))
    assert any("adding into the buffer" in r.reason for r in report.rejected), report


@pytest.mark.parametrize("kw", [dict(), dict(ffn="swiglu", bias=True, weight_first=True),
                                dict(router="max_top1", k=1), dict(loop="any_where")])
def test_routing_weight_on_the_input_fuses(kw):
    """expert(x[tok] * w[tok, slot, None]) (torchtitan's score_before_experts): the op's weight on input."""
    rec = _run(LoopMoE(Variant(weight_on_input=True, **kw)), torch.float32)
    assert all(n.target.spec.weight_on_input for gm in rec.graphs for n in gm.graph.nodes
               if n.op == "call_function" and hasattr(n.target, "spec"))


@pytest.mark.parametrize("ffn", FFNS)
def test_ffn_styles_with_bias_fuse(ffn):
    _run(LoopMoE(Variant(ffn=ffn, bias=True, weight_first=True)), torch.float32)


@pytest.mark.parametrize("act", [a for a in ACTS if a != "silu"])
def test_activations_fuse(act):
    _run(LoopMoE(Variant(act=act, ffn="swiglu" if act == "gelu" else "sequential")), torch.float32)


def test_inplace_activation_module_fuses():
    model = LoopMoE(Variant(act="relu"))
    for expert in model.experts:
        expert[1] = torch.nn.ReLU(inplace=True)
    _run(model, torch.float32)


def test_bf16_fuses_and_trains():
    _run(LoopMoE(Variant(router="mixtral_f32", ffn="swiglu", loop="one_hot_210")), torch.bfloat16)


def test_seed_switch_layer_keeps_aux_loss():
    model = load_example("switch_transformer").SwitchLayer(d_model=32, d_ff=64)
    rec = _run(model, torch.float32)
    code = rec.graphs[0].code
    assert "one_hot" in code and "index_add_" not in code     # the loss stays, the loop is gone
    # The loss keeps the router's probabilities and top-k ids, so the op takes the graph's top-k weights and ids
    # (no router logits) instead of routing a second time.
    fused, = [n for n in rec.graphs[0].graph.nodes if hasattr(n.target, "spec")]
    logits, topk_weights, topk_ids = fused.args[1:4]
    assert logits is None and topk_ids.name == "topk_ids" and topk_weights.name.startswith("topk_w")
    assert sum(1 for n in rec.graphs[0].graph.nodes if "topk" in str(n.target)) == 1


def test_mixtral_v4_block():
    _run(MixtralV4Block(), torch.float32)


def test_inductor_end_to_end():
    _run(LoopMoE(Variant(ffn="swiglu")), torch.float32, inner="inductor", shapes=((2, 5),))


@pytest.mark.parametrize("router,loop,combine", [(r, "where", ASSIGN) for r in TOP1_ROUTERS]
                         + [("argmax_top1", loop, c) for loop in TOP1_LOOPS for c in (ASSIGN, "iadd")])
def test_top1_styles_fuse(router, loop, combine):
    """Top-1 code: ids from max / argmax / a squeezed topk(1), tokens picked by a mask or a squeezed nonzero, and
    ``out[tok] = y``, which sums the experts when each token has one."""
    _run(LoopMoE(Variant(router=router, loop=loop, combine=combine)), torch.float32)


def test_assignment_under_top_k_is_not_fused():
    """``out[tok] = y`` with k = 2 keeps the last expert's output of each token, not the sum: left alone, the
    reason names the fix."""
    model = LoopMoE(Variant(k=2, combine=ASSIGN))
    _run(model, torch.float32, fused=0)
    report = moe_fuser.explain(model, torch.randn(2, 5, 16))
    assert report.num_fused == 0
    assert any("top-1" in r.reason and "out[tok] += y" in r.reason for r in report.rejected), report


def test_matmul_by_linear_layout_weights_fuses():
    """Experts holding nn.Linear's [out, in] layout and projecting with ``x @ w.t()`` and ``x @ w.T`` (the
    [in, out] layout, ``x @ w``, is in FFNS); trained under inductor too, whose weight gradients come back through
    the op's transposed views."""
    model = LoopMoE(Variant(ffn="param_kn", bias=True))
    model.experts = torch.nn.ModuleList([MatmulFFN(16, 24, "gelu", True, linear_layout=True) for _ in range(4)])
    _run(model, torch.float32)
    _run(model, torch.float32, inner="inductor", shapes=((2, 5),))


@pytest.mark.parametrize("linear_layout", [False, True], ids=["kn", "linear"])
def test_einsum_projections_fuse(linear_layout):
    """``einsum("nd,df->nf", x, w)`` ([in, out] weights) and ``einsum("nd,fd->nf", x, w)`` (nn.Linear's)."""
    model = LoopMoE(Variant(ffn="param_kn", bias=True))
    model.experts = torch.nn.ModuleList([MatmulFFN(16, 24, "silu", True, linear_layout, einsum=True)
                                         for _ in range(4)])
    _run(model, torch.float32)


def test_matmul_by_a_computed_matrix_is_not_fused():
    """``x @ (2 * w)`` multiplies by a matrix the loop computes, not an expert weight: left alone, with the reason."""
    model = LoopMoE(Variant(ffn="param_kn"))
    for expert in model.experts:
        expert.w1.data /= 2
        expert.forward = lambda x, ex=expert: F.silu(x @ (2 * ex.w1)) @ ex.w2
    _run(model, torch.float32, fused=0)
    report = moe_fuser.explain(model, torch.randn(2, 5, 16))
    assert any("is not a parameter of expert 0" in r.reason for r in report.rejected), report


def test_masked_weight_of_another_expert_is_not_fused():
    """Tokens with expert e in any slot, weighted by the slots of expert e + 1: not an MoE the op computes."""
    model = LoopMoE(Variant(loop="any_nonzero"))

    def forward(hidden):
        x = hidden.view(-1, 16)
        logits, w, ids = model.route(x)
        out = torch.zeros_like(x)
        for e in range(4):
            tok = (ids == e).any(-1).nonzero().squeeze(-1)
            out.index_add_(0, tok, model.expert(e, x[tok]) * (w * (ids == (e + 1) % 4)).sum(-1, keepdim=True)[tok])
        return out.view(hidden.shape), logits.float().softmax(-1).mean(0).pow(2).sum()

    model.forward = forward
    _run(model, torch.float32, fused=0)
    report = moe_fuser.explain(model, torch.randn(2, 5, 16))
    assert any("pick different experts" in r.reason for r in report.rejected), report


def test_expert_choice_routing_is_not_fused():
    """Each expert picking its tokens with a top-k over the tokens is another MoE than the op's: left alone,
    eager-equal, and explain names it."""
    model = LoopMoE(Variant())

    def forward(hidden):
        x = hidden.view(-1, 16)
        probs = model.gate(x).softmax(-1)
        w, tok = probs.t().topk(x.shape[0] // 2, dim=-1)
        out = torch.zeros_like(x)
        for e in range(4):
            out.index_add_(0, tok[e], model.expert(e, x[tok[e]]) * w[e, :, None])
        return out.view(hidden.shape), probs.mean(0).pow(2).sum()

    model.forward = forward
    _run(model, torch.float32, fused=0)
    report = moe_fuser.explain(model, torch.randn(2, 5, 16))
    assert any("expert-choice routing" in r.reason for r in report.rejected), report


@pytest.mark.parametrize("twist", ["extra_scale", "skip_expert"])
def test_unmodelled_departures_are_not_fused(twist):
    _run(LoopMoE(Variant(twist=twist)), torch.float32, fused=0)


def test_active_dropout_is_not_fused():
    model = LoopMoE(Variant(twist="train_dropout"))
    rec = Recorder()
    out, _ = torch.compile(model, backend="moe_fuser", options={"inner": rec})(torch.randn(2, 5, 16))
    assert rec.num_fused == 0 and out.shape == (2, 5, 16)
    torch._dynamo.reset()
    model.eval()
    # In eval mode the dropout is an identity: fused. (Static shapes: with dynamic=True dynamo first traces the
    # dropout probability as a graph input, then restarts and specialises it.)
    _run(model, torch.float32, dynamic=None)


def test_routing_under_no_grad_is_left_alone():
    """Routing weights computed under ``torch.no_grad()`` give the router no gradient; the fused op, placed where
    the loop ends, would make them differentiable. The match is refused with the reason and the gate's gradient
    stays None, as in eager."""
    class NoGradRouting(torch.nn.Module):
        def __init__(self, D=16, E=4, k=2):
            super().__init__()
            self.E, self.k = E, k
            self.gate = torch.nn.Linear(D, E, bias=False)
            self.experts = torch.nn.ModuleList(
                torch.nn.Sequential(torch.nn.Linear(D, 24), torch.nn.SiLU(), torch.nn.Linear(24, D))
                for _ in range(E))

        def forward(self, h):
            x = h.reshape(-1, h.shape[-1])
            logits = self.gate(x)
            with torch.no_grad():
                w, ids = logits.softmax(-1).topk(self.k, -1)
            out = torch.zeros_like(x)
            for e in range(self.E):
                tok, slot = torch.where(ids == e)
                out.index_add_(0, tok, self.experts[e](x[tok]) * w[tok, slot, None])
            return out.view_as(h)

    model = NoGradRouting()
    report = moe_fuser.explain(model, torch.randn(2, 5, 16))
    assert report.num_fused == 0 and "grad mode" in report.rejected[0].reason, report
    torch._dynamo.reset()
    _run(model, torch.float32, fused=0)
    model(torch.randn(2, 5, 16)).sum().backward()
    assert model.gate.weight.grad is None


def test_buffer_only_copied_into_is_no_candidate():
    """A zeros buffer that only ``copy_`` writes (a recurrent state, as in Mamba mixers) is no MoE output: explain
    neither fuses nor lists it."""
    class State(torch.nn.Module):
        def forward(self, x):
            state = torch.zeros_like(x)
            state.copy_(x * 2)
            return state + 1

    report = moe_fuser.explain(State(), torch.randn(4, 8))
    assert report.num_fused == 0 and not report.rejected, report


def test_no_recompile_per_batch_size():
    model = LoopMoE(Variant())
    rec = Recorder()
    compiled = torch.compile(model, backend="moe_fuser", options={"inner": rec})
    for B in (2, 3, 4, 5, 6):
        compiled(torch.randn(B, 3, 16))
    assert len(rec.graphs) == 2          # the static first graph, then one dynamic graph
    assert rec.num_fused == 2


class _RoundedWeightsMoE(torch.nn.Module):
    """fp32 experts, routing weights rounded to bf16 where they are used, probabilities kept for a loss: the op
    takes the graph's top-k (the router's values stay) and must round them as the model does."""

    def __init__(self, E=4, D=16, F=24):
        super().__init__()
        self.gate = torch.nn.Linear(D, E, bias=False)
        self.experts = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(D, F), torch.nn.SiLU(),
                                                               torch.nn.Linear(F, D)) for _ in range(E))

    def forward(self, h):
        x = h.reshape(-1, h.shape[-1])
        probs = self.gate(x).float().softmax(-1)
        w, ids = probs.topk(2, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(ids == e)
            out.index_add_(0, tok, expert(x[tok]) * w[tok, slot, None].to(torch.bfloat16))
        return out.view_as(h), probs.mean(0).pow(2).sum()


def test_rounded_routing_weights_taken_from_the_graph():
    model = _RoundedWeightsMoE()
    report = moe_fuser.explain(model, torch.randn(2, 5, 16))
    assert report.num_fused == 1 and any("rounded to bfloat16" in n for n in report.fused[0].notes), report
    assert any("takes its top-k weights and ids" in n for n in report.fused[0].notes), report
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="moe_fuser", options={"inner": "aot_eager"})
    x = torch.randn(3, 7, 16)
    with torch.no_grad():
        out, ref = compiled(x)[0], model(x)[0]
    assert rel_err(out, ref) <= 1e-6, rel_err(out, ref)   # unrounded weights: ~1e-3


class UnflattenedLoop(torch.nn.Module):
    """A loop over [B, S, D] tokens without flattening: ``b, t, slot = torch.where(ids == e)`` over [B, S, K] ids,
    ``x[b, t]``, ``w[b, t, slot, None]``, into a [B, S, D] buffer; ``slot=0``: every token weighted by its first
    slot (no MoE the op computes)."""

    def __init__(self, combine="iadd", on_input=False, slot=None, E=4, k=2, gather_dim=None):
        super().__init__()
        self.gate = torch.nn.Linear(16, E, bias=False)
        self.experts = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.SiLU(),
                                                               torch.nn.Linear(24, 16)) for _ in range(E))
        self.combine, self.on_input, self.slot, self.k = combine, on_input, slot, k
        self.gather_dim = gather_dim   # a sigmoid router gathering its weights along this dim of [B, S, E] scores

    def forward(self, x):
        if self.gather_dim is None:
            w, ids = self.gate(x).softmax(-1).topk(self.k, -1)
        else:
            scores = self.gate(x).sigmoid()
            ids = scores.topk(self.k, -1)[1]
            w = scores.gather(self.gather_dim, ids)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            b, t, slot = torch.where(ids == e)
            we = w[b, t, slot if self.slot is None else self.slot, None]
            y = expert(x[b, t] * we) if self.on_input else expert(x[b, t]) * we
            if self.combine == "iadd":
                out[b, t] += y
            else:
                out.index_put_((b, t), y, accumulate=True)
        return out


@pytest.mark.parametrize("kw", [dict(), dict(combine="index_put_"), dict(on_input=True), dict(k=1, E=3),
                                dict(gather_dim=-1), dict(gather_dim=2)])
def test_loop_over_unflattened_tokens_fuses(kw):
    """... with its [B, S, E] router recognised: the op routes the flattened logits itself."""
    _run(UnflattenedLoop(**kw), torch.float32)
    report = moe_fuser.explain(UnflattenedLoop(**kw), torch.randn(2, 5, 16))
    assert report.num_fused == 1 and report.fused[0].top_k == kw.get("k", 2), report
    assert report.fused[0].router == ("softmax-topk" if "gather_dim" not in kw else "sigmoid-topk"), report


def test_unflattened_router_gathering_along_tokens_stays_external():
    """gather(scores, 1, ids) over [B, S, E] scores reads along the sequence, not the experts (legal where S >= E,
    and not a router the op knows): the loop still fuses, with the user's weights as computed."""
    _run(UnflattenedLoop(gather_dim=1, E=3), torch.float32, shapes=((2, 5), (3, 7)))
    report = moe_fuser.explain(UnflattenedLoop(gather_dim=1, E=3), torch.randn(2, 5, 16))
    assert report.num_fused == 1 and report.fused[0].router == "external", report


def test_loop_over_unflattened_tokens_with_a_constant_slot_is_not_fused():
    _run(UnflattenedLoop(slot=0), torch.float32, fused=0)
    report = moe_fuser.explain(UnflattenedLoop(slot=0), torch.randn(2, 5, 16))
    assert any("not b, t, slot = torch.where(ids == e)" in r.reason for r in report.rejected), report


class DropoutLoop(torch.nn.Module):
    """The seed's loop with ``nn.Dropout(0.0)`` after each expert, in training mode."""

    def __init__(self):
        super().__init__()
        self.gate = torch.nn.Linear(16, 4, bias=False)
        self.drop = torch.nn.Dropout(0.0)
        self.experts = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.SiLU(),
                                                               torch.nn.Linear(24, 16)) for _ in range(4))

    def forward(self, x):
        w, ids = self.gate(x).softmax(-1).topk(2, -1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(ids == e)
            out.index_add_(0, tok, self.drop(expert(x[tok])) * w[tok, slot, None])
        return out


def test_dropout_probability_passed_as_a_graph_input_is_named(caplog):
    """torch.compile(dynamic=True) passes nn.Dropout's float p as a graph input: that graph's loop is not fused (p
    may be anything there), with that reason; dynamo's recompile with p a constant 0.0 fuses."""
    model, rec = DropoutLoop(), Recorder()
    compiled = torch.compile(model, backend="moe_fuser", options={"inner": rec}, dynamic=True)
    with caplog.at_level(logging.INFO, logger="moe_fuser"):
        check_train_step(model, compiled, torch.randn(10, 16), TOL[torch.float32])
    assert rec.num_fused == 1, rec.graphs
    assert "probability item is a graph input, not a constant" in caplog.text, caplog.text
