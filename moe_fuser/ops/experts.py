"""The grouped-experts custom op: ``torch.ops.moe_fuser.grouped_experts`` and its backward op.

Given routed tokens (``topk_weights [T, K]`` fp32, ``topk_ids [T, K]`` int64, -1 for a dropped pair) it computes
``out[t] = sum_j w[t, j] * expert_{ids[t, j]}(x[t])``. It is registered with ``torch.library`` so that
dynamo/AOTAutograd treat it as one opaque node: a fake kernel gives output shapes (all functions of the
symbolic T, so ``dynamic=True`` holds), and ``register_autograd`` routes the backward to a second custom op,
which is what appears in the compiled backward graph. Eager calls skip the custom op's dispatch and run the same
forward and formula as a plain autograd function (``_EagerExperts``: torch.library's wrapper for list arguments
costs about 0.2 ms per training step of a layer with eight per-expert weights on our CPU).

Expert weights travel as ``Tensor[]``: a one-element list holding the stacked ``[E, ...]`` tensor, or E
per-expert tensors (ModuleList models: never stacked or copied). An empty list means "absent". Static expert
configuration travels as scalar arguments (from ``ExpertSpec``), and ``impl`` names the lowering
(``moe_fuser.lowering``) that runs both directions.

Outputs: ``out [T, D]`` plus ``h`` and ``order [T*K]`` saved for backward (see ``moe_fuser.lowering``). ``h`` is
a ``Tensor[]`` of ``save`` tensors: one ``[T*K, H]``, or, where the lowering saves in chunks (``save_chunks``:
the CPU lowering with per-expert weight lists), one tensor per range of experts, whose row counts depend on the
routing. With ``save=0`` (no gradient can flow: the wrapper decides) ``h`` is empty, ``order`` too, and the
lowering's ``forward_inference`` (if it has one) runs instead, keeping less alive.

Backward: ``moe_fuser::grouped_experts_backward`` takes the output gradient. Traced with ``h`` in chunks, the
backward is two ops instead: ``moe_fuser::grad_rows`` gathers the output gradient's rows per chunk and
``moe_fuser::grouped_experts_backward_rows`` takes those, so the compiled backward frees the output gradient
before the experts' weight gradients appear and the lowering frees each chunk of rows once used (the eager
loop's backward holds the output gradient only until its last expert; autograd holds it through a backward op).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from typing import Optional, Sequence, Union

import torch
from torch._subclasses.fake_tensor import is_fake

from .. import lowering
from ..spec import ExpertSpec

__all__ = ["fake_weight_grads", "grouped_experts", "pack_weights", "register_ep_autograd", "zero_filled"]

Weights = Union[torch.Tensor, Sequence[torch.Tensor], None]


def pack_weights(ws: Weights) -> list[torch.Tensor]:
    if ws is None:
        return []
    if isinstance(ws, torch.Tensor):
        return [ws]
    return list(ws)


def _unpack(ws: Sequence[torch.Tensor], stacked_dim: int):
    if len(ws) == 0:
        return None
    if len(ws) == 1 and ws[0].dim() == stacked_dim:
        return ws[0]
    return list(ws)


def _unpack_all(w1, w2, w3, b1, b2, b3):
    return (_unpack(w1, 3), _unpack(w2, 3), _unpack(w3, 3), _unpack(b1, 2), _unpack(b2, 2), _unpack(b3, 2))


def _spec(num_experts: int, activation: str, glu: str, has_bias: bool, alpha: float, limit: float,
          combine: str = "") -> ExpertSpec:
    return ExpertSpec(num_experts=num_experts, activation=activation, glu=glu or None, bias=has_bias,
                      alpha=alpha, limit=ExpertSpec.from_op_limit(limit),
                      combine_dtype=ExpertSpec.from_op_combine(combine))


@torch.library.custom_op("moe_fuser::grouped_experts", mutates_args=())
def _grouped_experts_op(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                        w1: list[torch.Tensor], w2: list[torch.Tensor], w3: list[torch.Tensor],
                        b1: list[torch.Tensor], b2: list[torch.Tensor], b3: list[torch.Tensor],
                        num_experts: int, activation: str, glu: str, alpha: float, limit: float, combine: str,
                        impl: str, save: int) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    return _experts_forward(x, topk_weights, topk_ids, w1, w2, w3, b1, b2, b3, num_experts, activation, glu, alpha,
                            limit, combine, impl, save)


def _experts_forward(x, topk_weights, topk_ids, w1, w2, w3, b1, b2, b3, num_experts, activation, glu, alpha, limit,
                     combine, impl, save):
    """What the op computes: ``(out, h, order)`` (the op's kernel, and ``_EagerExperts``'s forward). A lowering
    without ``combine_dtypes`` combines in the compute dtype, and the result is cast to ``combine_dtype``."""
    spec = _spec(num_experts, activation, glu, bool(b1 or b2 or b3), alpha, limit, combine)
    low = lowering.select(impl, x.device)
    weights = _unpack_all(w1, w2, w3, b1, b2, b3)
    cast_to = None
    if spec.combine_dtype is not None and not getattr(low, "combine_dtypes", False):
        spec, cast_to = dataclasses.replace(spec, combine_dtype=None), spec.combine_dtype
    if save:
        chunked = {"chunks": save} if save > 1 else {}   # only a lowering with save_chunks is asked for chunks
        out, h, order = low.forward(x, topk_weights, topk_ids, *weights, spec, **chunked)
        h = list(h) if chunked else [h]
    else:
        infer = getattr(low, "forward_inference", None)
        out = infer(x, topk_weights, topk_ids, *weights, spec) if infer else \
            low.forward(x, topk_weights, topk_ids, *weights, spec)[0]
        h, order = [], topk_ids.new_empty((0,), dtype=torch.int64)
    return (out if cast_to is None else out.to(cast_to)), h, order


def _hidden_width(w2: list[torch.Tensor], glu: str) -> int:
    F_ = w2[0].shape[-1]
    return 2 * F_ if glu else F_


@_grouped_experts_op.register_fake
def _(x, topk_weights, topk_ids, w1, w2, w3, b1, b2, b3, num_experts, activation, glu, alpha, limit, combine, impl,
      save):
    T, K = topk_ids.shape
    H = _hidden_width(w2, glu)
    if save > 1:
        ctx = torch.library.get_ctx()
        h = [x.new_empty((ctx.new_dynamic_size(), H)) for _ in range(save)]
    else:
        h = [x.new_empty((T * K, H))] if save else []
    out = x.new_empty(x.shape, dtype=ExpertSpec.from_op_combine(combine) or x.dtype)
    return out, h, topk_ids.new_empty((T * K if save else 0,), dtype=torch.int64)


@torch.library.custom_op("moe_fuser::grad_rows", mutates_args=())
def _grad_rows_op(grad: torch.Tensor, topk_ids: torch.Tensor, order: torch.Tensor, num_experts: int,
                  chunks: int, impl: str) -> list[torch.Tensor]:
    """The output gradient's rows of the kept pairs, in sorted order, one tensor per saved chunk of ``h`` (the
    lowering's ``grad_rows``). In a traced backward it runs before the backward op, so that the compiled code can
    let go of the output gradient, and the backward op lets go of each chunk of rows once used."""
    return lowering.select(impl, grad.device).grad_rows(grad, topk_ids, order, num_experts, chunks)


@_grad_rows_op.register_fake
def _(grad, topk_ids, order, num_experts, chunks, impl):
    ctx = torch.library.get_ctx()
    return [grad.new_empty((ctx.new_dynamic_size(), grad.shape[1])) for _ in range(chunks)]


_BackwardGrads = tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor],
                       list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]


@torch.library.custom_op("moe_fuser::grouped_experts_backward", mutates_args=())
def _grouped_experts_backward_op(
        grad: torch.Tensor, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
        h: list[torch.Tensor], order: torch.Tensor,
        w1: list[torch.Tensor], w2: list[torch.Tensor], w3: list[torch.Tensor],
        b1: list[torch.Tensor], b2: list[torch.Tensor], b3: list[torch.Tensor],
        num_experts: int, activation: str, glu: str, alpha: float, limit: float, combine: str, impl: str,
        needs_input_grad: list[bool]) -> _BackwardGrads:
    return _op_grads(grad, [], x, topk_weights, topk_ids, h, order, w1, w2, w3, b1, b2, b3, num_experts, activation,
                     glu, alpha, limit, combine, impl, needs_input_grad)


# The same backward taking the output gradient already gathered per saved chunk (``_grad_rows_op``). A separate
# op, not another argument of the first: compiled graphs cached on disk call the first by name with its schema.
@torch.library.custom_op("moe_fuser::grouped_experts_backward_rows", mutates_args=())
def _grouped_experts_backward_rows_op(
        grad_rows: list[torch.Tensor], x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
        h: list[torch.Tensor], order: torch.Tensor,
        w1: list[torch.Tensor], w2: list[torch.Tensor], w3: list[torch.Tensor],
        b1: list[torch.Tensor], b2: list[torch.Tensor], b3: list[torch.Tensor],
        num_experts: int, activation: str, glu: str, alpha: float, limit: float, combine: str, impl: str,
        needs_input_grad: list[bool]) -> _BackwardGrads:
    return _op_grads(None, grad_rows, x, topk_weights, topk_ids, h, order, w1, w2, w3, b1, b2, b3, num_experts,
                     activation, glu, alpha, limit, combine, impl, needs_input_grad)


def _op_grads(grad, grad_rows, x, topk_weights, topk_ids, h, order, w1, w2, w3, b1, b2, b3, *config):
    """The backward ops' kernel: ``_experts_backward`` with what a custom op may return (no None, no alias of an
    input: absent grads become empty tensors / zero-filled lists)."""
    dx, dweights, *dws = _experts_backward(grad, grad_rows, x, topk_weights, topk_ids, h, order, w1, w2, w3, b1,
                                           b2, b3, *config)
    dx = x.new_zeros(0) if dx is None else dx
    dweights = topk_weights.new_zeros(0) if dweights is None else dweights
    return (dx, dweights, *zero_filled(dws, (w1, w2, w3, b1, b2, b3)))


def _experts_backward(grad, grad_rows, x, topk_weights, topk_ids, h, order, w1, w2, w3, b1, b2, b3, num_experts,
                      activation, glu, alpha, limit, combine, impl, needs_input_grad):
    """What the backward op computes: ``(dx, dweights, *six weight-gradient lists)``, None where not needed, and
    None in a per-expert list for an expert that got no rows (``moe_fuser.lowering``). The output's gradient
    comes in ``combine_dtype`` if one was set: a lowering with ``combine_dtypes`` takes it so, any other gets it
    cast to the compute dtype. It comes as ``grad`` or, already gathered per chunk, as ``grad_rows``
    (``_grad_rows_op``; then ``grad`` is None)."""
    spec = _spec(num_experts, activation, glu, bool(b1 or b2 or b3), alpha, limit)
    low = lowering.select(impl, x.device)
    if grad is not None and not getattr(low, "combine_dtypes", False):
        grad = grad.to(x.dtype)
    # one saved tensor goes to the lowering as it came; chunks (see the module docstring) as the list
    rows = {"grad_rows": grad_rows} if grad_rows else {}
    dx, dweights, *dws = low.backward(grad, x, topk_weights, topk_ids, h[0] if len(h) == 1 else h, order,
                                      *_unpack_all(w1, w2, w3, b1, b2, b3), spec, tuple(needs_input_grad), **rows)
    return (dx, dweights, *[pack_weights(g) for g in dws])


def zero_filled(grad_lists: Sequence[list], weight_lists: Sequence[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """Weight-gradient lists as a backward op returns them: an expert without a gradient (None) gets zeros."""
    return [[w.new_zeros(w.shape) if g is None else g for g, w in zip(gs, ws)]
            for gs, ws in zip(grad_lists, weight_lists)]


def _functorch_levels() -> int:
    """How many ``torch.func`` transforms (grad, vjp, vmap, ...) the current call runs under (0: none)."""
    if not torch._C._are_functorch_transforms_active():
        return 0
    return len(torch._C._functorch.get_interpreter_stack() or ())


def _runs_eagerly(grad: torch.Tensor) -> bool:
    """Whether a backward (handed ``grad``) runs on real tensors with no dispatch mode or compiled autograd
    watching, so that it may return what depends on the data; traced (AOTAutograd, compiled autograd, make_fx) it
    must return what the backward op's fake kernel promises. Grad mode is on in a backward only for
    ``create_graph=True``: then the backward op runs too, so that backpropagating through the gradients it gave
    fails naming the op (it has no derivative) instead of deep inside a lowering. Under one ``torch.func``
    transform (``torch.func.grad``, ``vjp``) grad mode is on as well, for transforms around it; with none around
    it the gradients are plain values and the backward runs eagerly (``_grads``); nested transforms are refused."""
    levels = _functorch_levels()
    if levels > 1:
        raise RuntimeError("moe_fuser: the fused MoE op has a first derivative only; a torch.func transform around "
                           "torch.func.grad/vjp of it (grad of grad, jacrev, vmap) is not supported")
    ca = sys.modules.get("torch._dynamo.compiled_autograd")
    return not (is_fake(grad) or torch._C._len_torch_dispatch_stack() or torch.compiler.is_compiling()
                or (ca is not None and ca.in_compiled_autograd_region)
                or (torch.is_grad_enabled() and not levels))


@_grouped_experts_backward_op.register_fake
def _(grad, *args):
    return _fake_grads(*args)


@_grouped_experts_backward_rows_op.register_fake
def _(grad_rows, *args):
    return _fake_grads(*args)


def _fake_grads(x, topk_weights, topk_ids, h, order, w1, w2, w3, b1, b2, b3, num_experts, activation, glu, alpha,
                limit, combine, impl, needs_input_grad):
    need_x, need_weights, need_w = needs_input_grad
    return (x.new_empty(x.shape) if need_x else x.new_empty(0),
            topk_weights.new_empty(topk_weights.shape) if need_weights else topk_weights.new_empty(0),
            *fake_weight_grads((w1, w2, w3, b1, b2, b3), need_w))


def save_with_weights(ctx, tensors: Sequence[torch.Tensor], weight_lists: Sequence[list[torch.Tensor]]) -> None:
    """``ctx.save_for_backward`` for a custom op taking the six ``Tensor[]`` weight arguments: the lists are
    flattened after ``tensors`` and their lengths kept (see ``saved_with_weights``)."""
    ctx.save_for_backward(*tensors, *(w for ws in weight_lists for w in ws))
    ctx.num_plain = len(tensors)
    ctx.lengths = [len(ws) for ws in weight_lists]


def saved_with_weights(ctx) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """What ``save_with_weights`` saved: (the plain tensors, the weight lists)."""
    saved = ctx.saved_tensors
    return list(saved[:ctx.num_plain]), _split(saved[ctx.num_plain:], ctx.lengths)


def fake_weight_grads(weight_lists: Sequence[list[torch.Tensor]], need_w: bool) -> list[list[torch.Tensor]]:
    """A backward op's fake weight-gradient lists: shaped like the weights, or empty when not needed."""
    return [[w.new_empty(w.shape) for w in ws] if need_w else [] for ws in weight_lists]


def weights_need_grad(ctx) -> bool:
    """Whether any of the six weight lists (arguments 3-8) needs a gradient. Autograd reports a ``Tensor[]``
    argument as a list of flags, so a list of all-False flags is truthy: look inside."""
    return any(any(flags) for flags in ctx.needs_input_grad[3:9])


def weight_grads(dws: Sequence[list[torch.Tensor]], lengths: Sequence[int]) -> list[list]:
    """A backward op's weight-gradient lists (empty: not computed) as autograd wants them for ``Tensor[]``
    inputs: one entry per tensor, None where there is no gradient."""
    return [list(g) if g else [None] * n for g, n in zip(dws, lengths)]


def _input_grads(ctx, dx, dweights, dws: Sequence[list[torch.Tensor]], trailing: int) -> tuple:
    """An experts op's gradients as autograd wants them for its inputs ``(x, topk_weights, topk_ids, w1, w2, w3,
    b1, b2, b3, *trailing inputs without gradient)``: x's and the routing weights' only where asked for, the
    weight lists per tensor (``weight_grads``; an empty list: none)."""
    return (dx if ctx.needs_input_grad[0] else None, dweights if ctx.needs_input_grad[1] else None, None,
            *weight_grads(dws, ctx.lengths), *([None] * trailing))


def first_derivative_only(backward_op) -> None:
    """Give a backward op an autograd formula that refuses, naming the fix: it runs with grad mode on under
    ``create_graph=True`` (see ``_runs_eagerly``), and differentiating the gradients it returned would otherwise
    fail with torch's note to its developers (\"no autograd formula was registered\")."""
    def refuse(ctx, *grads):
        raise RuntimeError("moe_fuser: the fused MoE op has a first derivative only; to differentiate its "
                           "gradients again (create_graph=True, then backward through them) run the layer with "
                           "fused_moe(..., impl='reference') (plain PyTorch) or without moe_fuser")

    backward_op.register_autograd(refuse, setup_context=lambda ctx, inputs, output: None)


def register_ep_autograd(op, backward_op, eager_backward=None) -> None:
    """The autograd formula of an expert-parallel experts op (moe_fuser's exchange, the npu lowering's): inputs
    ``(x, topk_weights, topk_ids, w1, w2, w3, b1, b2, b3, owner, *config, save)``, outputs ``(out, *kept)``, and
    ``backward_op(grad, x, topk_weights, topk_ids, *kept, *weight lists, owner, *config, need_w)`` returning
    ``(dx, dweights, *weight-gradient lists)``. ``eager_backward``, if given, computes the same with None for a
    weight that got no gradient, and runs instead of the op where nothing traces (as in ``grouped_experts``)."""
    def setup_context(ctx, inputs, output):
        (x, topk_weights, topk_ids, w1, w2, w3, b1, b2, b3, owner, *config) = inputs
        save_with_weights(ctx, (x, topk_weights, topk_ids, *output[1:], owner), (w1, w2, w3, b1, b2, b3))
        ctx.mark_non_differentiable(*output[1:])   # kept for the backward only, as in grouped_experts
        ctx.set_materialize_grads(False)
        ctx.config = tuple(config[:-1])   # without ``save``

    def backward(ctx, grad_out, *_unused):
        trailing = 1 + len(ctx.config) + 1   # owner, the config, save
        if grad_out is None:   # no gradient reached the output (none is materialised)
            return _input_grads(ctx, None, None, [[]] * 6, trailing)
        (x, topk_weights, topk_ids, *kept, owner), lists = saved_with_weights(ctx)
        args = (grad_out, x, topk_weights, topk_ids, *kept, *lists, owner, *ctx.config, weights_need_grad(ctx))
        eager = eager_backward is not None and _runs_eagerly(grad_out)
        dx, dweights, *dws = (eager_backward if eager else backward_op)(*args)
        return _input_grads(ctx, dx, dweights, dws, trailing)

    op.register_autograd(backward, setup_context=setup_context)
    first_derivative_only(backward_op)


def _setup_context(ctx, inputs, output):
    (x, topk_weights, topk_ids, w1, w2, w3, b1, b2, b3, num_experts, activation, glu, alpha, limit, combine, impl,
     save) = inputs
    _, h, order = output
    save_with_weights(ctx, (x, topk_weights, topk_ids, order, *h), (w1, w2, w3, b1, b2, b3))
    # h and order exist only for the backward: no gradient flows into them, and none is materialised (zeros the
    # size of h, allocated and filled on every eager backward otherwise)
    ctx.mark_non_differentiable(*h, order)
    ctx.set_materialize_grads(False)
    ctx.config = (num_experts, activation, glu, alpha, limit, combine, impl)
    ctx.save = save


_CONFIG_INPUTS = 8   # num_experts, activation, glu, alpha, limit, combine, impl, save: no gradient


def _backward(ctx, grad_out, grad_h, grad_order):
    if grad_out is None:   # no gradient reached the output (grads are not materialised, see _setup_context)
        return _input_grads(ctx, None, None, [[]] * 6, _CONFIG_INPUTS)
    (x, topk_weights, topk_ids, order, *h), lists = saved_with_weights(ctx)
    if not ctx.save:  # forward ran without saving (no grad was expected then): recompute h, as checkpointing
        _, h, order = _grouped_experts_op(x, topk_weights, topk_ids, *lists, *ctx.config, 1)
    dx, dweights, *dws = _grads(ctx, grad_out, x, topk_weights, topk_ids, h, order, lists,
                                [ctx.needs_input_grad[0], ctx.needs_input_grad[1], weights_need_grad(ctx)])
    return _input_grads(ctx, dx, dweights, dws, _CONFIG_INPUTS)


def _grads(ctx, grad_out, x, topk_weights, topk_ids, h, order, lists, needs_input_grad):
    """The backward of both autograd formulas: ``(dx, dweights, *six weight-gradient lists)``."""
    ctx.maybe_clear_saved_tensors()  # unless retain_graph: the lowering may let go of h as it goes
    rest = (x, topk_weights, topk_ids, h, order, *lists, *ctx.config, needs_input_grad)
    # Where nothing traces, an expert that got no rows keeps no gradient (None, as in an eager loop that skips it;
    # an optimizer then leaves it alone) instead of the zeros the op's fixed outputs force.
    if _runs_eagerly(grad_out):
        # under torch.func.grad/vjp: the gradients' values (nothing differentiates them)
        with torch.no_grad() if _functorch_levels() else contextlib.nullcontext():
            return _experts_backward(grad_out.contiguous(), [], *rest)
    impl = ctx.config[-1]
    if len(h) > 1 and hasattr(lowering.select(impl, x.device), "grad_rows"):
        # Traced, with h saved in chunks: the output gradient's rows are gathered first, so that the compiled
        # backward lets go of the output gradient before the experts' backward, which lets go of each chunk of
        # rows once used (the gradients then grow while everything else shrinks, as in the eager loop).
        rows = _grad_rows_op(grad_out.contiguous(), topk_ids, order, ctx.config[0], len(h), impl)
        return _grouped_experts_backward_rows_op(rows, *rest)
    return _grouped_experts_backward_op(grad_out.contiguous(), *rest)


_grouped_experts_op.register_autograd(_backward, setup_context=_setup_context)
first_derivative_only(_grouped_experts_backward_op)
first_derivative_only(_grouped_experts_backward_rows_op)


class _EagerExperts(torch.autograd.Function):
    """The op's forward and autograd formula for calls where nothing traces, without going through the custom op.

    torch.library wraps an op that takes tensor lists in an autograd function that flattens and rebuilds every
    argument with pytree on each call: about 0.2 ms per layer and training step on this CPU for eight per-expert
    weights. This is the same formula with the weights passed flat. Traced calls (dynamo, AOTAutograd, make_fx,
    fake tensors) keep the custom op, whose fake kernel and backward op the graphs need (``grouped_experts``)."""

    @staticmethod
    def forward(x, topk_weights, topk_ids, config, save, lengths, *weights):
        out, h, order = _experts_forward(x, topk_weights, topk_ids, *_split(weights, lengths), *config, save)
        return (out, order, *h)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, topk_weights, topk_ids, config, save, lengths, *weights = inputs
        _, order, *h = output
        save_with_weights(ctx, (x, topk_weights, topk_ids, order, *h), _split(weights, lengths))
        ctx.mark_non_differentiable(order, *h)   # as in _setup_context
        ctx.set_materialize_grads(False)
        ctx.config = config

    @staticmethod
    def backward(ctx, grad_out, *_unused):
        need = ctx.needs_input_grad
        if grad_out is None:
            return (None,) * len(need)
        (x, topk_weights, topk_ids, order, *h), lists = saved_with_weights(ctx)
        dx, dweights, *dws = _grads(ctx, grad_out, x, topk_weights, topk_ids, h, order, lists,
                                    [need[0], need[1], any(need[6:])])
        flat = [g for gs, n in zip(dws, ctx.lengths) for g in (gs or [None] * n)]
        return (dx if need[0] else None, dweights if need[1] else None, None, None, None, None, *flat)


def _split(flat: Sequence[torch.Tensor], lengths: Sequence[int]) -> list[list[torch.Tensor]]:
    """Consecutive lists of ``lengths`` tensors from ``flat``."""
    out, start = [], 0
    for n in lengths:
        out.append(list(flat[start:start + n]))
        start += n
    return out


def _traced(x: torch.Tensor) -> bool:
    """Whether this call is being traced into a graph (then the custom op must appear in it)."""
    return torch.compiler.is_compiling() or is_fake(x) or torch._C._len_torch_dispatch_stack() > 0


@torch.compiler.assume_constant_result
def _lowering_name(impl: Optional[str], device_type: str) -> str:
    """The lowering chosen for a device, evaluated eagerly even while dynamo traces (it imports lazily)."""
    return lowering.select(impl, torch.device(device_type)).name


@torch.compiler.assume_constant_result
def _save_chunks(name: str, device_type: str, stacked: bool, num_experts: int) -> int:
    """How many tensors lowering ``name`` saves ``h`` in for backward (``save_chunks``; default one)."""
    device = torch.device(device_type)
    chunks = getattr(lowering.select(name, device), "save_chunks", None)
    return 1 if chunks is None else chunks(device, stacked, num_experts)


def grouped_experts(x_TD: torch.Tensor, topk_weights_TK: torch.Tensor, topk_ids_TK: torch.Tensor,
                    w1: Weights, w2: Weights, w3: Weights = None, b1: Weights = None, b2: Weights = None,
                    b3: Weights = None, *, spec: ExpertSpec, impl: Optional[str] = None) -> torch.Tensor:
    """Run the op with lowering ``impl`` (None: chosen for ``x``'s device now, so the graph records a name)."""
    name = _lowering_name(impl, x_TD.device.type)
    packed = [pack_weights(w) for w in (w1, w2, w3, b1, b2, b3)]
    # Keep h for backward only when a gradient can flow; inference runs the lowering's leaner forward.
    save = 0
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x_TD, topk_weights_TK, *sum(packed, []))):
        stacked = isinstance(w1, torch.Tensor)   # else a list of E tensors: E is static, the list's length
        save = _save_chunks(name, x_TD.device.type, stacked, 1 if stacked else len(packed[0]))
    config = (spec.num_experts, spec.activation, spec.glu or "", float(spec.alpha), spec.op_limit, spec.op_combine,
              name)
    if _traced(x_TD):
        return _grouped_experts_op(x_TD, topk_weights_TK, topk_ids_TK, *packed, *config, save)[0]
    if not save:
        return _experts_forward(x_TD, topk_weights_TK, topk_ids_TK, *packed, *config, 0)[0]
    return _EagerExperts.apply(x_TD, topk_weights_TK, topk_ids_TK, config, save, [len(w) for w in packed],
                               *sum(packed, []))[0]
