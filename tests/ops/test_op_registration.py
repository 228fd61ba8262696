"""The custom op under torch.library's opcheck and under torch.compile(fullgraph=True, dynamic=True)."""

import math

import pytest
import torch

import moe_fuser
from moe_fuser.ops.experts import _grouped_experts_op
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
