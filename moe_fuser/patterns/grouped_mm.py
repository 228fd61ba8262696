"""Hand-written grouped-matmul MoE: pairs sorted by expert, offsets from per-expert counts, ``F.grouped_mm``.

``torch.nn.functional.grouped_mm`` (``torch._grouped_mm``) multiplies each expert's contiguous run of rows by
that expert's weight in one call, the runs delimited by int32 end offsets. The MoE written on it by hand
(torchtitan's grouped experts and combine; much new research code) is, in a dynamo graph (K top-k, ``[...]``
optional, casts allowed where the model casts):

    flat = ids.view(-1)                                    ids: the [T, K] top-k expert ids
    order = flat.argsort(stable=True)                      | sort(flat)[1]; ascending
    counts = bincount(flat, minlength=E)                   | histc(flat.float(), bins=E, min=0, max=E-1 or E),
                                                             of the flat ids or of the sorted ones
                                                           | one_hot(flat, E).sum(0) | one_hot(ids, E).sum((0, 1))
    offs = counts.cumsum(0).to(torch.int32)                | cumsum(counts, 0, dtype=torch.int32)
    tok = order // K                                       | div(order, K, rounding_mode=...); order itself (K=1)
    xs = x[tok]                                            | index_select(x, 0, tok)
                                                           | gather(x, 0, tok.view(-1, 1).expand(-1, D))
    [xs = (xs.float() * w.view(-1)[order].view(-1, 1)).to(x.dtype)]       routing weight on the input
    h = grouped_mm(xs, W1.transpose(-2, -1), offs=offs)    W1 [E, H, D] (nn.Linear layout), or [E, D, H] as is
    a = act(h) | act(g) * u of h.chunk(2, -1) | GPT-OSS's clamped gate      (the gates of transformers_experts)
              | act(h) * grouped_mm(xs, W3.transpose(-2, -1), offs=offs)  (a separate up projection)
    y = grouped_mm(a, W2.transpose(-2, -1), offs=offs)
    [y = y * w.view(-1)[order][:, None]]                   routing weight on the output
    out = zeros_like(x).index_add(0, tok, y)               | index_add_ | scatter_add(_)(0, tok.view(-1, 1)
                                                             .expand(-1, D), y); into zeros or into a shared
                                                             expert's output (torchtitan): out = shared + routed

Run e of the sorted rows is expert e's, so ``W[e]`` meets exactly expert e's pairs, only because the offsets are
the running sums of a per-expert count of the very ids the sort orders ascending: the walk proves that (and,
for a router it does not recognise, that the ids are a top-k over E scores) and takes nothing on trust. The
combine's index must be the gather's token index of the same sort.

transformers' own grouped_mm experts (an inverse permutation and a [T, K, D] sum as the combine) are
``transformers.grouped_mm``'s: a candidate whose sort permutation is inverted is left to that pattern.

Entry point: the pattern ``handwritten.grouped_mm`` (family ``"handwritten"``), registered at import.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from ..fx.dag import mutated_arg
from ..fx.graph import arg, common_prefix, is_op, module_path, op, val
from ..spec import ExpertSpec, MoESpec, MoEWeights, SharedExpertSpec
from .base import Match, MatchContext, Rejection, register_pattern
from .handwritten import (_ALLOCS, _CASTS, FAMILY, HandwrittenLoop, _activation, _is_activation, _NoMatch,
                          _Walk, _want)
from .routers import _dtype_of as _dtype
from .routers import recognise_router
from .sorted_experts import _gate_column, ascending_order
from .transformers_experts import _match_gate, _Miss, _shape, _shared_mlp, inverted

__all__ = ["find_grouped_mm"]

PATTERN = "handwritten.grouped_mm"
_INT_CASTS = ("to", "int", "long", "float", "type", "double")


def _name(node) -> str:
    return f"{node.name} ({op(node) or node.op})" if isinstance(node, fx.Node) else repr(node)


def _flat_ids(flat: fx.Node, walk: _Walk) -> fx.Node:
    """``ids.view(-1)`` / ``reshape(-1)`` / ``flatten()`` of [T, K] ids -> ids."""
    _want(is_op(flat, "view", "reshape", "flatten") and (op(flat) == "flatten" or tuple(flat.args[1:]) in
                                                         ((-1,), ((-1,),), ([-1],))),
          f"{_name(flat)}: expected the [T, K] expert ids flattened with view(-1)")
    ids = flat.args[0]
    _want(isinstance(val(ids), torch.Tensor) and val(ids).dim() == 2, f"{_name(ids)}: the expert ids should be [T, K]")
    walk.take(flat)
    return ids


# ------------------------------------------------------------------------------------ offsets and counts

def _offsets(offs: fx.Node, walk: _Walk) -> tuple[fx.Node, int, Optional[fx.Node]]:
    """``cumsum(counts)`` as int32 of a per-expert count: (the counted [T, K] ids, E, the sort node whose values
    were counted or None)."""
    walk.take(offs)
    node = walk.casts(offs, ("to", "int", "type"))
    _want(is_op(node, "cumsum") and arg(node, 1, "dim") in (0, -1),
          f"{_name(offs)}: the grouped_mm offsets should be a cumsum of tokens per expert")
    walk.take(node)
    counts = walk.casts(node.args[0], _INT_CASTS)
    walk.take(counts)
    if is_op(counts, "bincount"):
        _want(arg(counts, 1, "weights") is None, f"{_name(counts)}: a weighted bincount does not count pairs")
        E = arg(counts, 2, "minlength")
        _want(isinstance(E, int) and E >= 1, f"{_name(counts)}: bincount needs minlength=E (the expert count)")
        counted = walk.casts(counts.args[0], _INT_CASTS)
    elif is_op(counts, "histc"):
        E = arg(counts, 1, "bins", 100)
        _want(isinstance(E, int) and arg(counts, 2, "min", 0) == 0 and arg(counts, 3, "max", 0) in (E - 1, E),
              f"{_name(counts)}: expected histc(ids, bins=E, min=0, max=E-1 or E)")
        counted = walk.casts(counts.args[0], _INT_CASTS)
    elif is_op(counts, "sum") and is_op(counts.args[0], "one_hot"):
        onehot = counts.args[0]
        E = arg(onehot, 1, "num_classes", -1)
        rank = getattr(val(onehot.args[0]), "ndim", 0)
        _want(isinstance(E, int) and E >= 1 and rank in (1, 2)
              and arg(counts, 1, "dim") in ({1: (0, [0], (0,)), 2: ((0, 1), [0, 1])}[rank]),
              f"{_name(counts)}: expected one_hot(ids, E) summed over every pair")
        walk.take(onehot)
        counted = onehot.args[0]
    else:
        raise _NoMatch(f"{_name(counts)}: the offsets should sum a per-expert count (bincount, histc or a summed "
                       "one_hot of the expert ids)")
    _want(_shape(counts) == (E,), f"{_name(counts)}: expected [E={E}] counts, found {_shape(counts)}")
    if getattr(val(counted), "ndim", 0) == 2:   # one_hot of the [T, K] ids themselves
        return counted, E, None
    if is_op(counted, "getitem") and counted.args[1] == 0 and is_op(counted.args[0], "sort"):
        walk.take(counted)
        srt = counted.args[0]
        return _flat_ids(srt.args[0], walk), E, srt
    return _flat_ids(counted, walk), E, None


def _order(tok: fx.Node, walk: _Walk, K: int) -> fx.Node:
    """``order // K`` (``order`` itself for K=1) -> order."""
    if K == 1 and (is_op(tok, "argsort") or is_op(tok, "getitem") and tok.args[1] == 1 and is_op(tok.args[0], "sort")):
        return tok
    if is_op(tok, "div"):
        _want(arg(tok, 2, "rounding_mode") in ("trunc", "floor"), f"{_name(tok)}: expected an integer division")
    else:
        _want(is_op(tok, "floordiv", "floor_divide"), f"{_name(tok)}: the token index should be order // {K}")
    _want(tok.args[1] == K, f"{_name(tok)}: divided by {tok.args[1]!r}, not the top-k count {K}")
    walk.take(tok)
    return tok.args[0]


def _same_division(a: fx.Node, b: fx.Node, walk: _Walk) -> bool:
    """Whether ``a`` computes what ``b`` does, ``order // K`` written twice (into the walk when so)."""
    if not (op(a) == op(b) and op(a) in ("floordiv", "floor_divide", "div") and a.args == b.args
            and a.kwargs == b.kwargs):
        return False
    walk.take(a)
    return True


def _sorted_ids(order: fx.Node, walk: _Walk, sort_counted: Optional[fx.Node]) -> fx.Node:
    """The ascending sort behind ``order`` -> the [T, K] ids it sorts (whose values the counts may read)."""
    flat, srt = ascending_order(order, walk)
    _want(sort_counted is None or srt is sort_counted, f"{_name(order)}: the counts read another sort's values")
    return _flat_ids(flat, walk)


# ------------------------------------------------------------------------------------ gather and weights

def _token_column(idx: fx.Node, walk: _Walk) -> Optional[fx.Node]:
    """``tok.view(-1, 1).expand(-1, D)`` and friends (a token index broadcast over D) -> tok, else None."""
    if not is_op(idx, "expand", "expand_as"):
        return None
    col = idx.args[0]
    if is_op(col, "view", "reshape") and tuple(col.args[1:]) in ((-1, 1), ((-1, 1),)):
        inner = col.args[0]
    elif is_op(col, "unsqueeze") and arg(col, 1, "dim") in (1, -1):
        inner = col.args[0]
    elif is_op(col, "getitem") and col.args[1] in ((slice(None), None), (slice(None, None, None), None)):
        inner = col.args[0]
    else:
        return None
    walk.take(idx)
    walk.take(col)
    return inner


def _gathered(xs: fx.Node, walk: _Walk) -> tuple[fx.Node, fx.Node]:
    """``x[tok]`` / ``index_select(x, 0, tok)`` / ``gather(x, 0, tok broadcast)`` -> (x, tok)."""
    walk.take(xs)
    if is_op(xs, "getitem") and isinstance(xs.args[1], fx.Node):
        return xs.args[0], xs.args[1]
    if is_op(xs, "index_select") and arg(xs, 1, "dim") == 0:
        return xs.args[0], arg(xs, 2, "index")
    if is_op(xs, "gather") and arg(xs, 1, "dim") == 0:
        tok = _token_column(arg(xs, 2, "index"), walk)
        _want(tok is not None and _shape(arg(xs, 2, "index")) == _shape(xs),
              f"{_name(xs)}: expected gather(x, 0, tok.view(-1, 1).expand(-1, D))")
        return xs.args[0], tok
    raise _NoMatch(f"{_name(xs)}: the experts' input rows should be x[tok] of the sorted pairs")


def _pair_weights(col: fx.Node, order: fx.Node, walk: _Walk) -> Optional[tuple[fx.Node, torch.dtype]]:
    """A column of routing weights in sorted order, ``w.view(-1)[order][:, None]`` or ``w.view(-1)[order, None]``
    (casts allowed) -> (the [T, K] weights, their dtype where applied), else None."""
    applied = _dtype(col)
    sub = _Walk()
    node = sub.casts(col)
    if is_op(node, "getitem") and node.args[1] == (order, None):
        sub.take(node)
        g = node
    else:
        g = _gate_column(node, sub)
        if g is None:
            return None
        g = sub.casts(g)
        if not (is_op(g, "getitem") and g.args[1] is order):
            return None
        sub.take(g)
    flat = g.args[0]
    if not is_op(flat, "view", "reshape", "flatten") or \
            op(flat) != "flatten" and tuple(flat.args[1:]) not in ((-1,), ((-1,),), ([-1],)):
        return None
    sub.take(flat)
    walk.nodes |= sub.nodes
    return flat.args[0], applied


# ------------------------------------------------------------------------------------ the experts

def _stacked_weight(w, walk: _Walk, E: int, what: str) -> tuple[fx.Node, bool]:
    """The [E, ., .] parameter a grouped_mm reads -> (node, transposed storage?): ``W.transpose(-2, -1)`` (or
    ``W.mT``) is the nn.Linear layout [E, out, in]; ``W`` used as is holds [E, in, out]."""
    transposed = True
    w = walk.casts(w)   # a cast on either side of the transpose
    if is_op(w, "getattr") and w.args[1] == "mT":
        walk.take(w)
        w, transposed = w.args[0], False
    elif is_op(w, "transpose", "permute"):
        dims = tuple(w.args[1:]) if len(w.args) > 2 else tuple(w.args[1]) if len(w.args) == 2 else ()
        _want(dims in ((-2, -1), (-1, -2), (1, 2), (2, 1), (0, 2, 1)), f"{_name(w)}: expected {what}.transpose(-2, -1)")
        walk.take(w)
        w, transposed = w.args[0], False
    w = walk.casts(w)
    _want(isinstance(w, fx.Node) and w.op in ("placeholder", "get_attr") and _shape(w) is not None
          and len(_shape(w)) == 3 and _shape(w)[0] == E,
          f"{_name(w)}: {what} should be a stacked [E={E}, ., .] parameter; found shape {_shape(w)}")
    return w, transposed


def _grouped(node: fx.Node) -> None:
    _want(arg(node, 3, "bias") is None and arg(node, 4, "out_dtype") is None,
          f"{_name(node)}: grouped_mm with a bias or an out_dtype is not modelled")


def _rows(mm: fx.Node) -> tuple:
    """The rows a projection reads, dtype casts aside, and their dtype: ``x.bfloat16()`` written once per up
    projection reads the same rows."""
    return _Walk().casts(mm.args[0]), _dtype(mm.args[0])


def _up_and_gate(ups: list, region: set, walk: _Walk):
    """The up projection(s), all reading the same rows, and the gate after them -> (gate output, activation, glu,
    alpha, limit, [(projection, weight role)])."""
    if len(ups) == 1:
        mm = ups[0]
        try:
            gate = _match_gate(mm, [u for u in mm.users if u not in region], region)
        except _Miss as exc:
            raise _NoMatch(str(exc)) from None
        return gate.out, gate.activation, gate.glu, gate.alpha, gate.limit, [(mm, "w1")]
    for gmm, umm in (ups, ups[::-1]):
        mul = next(iter(umm.users)) if len(umm.users) == 1 else None
        if not (is_op(mul, "mul") and len(mul.args) == 2 and umm in mul.args):
            continue
        act_out = mul.args[1] if mul.args[0] is umm else mul.args[0]
        if not _is_activation(act_out):
            continue
        sub = _Walk()
        activation, inner = _activation(act_out, sub)
        if inner is gmm:
            walk.nodes |= sub.nodes | {mul}
            return mul, activation, "separate", 1.702, None, [(gmm, "w1"), (umm, "w3")]
    raise _NoMatch(f"{_name(ups[0])}, {_name(ups[1])}: expected act(gate projection) * up projection")


def _input_rows(rows: fx.Node, K: int, walk: _Walk):
    """From the up projection's input back to the gather: (x, tok, order, the [T, K] weights and their applied
    dtype and the product when the routing weight is on the input, else None for those three)."""
    core = walk.casts(rows)
    if not is_op(core, "mul"):
        x, tok = _gathered(core, walk)
        return x, tok, _order(tok, walk, K), None, None, None
    _want(len(core.args) == 2 and all(isinstance(a, fx.Node) for a in core.args),
          f"{_name(core)}: the experts' input rows are multiplied by something other than their routing weights")
    for xs, col in (core.args, core.args[::-1]):
        if is_op(_Walk().casts(xs), "getitem", "index_select", "gather"):
            break
    else:
        raise _NoMatch(f"{_name(core)}: neither factor is the gathered rows x[tok]")
    walk.take(core)
    x, tok = _gathered(walk.casts(xs), walk)
    order = _order(tok, walk, K)
    found = _pair_weights(col, order, walk)
    _want(found is not None, f"{_name(core)}: the experts' input rows are multiplied by something other than "
                             "their routing weights w.view(-1)[order]")
    return x, tok, order, found[0], found[1], core


# ------------------------------------------------------------------------------------ combine

def _to_write(y: fx.Node, region: set, walk: _Walk):
    """From the down projection through casts and at most one product (the routing weight on the output) to the
    write into the output buffer -> (write, token index, the product or None, its other factor, the written
    source)."""
    node, mul, col = y, None, None
    while True:
        users = [u for u in node.users if u not in region and u not in walk.nodes]
        _want(len(users) == 1, f"{_name(node)} should feed only the combine; it has {len(users)} users")
        u = users[0]
        if is_op(u, *_CASTS) and u.args[0] is node:
            walk.take(u)
        elif is_op(u, "mul") and mul is None and len(u.args) == 2:
            mul, col = u, (u.args[1] if u.args[0] is node else u.args[0])
            walk.take(u)
        else:
            break
        node = u
    name = op(u)
    _want(name in ("index_add", "index_add_", "scatter_add", "scatter_add_") and arg(u, 1, "dim") == 0
          and "alpha" not in u.kwargs and arg(u, 3, "source" if name.startswith("index") else "src") is node,
          f"{_name(u)}: expected out.index_add(0, tok, y) or out.scatter_add(0, tok.view(-1, 1).expand(-1, D), y)")
    idx = arg(u, 2, "index")
    if name.startswith("scatter"):
        tok = _token_column(idx, walk)
        _want(tok is not None and _shape(idx) == _shape(node),
              f"{_name(u)}: the scatter index should be the token index broadcast over each whole row")
    else:
        tok = idx
    return u, tok, mul, col, node


def _buffer(buf: fx.Node, write: fx.Node, x: fx.Node, walk: _Walk):
    """The output buffer: zeros shaped like x (-> None), or a shared expert's output (-> its spec and weights)."""
    _want(_shape(buf) == _shape(x), f"{_name(buf)}: the combine buffer should be shaped like x [T, D]")
    if op(write).endswith("_"):
        _want(not [u for u in buf.users if u is not write and mutated_arg(u) is buf],
              f"{_name(buf)}: written by more than the combine")
    if is_op(buf, *_ALLOCS):
        walk.take(buf)
        return None
    mlp = _shared_mlp(buf, lambda a: a is x)
    _want(mlp is not None, f"{_name(buf)}: the combine adds into neither zeros nor a shared expert's output")
    act, glu, w1, w2, w3, nodes = mlp
    inside = set(nodes) | {write}
    _want(all(u in inside for n in nodes if n is not buf for u in n.users)
          and (op(write).endswith("_") or list(buf.users) == [write]),
          f"{_name(buf)}: the shared expert's values are read elsewhere")
    walk.nodes |= set(nodes)
    return SharedExpertSpec(activation=act, glu=glu, gated=False), w1, w2, w3


# ------------------------------------------------------------------------------------ the match

def _match(ctx: MatchContext, offs: fx.Node, mms: list) -> Match:
    walk = _Walk()
    counted_ids, E, sort_counted = _offsets(offs, walk)
    _want(len(mms) in (2, 3) and all(u in mms for u in offs.users),
          f"{_name(offs)}: expected two or three grouped matmuls (up, [up,] down) on these offsets; found "
          f"{', '.join(_name(u) for u in offs.users)}")
    for mm in mms:
        _grouped(mm)
    walk.nodes |= set(mms)
    ups = [m for m in mms if _rows(m) == _rows(mms[0])]
    downs = [m for m in mms if m not in ups]
    _want(len(downs) == 1, f"{_name(offs)}: expected the up projection(s) to read the same rows and one down "
                           "projection to read the gate")
    mm2 = downs[0]
    K = val(counted_ids).shape[1]
    x, tok, order, w_in, w_in_dtype, product = _input_rows(ups[0].args[0], K, walk)
    for up in ups[1:]:
        walk.casts(up.args[0])
    ids = _sorted_ids(order, walk, sort_counted)
    _want(ids is counted_ids, f"the counts read {counted_ids.name}, the sort {ids.name}: not the same ids")
    _want(_shape(x) is not None and len(_shape(x)) == 2, f"{_name(x)}: the hidden states should be [T, D]")
    # the experts
    before = set(walk.nodes)
    region = set(before)
    out, activation, glu, alpha, limit, roles = _up_and_gate(ups, region, walk)
    walk.nodes |= region
    compute = _dtype(mm2)
    for n in walk.nodes - before:
        _want(_dtype(n) in (None, compute), f"{_name(n)}: the expert gate computes in {_dtype(n)}, the projections "
                                            f"in {compute}; the fused op computes both in one dtype")
    a = mm2.args[0]
    while a is not out and is_op(a, *_CASTS) and _dtype(a) == compute:
        walk.take(a)
        a = a.args[0]
    _want(a is out, f"{_name(mm2)}: the down projection should read the gate's output {out.name}")
    weights, transposed = {}, set()
    for mm, role in roles + [(mm2, "w2")]:
        weights[role], t = _stacked_weight(mm.args[1], walk, E, role)
        if t:
            transposed.add(role)
    _want(len(transposed) in (0, len(weights)), "the expert weights mix the [E, out, in] and [E, in, out] layouts")
    # the combine
    write, tok_c, mul, col, src = _to_write(mm2, walk.nodes, walk)
    _want(tok_c is tok or _same_division(tok_c, tok, walk),
          f"{_name(write)}: the combine adds at another index than the gathered tokens {tok.name}")
    buf = write.args[0]
    buf_dtype = _dtype(buf)
    if mul is not None:
        _want(w_in is None, f"{_name(mul)}: the routing weight is applied both before and after the experts")
        found = _pair_weights(col, order, walk) if isinstance(col, fx.Node) else None
        _want(found is not None, f"{_name(mul)}: the expert outputs are multiplied by something other than their "
                                 "routing weights w.view(-1)[order]")
        w_tk, applied = found
        _want(_dtype(mul) == buf_dtype, f"{_name(mul)}: the weighted outputs are formed in {_dtype(mul)} but summed "
                                        f"in {buf_dtype}")
    else:
        _want(w_in is not None, f"{_name(write)}: the expert outputs are combined without routing weights")
        w_tk, applied = w_in, w_in_dtype
        want = torch.promote_types(_dtype(x), applied)
        _want(_dtype(product) == want and all(_dtype(f) in (want, _dtype(x)) for f in product.args),
              f"{_name(product)}: the weighted input rows are formed in {_dtype(product)}; the fused op forms them "
              f"in promote(x, weights) = {want}")
        _want(_dtype(src) == buf_dtype, f"{_name(write)}: the expert outputs are summed in {buf_dtype}, computed "
                                        f"in {_dtype(src)}")
    shared = _buffer(buf, write, x, walk)
    walk.take(write)
    # an in-place combine's buffer is the output, or the write's own result when the code reads that instead
    # (``return zeros_like(x).index_add_(...)``)
    output = buf if op(write).endswith("_") and (not write.users or len(buf.users) > 1) else write
    _want(output is write or not write.users, f"{_name(write)}: both the buffer and the write's result are read")
    router = recognise_router(w_tk, ids, applied_dtype=applied)
    if router.external:
        HandwrittenLoop._check_external_ids(ids, E)
    walk.nodes |= router.nodes
    spec = MoESpec(router=router.spec.replace(top_k=K) if router.spec.top_k != K else router.spec,
                   experts=ExpertSpec(num_experts=E, activation=activation, glu=glu, alpha=alpha, limit=limit,
                                      combine_dtype=None if buf_dtype == compute else buf_dtype),
                   shared=shared[0] if shared else None, weight_on_input=w_in is not None)
    mw = MoEWeights(w1=weights["w1"], w2=weights["w2"], w3=weights.get("w3"), selection_bias=router.selection_bias,
                    shared_w1=shared[1] if shared else None, shared_w2=shared[2] if shared else None,
                    shared_w3=shared[3] if shared else None)
    notes = ("pairs sorted by expert, one grouped_mm per projection over the per-expert offsets",)
    if w_in is not None:
        notes += ("routing weight on the experts' input, as written",)
    if router.external:
        notes += (f"router kept as written: {router.reason}",)
    paths = [module_path(n) for n in (*mms, write, *router.nodes)]
    where = "" if "" in paths else common_prefix(paths)   # the block: experts, combine and router inside it
    return Match(family=FAMILY, pattern=PATTERN, spec=spec, x=x, output=output, region=frozenset(walk.nodes),
                 weights=mw, router_logits=router.logits, topk_weights=w_tk if router.external else None,
                 topk_ids=ids if router.external else None, module_path=where, notes=notes,
                 transposed=frozenset(transposed), router_outputs=None if router.external else (w_tk, ids))


def find_grouped_mm(ctx: MatchContext):
    """Each set of offsets shared by grouped matmuls is a candidate (transformers' own form is left to
    ``transformers.grouped_mm``)."""
    seen = set()
    for mm in ctx.nodes_of("grouped_mm"):
        offs = arg(mm, 2, "offs")
        if not isinstance(offs, fx.Node) or offs in seen:
            continue
        seen.add(offs)
        mms = sorted((u for u in offs.users if is_op(u, "grouped_mm")), key=lambda n: ctx.position[n])
        # transformers' block as a whole: only its first projection's input shows the inverted permutation
        if any(m in ctx.claimed or inverted(m) for m in mms):
            continue
        try:
            yield _match(ctx, offs, mms)
        except _NoMatch as exc:
            yield Rejection(FAMILY, PATTERN, str(exc), module_path(mm).rpartition(".")[0])


register_pattern(find_grouped_mm, name=PATTERN, family=FAMILY, priority=25)
