"""Bad input raises ValueError naming the problem and the fix, before any work."""

import pytest
import torch

import moe_fuser
from _moe_cases import Case


def _args(**over):
    x, logits, kw = Case(T=9, D=16, F=24, E=4, k=2, dtype=torch.float32).make()
    args = dict(hidden_states=x, router_logits=logits, **kw)
    args.update(over)
    return args


@pytest.mark.parametrize("over,match", [
    (dict(top_k=5), r"top_k=5 exceeds the number of experts E=4; choose top_k <= 4"),
    (dict(top_k=0), r"top_k must be a positive int.*top_k=1 or more"),
    (dict(router_logits=torch.randn(9, 5)), r"router_logits has 5 experts but the weights hold 4"),
    (dict(hidden_states=torch.randn(1, 9, 16)), r"hidden_states must be \[T, D\].*reshape"),
    (dict(router_logits=torch.randn(9)), r"router_logits must be \[T=9, E\]"),
    (dict(w1=torch.randn(4, 24)), r"w1 must be a stacked \[E, out, in\] tensor or a list"),
    (dict(hidden_states=torch.randn(9, 16, dtype=torch.bfloat16)), r"mixed dtypes.*cast"),
    (dict(w2=torch.randn(4, 16, 24, dtype=torch.float64)), r"w2 is torch.float64 but w1 is torch.float32"),
    (dict(w2=torch.randn(3, 16, 24)), r"w1 has 4 experts but w2 has 3"),
    (dict(hidden_states=torch.randn(9, 12)), r"hidden size mismatch"),
    (dict(router_logits=torch.full((9, 4), float("nan"))), r"router_logits contain NaN.*check"),
    (dict(activation="swish"), r"activation='swish' is unknown; use one of"),
    (dict(num_groups=3), r"cannot be split into num_groups=3"),
    (dict(w3=None, limit=5.0), r"limit=5.0 clamps the gate and up halves of a gated \(GLU\) expert.*drop limit"),
    (dict(limit=-1.0), r"limit=-1.0 must be a positive number"),
    (dict(topk_first=True, num_groups=2), r"topk_first=True .* selects on the logits alone: drop num_groups"),
    (dict(topk_first=True, selection_bias=torch.zeros(4)), r"topk_first=True .* drop num_groups / selection_bias"),
    (dict(apply_router_weight_on_input=True, capacity=4), r"weight_on_input .* with capacity .* drop one of them"),
    (dict(top_k=True), r"top_k must be a positive int, got True"),
    (dict(routed_scaling_factor=float("nan")), r"routed_scaling_factor=nan must be a finite number"),
    (dict(activation="gpt_oss", alpha=float("inf")), r"alpha=inf must be a finite number"),
    (dict(router_dtype=torch.int32), r"router_dtype=torch.int32 must be a floating torch.dtype"),
    (dict(capacity=3, capacity_groups=0), r"capacity_groups=0 must be a positive int that divides the T=9 tokens"),
    (dict(capacity=3, capacity_groups=2), r"capacity_groups=2 must be a positive int that divides the T=9 tokens"),
    (dict(shared_w1=torch.randn(10, 15), shared_w2=torch.randn(16, 10)),
     r"shared_w1 has shape \(10, 15\).*\[S, D=16\]"),
    (dict(shared_w1=torch.randn(10, 16), shared_w2=torch.randn(16, 10), shared_gate=torch.randn(2, 16)),
     r"shared_gate has shape \(2, 16\).*shared_gate \[1, D=16\]"),
    (dict(shared_w1=torch.randn(10, 16), shared_w2=torch.randn(16, 10, dtype=torch.float64)),
     r"shared_w2 is torch.float64 but hidden_states is torch.float32"),
])
def test_bad_input_raises_with_fix(over, match):
    with pytest.raises(ValueError, match=match):
        moe_fuser.fused_moe(**_args(**over))


def test_unknown_or_unavailable_impl():
    with pytest.raises(ValueError, match=r"impl='cuda_magic' is unknown"):
        moe_fuser.fused_moe(**_args(), impl="cuda_magic")
    with pytest.raises(ValueError, match=r"impl='npu' cannot"):
        moe_fuser.fused_moe(**_args(), impl="npu")


@pytest.mark.parametrize("shift,match", [(4, r"ids from 4 to 7 but there are 4 experts.*\[0, 4\)"),
                                         (-6, r"ids from -6 to -3 but there are 4 experts")])
def test_external_ids_out_of_range(shift, match):
    """Given top-k ids outside [0, E) (other than -1) would silently contribute nothing: refused, either impl."""
    args = _args()
    weights, ids = args.pop("router_logits").softmax(-1).topk(2)
    for impl in ("cpu", "reference"):
        with pytest.raises(ValueError, match=match):
            moe_fuser.fused_moe(**args, router_logits=None, topk_weights=weights, topk_ids=ids + shift, impl=impl)


def test_external_id_minus_one_goes_to_no_expert():
    """-1 marks a pair that goes to no expert (as a dropped pair): it contributes nothing, like a zero weight."""
    args = _args()
    weights, ids = args.pop("router_logits").softmax(-1).topk(2)
    ids[::2, 1] = -1
    got = moe_fuser.fused_moe(**args, router_logits=None, topk_weights=weights, topk_ids=ids)
    zeroed = weights.clone()
    zeroed[::2, 1] = 0
    want = moe_fuser.fused_moe(**args, router_logits=None, topk_weights=zeroed, topk_ids=ids.clamp(min=0),
                               impl="reference")
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_external_weights_must_be_floating():
    args = _args()
    weights, ids = args.pop("router_logits").softmax(-1).topk(2)
    with pytest.raises(ValueError, match=r"topk_weights must be floating .* got torch.int64"):
        moe_fuser.fused_moe(**args, router_logits=None, topk_weights=(weights * 10).long(), topk_ids=ids)
