"""FX helpers: canonical op names, parameter/module paths, the mutation-aware networkx view, region closure."""

import operator

import networkx as nx
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from moe_fuser.fx.dag import mutated_arg, to_networkx
from moe_fuser.fx.graph import module_path, op, param_path
from moe_fuser.fx.region import absorb_plumbing, check_region


def _dynamo_graph(fn, *args, dynamic=False) -> fx.GraphModule:
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True):
        torch.compile(fn, backend=backend, fullgraph=True, dynamic=dynamic)(*args)
    return graphs[0]


def _node(gm, name):
    return next(n for n in gm.graph.nodes if n.name == name)


def test_op_names_are_canonical_across_call_forms():
    def f(x):
        a = torch.softmax(x, -1) + x.softmax(-1) + F.softmax(x, dim=-1)
        b = F.silu(x) * torch.nn.functional.gelu(x)
        return a, b, x.topk(2, -1)[0]

    gm = _dynamo_graph(f, torch.randn(4, 8))
    names = [op(n) for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    assert names.count("softmax") == 3 and "silu" in names and "gelu" in names and "topk" in names
    traced = fx.symbolic_trace(lambda x: torch.ops.aten._softmax.default(x, -1, False))
    assert [op(n) for n in traced.graph.nodes if n.op == "call_function"] == ["softmax"]
    # torch 2.11's dynamo records `ids == e` as the tensor method __eq__ (2.13: operator.eq): one name for both
    g = fx.Graph()
    ids = g.placeholder("ids")
    forms = [g.call_method("__eq__", (ids, 0)), g.call_function(operator.eq, (ids, 0)),
             g.call_method("__getitem__", (ids, 0)), g.call_method("__iadd__", (ids, 1))]
    assert [op(n) for n in forms] == ["eq", "eq", "getitem", "iadd"]


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4)) for _ in range(2)])

    def forward(self, x):
        return self.blocks[1](x)


def test_param_and_module_paths():
    seen = {}

    def backend(gm, example_inputs):        # dynamo's grapharg metadata lives only during the backend call
        seen["with_source"] = sorted(p for p in (param_path(n) for n in gm.graph.nodes) if p)
        seen["had_source"] = all("grapharg" in n.meta for n in gm.graph.find_nodes(op="placeholder"))
        seen["module"] = module_path(next(n for n in gm.graph.nodes if op(n) == "linear"))
        saved = {n: n.meta.pop("grapharg") for n in gm.graph.find_nodes(op="placeholder")}
        seen["from_names"] = sorted(p for p in (param_path(n) for n in gm.graph.nodes) if p)
        for n, ga in saved.items():         # dynamo needs it back
            n.meta["grapharg"] = ga
        return gm.forward

    torch.compile(Outer(), backend=backend)(torch.randn(2, 4))
    assert seen["had_source"]
    assert seen["with_source"] == seen["from_names"] == ["blocks.1.0.bias", "blocks.1.0.weight"]
    assert seen["module"] == "blocks.1.0"


def _loop(x, ids, w1):
    out = torch.zeros_like(x)
    for e in range(2):
        tok = torch.where(ids == e)[0]
        out.index_add_(0, tok, x[tok] @ w1[e])
    return out * 2


def _loop_graph(fn):
    """``fn(x, ids, w1)`` (a two-expert loop) captured by dynamo, with its three placeholders."""
    gm = _dynamo_graph(fn, torch.randn(6, 4), torch.randint(0, 2, (6,)), torch.randn(2, 4, 4))
    return gm, [n for n in gm.graph.nodes if n.op == "placeholder"]


def test_mutation_edges_make_the_loop_an_ancestor_of_the_result():
    gm, _ = _loop_graph(_loop)
    dag = to_networkx(gm.graph)
    result = next(n for n in gm.graph.nodes if op(n) == "mul")
    writes = [n for n in gm.graph.nodes if mutated_arg(n) is not None]
    assert len(writes) == 2 and all(w in nx.ancestors(dag, result) for w in writes)
    # data edges alone would miss them
    plain = nx.DiGraph([(i, n) for n in gm.graph.nodes for i in n.all_input_nodes])
    assert not any(w in nx.ancestors(plain, result) for w in writes)


def _region_of(gm):
    """Everything from the zeros_like buffer to the last index_add_ (what a pattern would claim)."""
    nodes = list(gm.graph.nodes)
    start = next(i for i, n in enumerate(nodes) if op(n) == "zeros_like")
    end = max(i for i, n in enumerate(nodes) if op(n) == "index_add_")
    return [n for n in nodes[start:end + 1] if n.op != "placeholder"]


def _check(gm, region, inputs):
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    buf = next(n for n in region if op(n) == "zeros_like")
    return check_region(to_networkx(gm.graph), position, absorb_plumbing(region), buf, inputs)


def test_a_closed_region_passes():
    gm, (x, ids, w1) = _loop_graph(_loop)
    res = _check(gm, _region_of(gm), [x, ids, w1])
    assert res.ok, res.reason
    assert not res.keep


def test_an_unmodelled_op_is_found():
    gm, (x, ids, w1) = _loop_graph(_loop)
    region = [n for n in _region_of(gm) if op(n) != "matmul"]
    res = _check(gm, region, [x, ids, w1])
    assert not res.ok and "not part of the recognised MoE" in res.reason


def test_an_undeclared_input_is_found():
    gm, (x, ids, w1) = _loop_graph(_loop)
    res = _check(gm, _region_of(gm), [x, ids])
    assert not res.ok


def _leaky(x, ids, w1):
    out = torch.zeros_like(x)
    tok = torch.where(ids == 0)[0]
    out.index_add_(0, tok, x[tok] @ w1[0])
    snapshot = out.sum()                       # reads the buffer half-way
    tok = torch.where(ids == 1)[0]
    out.index_add_(0, tok, x[tok] @ w1[1])
    return out, snapshot


def test_reading_the_output_mid_region_is_refused():
    gm, (x, ids, w1) = _loop_graph(_leaky)
    region = [n for n in _region_of(gm) if op(n) != "sum"]
    res = _check(gm, region, [x, ids, w1])
    assert not res.ok and "before the MoE has finished" in res.reason


def _writes_input(x, ids, w1):
    out = torch.zeros_like(x)
    for e in range(2):
        tok = torch.where(ids == e)[0]
        out.index_add_(0, tok, x[tok] @ w1[e])
    x.mul_(0.5)
    return out


def test_writing_memory_outside_the_region_is_refused():
    gm, (x, ids, w1) = _loop_graph(_writes_input)
    region = _region_of(gm) + [n for n in gm.graph.nodes if op(n) == "mul_"]
    res = _check(gm, region, [x, ids, w1])
    assert not res.ok and "lives outside the region" in res.reason


def _writes_mid_region(target: str):
    def fn(x, ids, w1, stats):
        out = torch.zeros_like(x)
        tok = torch.where(ids == 0)[0]
        out.index_add_(0, tok, x[tok] @ w1[0])
        (stats if target == "stats" else x).add_(1.0)    # between the experts
        tok = torch.where(ids == 1)[0]
        out.index_add_(0, tok, x[tok] @ w1[1])
        return out
    return fn


@pytest.mark.parametrize("target", ["stats", "input"])
def test_an_outside_write_mid_region_must_miss_what_the_region_touches(target):
    """The fused op runs where the region ends: an outside write in between may stay only if the region neither
    reads nor writes that memory (a statistics buffer); one into an input the later experts read is refused."""
    gm = _dynamo_graph(_writes_mid_region(target), torch.randn(6, 4), torch.randint(0, 2, (6,)),
                       torch.randn(2, 4, 4), torch.zeros(2))
    x, ids, w1 = [n for n in gm.graph.nodes if n.op == "placeholder"][:3]   # (stats only where it is used)
    region = [n for n in _region_of(gm) if op(n) != "add_"]
    res = _check(gm, region, [x, ids, w1])
    if target == "stats":
        assert res.ok, res.reason
    else:   # (the influence check names it first: the write changes what the later experts compute)
        assert not res.ok and "add_ affects the MoE output" in res.reason
