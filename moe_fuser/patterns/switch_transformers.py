"""transformers' Switch Transformers sparse MLP: top-1 routing with per-sequence expert capacity.

Entry point: the pattern ``switch_transformers.sparse_mlp`` (family ``"switch_transformers"``), registered at
import.

The router (``SwitchTransformersTop1Router``, the same in transformers 4 and 5) is recognised from its capacity
signature, inside-out from the dispatch mask:

    logits = classifier(x.to(router_dtype))                    # stays outside: returned for the z-loss
    probs  = softmax(logits, -1, dtype=router_dtype)[.to(x.dtype)]
    mask   = one_hot(argmax(probs, -1), E)                      # [B, S, E]
    mask   = mask * (cumsum(mask, dim=-2) <= capacity)          # first come first served, per sequence
    p      = max(probs, -1).values.unsqueeze(-1)                # [B, S, 1]

and the experts in the form transformers 4 wrote them, which dynamo captures whole (boolean-mask indexing
becomes ``nonzero`` with an unbacked size under moe_fuser's capture settings):

    next = x.clone()
    for e, expert in enumerate(experts.values()):               # ModuleDict of Linear -> act -> dropout -> Linear
        sel = mask[:, :, e].bool();  next[sel] = expert(x[sel])[.to(next.dtype)]
    out = p * next

A dropped token keeps its input in ``next``, so it leaves scaled by its router probability: the spec is
``RouterSpec(top_k=1, renormalize=False)``, ``CapacitySpec(capacity, dropped="passthrough")`` and one capacity
group per sequence (``capacity_groups = B``). Expert dropout must be inactive (eval mode or rate 0): the op has
no dropout, so an active one is a Rejection.

transformers 5 rewrote the experts as ``SwitchTransformersExperts.forward``: ``for expert_idx in expert_hit``
over ``nonzero(...)`` of the mask, which iterates a data-dependent tensor. dynamo breaks the graph there under
every setting, so the router reaches the backend alone and the experts run eagerly outside any graph. The
pattern then finds a router whose mask only leaves the graph and reports that block as unfused, with the reason.
(transformers 5 also dropped the passthrough: its dropped tokens contribute zero.)

Invariants: every node the walk visits is in the region, and only those; the router logits and the input stay
outside; any departure (a second write into ``next``, an expert skipped, an unknown op) rejects the candidate.

Legend: B sequences, S tokens per sequence, T = B*S, D model dim, F expert hidden dim, E experts.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..fx import graph as fxg
from ..spec import CapacitySpec, ExpertSpec, MoESpec, MoEWeights, RouterSpec
from .base import Match, MatchContext, Rejection, register_pattern

__all__ = ["FAMILY", "find_sparse_mlp"]

FAMILY = "switch_transformers"
PATTERN = "switch_transformers.sparse_mlp"
_CASTS = ("to", "float", "type", "bfloat16", "half")
_ACTS = {"relu": "relu", "silu": "silu", "gelu": "gelu"}


class _Miss(Exception):
    pass


def _want(cond: bool, reason: str) -> None:
    if not cond:
        raise _Miss(reason)


def _is(node, *names) -> bool:
    return fxg.is_op(node, *names)


def _shape(node):
    v = fxg.val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _strip(node, region: set):
    while _is(node, *_CASTS) and isinstance(node.args[0], fx.Node):
        region.add(node)
        node = node.args[0]
    return node


def _last_dim(node, index, name) -> bool:
    dim = fxg.arg(node, index, name)
    v = fxg.val(node.args[0])
    return isinstance(dim, int) and isinstance(v, torch.Tensor) and dim in (-1, v.dim() - 1)


# ------------------------------------------------------------------------------------------------ the router
class _Router:
    def __init__(self, mask, weights, logits, E, capacity, dtype, region):
        self.mask, self.weights, self.logits = mask, weights, logits
        self.E, self.capacity, self.dtype, self.region = E, capacity, dtype, region


def _router_from_cumsum(prio: fx.Node) -> _Router:
    """``cumsum(one_hot(argmax(probs)), dim=-2)`` -> the capacity-masked dispatch mask and its router."""
    region = {prio}
    oh = prio.args[0]
    _want(_is(oh, "one_hot"), f"{prio.name} does not count a one_hot expert choice")
    dim = fxg.arg(prio, 1, "dim")
    _want(dim == -2 or (_shape(oh) is not None and dim == len(_shape(oh)) - 2),
          f"{prio.name}: token priority must be counted along the tokens of each sequence (dim=-2)")
    E = fxg.arg(oh, 1, "num_classes")
    _want(isinstance(E, int) and E > 0, f"{oh.name}: one_hot needs a constant num_classes")
    idx = oh.args[0]
    _want(_is(idx, "argmax") and _last_dim(idx, 1, "dim"), f"{oh.name} does not encode argmax(probs, -1)")
    region.update((oh, idx))
    probs_c = idx.args[0]
    probs = _strip(probs_c, region)
    _want(_is(probs, "softmax") and _last_dim(probs, 1, "dim"), f"{idx.name}: argmax is not over softmax(logits)")
    region.add(probs)
    logits = _strip(probs.args[0], region)
    # The capacity mask: mask = one_hot * (priority <= C).
    les = [u for u in prio.users if _is(u, "le") and isinstance(u.args[1], int)]
    _want(len(les) == 1 and len(prio.users) == 1, f"{prio.name}: expected one `priority <= capacity` comparison")
    le = les[0]
    cap = le.args[1]
    muls = [u for u in le.users if _is(u, "mul") and set(u.args) == {oh, le}]
    _want(len(muls) == 1 and len(le.users) == 1, f"{le.name}: expected one_hot * capacity_mask")
    mask = muls[0]
    region.update((le, mask))
    # The routing weight: max(probs, -1).values.unsqueeze(-1) (the same, possibly cast, probs argmax read).
    weights = None
    for u in probs_c.users:
        if _is(u, "max") and _last_dim(u, 1, "dim"):
            vals = [g for g in u.users if _is(g, "getitem") and g.args[1] == 0]
            if len(vals) == 1 and len(vals[0].users) == 1:
                uns = next(iter(vals[0].users))
                if _is(uns, "unsqueeze") and fxg.arg(uns, 1, "dim") == -1:
                    region.update((u, vals[0], uns))
                    weights = uns
    _want(weights is not None, f"{probs_c.name}: expected the routing weight max(probs, -1).values.unsqueeze(-1)")
    dtype = fxg.val(probs).dtype if fxg.val(probs) is not None else None
    return _Router(mask, weights, logits, E, cap, dtype, region)


# ----------------------------------------------------------------------------------------------- the experts
def _expert_ffn(ye: fx.Node, xe: fx.Node, region: set):
    """``wo(dropout(act(wi(xe))))`` (dropout inactive): (activation, wi, wo, bi, bo)."""
    lo = _strip(ye, region)
    _want(_is(lo, "linear"), f"{lo.name}: an expert should end in a Linear (wo); found {fxg.op(lo)}")
    region.add(lo)
    h = _strip(lo.args[0], region)
    if _is(h, "dropout"):
        p = fxg.arg(h, 1, "p", 0.5)
        training = fxg.arg(h, 2, "training", True)
        _want(training is False or p == 0, f"{h.name}: expert dropout is active (training mode, p={p}); the fused "
                                            "op has no dropout: use model.eval() or dropout_rate=0")
        region.add(h)
        h = _strip(h.args[0], region)
    act = _ACTS.get(fxg.op(h))
    if fxg.op(h) == "gelu" and fxg.arg(h, 1, "approximate", "none") == "tanh":
        act = "gelu_tanh"
    _want(act is not None and not h.kwargs.get("inplace"), f"{h.name}: unsupported expert activation "
                                                           f"{fxg.op(h)!r}; supported: relu, silu, gelu, gelu_tanh")
    region.add(h)
    li = h.args[0]
    _want(_is(li, "linear") and li.args[0] is xe, f"{h.name}: the activation should read wi(x[mask])")
    region.add(li)
    return act, li.args[1], lo.args[1], fxg.arg(li, 2, "bias"), fxg.arg(lo, 2, "bias")


def _walk_experts(r: _Router, out_mul: fx.Node, next_: fx.Node, x: fx.Node, region: set) -> dict:
    """Every write into ``next``: one per expert 0..E-1, each ``next[mask[:, :, e].bool()] = expert_e(x[...])``."""
    writes = [u for u in next_.users if _is(u, "setitem")]
    others = [u for u in next_.users if u not in writes and u is not out_mul]
    _want(not others, f"{next_.name} is read by {', '.join(u.name for u in others)} besides the expert writes")
    per_expert = {}
    acts = set()
    for w in writes:
        sel, ye = w.args[1], w.args[2]
        _want(_is(sel, "bool") and _is(sel.args[0], "getitem"), f"{w.name}: expected next[mask[:, :, e].bool()]")
        pick = sel.args[0]
        idx = pick.args[1]
        _want(pick.args[0] is r.mask and isinstance(idx, tuple) and len(idx) == 3 and isinstance(idx[2], int)
              and all(isinstance(s, slice) and s == slice(None) for s in idx[:2]),
              f"{w.name}: expected the expert's column of the dispatch mask, mask[:, :, e]")
        e = idx[2]
        _want(e not in per_expert, f"expert {e} is written twice")
        xe = next((u for u in sel.users if _is(u, "getitem") and u.args[0] is x and u.args[1] is sel), None)
        _want(xe is not None, f"{w.name}: the expert input should be x[mask[:, :, {e}].bool()]")
        region.update((w, sel, pick, xe))
        act, wi, wo, bi, bo = _expert_ffn(ye, xe, region)
        acts.add(act)
        per_expert[e] = (wi, wo, bi, bo)
    _want(sorted(per_expert) == list(range(r.E)),
          f"the loop covers experts {sorted(per_expert)}, not all {r.E}")
    _want(len(acts) == 1, f"experts use different activations {sorted(acts)}")
    biases = {tuple(b is None for b in v[2:]) for v in per_expert.values()}
    _want(len(biases) == 1, "some experts have biases and others not")
    return {"activation": acts.pop(), "experts": [per_expert[e] for e in range(r.E)]}


def _capacity_groups(ctx: MatchContext, x: fx.Node):
    """Number of sequences: an int, or a SymInt placeholder/size node holding x.shape[0]."""
    shape = _shape(x)
    if len(shape) == 2:
        return 1
    B = shape[0]
    if isinstance(B, int):
        return B
    holders = [n for n in ctx.nodes if isinstance(fxg.val(n), torch.SymInt) and fxg.val(n).node.expr == B.node.expr]
    if holders:
        return min(holders, key=lambda n: (n.op != "placeholder", ctx.position[n]))
    raise _Miss("the number of sequences (capacity is counted per sequence) is symbolic and no graph node "
                "holds it")


def _graph_outputs(ctx: MatchContext) -> set:
    out: list = []
    fx.node.map_arg(ctx.graph.output_node().args, out.append)
    return set(out)


def _escapes_only_to_output(node: fx.Node, outputs: set) -> bool:
    """The mask only leaves the graph (through views): transformers 5's experts run in a later frame."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        for u in n.users:
            if u.op == "output":
                continue
            if not _is(u, "view", "reshape", "permute"):
                return False
            stack.append(u)
    return any(n in outputs for n in seen)


def _match(ctx: MatchContext, prio: fx.Node):
    r = _router_from_cumsum(prio)
    where = fxg.module_path(prio).rpartition(".")[0]  # the router's parent: the sparse MLP
    if _escapes_only_to_output(r.mask, _graph_outputs(ctx)):
        return Rejection(
            FAMILY, PATTERN,
            f"Switch top-1 router ({r.E} experts, capacity {r.capacity}) whose dispatch mask leaves the graph: "
            "transformers 5's SwitchTransformersExperts loop (`for expert_idx in expert_hit`) iterates a "
            "data-dependent tensor, so dynamo breaks the graph after the router and the experts run eagerly "
            "outside any graph; nothing to fuse", where, frozenset(r.region))
    region = set(r.region)
    outs = [u for u in r.weights.users if _is(u, "mul")]
    _want(len(outs) == 1 and len(r.weights.users) == 1, f"{r.weights.name}: expected probs * next_states")
    out_mul = outs[0]
    next_ = out_mul.args[1] if out_mul.args[0] is r.weights else out_mul.args[0]
    _want(_is(next_, "clone"), f"{out_mul.name}: expected router_probs * x.clone() filled by the experts")
    x = next_.args[0]
    _want(_shape(x) is not None and _shape(x)[:-1] == _shape(r.mask)[:-1],
          f"{next_.name}: the cloned input does not match the dispatch mask's tokens")
    region.update((out_mul, next_))
    ex = _walk_experts(r, out_mul, next_, x, region)
    wis, wos, bis, bos = zip(*ex["experts"])
    has_bias = bis[0] is not None or bos[0] is not None
    spec = MoESpec(RouterSpec(top_k=1, renormalize=False, dtype=torch.float32 if r.dtype == torch.float32 else None,
                              first_max=True),   # argmax: ties to the lowest expert id
                   ExpertSpec(r.E, activation=ex["activation"], glu=None, bias=has_bias),
                   capacity=CapacitySpec(capacity=r.capacity, dropped="passthrough"))
    weights = MoEWeights(w1=list(wis), w2=list(wos), b1=list(bis) if bis[0] is not None else None,
                         b2=list(bos) if bos[0] is not None else None)
    return Match(FAMILY, PATTERN, spec, x=x, output=out_mul, region=frozenset(region), weights=weights,
                 router_logits=r.logits, capacity_groups=_capacity_groups(ctx, x), module_path=where,
                 notes=("capacity counted per sequence; dropped tokens pass through scaled by their router "
                        "probability",))


def find_sparse_mlp(ctx: MatchContext):
    """Each ``cumsum(one_hot(argmax(...)))`` capacity count is a candidate Switch router."""
    for prio in ctx.nodes_of("cumsum"):
        if prio in ctx.claimed or not _is(prio.args[0], "one_hot"):
            continue
        try:
            yield _match(ctx, prio)
        except _Miss as e:
            yield Rejection(FAMILY, PATTERN, str(e), fxg.module_path(prio).rpartition(".")[0])


register_pattern(find_sparse_mlp, name=PATTERN, family=FAMILY, priority=20)
