"""Hand-written sort-based MoE: pairs sorted by expert, split into per-expert runs, one combine for all.

The other common way to write an MoE by hand (JetMoE in transformers, ScatterMoE/Megablocks-style research code)
sorts the (token, slot) pairs by expert once and runs each expert on its contiguous run of rows:

    counts = zeros(T, E).scatter(1, ids, 1).long().sum(0).tolist()
    _, order = ids.flatten().sort(0)                                   # or argsort; ascending
    tok = order.div(K, rounding_mode="trunc");  g = w.flatten()[order]  # or // K, floor_divide
    xs = x[tok]                                                         # or index_select(x, 0, tok)
    h = cat([linear(part, W1[e]) for e, part in enumerate(xs.split(counts))])
    a = act(h.chunk(2, -1)[0]) * h.chunk(2, -1)[1]                      # or act(h)
    y = cat([linear(part, W2[e]) for e, part in enumerate(a.split(counts))])
    out = zeros(T, D).index_add(0, tok, y * g[:, None])                 # or index_add_ into the buffer, or
                                                                        # another COMBINE form of handwritten.py

With ``.tolist()`` counts captured (moe_fuser's capture settings), dynamo keeps all of it in one graph (not with
``bincount(ids, minlength=E).tolist()``: its length is data-dependent, dynamo cannot list it, and the frame is
traced as plain dynamo traces it, see ``moe_fuser.capture``; the MoE then stays unfused). Run e of
each split holds exactly expert e's pairs only because the counts are those of the sorted ids in expert order:
the walk proves it (the same ``counts`` list feeds both splits, element e is ``counts[e]`` of a per-expert count
of the same ids, the sort is ascending on those ids) and takes nothing on trust. Weights: ``W[e]`` rows of a
stacked parameter (JetMoE's ``[E, out, in]``) or per-expert parameters, with optional biases. Under autocast the
weighted outputs may be formed and summed in the buffer's fp32 (``ExpertSpec.combine_dtype``), as the layer does.

Entry point: the pattern ``handwritten.sorted`` (family ``"handwritten"``), registered at import; it runs before
``handwritten.loop``, which would otherwise report the same buffer as a loop it does not understand.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from ..fx.dag import mutated_arg
from ..fx.graph import arg, is_op, module_path, op, val
from ..spec import ExpertSpec
from .base import Match, MatchContext, Rejection, register_pattern
from .handwritten import (_ACCUMULATES, _ACCUMULATES_INPLACE, _ALLOCS, FAMILY, HandwrittenLoop, _accumulation,
                          _activation, _is_activation, _linear, _NoMatch, _Walk, _want, routed_match)

__all__ = ["ascending_order", "find_sorted"]

PATTERN = "handwritten.sorted"


def _gate_column(node: fx.Node, walk: _Walk) -> Optional[fx.Node]:
    """``g[:, None]`` / ``g.unsqueeze(-1)`` / ``g.view(-1, 1)`` of a 1-D ``g``: g, else None."""
    if is_op(node, "unsqueeze") and arg(node, 1, "dim") in (-1, 1):
        inner = node.args[0]
    elif is_op(node, "getitem") and node.args[1] in ((slice(None), None), (slice(None, None, None), None)):
        inner = node.args[0]
    elif is_op(node, "view", "reshape") and tuple(node.args[1:]) in ((-1, 1), ((-1, 1),)):
        inner = node.args[0]
    else:
        return None
    v = val(inner)
    if not (isinstance(v, torch.Tensor) and v.dim() == 1):
        return None
    walk.take(node)
    return inner


def _runs(cat: fx.Node, walk: _Walk, what: str) -> tuple[fx.Node, list, list]:
    """``cat([linear(split(src, sizes)[e], W[e]) for e])`` -> (src, sizes, per-expert (weight, bias) sources)."""
    _want(is_op(cat, "cat") and arg(cat, 1, "dim", 0) == 0, f"{cat.name} ({op(cat)}): expected the {what} as "
                                                            "a cat of per-expert runs along dim 0")
    walk.take(cat)
    parts = cat.args[0]
    split, srcs = None, []
    for e, part in enumerate(parts):
        row, w, b = _linear(part, e, walk)
        _want(is_op(row, "getitem") and row.args[1] == e and is_op(row.args[0], "split"),
              f"{part.name}: the {what} of expert {e} should read run {e} of a split")
        _want(split is None or row.args[0] is split, f"{part.name}: the {what} runs come from different splits")
        split = row.args[0]
        walk.take(row)
        srcs.append((w, b))
    _want(split is not None and len(split.users) == len(parts) and arg(split, 2, "dim", 0) == 0,
          f"{cat.name}: every run of the split should go through one expert, in order")
    walk.take(split)
    sizes = arg(split, 1, "split_size_or_sections")
    _want(isinstance(sizes, (list, tuple)) and len(sizes) == len(parts),
          f"{split.name}: expected one split size per expert")
    return split.args[0], list(sizes), srcs


def _counts(sizes: list, walk: _Walk) -> tuple[fx.Node, int]:
    """Split sizes ``[counts[0].item(), ...]`` of a per-expert count of ids: (the [T, K] ids, E)."""
    cnt = None
    for e, s in enumerate(sizes):
        _want(is_op(s, "item") and is_op(s.args[0], "getitem") and s.args[0].args[1] == e,
              f"split size {e} ({getattr(s, 'name', s)}) is not element {e} of a per-expert count (.tolist())")
        _want(cnt is None or s.args[0].args[0] is cnt, f"split size {e} comes from another count")
        cnt = s.args[0].args[0]
        walk.take(s)
        walk.take(s.args[0])
    E = len(sizes)
    _want(isinstance(val(cnt), torch.Tensor) and tuple(val(cnt).shape) == (E,), f"{cnt.name}: expected [E={E}] counts")
    walk.take(cnt)
    _want(is_op(cnt, "sum") and arg(cnt, 1, "dim") in (0, [0], (0,)), f"{cnt.name}: expected a per-expert count")
    node = walk.casts(cnt.args[0])
    if is_op(node, "long", "int") and isinstance(node.args[0], fx.Node):
        walk.take(node)
        node = node.args[0]
    _want(is_op(node, "scatter") and arg(node, 1, "dim") in (1, -1) and arg(node, 3, "value", arg(node, 3, "src")) == 1,
          f"{node.name}: expected zeros(T, E).scatter(1, ids, 1) under the counts")
    base = node.args[0]
    _want(is_op(base, "zeros", "zeros_like", "new_zeros") and len(base.users) == 1,
          f"{base.name}: the one-hot counts should start from zeros")
    walk.take(node)
    walk.take(base)
    return arg(node, 2, "index"), E


def _sorted_tokens(tok: fx.Node, walk: _Walk) -> tuple[fx.Node, fx.Node, int]:
    """``order // K`` of an ascending sort of the flat ids: (order, the [T, K] ids, K)."""
    if is_op(tok, "div"):
        _want(arg(tok, 2, "rounding_mode") in ("trunc", "floor"), f"{tok.name}: expected an integer division")
    else:
        _want(is_op(tok, "floordiv", "floor_divide"), f"{tok.name} ({op(tok)}): expected order // K")
    K = tok.args[1]
    _want(isinstance(K, int) and K >= 1, f"{tok.name}: divided by {K!r}, not the top-k count")
    walk.take(tok)
    order = tok.args[0]
    flat, _ = ascending_order(order, walk)
    _want(is_op(flat, "flatten", "view", "reshape"), f"{flat.name}: expected the flattened [T, K] ids")
    walk.take(flat)
    ids = flat.args[0]
    v, fv = val(ids), val(flat)
    _want(isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[1] == K and isinstance(fv, torch.Tensor)
          and fv.dim() == 1, f"{ids.name}: the sorted ids should be [T, K={K}], flattened")
    return order, ids, K


def ascending_order(order: fx.Node, walk: _Walk) -> tuple[fx.Node, Optional[fx.Node]]:
    """``order``, the permutation of an ascending sort of a flat tensor (``sort(flat)[1]`` or ``argsort(flat)``;
    stable or not) -> (flat, the sort node, None for an argsort)."""
    srt = None
    if is_op(order, "getitem") and order.args[1] == 1 and is_op(order.args[0], "sort"):
        srt = order.args[0]
        _want(arg(srt, 1, "dim", -1) in (0, -1) and not arg(srt, 2, "descending", False),
              f"{srt.name}: expected an ascending sort of the flat ids")
        walk.take(srt)
    else:
        _want(is_op(order, "argsort") and arg(order, 1, "dim", -1) in (0, -1)
              and not arg(order, 2, "descending", False), f"{order.name} ({op(order)}): expected an ascending "
                                                          "argsort or sort of the flat ids")
    walk.take(order)
    return (srt or order).args[0], srt


def _match(ctx: MatchContext, write: fx.Node, tok: fx.Node, src: fx.Node, combine_nodes: set) -> Match:
    walk = _Walk()
    buf = write.args[0]
    output = buf if mutated_arg(write) is buf else write
    if output is buf:
        _want(not [u for u in buf.users if u is not write and mutated_arg(u) is buf],
              f"{buf.name}: written by more than the combine")
    walk.take(buf)
    walk.nodes |= combine_nodes
    src = walk.casts(src)
    _want(is_op(src, "mul") and len(src.args) == 2, f"{src.name} ({op(src)}): the expert outputs should be "
                                                    "multiplied by their routing weights")
    walk.take(src)
    for y, col in (src.args, src.args[::-1]):
        g = _gate_column(col, walk) if isinstance(col, fx.Node) else None
        if g is not None:
            break
    else:
        raise _NoMatch(f"{src.name}: neither factor is a column of per-pair routing weights")
    y = walk.casts(y)
    a, sizes2, w2s = _runs(y, walk, "second projection")
    a_dtype = val(a).dtype
    # the activation: act(h) or act(gate) * up of h.chunk(2, -1)
    glu = None
    if is_op(a, "mul") and len(a.args) == 2:
        walk.take(a)
        act_node, up = (a.args if _is_activation(a.args[0]) else a.args[::-1])
        activation, gate = _activation(act_node, walk)
        _want(is_op(gate, "getitem") and is_op(up, "getitem") and gate.args[0] is up.args[0]
              and (gate.args[1], up.args[1]) == (0, 1) and is_op(gate.args[0], "chunk")
              and arg(gate.args[0], 1, "chunks") == 2 and arg(gate.args[0], 2, "dim", 0) in (-1, 1),
              f"{a.name}: expected act(gate) * up of h.chunk(2, -1)")
        walk.take(gate)
        walk.take(up)
        walk.take(gate.args[0])
        h, glu = gate.args[0].args[0], "concat"
    else:
        activation, h = _activation(a, walk)
    _want(val(h).dtype == a_dtype, f"{h.name}: the activation changes dtype")
    xs, sizes1, w1s = _runs(h, walk, "first projection")
    _want(len(sizes1) == len(sizes2) and all(s1 is s2 for s1, s2 in zip(sizes1, sizes2)),
          "the two projections split their rows by different sizes")
    ids_counted, E = _counts(sizes1, walk)
    # GATHER: xs = x[tok], with tok the index the combine adds at
    if is_op(xs, "getitem") and xs.args[1] is tok:
        x = xs.args[0]
    else:
        _want(is_op(xs, "index_select") and arg(xs, 1, "dim") == 0 and arg(xs, 2, "index") is tok,
              f"{xs.name}: the expert inputs should be x[tok] of the combine's tok")
        x = xs.args[0]
    walk.take(xs)
    order, ids, K = _sorted_tokens(tok, walk)
    _want(ids_counted is ids, f"the counts read {ids_counted.name}, the sort {ids.name}: not the same ids")
    _want(is_op(g, "getitem") and g.args[1] is order and is_op(g.args[0], "flatten", "view", "reshape"),
          f"{g.name}: the routing weights should be w.flatten()[order] of the same sort")
    walk.take(g)
    walk.take(g.args[0])
    weights_TK = g.args[0].args[0]
    xv, bv = val(x), val(buf)
    _want(isinstance(xv, torch.Tensor) and xv.dim() == 2 and isinstance(bv, torch.Tensor)
          and tuple(bv.shape) == tuple(xv.shape), f"{buf.name}: the combine buffer should be shaped like x [T, D]")
    # Under autocast bf16 expert outputs times fp32 weights are formed and summed in fp32: ExpertSpec.combine_dtype
    _want(val(src).dtype == bv.dtype, f"{src.name}: the weighted outputs are formed in {val(src).dtype} but summed "
                                      f"in {bv.dtype}")
    combine_dtype = None if bv.dtype == a_dtype else bv.dtype
    experts = [dict(w1=w1, b1=b1, w2=w2, b2=b2) for (w1, b1), (w2, b2) in zip(w1s, w2s)]
    weights, transposed = HandwrittenLoop._weights(experts)
    return routed_match(PATTERN, walk, x, output, weights_TK, ids, val(g).dtype, weights, transposed,
                        ExpertSpec(num_experts=E, activation=activation, glu=glu, combine_dtype=combine_dtype),
                        module_path(write).rpartition(".")[0] if module_path(write) else "",
                        ("pairs sorted by expert, one run per expert (split by the captured counts)",), top_k=K)


def find_sorted(ctx: MatchContext):
    """Each accumulation (``index_add``, ``scatter_add``, ... as the loop pattern reads them) of weighted,
    concatenated per-expert runs into a fresh zeros buffer is a candidate; other writes are left to the loop
    pattern without a word."""
    for write in ctx.nodes_of(*_ACCUMULATES, *_ACCUMULATES_INPLACE):
        if write in ctx.claimed or not is_op(write.args[0], *_ALLOCS):
            continue
        try:
            acc = _accumulation(write)
        except _NoMatch:
            continue
        if acc is None or not _concatenated(acc[1]):
            continue
        try:
            yield _match(ctx, write, *acc)
        except _NoMatch as exc:
            yield Rejection(FAMILY, PATTERN, str(exc), module_path(write))


def _concatenated(src) -> bool:
    """Whether ``src`` is (a cast of) a product one of whose factors is (a cast of) a cat: the sorted form's
    combine."""
    walk = _Walk()
    src = walk.casts(src)
    return is_op(src, "mul") and any(is_op(walk.casts(a), "cat") for a in src.args)


register_pattern(find_sorted, name=PATTERN, family=FAMILY, priority=10)
