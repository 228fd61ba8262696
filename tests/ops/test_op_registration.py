"""The custom op under torch.library's opcheck and under torch.compile(fullgraph=True, dynamic=True)."""

import math

import pytest
import torch

import moe_fuser
from moe_fuser.ops.experts import _grad_rows_op, _grouped_experts_backward_rows_op, _grouped_experts_op
from _moe_cases import Case, leaves, rel_err


def _op_args(T, glu="separate", as_list=False, bias=False, save=1, dtype=torch.float32, combine=""):
    x, logits, kw = Case(T=T, D=16, F=24, E=4, k=2, dtype=dtype, glu=glu, as_list=as_list,
                         bias=bias).make(requires_grad=True)
    weights, ids = logits.detach().softmax(-1).topk(2)
    weights.requires_grad_()

    def lst(name):
        v = kw.get(name)
        return [] if v is None else (v if isinstance(v, list) else [v])

    return (x, weights, ids, lst("w1"), lst("w2"), lst("w3"), lst("b1"), lst("b2"), lst("b3"), 4, "silu",
            glu or "", 1.702, math.inf, combine, "cpu", save)   # limit: none


@pytest.mark.parametrize("variant", [dict(), dict(glu=None, bias=True), dict(as_list=True), dict(glu="concat"),
                                     dict(save=0), dict(as_list=True, save=3), dict(as_list=True, save=4, bias=True),
                                     dict(dtype=torch.bfloat16, combine="float32"),
                                     dict(dtype=torch.bfloat16, combine="float32", as_list=True, save=0)])
def test_opcheck(variant):
    torch.library.opcheck(_grouped_experts_op, _op_args(T=7, **variant))


@pytest.mark.parametrize("save,bias", [(3, False), (4, True)])
def test_opcheck_backward_from_gathered_rows(save, bias):
    """The traced backward of a chunked save: the output gradient's rows per chunk (their count known only at run
    time), then the backward op that takes them; fake kernels agree with the real ones."""
    args = _op_args(T=9, as_list=True, bias=bias, save=save)
    x, weights, ids = args[:3]
    with torch.no_grad():
        out, h, order = _grouped_experts_op(*args)
    grad = torch.randn_like(out)
    torch.library.opcheck(_grad_rows_op, (grad, ids, order, 4, save, "cpu"))
    rows = _grad_rows_op(grad, ids, order, 4, save, "cpu")
    assert [r.shape[0] for r in rows] == [c.shape[0] for c in h] and sum(r.shape[0] for r in rows) == 18
    lists = [[w.detach() for w in ws] for ws in args[3:9]]   # no gradient of gradients (first derivative only)
    torch.library.opcheck(_grouped_experts_backward_rows_op,
                          (rows, x.detach(), weights.detach(), ids, h, order, *lists, *args[9:16], [True, True, True]))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("as_list", [False, True])
def test_compile_fullgraph_dynamic_forward_backward(backend, as_list):
    """Stacked weights, and weight lists (h saved per expert, let go of during the backward unless the graph is
    retained: here the second of two token counts backpropagates twice; AOTAutograd allows that only without
    donated buffers)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    case = Case(T=0, D=16, F=24, E=6, k=2, dtype=torch.float32, bias=True, as_list=as_list)

    def layer(x, logits, w1, w2, w3, b1, b2, b3):
        return moe_fuser.fused_moe(x, logits, w1, w2, w3, b1=b1, b2=b2, b3=b3, top_k=2)

    compiled = torch.compile(layer, backend=backend, fullgraph=True, dynamic=True)
    with torch._functorch.config.patch(donated_buffer=False):
        _two_token_counts(case, layer, compiled)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 1


def _two_token_counts(case, layer, compiled):
    for T in (13, 29):
        case.T = T
        x, logits, kw = case.make(requires_grad=True)
        args = (x, logits, kw["w1"], kw["w2"], kw["w3"], kw["b1"], kw["b2"], kw["b3"])
        out = compiled(*args)
        ref = layer(*args)
        assert rel_err(out, ref) < 1e-5
        grad = torch.randn_like(out)
        ins = leaves(x, logits, kw)
        want = torch.autograd.grad(ref, ins, grad)
        passes = (True, False) if T == 29 else (False,)
        for retain in passes:
            for g, w in zip(torch.autograd.grad(out, ins, grad, retain_graph=retain), want):
                assert (g - w).norm() <= 1e-5 * w.norm() + 1e-6


def test_traced_backward_lets_go_of_the_output_gradient_first():
    """With per-expert weight lists (h saved in chunks), the traced backward gathers the output gradient's rows
    first and the experts' backward takes those: the compiled code can free the output gradient before the
    experts' backward allocates any weight gradient (the eager loop's peak), and the gradients equal eager's."""
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm

    case = Case(T=11, D=16, F=24, E=4, k=2, dtype=torch.float32, as_list=True)
    x, logits, kw = case.make(requires_grad=True)

    def layer(x, logits, w1, w2, w3):
        return moe_fuser.fused_moe(x, logits, w1, w2, w3, top_k=2)

    torch._dynamo.reset()
    inner = aot_autograd(fw_compiler=lambda gm, _: gm, bw_compiler=keep)
    compiled = torch.compile(layer, backend=inner, fullgraph=True)
    out = compiled(x, logits, kw["w1"], kw["w2"], kw["w3"])
    ins = leaves(x, logits, kw)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, ins, grad)
    want = torch.autograd.grad(layer(x, logits, kw["w1"], kw["w2"], kw["w3"]), ins, grad)
    assert all((g - w).norm() <= 1e-5 * w.norm() + 1e-6 for g, w in zip(got, want))
    (bw,) = graphs
    tangent = next(n for n in bw.graph.nodes if n.op == "placeholder" and n.name.startswith("tangents"))
    reads = {n.target for n in bw.graph.nodes if tangent in n.all_input_nodes}
    targets = {n.target for n in bw.graph.nodes if n.op == "call_function"}
    assert torch.ops.moe_fuser.grouped_experts_backward_rows.default in targets
    assert torch.ops.moe_fuser.grouped_experts_backward_rows.default not in reads, reads
