"""The rewrite: offer a graph to every enabled pattern, check each match, replace its region by the fused op.

Entry point: ``fuse_graph(gm, example_inputs, options) -> FuseResult``. Per pattern (best priority first) the
driver collects the pattern's Matches and Rejections, then for each match:

1. *Overlap*: a node already replaced by an earlier match rejects it.
2. *Shapes and dtypes*: ``moe_fuser.ops.fused.validate`` runs on the nodes' fake values (``meta``), so a
   mismatch is found at compile time and the fused op can run with ``check=False``; the output must have the
   hidden states' shape, and their dtype or, for a routing weight on the input (Llama 4 under autocast: the
   block returns the sum of its bf16 expert matmuls; no shared expert), the experts' compute dtype, which the
   op's result is then cast to: exactly, since it was formed in that dtype (unit combine weights).
3. *Closure*: ``moe_fuser.fx.region.check_region`` (nothing unmodelled feeds the output, nothing escapes that is
   not kept unchanged, side effects stay inside).
4. *Precision*: the dtypes the routed and the shared experts compute in, read from the region's matmuls on
   their weights (``_compute_dtypes``): under ``torch.autocast`` they can differ from the hidden states' (and
   from each other), and the op is told them explicitly, so it computes the same whatever autocast state it is
   traced in. A region whose routed (or shared) expert matmuls disagree among themselves is refused.
5. *Lowering*: ``impl`` (option) or the best lowering for the hidden states' device.

Only then the region is replaced: one ``call_function`` node is inserted after the region's last node, the
output's later readers are redirected to it, and the region's nodes are erased, except the pure ones the rest of
the graph still reads (router probabilities for an auxiliary loss stay, unchanged). When those include part of a
recognised router, the router's top-k weights and ids stay too and the op takes them instead of routing again
(``_reuse_routing``). Every rewrite bumps
``FuseResult.num_fused`` (and the module counter ``counters``); every refusal is a ``Rejection`` with its reason.
After the patterns, a recognised router that none of them claimed or refused gets a ``Rejection`` of its own
(``_unclaimed_routers``): explain then says that its experts are in a form no pattern knows.

The inserted node's target is a small function made per match that closes over the ``MoESpec`` and calls
``moe_fuser.ops.fused.moe_forward(spec, x, logits, MoEWeights(...), ..., check=False)``; its arguments are the
match's nodes, flat (lists of per-expert weights stay lists: nothing is stacked or copied). The inner compiler
traces through it, so routing becomes ordinary ops and the experts one custom op (forward and backward).

Subgraphs: dynamo gives an activation-checkpointed block (``torch.utils.checkpoint``, transformers'
``gradient_checkpointing_enable``) its own graph, called through ``tag_activation_checkpoint``; ``fuse_graph``
runs on each such body as well (``_bodies``), so the fused op runs (and is recomputed in the backward) inside it.

For ``explain``/``draw`` each rewrite keeps a small before/after picture of its region (``RegionPicture``).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist
import torch.fx as fx
from torch.distributed.distributed_c10d import _resolve_process_group

from . import lowering
from .fx.graph import is_op, module_path, op, val
from .fx.region import absorb_plumbing, check_region, kept_closure
from .ops.fused import moe_forward, validate
from .patterns.base import Match, MatchContext, Rejection, patterns_for
from .patterns.routers import recognise_router
from .spec import MoESpec, MoEWeights, RouterSpec, dtype_name

__all__ = ["FuseResult", "RegionPicture", "counters", "fuse_graph"]

log = logging.getLogger("moe_fuser")

#: Totals over the process: "fused", "rejected", "graphs" (graphs seen by the pass).
counters: collections.Counter = collections.Counter()


@dataclass
class RegionPicture:
    """Nodes (name -> label) and edges of a region and its boundary, for drawing. ``role`` marks nodes as
    "input", "region", "kept", "fused" or "user"."""

    nodes: dict = field(default_factory=dict)
    edges: list = field(default_factory=list)
    role: dict = field(default_factory=dict)


@dataclass
class FuseResult:
    matches: list = field(default_factory=list)      # accepted Matches, in rewrite order
    rejections: list = field(default_factory=list)
    before: list = field(default_factory=list)       # RegionPicture per match
    after: list = field(default_factory=list)

    @property
    def num_fused(self) -> int:
        return len(self.matches)


def _label(n: fx.Node) -> str:
    name = op(n) or n.op
    v = val(n)
    shape = ""
    if isinstance(v, torch.Tensor):
        shape = "[" + ", ".join(str(s) for s in v.shape) + "]"
    return f"{n.name}\n{name} {shape}".strip()


def _picture(region, keep, inputs, users, extra=None) -> RegionPicture:
    pic = RegionPicture()
    shown = set(region) | set(inputs) | set(users) | ({extra} if extra is not None else set())
    for n in shown:
        pic.nodes[n.name] = _label(n)
        pic.role[n.name] = ("fused" if n is extra else "kept" if n in keep else "region" if n in region
                            else "input" if n in inputs else "user")
    for n in shown:
        for i in n.all_input_nodes:
            if i in shown:
                pic.edges.append((i.name, n.name))
    return pic


def _transpose_fields(w: MoEWeights, fields) -> MoEWeights:
    """``Match.transposed``: the named expert weights hold [E, in, out]; the op reads [E, out, in] views."""
    def t(x):
        return [e.transpose(-2, -1) for e in x] if isinstance(x, (list, tuple)) else x.transpose(-2, -1)
    return w._replace(**{f: t(getattr(w, f)) for f in fields}) if fields else w


def _fake_weights(w: MoEWeights, transposed=frozenset()) -> MoEWeights:
    def conv(x):
        if isinstance(x, (list, tuple)):
            return [val(n) for n in x]
        return val(x) if isinstance(x, fx.Node) else x
    return _transpose_fields(MoEWeights(*(conv(x) for x in w)), transposed)


def _to_2d(t):
    return t if t is None or t.dim() == 2 else t.unsqueeze(-1)


def _flatten_tokens(x, logits, topk_weights, topk_ids):
    """``Match.x`` may be [..., D]: the op sees [T, D]; logits and top-k given with x's leading dims
    ([..., E], [..., K]) are flattened likewise (already flat ones pass through)."""
    if x is None or x.dim() == 2:
        return x, logits, topk_weights, topk_ids

    def flat(t):
        return t.reshape(-1, t.shape[-1]) if t is not None and t.dim() == x.dim() else t
    return x.reshape(-1, x.shape[-1]), flat(logits), flat(topk_weights), flat(topk_ids)


def _topk_pairs(topk_weights, topk_ids, dense: bool):
    """[T, K] weights and ids from the flattened ones: 1-D top-1 ids as a column, a dense gate
    (``Match.dense_weights``) read at the ids."""
    if topk_ids is not None and topk_ids.dim() == 1:
        topk_ids = topk_ids.unsqueeze(-1)
        if not dense:
            topk_weights = topk_weights.unsqueeze(-1)
    return (topk_weights.gather(-1, topk_ids) if dense else topk_weights), topk_ids


def _make_target(spec: MoESpec, recognised: MoESpec, impl: Optional[str], index: int, dtypes: tuple,
                 transposed=frozenset(), out_dtype: Optional[torch.dtype] = None, dense_weights: bool = False):
    """The function the new node calls; it closes over the op's ``spec`` (FX keeps it as a graph global). Its
    ``spec`` attribute is the MoE as ``recognised`` (whose routing the call may take from the graph instead,
    ``Match.reuse_routing``). The routed and shared experts compute in ``dtypes`` (``_compute_dtypes``)
    whatever autocast state the call is traced or run in; ``out_dtype``: the dtype the region's output has
    where it is not the hidden states' (``_check_values``)."""

    def fused_moe_call(x, logits, topk_weights, topk_ids, capacity_groups, w1, w2, w3, b1, b2, b3,
                       selection_bias, shared_w1, shared_w2, shared_w3, shared_gate, op_kwargs):
        weights = MoEWeights(w1, w2, w3, b1, b2, b3, selection_bias, shared_w1, shared_w2, shared_w3, shared_gate)
        weights = _transpose_fields(weights, transposed)
        x_shape = x.shape
        x, logits, topk_weights, topk_ids = _flatten_tokens(x, logits, topk_weights, topk_ids)
        topk_weights, topk_ids = _topk_pairs(topk_weights, topk_ids, dense_weights)
        out = moe_forward(spec, x, logits, weights, impl=impl, topk_weights_TK=topk_weights,
                          topk_ids_TK=topk_ids, capacity_groups=capacity_groups, check=False,
                          expert_dtype=dtypes[0], shared_dtype=dtypes[1], **op_kwargs)
        if out_dtype is not None:
            out = out.to(out_dtype)
        return out.view(x_shape) if len(x_shape) != 2 else out

    fused_moe_call.__name__ = fused_moe_call.__qualname__ = f"moe_fuser_fused_moe_{index}"
    fused_moe_call.spec = recognised
    return fused_moe_call


def _op_inputs(m: Match) -> tuple[MoESpec, Optional[fx.Node], Optional[fx.Node], Optional[fx.Node], MoEWeights]:
    """(spec, router logits, top-k weights, top-k ids, weights) the fused op is called with: the match's own, or,
    when it reuses the graph's routing (``Match.reuse_routing``), an external router fed the recognised router's
    top-k nodes (the op then neither routes nor reads a selection bias)."""
    if not m.reuse_routing:
        return m.spec, m.router_logits, m.topk_weights, m.topk_ids, m.weights
    topk_weights, topk_ids = m.router_outputs
    spec = m.spec.replace(router=RouterSpec(top_k=m.spec.top_k, external=True,
                                            weights_dtype=m.spec.router.weights_dtype))
    return spec, None, topk_weights, topk_ids, m.weights._replace(selection_bias=None)


def _combine_in(spec: MoESpec, compute: torch.dtype) -> MoESpec:
    """The spec with ``ExpertSpec.combine_dtype`` only where it differs from the experts' compute dtype."""
    if spec.experts.combine_dtype != compute:
        return spec
    return spec.replace(experts=dataclasses.replace(spec.experts, combine_dtype=None))


def _router_notes(router: RouterSpec) -> tuple[str, ...]:
    """What the op reproduces of a recognised router beyond its kind (explain shows these)."""
    if router.external:
        return ()
    notes = []
    if router.weights_dtype is not None:
        notes.append(f"routing weights rounded to {dtype_name(router.weights_dtype)}, as the model casts them")
    if router.renorm_eps is not None:
        notes.append(f"renormalisation adds {router.renorm_eps:g} to the sum")
    if router.renorm_min:
        notes.append(f"renormalisation clamps the sum to at least {router.renorm_min:g}")
    return tuple(notes)


def _reuse_routing(ctx: MatchContext, m: Match, keep: frozenset) -> frozenset:
    """When the rest of the graph keeps part of a recognised router anyway (an auxiliary loss reading its
    probabilities or top-k ids), let the op take the router's own top-k weights and ids instead of routing again:
    the same values, computed once. Sets ``m.reuse_routing`` and returns the nodes to keep (with the router's)."""
    if m.spec.router.external or m.router_outputs is None:
        return keep
    router = kept_closure(ctx.dag, m.region, m.output, m.router_outputs)
    if isinstance(router, str) or not router & keep:
        return keep
    if _check_values(dataclasses.replace(m, reuse_routing=True), ctx) is not None:
        return keep   # the op cannot take them as they are: it routes itself
    m.reuse_routing = True
    m.notes += ("the rest of the graph keeps the router's values: the op takes its top-k weights and ids "
                "instead of routing again",)
    return keep | router


def _check_values(m: Match, ctx: MatchContext) -> Optional[str]:
    xv = val(m.x)
    ov = val(m.output)
    if not isinstance(xv, torch.Tensor) or xv.dim() < 2:
        return f"the hidden states {m.x.name} are not a [T, D] (or [..., D]) tensor"
    if not isinstance(ov, torch.Tensor) or tuple(ov.shape) != tuple(xv.shape) or not (
            ov.dtype == xv.dtype or (m.spec.weight_on_input and m.spec.shared is None
                                     and _gemm_dtypes(m, ("w1", "w2", "w3")) == {ov.dtype})):
        return (f"the MoE output {m.output.name} does not have the hidden states' shape and dtype "
                f"({getattr(ov, 'shape', None)}, {getattr(ov, 'dtype', None)} vs {tuple(xv.shape)}, {xv.dtype})")
    spec, logits, topk_weights, topk_ids, weights = _op_inputs(m)
    xv, lv, tw, ti = _flatten_tokens(xv, val(logits), val(topk_weights), val(topk_ids))
    if m.dense_weights:
        if tw.dim() != 2 or ti.dim() not in (1, 2) or tw.shape[0] != ti.shape[0]:
            return (f"the dense gate {m.topk_weights.name} {tuple(tw.shape)} does not fit the ids "
                    f"{tuple(ti.shape)}: one row of E weights per token")
        tw, ti = _topk_pairs(tw, ti, True)
    tw, ti = _to_2d(tw), _to_2d(ti)
    try:
        validate(spec, xv, lv, _fake_weights(weights, m.transposed), tw, ti)
    except ValueError as exc:
        return f"shape/dtype check failed: {exc}"
    except Exception as exc:  # a symbolic comparison that cannot be decided at compile time
        return f"shapes could not be checked at compile time ({type(exc).__name__}: {exc})"
    return None


def _choose_lowering(m: Match, impl: Optional[str]) -> str:
    if impl == "reference":
        return "reference"
    return lowering.select(impl, val(m.x).device).name


def _rewrite(ctx: MatchContext, m: Match, keep: frozenset, last: fx.Node, impl: Optional[str], index: int,
             dtypes: tuple, result: FuseResult) -> None:
    graph = ctx.graph
    region = m.region
    inputs = m.input_nodes()
    users = [u for u in m.output.users if u not in region]
    result.before.append(_picture(region, keep, inputs, users))
    spec, logits, topk_weights, topk_ids, w = _op_inputs(m)
    args = (m.x, logits, topk_weights, topk_ids, m.capacity_groups, *w, dict(m.op_kwargs))
    out_dtype = val(m.output).dtype
    target = _make_target(spec, m.spec, None if impl in (None, "auto") else impl, index, dtypes, m.transposed,
                          None if out_dtype == val(m.x).dtype else out_dtype, m.dense_weights)
    with graph.inserting_after(last):
        new = graph.call_function(target, args=tuple(
            list(a) if isinstance(a, (list, tuple)) else a for a in args))
    new.meta["example_value"] = val(m.output)
    if "val" in m.output.meta:
        new.meta["val"] = m.output.meta["val"]
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in m.output.meta:
            new.meta[key] = m.output.meta[key]
    m.output.replace_all_uses_with(new, delete_user_cb=lambda u: u not in region and u is not new)
    for n in reversed(list(graph.nodes)):
        if n in region and n not in keep:
            if n.users:
                raise AssertionError(f"moe_fuser internal error: {n.name} still has users "
                                     f"{list(n.users)} after the rewrite")
            graph.erase_node(n)
    result.after.append(_picture({new}, frozenset(), inputs, users, extra=new))


def fuse_graph(gm: fx.GraphModule, example_inputs: Optional[list] = None,
               options: Optional[Mapping[str, Any]] = None) -> FuseResult:
    """Find and replace every MoE in ``gm`` (in place). See the module docstring."""
    options = dict(options or {})
    impl = options.get("impl")
    ctx = MatchContext(gm, example_inputs, options)
    result = FuseResult()
    counters["graphs"] += 1
    for pattern in patterns_for(options.get("patterns")):
        try:
            found = list(pattern.find(ctx))
        except Exception as exc:  # a broken pattern must not break compilation
            log.warning("moe_fuser: pattern %s raised %s: %s; skipping it", pattern.name, type(exc).__name__, exc)
            result.rejections.append(Rejection(pattern.family, pattern.name, f"pattern raised {exc!r}"))
            continue
        for item in found:
            if isinstance(item, Rejection):
                _reject(result, item)
                continue
            if not isinstance(item, Match):
                raise TypeError(f"pattern {pattern.name} yielded {type(item).__name__}; yield Match or Rejection")
            reason = _accept(ctx, item, impl)
            if isinstance(reason, str):
                _reject(result, Rejection(item.family, item.pattern, reason, item.module_path, item.region))
                continue
            keep, last, lowering_name, dtypes = reason
            keep = _reuse_routing(ctx, item, keep)
            item.lowering = lowering_name
            item.dtype = dtypes[0]
            item.spec = _combine_in(item.spec, dtypes[0])
            if item.spec.experts.combine_dtype is not None:
                item.notes += (f"weighted expert outputs summed in {dtype_name(item.spec.experts.combine_dtype)}, "
                               "as the model forms them",)
            if dtypes[0] != val(item.x).dtype or (item.spec.shared is not None and dtypes[1] != val(item.x).dtype):
                item.notes += (f"autocast: the experts compute in {dtype_name(dtypes[0])}"
                               + (f", the shared expert in {dtype_name(dtypes[1])}" if item.spec.shared else "")
                               + f", as the graph's matmuls do; hidden states and weights "
                               f"({dtype_name(val(item.x).dtype)}) are cast on each call",)
            item.module_path = item.module_path or module_path(item.output)
            item.notes += _router_notes(item.spec.router)
            if lowering_name == "npu":  # which stages leave torch_npu's fused ops, and why (explain shows it)
                item.notes += tuple(_npu_fallbacks(item))
            _rewrite(ctx, item, keep, last, impl, len(result.matches), dtypes, result)
            ctx.claimed |= set(item.region)
            ctx.invalidate()
            result.matches.append(item)
            counters["fused"] += 1
            log.info("moe_fuser: fused %s (%s, %s) with lowering %s", item.module_path or "<unnamed>",
                     item.pattern, item.spec.summary(), lowering_name)
    for rejection in _unclaimed_routers(ctx, result.rejections):
        _reject(result, rejection)
    if result.matches:
        gm.graph.lint()
        gm.recompile()
    for body in _bodies(gm):   # an MoE inside an activation-checkpointed block lives in the block's own graph
        inner = fuse_graph(body, None, options)
        for name in ("matches", "rejections", "before", "after"):
            getattr(result, name).extend(getattr(inner, name))
    return result


def _reject(result: FuseResult, rejection: Rejection) -> None:
    """Record a refused candidate: in the result, the module counter and the log."""
    result.rejections.append(rejection)
    counters["rejected"] += 1
    log.info("moe_fuser: not fusing %s (%s): %s", rejection.module_path or "<unnamed>", rejection.pattern,
             rejection.reason)


def _unclaimed_routers(ctx: MatchContext, rejections: list[Rejection]) -> list[Rejection]:
    """A row for each router no pattern claimed or refused: a recognised softmax or sigmoid top-k over the
    output of a matmul by a parameter (``[.., E]`` logits), whose weights and ids the graph goes on to use. Its
    experts compute in a form no pattern knows, which explain should say rather than show nothing. Not listed: a
    router whose top-k leaves the graph (its experts run in another graph, after a graph break, which the capture
    row explains) and any router a rejection may already be about: one naming its node, a module beside it (the
    router in ``layers.1.gate``, the refused experts in ``layers.1.experts``) or neither."""
    if any(not r.region and not r.module_path for r in rejections):
        return []
    covered = {n for r in rejections for n in r.region}
    paths = {r.module_path for r in rejections if r.module_path}
    off = sorted(name for name, on in (ctx.options.get("patterns") or {}).items() if not on)
    rows = []
    for tk in ctx.nodes_of("topk"):
        if tk in ctx.claimed or tk in covered or any(_near(module_path(tk), p) for p in paths):
            continue
        outs = {u.args[1]: u for u in tk.users if is_op(u, "getitem")}
        if 0 not in outs or 1 not in outs or any(u.op == "output" for o in outs.values() for u in o.users):
            continue
        try:
            router = recognise_router(outs[0], outs[1])
        except Exception:   # a diagnostic must never break compilation
            continue
        if router.external or not _by_parameter(router.logits):
            continue
        inside = router.nodes | {tk, *outs.values()}
        readers = sorted({op(u) or u.op for n in inside for u in n.users if u not in inside})
        E = val(router.logits).shape[-1]
        rows.append(Rejection(
            "unmatched", "router",
            f"{tk.name} is a {router.kind} router (E={E}, k={router.spec.top_k}) whose experts no pattern "
            f"recognised (its top-k outputs are read by {', '.join(readers)}); moe_fuser.register_pattern can teach "
            f"it that form" + (f" (switched off by options['patterns']: {', '.join(off)})" if off else ""),
            module_path(tk), frozenset({tk})))
    return rows


def _near(path: str, other: str) -> bool:
    """Whether module ``other`` is ``path``'s parent or within it (``path``: a router's module path; everything is
    within the root)."""
    parent = path.rpartition(".")[0]
    return not parent or other == path or other == parent or other.startswith(parent + ".")


def _by_parameter(logits: Optional[fx.Node]) -> bool:
    """Whether ``logits`` come from a matmul (``linear``, ``matmul``, ``mm``, ``@``) by a parameter or buffer."""
    if logits is None or not is_op(logits, "linear", "matmul", "mm") or len(logits.args) < 2:
        return False
    w = logits.args[1]
    return isinstance(w, fx.Node) and w.op in ("placeholder", "get_attr") and isinstance(val(w), torch.Tensor) \
        and val(w).dim() == 2


_BODY_HOPS = ("tag_activation_checkpoint", "wrap")


def _bodies(gm: fx.GraphModule) -> list[fx.GraphModule]:
    """The subgraphs of ``gm``'s higher-order calls that run a plain function body: activation checkpointing
    (``torch.utils.checkpoint``, transformers' ``gradient_checkpointing_enable``: one body per checkpointed
    layer) and ``wrap``. Each once, however many calls share it."""
    seen, out = set(), []
    for n in gm.graph.nodes:
        if n.op == "call_function" and op(n) in _BODY_HOPS and n.args and isinstance(n.args[0], fx.Node) \
                and n.args[0].op == "get_attr":
            body = getattr(gm, n.args[0].target, None)
            if isinstance(body, fx.GraphModule) and id(body) not in seen:
                seen.add(id(body))
                out.append(body)
    return out


def _npu_fallbacks(m: Match) -> list[str]:
    from .lowering import npu

    w1 = m.weights.w1
    w2 = m.weights.w2[0] if isinstance(m.weights.w2, (list, tuple)) else m.weights.w2
    ffn = val(w2).shape[-2 if "w2" in m.transposed else -1]
    leaves = [m.x] + [n for w in m.weights if w is not None for n in (w if isinstance(w, (list, tuple)) else [w])]
    training = torch.is_grad_enabled() and any(getattr(val(n), "requires_grad", False) for n in leaves)
    lines = []
    ep = _ep_layout(m)
    if ep is not None:
        lines.append("expert parallel -> the npu lowering's own exchange: MC2 (npu_moe_distribute_dispatch_v2 / "
                     "combine_v2) where its constraints hold on every rank, else all_to_all_single + "
                     "npu_moe_re_routing (not moe_fuser's exchange)")
    world, num_experts, even = ep or (None, None, True)
    tokens = val(m.x).shape[0] if val(m.x).dim() == 2 else None
    return lines + npu.explain_constraints(
        _op_inputs(m)[0], dtype=m.dtype, hidden_size=val(m.x).shape[-1], ffn_size=ffn,
        weights_as_list=isinstance(w1, (list, tuple)), training=training, ep_world_size=world,
        tokens_per_rank=tokens if isinstance(tokens, int) else None, ep_num_experts=num_experts,
        ep_even_placement=even)


def _ep_layout(m: Match) -> Optional[tuple[int, int, bool]]:
    """(ranks, global experts, whether expert e lives on rank e // (E / ranks)) of an expert-parallel match; None
    for others. An owner buffer is read at run time: its layout is assumed even here (the run-time log says)."""
    group = m.op_kwargs.get("ep_group")
    if group is None:
        return None
    world = dist.get_world_size(_resolve_process_group(group))
    placement = m.op_kwargs.get("expert_placement")
    if isinstance(placement, fx.Node):
        return world, val(placement).shape[0], True
    owners = list(placement)
    E = len(owners)
    return world, E, E % world == 0 and all(r == e // (E // world) for e, r in enumerate(owners))


def _accept(ctx: MatchContext, m: Match, impl: Optional[str]):
    """Either a rejection reason, or (nodes to keep, the region's last node, lowering name)."""
    overlap = [n.name for n in m.region if n in ctx.claimed]
    if overlap:
        return f"overlaps an MoE already fused ({', '.join(sorted(overlap)[:3])})"
    if m.spec.router.external and (m.topk_weights is None or m.topk_ids is None):
        return "an external router needs topk_weights and topk_ids nodes"
    if not m.spec.router.external and m.router_logits is None:
        return "the spec routes, but no router_logits node was given"
    reason = _check_values(m, ctx)
    if reason:
        return reason
    m.region = absorb_plumbing(m.region)
    check = check_region(ctx.dag, ctx.position, m.region, m.output, m.input_nodes())
    if not check.ok:
        return check.reason
    dtypes = _compute_dtypes(ctx, m)
    if isinstance(dtypes, str):
        return dtypes
    try:
        name = _choose_lowering(m, impl)
    except ValueError as exc:
        raise ValueError(f"moe_fuser: options['impl']={impl!r} cannot be used: {exc}") from None
    return check.keep, check.last, name, dtypes


# Ops that multiply by an expert weight: their output dtype is the precision the experts compute in.
_GEMMS = ("linear", "matmul", "bmm", "addmm", "baddbmm", "grouped_mm", "einsum")
# What a weight may pass through on its way into such an op (layout, selection and dtype only).
_WEIGHT_PLUMBING = ("t", "transpose", "permute", "view", "reshape", "contiguous", "getitem", "to", "float", "type",
                    "bfloat16", "half", "type_as", "getattr", "unsqueeze", "squeeze", "expand", "chunk", "split",
                    "unbind", "select", "index_select")
_AUTOCAST_MARKS = ("_enter_autocast", "_exit_autocast")
_SHARED_FIELDS = ("shared_w1", "shared_w2", "shared_w3", "shared_gate")


def _reads_weight(node: Any, weights: set, depth: int = 8) -> bool:
    while isinstance(node, fx.Node) and depth > 0:
        if node in weights:
            return True
        if not is_op(node, *_WEIGHT_PLUMBING) or not node.args:
            return False
        node, depth = node.args[0], depth - 1
    return False


def _gemm_dtypes(m: Match, fields: tuple) -> set:
    """Output dtypes of the region's matmuls that read one of the weights named by ``fields``."""
    weights = {n for f in fields for n in _flat_nodes(getattr(m.weights, f))}
    return {val(n).dtype for n in m.region if is_op(n, *_GEMMS) and isinstance(val(n), torch.Tensor)
            and any(_reads_weight(i, weights) for i in n.all_input_nodes)}


def _compute_dtypes(ctx: MatchContext, m: Match):
    """(routed, shared) experts' compute dtypes, read from the graph: the output dtype of the region's matmuls on
    their weights. Under ``torch.autocast`` a part computes in the autocast dtype where the model's own matmuls
    are cast (``nn.Linear``) and in the weights' dtype where they are not (an op autocast leaves alone, a block
    with autocast switched off), so the fused op is told each explicitly. A rejection reason when one part's
    matmuls disagree, or when autocast is on and no such matmul shows a part's dtype."""
    xv = val(m.x)
    autocast = torch.is_autocast_enabled(xv.device.type) or any(is_op(n, *_AUTOCAST_MARKS) for n in ctx.nodes)
    out = []
    for part, fields in (("expert", ("w1", "w2", "w3")), ("shared expert", _SHARED_FIELDS)):
        if part == "shared expert" and m.spec.shared is None:
            out.append(xv.dtype)
            continue
        dtypes = _gemm_dtypes(m, fields)
        if len(dtypes) > 1:
            return (f"the {part} matmuls compute in different dtypes "
                    f"({', '.join(sorted(map(dtype_name, dtypes)))}); the fused op computes them in one")
        if not dtypes and autocast:
            return (f"autocast is on and no matmul on the {part} weights shows which dtype they compute in; the "
                    "pattern's region should include them")
        out.append(dtypes.pop() if dtypes else xv.dtype)
    return tuple(out)


def _flat_nodes(x) -> list:
    if isinstance(x, (list, tuple)):
        return [n for n in x if isinstance(n, fx.Node)]
    return [x] if isinstance(x, fx.Node) else []
