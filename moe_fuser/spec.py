"""MoESpec: the frozen description of one Mixture-of-Experts layer.

This is the single contract between the producers (the public ``fused_moe`` call, the FX pattern families in
``moe_fuser.patterns``) and the consumers (the op in ``moe_fuser.ops`` and the device lowerings in
``moe_fuser.lowering``). A new pattern family only has to produce a ``MoESpec``; a new device only has to
consume one.

A spec holds *static* configuration only (what would become a compile-time constant); tensors travel beside it
in ``MoEWeights``. Every spec validates itself on construction, so an impossible configuration fails where it is
written, with a message that names the fix.

Router semantics, with ``s`` the router logits computed in ``RouterSpec.dtype`` (fp32 by default):

    scoring="softmax", topk_first=False:  p = softmax(s);  w, ids = topk(p (+ bias), k)
    scoring="softmax", topk_first=True:   v, ids = topk(s, k); w = softmax(v)          (GShard, Granite, GPT-OSS)
    scoring="sigmoid", topk_first=False:  p = sigmoid(s);  ids = topk(p + bias, k);  w = p[ids]   (DeepSeek-V3)
    scoring="sigmoid", topk_first=True:   v, ids = topk(s, k); w = sigmoid(v)          (Llama 4)
    first_max: the top-1 is taken as torch.max / argmax take it, ties to the lowest expert id (documented for
        them; topk's order among equal scores is not, and it differs: exact ties are common in bf16)
    num_groups > 1: experts are split in num_groups groups; a group's score is its max (group_score="max") or
        the sum of its two best (group_score="top2_sum") biased scores; only the topk_groups best groups compete.
    renormalize: w = w / max(sum(w) + renorm_eps, renorm_min); renorm_eps None means the scoring's default,
        1e-20 for sigmoid (DeepSeek) and 0 for softmax; renorm_min > 0 clamps the sum (ERNIE-4.5)
    w = w * scaling_factor
    weights_dtype: the final weights are rounded to this dtype (kept in the routing dtype), as a model that casts
        them (``.to(hidden_states.dtype)``) computes with them; None: no rounding
    external=True: the router stays outside; the op receives (topk_weights, topk_ids) as they are (the weights
        rounded to weights_dtype if that is set: a recognised router whose top-k the op takes from the graph).

Expert semantics (one expert e, row x; W weights in nn.Linear layout ``[out, in]``):

    glu=None:          y = W2 (act(W1 x + b1)) + b2
    glu="separate":    y = W2 (act(W1 x + b1) * (W3 x + b3)) + b2
    glu="concat":      W1 holds [gate; up] stacked along its output dim (transformers' gate_up_proj)
    glu="interleaved": W1 rows alternate gate, up (GPT-OSS)
    activation="relu2": act(h) = relu(h)^2 (squared ReLU: Nemotron-H, Primer)
    activation="gpt_oss": g = min(gate, limit); u = clamp(up, -limit, limit); a = (u + 1) * g * sigmoid(alpha g)
                          (limit defaults to GPT-OSS's 7)
    other gated activations with a limit (DeepSeek-V4's swiglu_limit): a = act(min(gate, limit)) * clamp(up,
                          -limit, limit); without one (the default) nothing is clamped
    combine_dtype: y is weighted by w and summed over the token's experts in this dtype, where a model does so in
                          another than its experts compute in (a loop under autocast that adds bf16 expert outputs
                          times fp32 weights into an fp32 buffer); None: in the experts' compute dtype

Weight on input (``MoESpec.weight_on_input``, Llama 4; vLLM's ``apply_router_weight_on_input``): the routing
weight scales the expert's input instead of its output, out[t] = sum_j expert_{ids[t, j]}(w[t, j] * x[t]); the
product is formed in promote(x's dtype, weights_dtype or the routing dtype), as ``x * scores`` in the model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence, Union

import torch

__all__ = [
    "ACTIVATIONS",
    "GLU_LAYOUTS",
    "CapacitySpec",
    "ExpertSpec",
    "MoESpec",
    "MoEWeights",
    "RouterSpec",
    "SharedExpertSpec",
    "dtype_name",
]

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "relu2", "gpt_oss")
GLU_LAYOUTS = (None, "separate", "concat", "interleaved")
SCORINGS = ("softmax", "sigmoid")
GROUP_SCORES = ("max", "top2_sum")
SIGMOID_RENORM_EPS = 1e-20      # what DeepSeek-V3 and its descendants add to the sum of sigmoid weights
DROP_POLICIES = ("zero", "passthrough")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``bfloat16`` (the custom ops' dtype arguments, explain's tables and notes)."""
    return str(dtype).replace("torch.", "")


def default_renorm_eps(scoring: str) -> float:
    """What a router of this scoring adds to the sum of its top-k weights when it renormalises."""
    return SIGMOID_RENORM_EPS if scoring == "sigmoid" else 0.0


def _finite(v) -> bool:
    """A real number that is neither NaN nor infinite (a config value that the op computes with)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and -math.inf < v < math.inf  # False for NaN


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass(frozen=True)
class RouterSpec:
    """How token-to-expert assignments and their weights are computed (see the module docstring)."""

    top_k: int
    scoring: str = "softmax"
    topk_first: bool = False
    renormalize: bool = True
    num_groups: int = 1
    topk_groups: int = 1
    group_score: str = "max"
    scaling_factor: float = 1.0
    selection_bias: bool = False
    dtype: Optional[torch.dtype] = torch.float32
    external: bool = False
    renorm_min: float = 0.0
    weights_dtype: Optional[torch.dtype] = None
    renorm_eps: Optional[float] = None
    first_max: bool = False

    def __post_init__(self) -> None:
        _check(isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= 1,
               f"top_k must be a positive int, got {self.top_k!r}; pass top_k=1 or more")
        _check(self.scoring in SCORINGS, f"scoring={self.scoring!r} is unknown; use one of {SCORINGS}")
        _check(not self.first_max or self.top_k == 1,
               f"first_max (a top-1 taken by max/argmax) needs top_k=1, got {self.top_k}")
        if not _finite(self.scaling_factor):   # the message only on failure: under dynamo the value may be symbolic
            _check(False, f"routed_scaling_factor={self.scaling_factor!r} must be a finite number (1.0: no scaling)")
        _check(self.dtype is None or (isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point),
               f"router_dtype={self.dtype!r} must be a floating torch.dtype (or None: the logits' own)")
        _check(self.group_score in GROUP_SCORES,
               f"group_score={self.group_score!r} is unknown; use one of {GROUP_SCORES}")
        _check(self.num_groups >= 1 and 1 <= self.topk_groups <= self.num_groups,
               f"topk_groups={self.topk_groups} must lie in [1, num_groups={self.num_groups}]")
        _check(not (self.topk_first and (self.num_groups > 1 or self.selection_bias)),
               "topk_first=True (top-k on the logits, then softmax or sigmoid of the k) selects on the logits "
               "alone: drop num_groups / selection_bias, or use topk_first=False")
        _check(self.renorm_min >= 0.0 and (self.renorm_min == 0.0 or self.renormalize),
               f"renorm_min={self.renorm_min!r} clamps the renormalisation's sum: it needs renormalize=True and "
               "a value >= 0")
        _check(self.renorm_eps is None or (self.renorm_eps >= 0.0 and self.renormalize),
               f"renorm_eps={self.renorm_eps!r} is added to the renormalisation's sum: it needs renormalize=True "
               "and a value >= 0 (None: the scoring's default)")

    @property
    def eps(self) -> float:
        """What the renormalisation adds to the sum (``renorm_eps``, or the scoring's default)."""
        return default_renorm_eps(self.scoring) if self.renorm_eps is None else self.renorm_eps

    def validate_for(self, num_experts: int) -> None:
        _check(self.top_k <= num_experts,
               f"top_k={self.top_k} exceeds the number of experts E={num_experts}; choose top_k <= {num_experts}")
        if self.num_groups > 1:
            _check(num_experts % self.num_groups == 0,
                   f"E={num_experts} experts cannot be split into num_groups={self.num_groups} equal groups; "
                   "choose num_groups dividing E")
            per_group = num_experts // self.num_groups
            _check(self.top_k <= self.topk_groups * per_group,
                   f"top_k={self.top_k} exceeds the {self.topk_groups * per_group} experts in the "
                   f"topk_groups={self.topk_groups} selected groups; raise topk_groups")
            if self.group_score == "top2_sum":
                _check(per_group >= 2, "group_score='top2_sum' needs at least 2 experts per group")


@dataclass(frozen=True)
class ExpertSpec:
    """The routed experts' FFN (see the module docstring)."""

    num_experts: int
    activation: str = "silu"
    glu: Optional[str] = None
    bias: bool = False
    alpha: float = 1.702
    limit: Optional[float] = None
    combine_dtype: Optional[torch.dtype] = None

    def __post_init__(self) -> None:
        if self.activation == "gpt_oss" and self.limit is None:
            object.__setattr__(self, "limit", 7.0)
        _check(isinstance(self.num_experts, int) and self.num_experts >= 1,
               f"num_experts must be a positive int, got {self.num_experts!r}")
        _check(self.activation in ACTIVATIONS,
               f"activation={self.activation!r} is unknown; use one of {ACTIVATIONS}")
        _check(self.glu in GLU_LAYOUTS, f"glu={self.glu!r} is unknown; use one of {GLU_LAYOUTS}")
        _check(self.activation != "gpt_oss" or self.glu is not None,
               "activation='gpt_oss' is a gated (GLU) activation; give w3 or a fused gate_up layout")
        _check(self.limit is None or self.glu is not None,
               f"limit={self.limit} clamps the gate and up halves of a gated (GLU) expert; this one has no up "
               "projection: drop limit or give w3 / a fused gate_up layout")
        _check(self.limit is None or (_finite(self.limit) and self.limit > 0),
               f"limit={self.limit!r} must be a positive number (or None: no clamp)")
        if not _finite(self.alpha):
            _check(False, f"alpha={self.alpha!r} must be a finite number")
        _check(self.combine_dtype is None or (isinstance(self.combine_dtype, torch.dtype)
                                              and self.combine_dtype.is_floating_point),
               f"combine_dtype={self.combine_dtype!r} must be a floating torch.dtype (or None)")

    @property
    def gated(self) -> bool:
        return self.glu is not None

    @property
    def op_limit(self) -> float:
        """``limit`` as the custom ops' float argument: infinity for none (``from_op_limit`` reverses it)."""
        return math.inf if self.limit is None else float(self.limit)

    @staticmethod
    def from_op_limit(limit: float) -> Optional[float]:
        return None if math.isinf(limit) else limit

    @property
    def op_combine(self) -> str:
        """``combine_dtype`` as the custom ops' string argument: "" for none (``from_op_combine`` reverses it)."""
        return "" if self.combine_dtype is None else dtype_name(self.combine_dtype)

    @staticmethod
    def from_op_combine(combine: str) -> Optional[torch.dtype]:
        return getattr(torch, combine) if combine else None


@dataclass(frozen=True)
class SharedExpertSpec:
    """An always-on dense expert added to the routed output, optionally scaled by sigmoid(x @ gate^T)."""

    activation: str = "silu"
    glu: bool = True
    gated: bool = False

    def __post_init__(self) -> None:
        _check(self.activation in ACTIVATIONS and self.activation != "gpt_oss",
               f"shared activation={self.activation!r} is unsupported; use silu, gelu, gelu_tanh, relu or relu2")


@dataclass(frozen=True)
class CapacitySpec:
    """Switch-style expert capacity: each expert takes at most ``capacity`` (token, slot) pairs per token group,
    first come first served in token order; a dropped pair contributes nothing (``dropped="zero"``) or its
    routing weight times the token's input (``dropped="passthrough"``, Switch Transformers in transformers)."""

    capacity: int
    dropped: str = "zero"

    def __post_init__(self) -> None:
        _check(isinstance(self.capacity, int) and self.capacity >= 0,
               f"capacity must be a non-negative int, got {self.capacity!r}")
        _check(self.dropped in DROP_POLICIES, f"dropped={self.dropped!r} is unknown; use one of {DROP_POLICIES}")


@dataclass(frozen=True)
class MoESpec:
    router: RouterSpec
    experts: ExpertSpec
    shared: Optional[SharedExpertSpec] = None
    capacity: Optional[CapacitySpec] = None
    weight_on_input: bool = False

    def __post_init__(self) -> None:
        if not self.router.external:
            self.router.validate_for(self.experts.num_experts)
        _check(not (self.weight_on_input and self.capacity is not None),
               "weight_on_input (the routing weight scales the expert's input) with capacity (token dropping) is "
               "not supported; drop one of them")

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    @property
    def top_k(self) -> int:
        return self.router.top_k

    def replace(self, **changes) -> "MoESpec":
        return dataclasses.replace(self, **changes)

    def summary(self) -> str:
        r, e = self.router, self.experts
        if r.external:
            router = "external"
        elif r.scoring == "sigmoid":
            router = ("topk-sigmoid" if r.topk_first else "sigmoid-topk") + \
                (f"(groups {r.topk_groups}/{r.num_groups})" if r.num_groups > 1 else "")
        else:
            router = "topk-softmax" if r.topk_first else "softmax-topk"
        if r.renormalize and not r.external and not (r.topk_first and r.scoring == "softmax"):
            router += "+renorm"
        act = e.activation + ("-glu" if e.gated else "")
        extras = [x for x, on in (("bias", e.bias), ("shared", self.shared is not None),
                                  ("capacity", self.capacity is not None),
                                  ("weight on input", self.weight_on_input)) if on]
        return f"E={e.num_experts} k={r.top_k} {router} {act}" + (f" [{', '.join(extras)}]" if extras else "")


WeightList = Union[torch.Tensor, Sequence[torch.Tensor]]


class MoEWeights(NamedTuple):
    """The tensors of one MoE. Expert weights are stacked ``[E, out, in]`` tensors or per-expert lists of
    ``[out, in]`` tensors (ModuleList models, never copied). Shapes: w1 [E, F|2F, D], w2 [E, D, F],
    w3 [E, F, D]; b1 [E, F|2F], b2 [E, D], b3 [E, F]; selection_bias [E]; shared_* as nn.Linear weights;
    shared_gate [1, D]."""

    w1: WeightList
    w2: WeightList
    w3: Optional[WeightList] = None
    b1: Optional[WeightList] = None
    b2: Optional[WeightList] = None
    b3: Optional[WeightList] = None
    selection_bias: Optional[torch.Tensor] = None
    shared_w1: Optional[torch.Tensor] = None
    shared_w2: Optional[torch.Tensor] = None
    shared_w3: Optional[torch.Tensor] = None
    shared_gate: Optional[torch.Tensor] = None
