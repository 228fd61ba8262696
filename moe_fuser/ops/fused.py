"""The fused MoE op: ``fused_moe`` (public, keyword arguments) and ``moe_forward`` (a ``MoESpec`` + tensors).

``moe_forward`` is what the compiler's rewrite calls and what ``fused_moe`` builds a spec for:

    route (fp32, plain ops) -> capacity -> grouped experts (custom op, one lowering) -> dropped passthrough
    -> shared expert -> cast to the input dtype

Precision: the routed experts compute in ``expert_dtype``, by default the hidden states' dtype or, inside a
``torch.autocast`` region for their device, the autocast dtype, as the ``nn.Linear`` calls of an eager expert
would (``experts_dtype``). Hidden states, and the expert weights unless the lowering takes them in their own
dtype (``mixed_precision``: the CPU lowering casts each expert group's weights where it uses them), are then
cast on each call (fp32 master weights get fp32 gradients). The shared expert computes in ``shared_dtype`` (the
same default) and routing in ``RouterSpec.dtype``. All of it runs with autocast off, so no lowering's internal op
is cast again and the result depends on the explicit dtypes only, never on the autocast state it runs in.

Routing and the shared expert stay ordinary differentiable tensor code on purpose: they are cheap, the inner
compiler fuses them, and autograd carries the router-logit gradient through ``topk_weights`` into the expert op's
backward. ``impl="reference"`` swaps the expert op for the plain-PyTorch loop (the oracle).

Input checks run here, before any work, and raise ``ValueError`` naming the problem and the fix. The NaN check
on the router logits needs the data, so it runs in eager mode only (not while dynamo traces).
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

from .. import lowering
from ..lowering.reference import experts_reference
from ..spec import CapacitySpec, ExpertSpec, MoESpec, MoEWeights, RouterSpec, SharedExpertSpec
from .activations import act_fn
from .experts import grouped_experts
from .routing import RouterStats, apply_capacity, round_weights, route, router_stats

__all__ = ["cast_experts", "experts_dtype", "fused_moe", "moe_forward"]

Weights = Union[torch.Tensor, Sequence[torch.Tensor]]


def _fail(msg: str):
    raise ValueError(msg)


def _expert_shapes(name: str, ws, num_experts: Optional[int]) -> tuple[int, tuple[int, ...], torch.dtype]:
    """(E, per-expert shape, dtype) of a stacked tensor or a per-expert list, checking consistency."""
    if isinstance(ws, torch.Tensor):
        if ws.dim() != 3:
            _fail(f"{name} must be a stacked [E, out, in] tensor or a list of E [out, in] tensors; got shape "
                  f"{tuple(ws.shape)}")
        return ws.shape[0], tuple(ws.shape[1:]), ws.dtype
    ws = list(ws)
    if not ws or any(not isinstance(w, torch.Tensor) or w.dim() != 2 for w in ws):
        _fail(f"{name} as a list must hold E two-dimensional [out, in] tensors (one nn.Linear weight each)")
    shapes = {tuple(w.shape) for w in ws}
    dtypes = {w.dtype for w in ws}
    if len(shapes) != 1 or len(dtypes) != 1:
        _fail(f"{name}: every expert must have the same shape and dtype; got {sorted(shapes)} / {dtypes}")
    return len(ws), shapes.pop(), dtypes.pop()


def _bias_shape(name: str, bs, E: int, width: int, dtype: torch.dtype) -> None:
    if bs is None:
        return
    if isinstance(bs, torch.Tensor):
        ok = bs.shape == (E, width)
    else:
        bs = list(bs)
        ok = len(bs) == E and all(tuple(b.shape) == (width,) for b in bs)
    if not ok:
        _fail(f"{name} must be [E={E}, {width}] (or E tensors of [{width}]) to match the weights")
    dt = bs.dtype if isinstance(bs, torch.Tensor) else bs[0].dtype
    if dt != dtype:
        _fail(f"{name} has dtype {dt} but the weights are {dtype}; cast it with .to({dtype})")


def _on_real_data(t: torch.Tensor) -> bool:
    """Whether a value check may read ``t``: real, non-empty data (a fake tensor's ``bool()``, or one while dynamo
    traces, would add a data-dependent symbol)."""
    return not torch.compiler.is_compiling() and not is_fake(t) and t.numel() > 0


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN or infinity in ``t`` (non-empty): one reduction, since min and max propagate NaN (``isfinite(t).all()``
    runs four passes: 76 us against 12 us for [256, 128] bf16 logits here)."""
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _check_ids(topk_ids_TK: torch.Tensor, E: int) -> None:
    """Given top-k ids name experts: each in [0, E), or -1 for a pair that goes to no expert. Any other id would
    silently contribute nothing (the lowerings treat it as a dropped pair)."""
    if not _on_real_data(topk_ids_TK):
        return
    lo, hi = (int(v) for v in torch.aminmax(topk_ids_TK))
    if lo < -1 or hi >= E:
        _fail(f"topk_ids hold ids from {lo} to {hi} but there are {E} experts: each id must be in [0, {E}) (or "
              "-1 for a pair that goes to no expert); map the router's choices to expert indices first")


def _shared_shapes(w: MoEWeights, D: int, dtype: torch.dtype) -> None:
    """The shared expert's weights: nn.Linear layouts ``w1, w3 [S, D]``, ``w2 [D, S]``, ``gate [1, D]``."""
    S = w.shared_w1.shape[0] if w.shared_w1.dim() == 2 else None
    want = {"shared_w1": (S, D), "shared_w3": (S, D), "shared_w2": (D, S), "shared_gate": (1, D)}
    for name, shape in want.items():
        t = getattr(w, name)
        if t is None:
            continue
        if S is None or tuple(t.shape) != shape:
            _fail(f"{name} has shape {tuple(t.shape)}; the shared expert's weights are nn.Linear weights: "
                  f"shared_w1 and shared_w3 [S, D={D}], shared_w2 [D={D}, S], shared_gate [1, D={D}]")
        if t.dtype != dtype:
            _fail(f"{name} is {t.dtype} but hidden_states is {dtype}; cast the shared expert with .to({dtype})")


def validate(spec: MoESpec, x_TD: torch.Tensor, router_logits_TE: Optional[torch.Tensor], w: MoEWeights,
             topk_weights_TK: Optional[torch.Tensor] = None, topk_ids_TK: Optional[torch.Tensor] = None,
             num_ids: Optional[int] = None, capacity_groups: int = 1) -> None:
    """Raise ValueError naming the problem and the fix for inputs the op cannot take. ``num_ids``: the number of
    experts the given top-k ids index (default: the weights' E; expert parallelism passes the global count)."""
    if x_TD.dim() != 2:
        _fail(f"hidden_states must be [T, D]; got shape {tuple(x_TD.shape)}: flatten it with "
              "x.reshape(-1, x.shape[-1])")
    if not x_TD.is_floating_point():
        _fail(f"hidden_states must be a floating tensor (fp32, bf16, fp16, fp64); got {x_TD.dtype}")
    T, D = x_TD.shape
    E, w1_shape, w_dtype = _expert_shapes("w1", w.w1, None)
    E2, w2_shape, w2_dtype = _expert_shapes("w2", w.w2, E)
    if E2 != E:
        _fail(f"w1 has {E} experts but w2 has {E2}; both must hold the same E experts")
    H, D1 = w1_shape
    D2, F_ = w2_shape
    if D1 != D or D2 != D:
        _fail(f"hidden size mismatch: hidden_states D={D}, w1 [E, out, {D1}], w2 [E, {D2}, F]; w1 must be "
              "[E, F, D] and w2 [E, D, F] (nn.Linear layout: out x in)")
    want_H = 2 * F_ if spec.experts.glu in ("concat", "interleaved") else F_
    if H != want_H:
        _fail(f"w1 has {H} output rows but w2 expects F={F_}"
              + ("; a fused gate_up w1 must be [E, 2F, D]" if want_H != F_ else "; w1 must be [E, F, D]"))
    if spec.experts.glu == "separate":
        if w.w3 is None:
            _fail("glu='separate' needs w3")
        E3, w3_shape, w3_dtype = _expert_shapes("w3", w.w3, E)
        if E3 != E or w3_shape != (F_, D):
            _fail(f"w3 must be [E={E}, F={F_}, D={D}] like w1; got E={E3}, {w3_shape}")
        if w3_dtype != w_dtype:
            _fail(f"w3 is {w3_dtype} but w1 is {w_dtype}; give all expert weights one dtype")
    if w2_dtype != w_dtype:
        _fail(f"w2 is {w2_dtype} but w1 is {w_dtype}; give all expert weights one dtype")
    if w_dtype != x_TD.dtype:
        _fail(f"mixed dtypes: hidden_states is {x_TD.dtype} but the expert weights are {w_dtype}; cast one to "
              "the other (e.g. model.to(dtype) or x.to(w1.dtype))")
    _bias_shape("b1", w.b1, E, H, w_dtype)
    _bias_shape("b2", w.b2, E, D, w_dtype)
    _bias_shape("b3", w.b3, E, F_, w_dtype)
    if spec.router.external:
        if topk_weights_TK is None or topk_ids_TK is None:
            _fail("an external router needs both topk_weights and topk_ids")
        if topk_ids_TK.shape != (T, spec.top_k) or topk_weights_TK.shape != (T, spec.top_k):
            _fail(f"topk_weights and topk_ids must be [T={T}, top_k={spec.top_k}]; got "
                  f"{tuple(topk_weights_TK.shape)} and {tuple(topk_ids_TK.shape)}")
        if topk_ids_TK.dtype not in (torch.int64, torch.int32):
            _fail(f"topk_ids must be int64 or int32; got {topk_ids_TK.dtype}")
        if not topk_weights_TK.is_floating_point():
            _fail(f"topk_weights must be floating (the routing weights); got {topk_weights_TK.dtype}")
        _check_ids(topk_ids_TK, E if num_ids is None else num_ids)
    else:
        if router_logits_TE is None:
            _fail("router_logits is required unless topk_weights and topk_ids are given")
        if router_logits_TE.dim() != 2 or router_logits_TE.shape[0] != T:
            _fail(f"router_logits must be [T={T}, E]; got shape {tuple(router_logits_TE.shape)}")
        if router_logits_TE.shape[1] != E:
            _fail(f"router_logits has {router_logits_TE.shape[1]} experts but the weights hold {E}; the router's "
                  "output size must equal the number of experts")
        if not router_logits_TE.is_floating_point():
            _fail(f"router_logits must be floating; got {router_logits_TE.dtype}")
        if _on_real_data(router_logits_TE) and not _all_finite(router_logits_TE):
            _fail("router_logits contain NaN or inf; check the router's input and weights (routing on NaN "
                  "scores would pick arbitrary experts)")
    if E != spec.num_experts:
        _fail(f"the weights hold {E} experts but the spec says {spec.num_experts}")
    if w.selection_bias is not None and tuple(w.selection_bias.shape) != (E,):
        _fail(f"selection_bias must be [E={E}]; got {tuple(w.selection_bias.shape)}")
    if spec.shared is not None:
        if w.shared_w1 is None or w.shared_w2 is None:
            _fail("a shared expert needs shared_w1 and shared_w2")
        if spec.shared.glu and w.shared_w3 is None:
            _fail("a gated (GLU) shared expert needs shared_w3")
        if spec.shared.gated and w.shared_gate is None:
            _fail("a gated shared expert needs shared_gate ([1, D])")
        _shared_shapes(w, D, x_TD.dtype)
    if spec.capacity is not None and (not isinstance(capacity_groups, int) or capacity_groups < 1
                                      or T % capacity_groups):
        _fail(f"capacity_groups={capacity_groups!r} must be a positive int that divides the T={T} tokens into "
              "equal groups (one per sequence: the batch size)")


def experts_dtype(x_TD: torch.Tensor, requested: Optional[torch.dtype] = None) -> torch.dtype:
    """The dtype the routed experts compute in: ``requested``, else the autocast dtype when autocast is on for
    ``x_TD``'s device (autocast casts every floating tensor but fp64), else ``x_TD``'s dtype."""
    if requested is not None:
        return requested
    device = x_TD.device.type
    if x_TD.dtype != torch.float64 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x_TD.dtype


def cast_experts(x_TD: torch.Tensor, w: MoEWeights, dtype: torch.dtype,
                 weights: bool = True) -> tuple[torch.Tensor, MoEWeights]:
    """Hidden states and (with ``weights``) routed-expert weights and biases (stacked or lists) in ``dtype``.
    Differentiable: gradients flow back to the original tensors in their own dtype. Validated inputs share one
    dtype, so nothing is touched when it is ``dtype`` already (no per-expert call for a long weight list)."""
    if x_TD.dtype == dtype:
        return x_TD, w
    if not weights:
        return x_TD.to(dtype), w

    def cast(ws):
        if ws is None or isinstance(ws, torch.Tensor):
            return None if ws is None else ws.to(dtype)
        return [t.to(dtype) for t in ws]
    return x_TD.to(dtype), w._replace(**{f: cast(getattr(w, f)) for f in ("w1", "w2", "w3", "b1", "b2", "b3")})


def weighted_input_rows(x_TD: torch.Tensor, weights_TK: torch.Tensor, ids_TK: torch.Tensor, router: RouterSpec,
                        dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``MoESpec.weight_on_input``: the experts' input rows ``w[t, j] * x[t]`` (``[T*K, D]`` in ``dtype``, one per
    (token, slot); ``[T, D]`` for K=1), each routed to its one expert with unit weight: ``(rows, ones [T*K, 1],
    ids [T*K, 1])``. The product is formed in promote(x's dtype, the weights' rounding dtype), as a model's
    ``x * scores`` is; ``sum_slots`` folds the experts' result back. Differentiable."""
    T, K = ids_TK.shape
    w_TK = weights_TK.to(router.weights_dtype or weights_TK.dtype)
    # formed in promote(x, w) by type promotion, without a promoted copy of x (which autograd would keep)
    rows = (x_TD.unsqueeze(1) * w_TK.unsqueeze(-1)).reshape(T * K, x_TD.shape[-1])
    return rows.to(dtype), weights_TK.new_ones(T * K, 1), ids_TK.reshape(T * K, 1)


def sum_slots(out_ND: torch.Tensor, top_k: int) -> torch.Tensor:
    """The experts' result on ``weighted_input_rows`` summed over each token's K slots -> ``[T, D]``."""
    return out_ND if top_k == 1 else out_ND.view(-1, top_k, out_ND.shape[-1]).sum(1)


def no_autocast(device_type: str):
    """A context with autocast off for ``device_type`` (a no-op context when it is off already)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _shared_expert(x_TD: torch.Tensor, spec: SharedExpertSpec, w: MoEWeights, dtype: torch.dtype) -> torch.Tensor:
    """The shared expert computed in ``dtype`` (hidden states and its weights cast where they differ)."""
    x_TD = x_TD.to(dtype)
    w1, w2, w3, gate = (None if t is None else t.to(dtype)
                        for t in (w.shared_w1, w.shared_w2, w.shared_w3, w.shared_gate))
    h = act_fn(spec.activation, F.linear(x_TD, w1))
    if spec.glu:
        h = h * F.linear(x_TD, w3)
    s = F.linear(h, w2)
    if spec.gated:
        s = torch.sigmoid(F.linear(x_TD, gate)) * s
    return s


def select_routing(router: RouterSpec, low, router_logits_TE: Optional[torch.Tensor],
                   selection_bias_E: Optional[torch.Tensor], topk_weights_TK: Optional[torch.Tensor],
                   topk_ids_TK: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-k weights, int64 ids): an external router's as given (rounded to ``weights_dtype`` if set), else
    routed by the lowering ``low`` on its own device ops where it has them (npu: the gating ops), else ``route``."""
    if router.external:
        return round_weights(topk_weights_TK, router), topk_ids_TK.long()
    lowered = getattr(low, "route", None)
    routed = lowered(router_logits_TE, router, selection_bias_E) if lowered is not None else None
    return routed if routed is not None else route(router_logits_TE, router, selection_bias_E)


def moe_forward(spec: MoESpec, x_TD: torch.Tensor, router_logits_TE: Optional[torch.Tensor], w: MoEWeights, *,
                impl: Optional[str] = None, topk_weights_TK: Optional[torch.Tensor] = None,
                topk_ids_TK: Optional[torch.Tensor] = None, capacity_groups: int = 1,
                return_router_stats: bool = False, check: bool = True, expert_dtype: Optional[torch.dtype] = None,
                shared_dtype: Optional[torch.dtype] = None, ep_group=None, **ep_options):
    """The fused MoE for a ``spec`` (see ``fused_moe`` for the arguments). ``expert_dtype`` and ``shared_dtype``:
    the dtypes the routed and the shared experts compute in (``experts_dtype``: by default the autocast dtype
    or the hidden states'; the compiler passes the ones the replaced graph computed in). Everything runs with
    autocast off, each part in its explicit dtype, so the result does not depend on the autocast state."""
    if ep_group is not None:  # expert parallelism: moe_fuser.distributed (ep_options: see fused_moe)
        from ..distributed.ep_moe import ep_moe_forward
        return ep_moe_forward(spec, x_TD, router_logits_TE, w, ep_group, impl=impl, topk_weights_TK=topk_weights_TK,
                              topk_ids_TK=topk_ids_TK, return_router_stats=return_router_stats, check=check,
                              expert_dtype=expert_dtype, shared_dtype=shared_dtype, **ep_options)
    expert_dtype, shared_dtype = experts_dtype(x_TD, expert_dtype), experts_dtype(x_TD, shared_dtype)
    with no_autocast(x_TD.device.type):
        return _moe_forward(spec, x_TD, router_logits_TE, w, impl, topk_weights_TK, topk_ids_TK, capacity_groups,
                            return_router_stats, check, expert_dtype, shared_dtype)


def _moe_forward(spec: MoESpec, x_TD, router_logits_TE, w: MoEWeights, impl, topk_weights_TK, topk_ids_TK,
                 capacity_groups, return_router_stats: bool, check: bool, expert_dtype: torch.dtype,
                 shared_dtype: torch.dtype):
    if check:
        validate(spec, x_TD, router_logits_TE, w, topk_weights_TK, topk_ids_TK, capacity_groups=capacity_groups)
    low = None if impl == "reference" else lowering.select(impl, x_TD.device)
    weights_TK, ids_TK = select_routing(spec.router, low, router_logits_TE, w.selection_bias, topk_weights_TK,
                                        topk_ids_TK)
    if spec.capacity is not None:
        ids_TK = apply_capacity(ids_TK, spec.num_experts, spec.capacity, capacity_groups)

    # a lowering that takes weights in their own dtype casts them where it uses them (``mixed_precision``)
    xe_TD, we = cast_experts(x_TD, w, expert_dtype, weights=not getattr(low, "mixed_precision", False))
    rows, rows_w, rows_ids = xe_TD, weights_TK, ids_TK
    if spec.weight_on_input:
        rows, rows_w, rows_ids = weighted_input_rows(x_TD, weights_TK, ids_TK, spec.router, xe_TD.dtype)
    if impl == "reference":
        out_TD = experts_reference(rows, rows_w, rows_ids, we.w1, we.w2, we.w3, we.b1, we.b2, we.b3, spec.experts)
    else:
        out_TD = grouped_experts(rows, rows_w, rows_ids, we.w1, we.w2, we.w3, we.b1, we.b2, we.b3,
                                 spec=spec.experts, impl=impl)
    if spec.weight_on_input:
        out_TD = sum_slots(out_TD, spec.top_k)
    out_TD = out_TD.to(x_TD.dtype)
    if spec.capacity is not None and spec.capacity.dropped == "passthrough":
        dropped_w_T = (weights_TK * (ids_TK < 0)).sum(-1, keepdim=True)
        out_TD = out_TD + (dropped_w_T * x_TD).to(out_TD.dtype)
    if spec.shared is not None:
        out_TD = (out_TD + _shared_expert(x_TD, spec.shared, w, shared_dtype)).to(x_TD.dtype)
    if return_router_stats:
        return out_TD, router_stats(weights_TK, ids_TK, spec.num_experts)
    return out_TD


def fused_moe(hidden_states: torch.Tensor, router_logits: Optional[torch.Tensor], w1: Weights, w2: Weights,
              w3: Optional[Weights] = None, *, top_k: int, renormalize: bool = True, activation: str = "silu",
              impl: Optional[str] = None, gate_up: Optional[str] = None,
              b1: Optional[Weights] = None, b2: Optional[Weights] = None, b3: Optional[Weights] = None,
              scoring: str = "softmax", topk_first: bool = False, num_groups: int = 1, topk_groups: int = 1,
              group_score: str = "max", selection_bias: Optional[torch.Tensor] = None,
              routed_scaling_factor: float = 1.0, router_dtype: Optional[torch.dtype] = torch.float32,
              topk_weights: Optional[torch.Tensor] = None, topk_ids: Optional[torch.Tensor] = None,
              capacity: Optional[int] = None, dropped: str = "zero", capacity_groups: int = 1,
              shared_w1: Optional[torch.Tensor] = None, shared_w2: Optional[torch.Tensor] = None,
              shared_w3: Optional[torch.Tensor] = None, shared_gate: Optional[torch.Tensor] = None,
              shared_activation: Optional[str] = None, alpha: float = 1.702, limit: Optional[float] = None,
              apply_router_weight_on_input: bool = False, return_router_stats: bool = False, ep_group=None,
              expert_placement=None, overlap_chunks: Optional[int] = None, ranks_per_node: Optional[int] = None,
              ep_timeout: Optional[float] = None) -> Union[torch.Tensor, tuple[torch.Tensor, RouterStats]]:
    """Fused Mixture-of-Experts layer: routing (fp32), grouped experts, weighted combine.

    Shapes: hidden_states [T, D], router_logits [T, E]; w1 [E, F, D] (or [E, 2F, D] with ``gate_up``),
    w3 [E, F, D] or None, w2 [E, D, F]: nn.Linear weights, stacked or as lists of E tensors.

        expert_e(x) = w2[e] @ act(w1[e] @ x)                      if w3 is None and gate_up is None
                    = w2[e] @ (act(w1[e] @ x) * (w3[e] @ x))       otherwise (SwiGLU, GeGLU)
        p = softmax(router_logits in fp32); (w, ids) = top_k(p); if renormalize: w = w / sum(w)
        out[t] = sum_j w[t, j] * expert_{ids[t, j]}(x[t])          -> [T, D] in hidden_states' dtype

    Routers: ``topk_first=True`` takes top-k of the logits then a softmax over the k (GShard, Granite, GPT-OSS;
    with ``scoring="sigmoid"`` a sigmoid of each: Llama 4);
    ``scoring="sigmoid"`` with ``selection_bias``, ``num_groups``/``topk_groups``/``group_score`` and
    ``routed_scaling_factor`` is DeepSeek-V3's; ``topk_weights``/``topk_ids`` (router_logits=None) bypass
    routing for any router at all (ids in [0, E), or -1 for a pair that goes to no expert);
    ``router_dtype=None`` routes in the logits' own dtype.
    Experts: ``activation`` in silu, gelu, gelu_tanh, relu, relu2 (squared ReLU), gpt_oss (clamped SwiGLU with
    ``alpha``, ``limit``, default 7); ``limit`` with another gated activation clamps as DeepSeek-V4's
    ``swiglu_limit``: act(min(gate, limit)) * clamp(up, -limit, limit);
    ``gate_up="concat"``/``"interleaved"``: w1 holds gate and up fused; ``b1``/``b2``/``b3`` per-expert biases.
    ``capacity``: each expert takes at most that many pairs per token group (``capacity_groups`` equal groups),
    first come first served; dropped pairs contribute zero or, with ``dropped="passthrough"``, weight * x.
    ``shared_w1``/``shared_w2``(/``shared_w3``, ``shared_gate``): a dense shared expert added to the output,
    scaled by sigmoid(x @ shared_gate^T) when given.
    ``apply_router_weight_on_input=True``: the routing weight scales the expert's input, not its output
    (Llama 4): out[t] = sum_j expert_{ids[t, j]}(w[t, j] * x[t]).
    ``impl``: None/"auto" (best for the device), "reference" (plain PyTorch), "cpu", "triton", "npu".
    ``return_router_stats=True`` also returns ``RouterStats(topk_weights, topk_ids, tokens_per_expert)``.
    ``ep_group`` (a torch.distributed ProcessGroup): expert parallelism (``moe_fuser.distributed``): each rank
    passes its own tokens and only its local experts' weights; ``expert_placement`` (owner rank per expert,
    default balanced, uneven allowed), ``overlap_chunks`` (None: automatic), ``ranks_per_node`` (None: detected),
    ``ep_timeout`` (seconds before a dead or stalled peer is reported).
    """
    if w3 is not None and gate_up is not None:
        _fail("give either w3 (separate up projection) or gate_up (w1 holds both), not both")
    glu = gate_up if gate_up is not None else ("separate" if w3 is not None else None)
    if activation == "gpt_oss" and glu is None:
        _fail("activation='gpt_oss' is gated: give w3 or gate_up='interleaved'/'concat'")
    E = router_logits.shape[-1] if router_logits is not None else _expert_shapes("w1", w1, None)[0]
    external = router_logits is None
    spec = MoESpec(
        router=RouterSpec(top_k=top_k, scoring=scoring, topk_first=topk_first, renormalize=renormalize,
                          num_groups=num_groups, topk_groups=topk_groups, group_score=group_score,
                          scaling_factor=float(routed_scaling_factor), selection_bias=selection_bias is not None,
                          dtype=router_dtype, external=external),
        experts=ExpertSpec(num_experts=E, activation=activation, glu=glu,
                           bias=any(b is not None for b in (b1, b2, b3)), alpha=alpha, limit=limit),
        shared=None if shared_w1 is None else SharedExpertSpec(
            activation=shared_activation or (activation if activation != "gpt_oss" else "silu"),
            glu=shared_w3 is not None, gated=shared_gate is not None),
        capacity=None if capacity is None else CapacitySpec(capacity=capacity, dropped=dropped),
        weight_on_input=apply_router_weight_on_input,
    )
    weights = MoEWeights(w1, w2, w3, b1, b2, b3, selection_bias, shared_w1, shared_w2, shared_w3, shared_gate)
    return moe_forward(spec, hidden_states, router_logits, weights, impl=impl, topk_weights_TK=topk_weights,
                       topk_ids_TK=topk_ids, capacity_groups=capacity_groups,
                       return_router_stats=return_router_stats, ep_group=ep_group,
                       **({} if ep_group is None else dict(
                           expert_placement=expert_placement, ep_timeout=ep_timeout, overlap_chunks=overlap_chunks,
                           ranks_per_node=ranks_per_node)))
