"""Hand-written MoE loops: ``for e in range(E)`` over per-expert FFNs, accumulating into one output buffer.

The family covers the seed's Switch layer, transformers-4 style Mixtral blocks and the usual research code:

    out = zeros_like(x)                                   # the accumulation buffer (also zeros / new_zeros)
    for e in range(E):
        tok, slot = torch.where(ids == e)                 # DISPATCH (see below)
        y = expert[e](x[tok])                             # GATHER + FFN
        out.index_add_(0, tok, y * w[tok, slot, None])    # WEIGHT + COMBINE

Recognition works backwards from each in-place write into the buffer, one small predicate per step; each step
lists the forms it accepts (data), and raises ``_NoMatch`` with a reason when it sees something else:

    COMBINE   out.index_add_(0, tok, y) | out.scatter_add_(0, tok[:, None].expand(-1, D), y)
              | out.scatter_reduce_(0, tok[:, None].expand(-1, D), y, "sum")
              | out.index_put_((tok,), y, accumulate=True) | out[tok] += y (tok also a pair b, t, see DISPATCH)
              | each of the four as a function: out = out.index_add(0, tok, y), ...
              | out[tok] = y (a sum only under top-1 routing: refused for ids of k > 1 experts per token)
    WEIGHT    y = f * w[tok, slot, None] (either order; ``w[tok, slot].unsqueeze(-1)``/``[:, None]``/``view``;
              ``w[tok, None]`` for 1-D top-1 weights), with dtype casts anywhere; or the weight summed over the
              slots that chose e, ``(w * (ids == e)).sum(-1)[tok, None]``, with the tokens of
              ``(ids == e).any(-1)`` (DISPATCH's last form); or column e of a dense ``[T, E]`` gate,
              ``gate[tok, e].unsqueeze(1)`` with the same tokens and ids from a top-k (makeMoE: the op takes
              ``gate.gather(-1, ids)``, ``Match.dense_weights``); or any of these on the expert's input,
              ``expert(x[tok] * w[tok, slot, None])`` (``MoESpec.weight_on_input``). A squeeze that keeps the
              shape may follow the product.
    FFN       Linear -> act (also in place) -> Linear (``nn.Sequential``), act(Linear) * Linear -> Linear
              (SwiGLU/GeGLU module), Linear -> chunk(2) -> act(gate) * up -> Linear (fused gate_up); eval-mode
              dropout is skipped.
              Weights are the ModuleList's own parameters (a list per role: never stacked) or ``W[e]`` rows of a
              stacked parameter. A projection is ``F.linear(x, w, b)`` or a matmul ``x @ w (+ b)`` (also
              ``einsum("nd,df->nf", x, w)``): ``w`` then holds ``[in, out]`` (``Match.transposed``), or
              nn.Linear's ``[out, in]`` read as ``w.t()``/``w.T`` (``einsum("nd,fd->nf", ...)``).
              Activations: silu, gelu, gelu(tanh), relu, squared relu (``relu(h) ** 2``).
    GATHER    x[tok] | x[None, tok].reshape(-1, D) | x.index_select(0, tok) | x.view(-1, D)[m.view(-1)] for a
              boolean token mask m (x then ``[B, S, D]`` and the buffer too, written as ``out[m] += y``)
    DISPATCH  torch.where(ids == e) -> (tok, slot)  |  torch.where(one_hot(ids, E).permute(2, 1, 0)[e]) ->
              (slot, tok) (``permute(2, 0, 1)`` gives (tok, slot))  |  (ids == e).nonzero() -> [:, 0], [:, 1]
              |  with 1-D top-1 ids: torch.where(ids == e)[0], the mask ids == e (x[mask]),
              (ids == e).nonzero().squeeze(-1)  |  tok = (ids == e).any(-1).nonzero().squeeze(-1) (or
              torch.where(...)[0], or the mask itself, also over [B, S, K] ids) with the masked-sum weight or a
              dense gate column  |  b, t, slot = torch.where(ids == e) over [B, S, K] ids, with x[b, t],
              w[b, t, slot, None] and out[b, t] += y (or index_put_((b, t), ...)) on [B, S, D] tokens

The loop must cover every expert 0..E-1 exactly once with one FFN structure; the weights and ids of all experts
must be the same two nodes, which ``routers.recognise_router`` resolves to a RouterSpec (or an external router).
Everything else (an extra op on the way, a second buffer, an expert skipped) is a Rejection with the reason.

Legend: T tokens, D hidden size, E experts, K top-k, N routed (token, slot) pairs of one expert.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
import torch.fx as fx

from ..fx.dag import mutated_arg
from ..fx.graph import arg, common_prefix, is_op, module_path, op, squared_relu, val
from ..spec import ExpertSpec, MoESpec, MoEWeights, RouterSpec
from .base import Match, MatchContext, Rejection, register_pattern
from .routers import RouterMatch, recognise_router

__all__ = ["HandwrittenLoop", "routed_match"]

# ops that keep an integer tensor's values (casts between int32 and int64, reshapes): the expert-id range proof
# (``HandwrittenLoop._check_external_ids``) looks through them
_VALUE_KEEPING = ("to", "long", "int", "squeeze", "unsqueeze", "view", "reshape", "flatten")

FAMILY = "handwritten"
_CASTS = ("to", "float", "type_as", "half", "bfloat16", "double", "type")
_ALLOCS = ("zeros", "zeros_like", "new_zeros")
_ACCUMULATES = ("index_add", "scatter_add", "scatter_reduce", "index_put")   # COMBINE ops, functional ...
_ACCUMULATES_INPLACE = tuple(name + "_" for name in _ACCUMULATES)            # ... and in place
_MATMULS = ("matmul", "einsum")
_ACTIVATIONS = {"silu": "silu", "relu": "relu", "gelu": "gelu"}
_EXPERT_KEYS = ("w1", "w2", "w3", "b1", "b2", "b3")


class _NoMatch(Exception):
    pass


def _want(cond: bool, reason: str) -> None:
    if not cond:
        raise _NoMatch(reason)


def _weight_kinds(params: dict) -> dict:
    """role -> how an expert holds that weight (``_Expert.params``' kinds): experts of one MoE must agree."""
    return {k: (v[0] if v else None) for k, v in params.items()}


@dataclass
class _Expert:
    """One loop iteration, as recognised."""

    e: int
    x: fx.Node
    ids: fx.Node
    weights: Optional[fx.Node]
    weights_dtype: Optional[torch.dtype]   # the routing weight's dtype where it multiplies the expert output
    combine_dtype: Optional[torch.dtype]   # the dtype the weighted output is formed and summed in
    activation: str
    glu: Optional[str]
    params: dict                  # role -> (kind, node): "param" (the expert's own tensor) or "row" (stacked[e]);
                                  # weights used as x @ w ([in, out]) are "param.kn" / "row.kn"
    on_input: bool = False        # the routing weight scales the expert's input (MoESpec.weight_on_input)
    dense: bool = False           # ``weights`` is a dense [T, E] gate read at column e (``_dense_weight``)


class _Walk:
    def __init__(self) -> None:
        self.nodes: set = set()

    def take(self, node: fx.Node) -> fx.Node:
        self.nodes.add(node)
        return node

    def casts(self, node, names: tuple = _CASTS):
        """Up through the dtype casts ``names`` (taken into the walk) -> the tensor they cast."""
        while is_op(node, *names) and isinstance(node.args[0], fx.Node) and _same_shape(node, node.args[0]):
            self.take(node)
            node = node.args[0]
        return node


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    va, vb = val(a), val(b)
    return isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and tuple(va.shape) == tuple(vb.shape)


def _is_index(tok: Any) -> bool:
    """A token index: one node (rows of [T, D]), or a pair of nodes (b, t) (rows of [B, S, D], from
    ``b, t, slot = torch.where(ids == e)`` over [B, S, K] ids)."""
    return isinstance(tok, fx.Node) or (isinstance(tok, tuple) and len(tok) == 2
                                        and all(isinstance(t, fx.Node) for t in tok))


def _same_index(a: Any, b: Any) -> bool:
    """The same token index (a pair is rebuilt as a new tuple at each use)."""
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(x is y for x, y in zip(a, b))
    return a is b


# ---------------------------------------------------------------- COMBINE: buffer writes -> (tok, contribution)

def _combine_writes(buf: fx.Node) -> list[tuple[fx.Node, fx.Node, fx.Node, set]]:
    """Every accumulation into ``buf``: (writer, tok, y, nodes). Raises _NoMatch on any other write next to them;
    a buffer only other writes touch (a recurrent state filled by ``copy_``) is no MoE output: no writes."""
    writes, other = [], []
    for u in buf.users:
        if mutated_arg(u) is not buf:
            continue
        name = op(u)
        if name in _ACCUMULATES_INPLACE:
            acc = _accumulation(u)
            if acc is None:   # not along the rows (a load-balancing loss's zeros(B, E).scatter_add_(1, ...))
                other.append(f"{u.name} ({name}) adds into the output buffer {buf.name} along dim "
                             f"{arg(u, 1, 'dim')}")
            else:
                writes.append((u, *acc))
        elif name == "setitem":
            tok, rhs = u.args[1], u.args[2]
            if not _is_index(tok) or not isinstance(rhs, fx.Node):
                raise _NoMatch(f"{u.name} writes into the output at an index that is not a token index")
            old = _added_slice(u)
            if old is None:   # out[tok] = y: an accumulation only under top-1 routing (checked in _match)
                writes.append((u, tok, rhs, {u}))
                continue
            y = rhs.args[1] if rhs.args[0] is old else rhs.args[0]
            writes.append((u, tok, y, {u, rhs, old}))
        else:
            other.append(f"{u.name} ({name}) writes into the output buffer {buf.name} in a way not modelled")
    if writes and other:
        raise _NoMatch(other[0])
    return writes


def _accumulation(u: fx.Node) -> Optional[tuple[fx.Node, fx.Node, set]]:
    """(tok, y, nodes) of ``u``, one of the COMBINE forms that add the rows of ``y`` to rows ``tok`` of the buffer
    (in place or functional); None for such an op along another dim (no combine of token rows); _NoMatch, with
    the reason, for one along the rows but not of that form."""
    name = op(u).rstrip("_")
    if name != "index_put" and arg(u, 1, "dim") != 0:
        return None
    if name == "index_add":
        if len(u.args) < 4 or "alpha" in u.kwargs:
            raise _NoMatch(f"{u.name} is not index_add(0, tok, y)")
        return u.args[2], u.args[3], {u}
    if name == "index_put":
        indices, values = arg(u, 1, "indices"), arg(u, 2, "values")
        if arg(u, 3, "accumulate", False) is not True or not isinstance(indices, (tuple, list)) \
                or not _is_index(indices[0] if len(indices) == 1 else tuple(indices)):
            raise _NoMatch(f"{u.name} is not index_put((tok,), y, accumulate=True)")
        return (indices[0] if len(indices) == 1 else tuple(indices)), values, {u}
    if name == "scatter_reduce" and (arg(u, 4, "reduce") != "sum" or arg(u, 5, "include_self", True) is not True):
        raise _NoMatch(f'{u.name} is not scatter_reduce(0, tok[:, None].expand(-1, D), y, "sum") adding into the '
                       "buffer")
    idx, walk = arg(u, 2, "index"), _Walk()
    if is_op(idx, "expand", "expand_as"):
        idx = walk.take(idx).args[0]
    if is_op(idx, "unsqueeze") and arg(idx, 1, "dim") in (1, -1) \
            or is_op(idx, "view", "reshape") and len(idx.args) == 3 and idx.args[2] == 1 \
            or is_op(idx, "getitem") and idx.args[1] == (slice(None), None):   # tok[:, None]
        return walk.take(idx).args[0], arg(u, 3, "src"), walk.nodes | {u}
    raise _NoMatch(f"{u.name} scatters with an index that is not a broadcast token index")


def _added_slice(setitem: fx.Node) -> Optional[fx.Node]:
    """For ``out[tok] = rhs``: the ``out[tok]`` node that ``rhs`` adds to (``out[tok] += y``), or None."""
    buf, tok, rhs = setitem.args[:3]
    if not (is_op(rhs, "iadd", "add") and len(rhs.args) == 2):
        return None
    return next((a for a in rhs.args if is_op(a, "getitem") and a.args[0] is buf and _same_index(a.args[1], tok)),
                None)


def _assigns(writer: fx.Node) -> bool:
    """Whether a write into the buffer is ``out[tok] = y`` (not ``out[tok] += y``)."""
    return op(writer) == "setitem" and _added_slice(writer) is None


def _functional_chain(buf: fx.Node) -> tuple[list, fx.Node]:
    """out = zeros; out = out.index_add(0, tok, y) ... (or another functional COMBINE form): the writes and the
    chain's last node."""
    writes, node = [], buf
    while True:
        nxt = [u for u in node.users if is_op(u, *_ACCUMULATES) and u.args[0] is node]
        if len(nxt) != 1:
            return writes, node
        u = nxt[0]
        acc = _accumulation(u)
        if acc is None:
            if not writes:   # a lone zeros(B, E).scatter_add(1, ...) (a routing statistic): no MoE
                return writes, node
            raise _NoMatch(f"{u.name} ({op(u)}) adds into the output along dim {arg(u, 1, 'dim')}")
        writes.append((u, *acc))
        node = u


# ---------------------------------------------------------------- WEIGHT: y -> (ffn output, weights node)

def _split_weight(y: fx.Node, walk: _Walk, tok: fx.Node) -> tuple[fx.Node, fx.Node, Optional[fx.Node], fx.Node,
                                                                 fx.Node]:
    """y = f * w_e -> (f, topk weights node W, slot node or None, w_e, the product); w_e = W[tok, slot, None] and
    friends."""
    y = walk.casts(y, _CASTS + ("squeeze",))   # a squeeze that keeps the shape (makeMoE's .squeeze(1)) too
    if not (is_op(y, "mul") and len(y.args) == 2 and all(isinstance(a, fx.Node) for a in y.args)):
        raise _NoMatch(f"the expert output {y.name} is not multiplied by its routing weight")
    walk.take(y)
    for f, we in (y.args, y.args[::-1]):
        for read in _WEIGHT_READERS:
            try:
                sub = _Walk()
                W, slot = read(we, sub, tok)
            except _NoMatch:
                continue
            walk.nodes |= sub.nodes
            return f, W, slot, we, y
    raise _NoMatch(f"neither factor of {y.name} is the routing weight of the dispatched tokens")


@dataclass(frozen=True)
class _SlotMask:
    """In place of a slot index: expert e's weight of each token is summed over its slots under the mask ``eq``
    (``ids == e``), so the tokens are those with e in any slot (``_dispatch``)."""

    eq: fx.Node


def _column_index(we: fx.Node, walk: _Walk) -> tuple[fx.Node, tuple, bool]:
    """``we = src[index]``, maybe as a column (``.unsqueeze(-1)``/``.unsqueeze(1)`` of it, or a trailing None in
    the index) -> (src, the index without that None, whether it is a column)."""
    we = walk.casts(we)
    column = False
    if is_op(we, "unsqueeze") and arg(we, 1, "dim") in (-1, 1):
        column = True
        we = walk.casts(walk.take(we).args[0])
    if not is_op(we, "getitem"):
        raise _NoMatch(f"{we.name} does not index the routing weights")
    src, index = walk.take(we).args
    index = index if isinstance(index, tuple) else (index,)
    if len(index) >= 2 and index[-1] is None and not column:
        index, column = index[:-1], True
    return src, index, column


def _masked_weight(we: fx.Node, walk: _Walk, tok: fx.Node) -> tuple[fx.Node, _SlotMask]:
    """w_e = (W * (ids == e)).sum(-1)[tok, None] (also ``.sum(-1, keepdim=True)[tok]``, ``.unsqueeze(-1)``, the
    mask cast, either order) -> (W, the mask). Top-k ids hold e at most once per token, and even where a router's
    ids repeat it, applying the expert once with the summed weight is what the (token, slot) pairs sum to."""
    S, index, column = _column_index(we, walk)
    S = walk.casts(S)
    if not (len(index) == 1 and index[0] is tok and is_op(S, "sum")
            and arg(S, 1, "dim") in (-1, 1, (-1,), (1,), [-1], [1])):
        raise _NoMatch(f"{we.name} is not (W * (ids == e)).sum(-1)[tok, None]")
    if column == bool(arg(S, 2, "keepdim", False)):
        raise _NoMatch(f"{we.name} is not one weight column per token")
    prod = walk.casts(walk.take(S).args[0])
    if not (is_op(prod, "mul") and len(prod.args) == 2 and all(isinstance(a, fx.Node) for a in prod.args)):
        raise _NoMatch(f"{S.name} does not sum masked routing weights")
    walk.take(prod)
    for W, mask in (prod.args, prod.args[::-1]):
        mask = walk.casts(mask)
        if is_op(mask, "eq"):
            W = walk.casts(W)
            if isinstance(val(W), torch.Tensor) and val(W).dim() == 2 and _same_shape(W, mask.args[0]):
                return W, _SlotMask(mask)
    raise _NoMatch(f"{prod.name} is not routing weights [T, K] times the mask ids == e")


@dataclass(frozen=True)
class _DenseColumn:
    """In place of a slot index: expert e's weight of each token is column e of a dense ``[T, E]`` gate (zero
    outside the token's top-k), so the op takes ``gate.gather(-1, ids)`` (``Match.dense_weights``); the tokens are
    those with e in any slot (``_any_dispatch``)."""

    e: int


def _dense_weight(we: fx.Node, walk: _Walk, tok: fx.Node) -> tuple[fx.Node, _DenseColumn]:
    """w_e = G[tok, e].unsqueeze(1) (also ``G[tok, e, None]``, ``G[tok][:, e, None]`` not) -> (G, the column):
    makeMoE's ``flat_gating_output[flat_mask, i].unsqueeze(1)``."""
    G, index, column = _column_index(we, walk)
    if not (column and len(index) == 2 and isinstance(index[0], fx.Node) and _tokens(index[0]) is _tokens(tok)
            and isinstance(index[1], int) and not isinstance(index[1], bool)):
        raise _NoMatch(f"{we.name} is not G[tok, e, None], column e of a dense gate")
    G = walk.casts(G)
    if not (isinstance(val(G), torch.Tensor) and val(G).dim() == 2):
        raise _NoMatch(f"{we.name} reads a gate of rank {getattr(val(G), 'ndim', None)}, not [T, E]")
    return G, _DenseColumn(index[1])


def _weight_index(we: fx.Node, walk: _Walk, tok: fx.Node) -> tuple[fx.Node, Optional[fx.Node]]:
    we = walk.casts(we)
    trailing_none = False
    if is_op(we, "unsqueeze") and arg(we, 1, "dim") in (-1, 1):
        walk.take(we)
        we = walk.casts(we.args[0])
        trailing_none = True
    elif is_op(we, "view", "reshape") and we.args[1:] in ((-1, 1),):
        walk.take(we)
        we = walk.casts(we.args[0])
        trailing_none = True
    elif is_op(we, "getitem") and we.args[1] == (slice(None), None):
        walk.take(we)
        we = walk.casts(we.args[0])
        trailing_none = True
    if not is_op(we, "getitem"):
        raise _NoMatch(f"{we.name} does not index the routing weights")
    walk.take(we)
    W, index = we.args
    index = index if isinstance(index, tuple) else (index,)
    if index and index[-1] is None:
        if trailing_none:
            raise _NoMatch(f"{we.name} adds two trailing dims")
        index, trailing_none = index[:-1], True
    lead = len(tok) if isinstance(tok, tuple) else 1   # W[b, t, slot, None] for a (b, t) pair
    if not trailing_none or not _same_index(index[0] if lead == 1 else tuple(index[:lead]), tok) \
            or len(index) > lead + 1:
        raise _NoMatch(f"{we.name} is not W[tok, slot, None]")
    slot = index[lead] if len(index) == lead + 1 else None
    if lead == 2 and slot is None:
        raise _NoMatch(f"{we.name}: [B, S] top-1 weights without a slot index are not modelled")
    W = walk.casts(W)
    v = val(W)
    if not isinstance(v, torch.Tensor) or v.dim() != lead + (slot is not None):
        raise _NoMatch(f"{we.name} indexes routing weights of rank {getattr(v, 'ndim', None)} with "
                       f"{len(index)} indices")
    return W, slot


# How a factor may hold the routing weight, the stricter first (a masked sum is 1-D too; a dense column reads
# like W[tok, slot] with a constant slot).
_WEIGHT_READERS = (_masked_weight, _dense_weight, _weight_index)


# ---------------------------------------------------------------- FFN: f -> (x_e, params, activation, glu)

def _weight_source(w: Any, e: int, walk: _Walk) -> tuple:
    """A Linear weight/bias: ("param", node) for the expert's own tensor, ("row", stacked) for stacked[e]."""
    if isinstance(w, fx.Node) and w.op in ("placeholder", "get_attr"):
        return ("param", w)
    if is_op(w, "getitem") and w.args[1] == e and isinstance(w.args[0], fx.Node) \
            and w.args[0].op in ("placeholder", "get_attr"):
        walk.take(w)
        return ("row", w.args[0])
    raise _NoMatch(f"{getattr(w, 'name', w)} is not a parameter of expert {e} (nor row {e} of a stacked one)")


def _linear(node: fx.Node, e: int, walk: _Walk) -> tuple[fx.Node, tuple, Optional[tuple]]:
    """A projection -> (its input, weight source, bias source or None). A weight used as ``x @ w`` holds the
    ``[in, out]`` layout: its source's kind gets ``.kn`` ("param.kn", "row.kn"); ``x @ w.t()`` is nn.Linear's."""
    if is_op(node, "linear"):
        walk.take(node)
        w = _weight_source(arg(node, 1, "weight"), e, walk)
        b = arg(node, 2, "bias")
        return node.args[0], w, (None if b is None else _weight_source(b, e, walk))
    bias = None
    if is_op(node, "add") and len(node.args) == 2 and not node.kwargs:   # x @ w + b
        mm, b = node.args if is_op(node.args[0], *_MATMULS) else node.args[::-1]
        if not is_op(mm, *_MATMULS):
            raise _NoMatch(f"{node.name} (add) is not a projection plus its bias")
        walk.take(node)
        bias = _weight_source(b, e, walk)
        if _rank(b) != 1:
            raise _NoMatch(f"{node.name} adds {getattr(b, 'name', b)}, not a bias vector, to {mm.name}")
        node = mm
    if not is_op(node, *_MATMULS):
        raise _NoMatch(f"{node.name} ({op(node)}) is not an nn.Linear / F.linear or a matmul by an expert weight")
    walk.take(node)
    x, w, kn = _matmul_operands(node)
    if _rank(x) != 2 or _rank(w) != 2:
        raise _NoMatch(f"{node.name} is not a matmul of rows by a matrix")
    if _swaps_2d(w):
        walk.take(w)
        w, kn = w.args[0], not kn
    kind, src = _weight_source(w, e, walk)
    return x, (kind + ".kn" if kn else kind, src), bias


def _rank(node: Any) -> Optional[int]:
    v = val(node)
    return v.dim() if isinstance(v, torch.Tensor) else None


def _matmul_operands(node: fx.Node) -> tuple[Any, Any, bool]:
    """``x @ w`` or ``einsum("nd,df->nf", x, w)`` -> (x, w, whether w is read as [in, out]); ``einsum("nd,fd->nf",
    x, w)`` reads nn.Linear's [out, in]."""
    if is_op(node, "matmul"):
        return node.args[0], node.args[1], True
    eq, ops = node.args[0], node.args[1:]
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = tuple(ops[0])
    lhs, _, out = eq.replace(" ", "").partition("->") if isinstance(eq, str) else ("", "", "")
    ins = lhs.split(",")
    if len(ops) == 2 and len(ins) == 2 and all(len(t) == 2 for t in (*ins, out)) and len(set(ins[0])) == 2:
        (n, d), w_sub = ins[0], ins[1]
        f = out[1] if out[0] == n else None
        if f is not None and f not in (n, d) and w_sub in (d + f, f + d):
            return ops[0], ops[1], w_sub == d + f
    raise _NoMatch(f"{node.name}: einsum {eq!r} is not a matmul of rows by a matrix")


def _swaps_2d(w: Any) -> bool:
    """Whether ``w`` is a matrix's transpose: ``w.t()``, ``w.T``, ``w.mT``, ``w.transpose(0, 1)`` (any spelling of
    the two dims), ``w.permute(1, 0)``."""
    if is_op(w, "t") or is_op(w, "getattr") and w.args[1] in ("T", "mT"):
        return True
    if is_op(w, "transpose") and len(w.args) == 3:
        return all(isinstance(d, int) for d in w.args[1:]) and {d % 2 for d in w.args[1:]} == {0, 1}
    if is_op(w, "permute"):
        dims = tuple(w.args[1:] if len(w.args) > 2 else w.args[1])
        return dims in ((1, 0), (-1, -2), (1, -2), (-1, 0))
    return False


def _skip_dropout(node: fx.Node, walk: _Walk) -> fx.Node:
    while is_op(node, "dropout"):
        p, training = arg(node, 1, "p", 0.5), arg(node, 2, "training", True)
        if training is not False and isinstance(p, fx.Node):
            # torch.compile(dynamic=True) passes a module's float (nn.Dropout.p) as a graph input
            raise _NoMatch(f"{node.name} is a dropout whose probability {p.name} is a graph input, not a constant: "
                           f"the fused op has none and cannot assume it is 0 (compile in eval mode)")
        if training is not False and p != 0:
            raise _NoMatch(f"{node.name} is an active dropout; the fused op has none (compile in eval mode)")
        walk.take(node)
        node = node.args[0]
    return node


def _is_activation(node: Any) -> bool:
    return is_op(node, *_ACTIVATIONS) or squared_relu(node) is not None


def _activation(node: fx.Node, walk: _Walk) -> tuple[str, fx.Node]:
    relu = squared_relu(node)
    if relu is not None:  # relu(h) ** 2
        walk.take(node)
        walk.take(relu)
        return "relu2", relu.args[0]
    name = op(node)
    if name not in _ACTIVATIONS:
        raise _NoMatch(f"{node.name} ({name}) is not a supported activation (silu, gelu, gelu-tanh, relu, relu "
                       "squared)")
    if arg(node, 1 if name != "gelu" else 99, "inplace", False) is True and len(node.args[0].users) != 1:
        # nn.SiLU(inplace=True) overwrites its input: fine for a temporary nothing else reads
        raise _NoMatch(f"{node.name} overwrites {node.args[0].name}, which other nodes read")
    act = _ACTIVATIONS[name]
    if name == "gelu":
        approx = arg(node, 1, "approximate", "none")
        if approx not in ("none", "tanh"):
            raise _NoMatch(f"gelu approximate={approx!r}")
        act = "gelu_tanh" if approx == "tanh" else "gelu"
    walk.take(node)
    return act, node.args[0]


def _ffn(f: fx.Node, e: int, walk: _Walk) -> tuple[fx.Node, dict, str, Optional[str]]:
    f = _skip_dropout(walk.casts(f), walk)
    h, w2, b2 = _linear(f, e, walk)
    h = _skip_dropout(h, walk)
    params = {"w2": w2, "b2": b2}
    if is_op(h, "mul") and len(h.args) == 2:
        walk.take(h)
        for a, b in (h.args, h.args[::-1]):
            if _is_activation(a):
                break
        else:
            raise _NoMatch(f"{h.name} multiplies two branches, neither of them an activation")
        act, g = _activation(a, walk)
        if is_op(g, "getitem") and is_op(g.args[0], "chunk") and is_op(b, "getitem") and b.args[0] is g.args[0]:
            chunk = g.args[0]
            if not (g.args[1] == 0 and b.args[1] == 1 and arg(chunk, 1, "chunks") == 2
                    and arg(chunk, 2, "dim", 0) in (-1, 1)):
                raise _NoMatch(f"{chunk.name} does not split gate and up in halves along the last dim")
            walk.take(g)
            walk.take(b)
            walk.take(chunk)
            x_e, w1, b1 = _linear(chunk.args[0], e, walk)
            params.update(w1=w1, b1=b1)
            return x_e, params, act, "concat"
        x_e, w1, b1 = _linear(g, e, walk)
        x_e3, w3, b3 = _linear(b, e, walk)
        if x_e3 is not x_e:
            raise _NoMatch(f"gate and up projections of expert {e} read different inputs")
        params.update(w1=w1, b1=b1, w3=w3, b3=b3)
        return x_e, params, act, "separate"
    act, h1 = _activation(h, walk)
    x_e, w1, b1 = _linear(h1, e, walk)
    params.update(w1=w1, b1=b1)
    return x_e, params, act, None


# ---------------------------------------------------------------- GATHER and DISPATCH

def _flattens(node: Any) -> bool:
    """Whether ``node`` is ``t.view(-1)``, ``t.reshape(-1)`` or ``t.flatten()`` of a node t."""
    return (is_op(node, "view", "reshape") and tuple(node.args[1:]) in ((-1,), ((-1,),), ([-1],))
            or is_op(node, "flatten") and len(node.args) == 1 and not node.kwargs) \
        and isinstance(node.args[0], fx.Node)


def _tokens(tok: fx.Node) -> fx.Node:
    """The token mask a flattened mask comes from (``m.view(-1)``, ``m.reshape(-1)``, ``m.flatten()`` of a boolean
    m, ``[B, S]`` or already ``[T]``), else ``tok``: ``x.view(-1, D)[m.view(-1)]`` are the rows ``x[m]``."""
    if _flattens(tok) and getattr(val(tok.args[0]), "dtype", None) == torch.bool:
        return tok.args[0]
    return tok


def _unflattened(flat_x: fx.Node, mask: fx.Node, walk: _Walk) -> fx.Node:
    """The ``[B, S, D]`` (or ``[T, D]``) x of ``flat_x = x.view(-1, D)`` (or reshape) whose rows a flattened
    mask picks."""
    if is_op(flat_x, "view", "reshape") and len(flat_x.args) == 3 and flat_x.args[1] == -1:
        x = flat_x.args[0]
        xv, mv = val(x), val(mask)
        if isinstance(xv, torch.Tensor) and xv.dim() == mv.dim() + 1 and tuple(xv.shape[:-1]) == tuple(mv.shape) \
                and flat_x.args[2] == xv.shape[-1]:
            walk.take(flat_x)
            return x
    raise _NoMatch(f"{flat_x.name} is not the [B, S, D] hidden states flattened to rows, as the mask "
                   f"{mask.name} is")


def _gather(x_e: fx.Node, tok: fx.Node, walk: _Walk) -> fx.Node:
    """x_e = x[tok] (and friends) -> x; ``x.view(-1, D)[m.view(-1)]`` for a token mask m (``_tokens``) -> x."""
    idx = x_e.args[1] if is_op(x_e, "getitem") else None
    if idx is not tok and _flattens(idx) and _tokens(idx) is _tokens(tok):   # x.view(-1, D)[m.view(-1)], tok m
        walk.take(x_e)
        walk.take(idx)
        return _unflattened(x_e.args[0], _tokens(tok), walk)
    if is_op(x_e, "reshape", "view") and is_op(x_e.args[0], "getitem"):
        inner = x_e.args[0]
        if isinstance(inner.args[1], tuple) and inner.args[1] == (None, tok):
            walk.take(x_e)
            walk.take(inner)
            return inner.args[0]
    if is_op(x_e, "getitem") and _same_index(x_e.args[1], tok):
        walk.take(x_e)
        return x_e.args[0]
    if is_op(x_e, "index_select") and arg(x_e, 1, "dim") == 0 and arg(x_e, 2, "index") is tok:
        walk.take(x_e)
        return x_e.args[0]
    raise _NoMatch(f"the expert input {x_e.name} is not x[tok] for the dispatched tokens {_name(tok)}")


def _name(tok: Any) -> str:
    return ", ".join(t.name for t in tok) if isinstance(tok, tuple) else tok.name


def _expert_of(eq: fx.Node, walk: _Walk) -> tuple[fx.Node, int]:
    if not is_op(eq, "eq") or not isinstance(eq.args[1], int) or isinstance(eq.args[1], bool):
        raise _NoMatch(f"{eq.name} is not `ids == e` with a constant e")
    walk.take(eq)
    return eq.args[0], eq.args[1]


def _column(node: fx.Node) -> bool:
    """``t.squeeze(-1)`` / ``t.squeeze(1)`` / ``t.view(-1)`` / ``t.reshape(-1)`` / ``t.flatten()`` of an [n, 1] t."""
    ok = is_op(node, "squeeze") and arg(node, 1, "dim") in (-1, 1) or _flattens(node)
    v = val(node.args[0]) if ok and isinstance(node.args[0], fx.Node) else None
    return isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[1] == 1


def _any_dispatch(tok: fx.Node, walk: _Walk) -> tuple[fx.Node, int]:
    """The tokens with expert e in any slot (for weights summed under a mask or read from a dense gate column):
    tok = ``(ids == e).any(-1)`` as a boolean mask (also flattened, ``_tokens``),
    ``(ids == e).any(-1).nonzero().squeeze(-1)``, ``torch.where((ids == e).any(-1))[0]`` or
    ``.nonzero(as_tuple=True)[0]`` of it -> (ids, e)."""
    cond = _tokens(tok)
    if is_op(cond, "any"):
        nodes = {tok, cond}
        rank = val(cond).dim() + 1
    elif _column(tok) and is_op(tok.args[0], "nonzero") and arg(tok.args[0], 1, "as_tuple", False) is not True:
        nodes, cond, rank = {tok, tok.args[0]}, tok.args[0].args[0], 2
    elif is_op(tok, "getitem") and tok.args[1] == 0 and is_op(tok.args[0], "where", "nonzero") \
            and len(tok.args[0].args) == 1 and tok.args[0].kwargs.get("as_tuple", True) is True:
        nodes, cond, rank = {tok, tok.args[0]}, tok.args[0].args[0], 2
    else:
        raise _NoMatch(f"the token index {tok.name} is not (ids == e).any(-1) or its nonzero rows")
    if not (is_op(cond, "any") and arg(cond, 1, "dim") in (-1, val(cond.args[0]).dim() - 1)
            and not arg(cond, 2, "keepdim", False)):
        raise _NoMatch(f"{cond.name} is not (ids == e).any(-1)")
    walk.nodes |= nodes | {cond}
    ids, e = _expert_of(cond.args[0], walk)
    if val(ids).dim() != rank:
        raise _NoMatch(f"the tokens {tok.name} do not fit ids of rank {val(ids).dim()}")
    return ids, e


def _dispatch(tok: fx.Node, slot, walk: _Walk) -> tuple[fx.Node, int]:
    """(tok, slot) -> (ids node, expert index e); ``slot`` is a node, None, or a ``_SlotMask``."""
    if isinstance(tok, tuple):   # b, t, slot = torch.where(ids == e) over [B, S, K] ids
        where = tok[0].args[0] if is_op(tok[0], "getitem") else None
        if not (is_op(where, "where") and len(where.args) == 1 and is_op(where.args[0], "eq")
                and all(is_op(n, "getitem") and n.args[0] is where and n.args[1] == i
                        for i, n in enumerate((*tok, slot)))):
            raise _NoMatch(f"the token index ({_name(tok)}) and slot are not b, t, slot = torch.where(ids == e)")
        walk.nodes |= {*tok, slot, where}
        ids, e = _expert_of(where.args[0], walk)
        if val(ids).dim() != 3:
            raise _NoMatch(f"{where.name}: b, t, slot do not fit ids of rank {val(ids).dim()}")
        return ids, e
    if isinstance(slot, (_SlotMask, _DenseColumn)):
        ids, e = _any_dispatch(tok, walk)
        if isinstance(slot, _SlotMask) and (ids, e) != _expert_of(slot.eq, walk):
            raise _NoMatch(f"the tokens {tok.name} and the weight mask {slot.eq.name} pick different experts")
        if isinstance(slot, _DenseColumn) and e != slot.e:
            raise _NoMatch(f"the tokens {tok.name} are expert {e}'s, the routing weight column {slot.e} of the gate")
        return ids, e
    if is_op(tok, "eq") and slot is None:   # a boolean mask over 1-D top-1 ids: x[ids == e] picks rows like where
        ids, e = _expert_of(tok, walk)
        if val(ids).dim() != 1:
            raise _NoMatch(f"the mask {tok.name} over ids of rank {val(ids).dim()} does not select token rows")
        return ids, e
    if slot is None and _column(tok) and is_op(tok.args[0], "nonzero") \
            and arg(tok.args[0], 1, "as_tuple", False) is not True:   # (ids == e).nonzero().squeeze(-1)
        nz = tok.args[0]
        walk.take(tok)
        walk.take(nz)
        ids, e = _expert_of(nz.args[0], walk)
        if val(ids).dim() != 1:
            raise _NoMatch(f"{tok.name}: a flattened nonzero of ids of rank {val(ids).dim()} is no token index")
        return ids, e
    if is_op(tok, "getitem") and isinstance(tok.args[1], tuple) and len(tok.args[1]) == 2 \
            and tok.args[1][0] == slice(None) and is_op(tok.args[0], "nonzero"):
        nz = tok.args[0]
        if tok.args[1][1] != 0 or (slot is not None and not (
                is_op(slot, "getitem") and slot.args[0] is nz and slot.args[1] == (slice(None), 1))):
            raise _NoMatch(f"{tok.name} and {getattr(slot, 'name', None)} are not the columns of one nonzero")
        walk.take(tok)
        walk.take(nz)
        if slot is not None:
            walk.take(slot)
        ids, e = _expert_of(nz.args[0], walk)
        if val(ids).dim() != (1 if slot is None else 2):
            raise _NoMatch(f"{nz.name}: nonzero columns do not fit ids of rank {val(ids).dim()}")
        return ids, e
    if not (is_op(tok, "getitem") and is_op(tok.args[0], "where", "nonzero") and isinstance(tok.args[1], int)):
        raise _NoMatch(f"the token index {tok.name} does not come from torch.where / nonzero")
    where = tok.args[0]
    if is_op(where, "nonzero") and arg(where, 1, "as_tuple", False) is not True:
        raise _NoMatch(f"{where.name} is nonzero without as_tuple")
    if len(where.args) != 1 or where.kwargs.get("as_tuple", True) is not True:
        raise _NoMatch(f"{where.name} is the three-argument torch.where")
    walk.take(tok)
    cond = where.args[0]
    walk.take(where)
    if slot is not None:
        if not (is_op(slot, "getitem") and slot.args[0] is where):
            raise _NoMatch("token and slot indices come from different torch.where calls")
        walk.take(slot)
    tok_pos = tok.args[1]
    slot_pos = slot.args[1] if slot is not None else None
    if is_op(cond, "eq"):
        ids, e = _expert_of(cond, walk)
        ndim = val(ids).dim()
        if (ndim, tok_pos, slot_pos) not in ((2, 0, 1), (1, 0, None)):
            raise _NoMatch(f"{where.name}: token/slot positions {tok_pos}/{slot_pos} do not fit ids of rank {ndim}")
        return ids, e
    # one_hot(ids, E).permute(...)[e]
    if not (is_op(cond, "getitem") and isinstance(cond.args[1], int) and is_op(cond.args[0], "permute")):
        raise _NoMatch(f"the routing mask {cond.name} is neither `ids == e` nor one_hot(ids).permute(...)[e]")
    e = cond.args[1]
    perm_node = cond.args[0]
    perm = tuple(perm_node.args[1:]) if len(perm_node.args) > 2 else tuple(perm_node.args[1])
    oh = perm_node.args[0]
    if not is_op(oh, "one_hot"):
        raise _NoMatch(f"{oh.name} is not a one_hot of the expert ids")
    walk.take(cond)
    walk.take(perm_node)
    walk.take(oh)
    ids = oh.args[0]
    ndim = val(ids).dim()
    table = {(2, (2, 1, 0)): (1, 0), (2, (2, 0, 1)): (0, 1), (1, (1, 0)): (0, None)}
    want = table.get((ndim, perm))
    if want is None or want != (tok_pos, slot_pos):
        raise _NoMatch(f"{perm_node.name}: permute{perm} with token/slot positions {tok_pos}/{slot_pos} is not a "
                       "dispatch this pattern models")
    return ids, e


# ---------------------------------------------------------------- the pattern

def _expert(write, walk: _Walk) -> _Expert:
    _writer, tok, y, nodes = write
    if is_op(tok, "getitem") and isinstance(tok.args[1], int) and is_op(tok.args[0], "getitem") \
            and tok.args[0].args[1] == 1 and is_op(tok.args[0].args[0], "topk"):   # tok = topk(...).indices[e]
        raise _NoMatch(f"{tok.name}: each expert picks its tokens by a top-k (expert-choice routing); the fused op "
                       "routes each token to its top-k experts (token choice)")
    walk.nodes |= nodes
    sub = _Walk()
    try:
        f, W, slot, we, product = _split_weight(y, sub, tok)
        gathered = None
    except _NoMatch:
        found = _weighted_input(tok, sub)
        if found is None:
            raise
        W, slot, we, product, gathered = found
        f = y
    walk.nodes |= sub.nodes
    ids, e = _dispatch(tok, slot, walk)
    x_e, params, act, glu = _ffn(f, e, walk)
    x_e = _skip_dropout(x_e, walk)
    if gathered is not None and x_e is not product:
        raise _NoMatch(f"expert {e} reads {x_e.name}, not its weighted input {product.name}")
    x = _gather(x_e if gathered is None else gathered, tok, walk)
    # weighted and summed in one dtype (the buffer's): the op does the same (the rewrite drops it when it is the
    # experts' compute dtype); a product cast before the sum is not modelled (the op then sums in compute dtype)
    formed = val(product if gathered is None else _Walk().casts(y)).dtype
    combine = formed if formed == val(y).dtype else None
    return _Expert(e, x, ids, W, val(we).dtype, combine, act, glu, params, on_input=gathered is not None,
                   dense=isinstance(slot, _DenseColumn))


def _weighted_input(tok: fx.Node, walk: _Walk) -> Optional[tuple]:
    """The routing weight on the expert's input, ``expert(x[tok] * w[tok, slot, None])`` (either order, the weight
    forms of WEIGHT; torchtitan's ``score_before_experts``) -> (W, slot, the weight factor, the product, the
    gathered rows), or None."""
    for gathered in (tok[0] if isinstance(tok, tuple) else tok).users:
        if not (is_op(gathered, "getitem") and _same_index(gathered.args[1], tok)
                or is_op(gathered, "index_select") and arg(gathered, 2, "index") is tok):
            continue
        for prod in gathered.users:
            if not (is_op(prod, "mul") and len(prod.args) == 2 and gathered in prod.args):
                continue
            we = prod.args[1] if prod.args[0] is gathered else prod.args[0]
            for read in _WEIGHT_READERS:
                sub = _Walk()
                try:
                    W, slot = read(we, sub, tok)
                except _NoMatch:
                    continue
                walk.nodes |= sub.nodes | {prod}
                return W, slot, we, prod, gathered
    return None


def _all_experts_at_once(y: fx.Node) -> bool:
    """Whether one write's contribution ``y`` (casts and the weighting aside) comes from a grouped matmul or a cat
    of per-expert runs: all experts in one write is no loop (``grouped_mm`` and ``sorted_experts`` report it)."""
    walk = _Walk()
    y = walk.casts(y)
    factors = y.args if is_op(y, "mul") else (y,)
    return any(is_op(walk.casts(f), "grouped_mm", "cat") for f in factors if isinstance(f, fx.Node))


def routed_match(pattern: str, walk: _Walk, x: fx.Node, output: fx.Node, weights_TK: fx.Node, ids: fx.Node,
                 applied_dtype: torch.dtype, weights: MoEWeights, transposed: frozenset, experts: ExpertSpec,
                 where: str, notes: tuple = (), top_k: Optional[int] = None, weight_on_input: bool = False,
                 dense_weights: bool = False) -> Match:
    """The Match of a hand-written MoE (family ``handwritten``) whose experts were read (``weights``, ``experts``
    without its bias flag) and whose routing weights ``weights_TK`` (applied in ``applied_dtype``) and ``ids``
    select them: the router recognised, or kept as written with its ids proven to lie in [0, E); ``top_k``
    overrides the recognised router's k (ids read as a flat list of K per token); ``weight_on_input``: the weights
    scale the experts' inputs; ``dense_weights``: ``weights_TK`` is a dense ``[T, E]`` gate read at the ids (an
    external router whose ids, a top-k, max or argmax, name no expert twice per token)."""
    if dense_weights:
        router = RouterMatch(RouterSpec(top_k=val(ids).shape[-1] if val(ids).dim() > 1 else 1, external=True,
                                        dtype=None), weights_TK, ids, kind="external",
                             reason=f"the weights are columns of the dense gate {weights_TK.name}, taken at the ids")
    else:
        router = recognise_router(weights_TK, ids, applied_dtype=applied_dtype)
    if router.external:
        HandwrittenLoop._check_external_ids(ids, experts.num_experts)
        notes += (f"router kept as written: {router.reason}",)
    walk.nodes |= router.nodes
    experts = replace(experts, bias=any(b is not None for b in (weights.b1, weights.b2, weights.b3)))
    rspec = router.spec if top_k in (None, router.spec.top_k) else replace(router.spec, top_k=top_k)
    if router.selection_bias is not None:
        weights = weights._replace(selection_bias=router.selection_bias)
    spec = MoESpec(router=rspec, experts=experts, weight_on_input=weight_on_input)
    return Match(family=FAMILY, pattern=pattern, spec=spec, x=x, output=output,
                 region=frozenset(walk.nodes), weights=weights, router_logits=router.logits,
                 topk_weights=weights_TK if router.external else None, topk_ids=ids if router.external else None,
                 module_path=where, notes=notes, dense_weights=dense_weights,
                 router_outputs=None if router.external else (weights_TK, ids), transposed=transposed)


class HandwrittenLoop:
    """Per-expert loops accumulating into one buffer (see the module docstring)."""

    name = "handwritten.loop"
    family = FAMILY
    priority = 0

    def find(self, ctx: MatchContext):
        for buf in ctx.nodes_of(*_ALLOCS):
            if buf in ctx.claimed:
                continue
            try:
                writes = _combine_writes(buf)
                output = buf
                if not writes:
                    writes, output = _functional_chain(buf)
                if not writes or len(writes) == 1 and _all_experts_at_once(writes[0][2]):
                    continue
            except _NoMatch as exc:
                yield Rejection(FAMILY, self.name, str(exc), module_path(buf))
                continue
            try:
                yield self._match(ctx, buf, output, writes)
            except _NoMatch as exc:
                yield Rejection(FAMILY, self.name, str(exc), module_path(buf))

    def _match(self, ctx: MatchContext, buf: fx.Node, output: fx.Node, writes: list) -> Match:
        walk = _Walk()
        walk.take(buf)
        experts = [_expert(w, walk) for w in writes]
        first = experts[0]
        E = len(experts)
        if sorted(x.e for x in experts) != list(range(E)):
            raise _NoMatch(f"the loop covers experts {sorted(x.e for x in experts)}, not each of 0..{E - 1} once")
        for ex in experts[1:]:
            for what in ("x", "ids", "weights", "weights_dtype", "combine_dtype", "activation", "glu", "on_input",
                         "dense"):
                if getattr(ex, what) is not getattr(first, what) and getattr(ex, what) != getattr(first, what):
                    raise _NoMatch(f"experts {first.e} and {ex.e} differ in {what}")
            if _weight_kinds(ex.params) != _weight_kinds(first.params):
                raise _NoMatch(f"experts {first.e} and {ex.e} hold their weights differently")
        ids = val(first.ids)
        assign = next((w[0] for w in writes if _assigns(w[0])), None)
        if assign is not None and not (ids.dim() == 1 or ids.shape[-1] == 1):
            raise _NoMatch(f"{assign.name} assigns into the output (out[tok] = y): that sums the experts only "
                           f"under top-1 routing, and the ids {first.ids.name} hold {ids.shape[-1]} experts per "
                           "token (accumulate: out[tok] += y or index_add_)")
        experts.sort(key=lambda x: x.e)
        weights, transposed = self._weights([ex.params for ex in experts])
        paths = [ctx.param_path(w) or "" for w in (weights.w2 if isinstance(weights.w2, list) else [weights.w2])]
        prefix = common_prefix(paths)          # the ModuleList ("layers.0.moe.experts"): the MoE is its parent
        where = module_path(buf) or (prefix.rsplit(".", 1)[0] if "." in prefix else "")
        return routed_match(self.name, walk, first.x, output, first.weights, first.ids, first.weights_dtype,
                            weights, transposed, ExpertSpec(num_experts=E, activation=first.activation,
                                                            glu=first.glu, combine_dtype=first.combine_dtype),
                            where, weight_on_input=first.on_input, dense_weights=first.dense,
                            top_k=ids.shape[-1] if ids.dim() == 3 else None)

    @staticmethod
    def _weights(params: list[dict]) -> tuple[MoEWeights, frozenset]:
        """The MoEWeights of the experts whose weight sources (``_Expert.params``) are ``params``, in expert
        order (per-expert parameters as lists, rows of one stacked parameter as that parameter), and the roles
        whose weights hold the ``[in, out]`` layout (``Match.transposed``)."""
        out, transposed = {}, set()
        for key in _EXPERT_KEYS:
            srcs = [p.get(key) for p in params]
            if all(s is None for s in srcs):
                out[key] = None
                continue
            if any(s is None for s in srcs):
                raise _NoMatch(f"only some experts have {key}")
            kinds = {s[0] for s in srcs}
            if len(kinds) == 1 and next(iter(kinds)).endswith(".kn"):
                transposed.add(key)
                srcs = [(s[0][:-len(".kn")], s[1]) for s in srcs]
                kinds = {s[0] for s in srcs}
            if kinds == {"param"}:
                nodes = [s[1] for s in srcs]
                if len(set(nodes)) != len(nodes):
                    raise _NoMatch(f"experts share one {key} tensor")
                out[key] = nodes
            elif kinds == {"row"} and len({s[1] for s in srcs}) == 1:
                stacked = srcs[0][1]
                if val(stacked).shape[0] != len(params):
                    raise _NoMatch(f"the stacked {key} {stacked.name} holds {val(stacked).shape[0]} experts, "
                                   f"the loop {len(params)}")
                out[key] = stacked
            else:
                raise _NoMatch(f"experts take {key} from different places")
        return MoEWeights(**out), frozenset(transposed)

    @staticmethod
    def _check_external_ids(ids: fx.Node, E: int) -> None:
        """An external router's ids must provably lie in [0, E): the indices of a top-k, max or argmax over the
        last dim of E scores, through integer casts and reshapes (which keep the values)."""
        node = ids
        while is_op(node, *_VALUE_KEEPING) and isinstance(node.args[0], fx.Node) \
                and getattr(val(node), "dtype", None) in (torch.int32, torch.int64) \
                and not (is_op(node, "view") and any(isinstance(a, torch.dtype) for a in node.args[1:])):
            node = node.args[0]   # (a view as another dtype reinterprets the bits: not looked through)
        if is_op(node, "getitem") and node.args[1] == 1 and is_op(node.args[0], "topk"):
            select, dim = node.args[0], arg(node.args[0], 2, "dim", -1)
        elif is_op(node, "getitem") and node.args[1] == 1 and is_op(node.args[0], "max"):
            select, dim = node.args[0], arg(node.args[0], 1, "dim")
        elif is_op(node, "argmax"):
            select, dim = node, arg(node, 1, "dim")
        else:
            select = dim = None
        if select is not None:
            v = val(select.args[0])
            if isinstance(v, torch.Tensor) and isinstance(dim, int) and dim in (-1, v.dim() - 1) \
                    and v.shape[-1] == E:
                return
        if node.op == "placeholder":
            raise _NoMatch("the expert ids are a graph input: cannot prove they lie in [0, E)")
        raise _NoMatch(f"cannot prove the expert ids {ids.name} lie in [0, {E}) (not a top-k over {E} scores)")


register_pattern(HandwrittenLoop())
