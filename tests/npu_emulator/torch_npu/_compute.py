"""Emulated expert compute: ``npu_grouped_matmul`` (non-quantised) and ``npu_swiglu``.

``npu_grouped_matmul`` computes ``y_i = x_i @ weight_i`` with weights laid out K-by-N (an ``nn.Linear`` weight
``[N, K]`` must be passed transposed; a transposed *view* is allowed, "weight transpose supported", x transposes
are not). Emulated scenarios (the docs' tensor-group_list table):
- ``group_type=0``, ``split_item`` 2/3, one x ``[M, K]``, weights one ``[E, K, N]`` tensor (at most 1024 groups)
  or a list of E ``[K, N]`` tensors (at most 128), ``group_list`` int64 of length E: cumulative offsets
  (``group_list_type=0``, non-decreasing, last == M) or counts (``1``, non-negative, sum == M); one output [M, N].
- ``group_type=-1``, ``split_item`` 0/1: independent ``x_i @ weight_i`` for lists of 2D tensors, no group_list.
Inner dims (x's K, weight's last dim as stored) must be < 65536; dtypes float16/bfloat16/float32, x and weight
alike; the output has x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._routing import FLOATS, check, not_emulated

INNER_LIMIT = 65536


def _check_weight_layout(w: torch.Tensor) -> None:
    """K-by-N either row-major or as the transpose of a row-major [N, K] tensor (the docs' 'weight transpose')."""
    rows_major = w.stride(-1) == 1 and w.stride(-2) == w.shape[-1]
    transposed = w.stride(-2) == 1 and w.stride(-1) == w.shape[-2]
    check(rows_major or transposed or w.numel() == 0,
          f"weight strides {tuple(w.stride())} are neither contiguous nor a transposed contiguous tensor")
    last = w.shape[-2] if transposed and not rows_major else w.shape[-1]
    check(last < INNER_LIMIT, f"weight inner dim {last} must be < {INNER_LIMIT}")


def _check_x(x: torch.Tensor) -> None:
    check(x.dim() == 2, f"x must be 2D here, got {x.dim()}D")
    check(x.is_contiguous(), "x must not be transposed / non-contiguous")
    check(x.shape[1] < INNER_LIMIT, f"x inner dim {x.shape[1]} must be < {INNER_LIMIT}")


def npu_grouped_matmul(x, weight, *, bias=None, scale=None, offset=None, antiquant_scale=None,
                       antiquant_offset=None, per_token_scale=None, group_list=None, activation_input=None,
                       activation_quant_scale=None, activation_quant_offset=None, split_item=0, group_type=None,
                       group_list_type=0, act_type=0, output_dtype=None, tuning_config=None):
    for name, v in (("scale", scale), ("offset", offset), ("antiquant_scale", antiquant_scale),
                    ("antiquant_offset", antiquant_offset), ("per_token_scale", per_token_scale),
                    ("activation_input", activation_input), ("activation_quant_scale", activation_quant_scale),
                    ("activation_quant_offset", activation_quant_offset)):
        if v is not None:
            not_emulated(f"{name} (quantised grouped matmul)")
    if bias is not None:
        not_emulated("bias")
    check(act_type == 0, "act_type: activations are supported only with per-token quantisation")
    check(isinstance(x, (list, tuple)) and isinstance(weight, (list, tuple)) and x and weight,
          "x and weight must be non-empty lists of tensors")
    dtypes = {t.dtype for t in list(x) + list(weight)}
    check(len(dtypes) == 1 and dtypes <= set(FLOATS), f"x and weight must share one of {FLOATS}, got {dtypes}")
    check(output_dtype in (None, x[0].dtype), "output_dtype must be None or x's dtype without quantisation")
    for t in x:
        _check_x(t)
    for w in weight:
        _check_weight_layout(w)

    if group_type == -1:
        check(split_item in (0, 1) and group_list is None, "group_type=-1 needs split_item 0/1 and no group_list")
        check(len(x) == len(weight) and len(x) <= 128, "group_type=-1 pairs up to 128 x and weight tensors")
        return [xi @ wi for xi, wi in zip(x, weight)]

    check(group_type == 0, f"group_type={group_type}: supported values are -1 and 0")
    check(split_item in (2, 3), "group_type=0 needs split_item 2 or 3 (one output tensor)")
    check(len(x) == 1, "the emulated grouped form takes one x tensor")
    check(isinstance(group_list, torch.Tensor) and group_list.dim() == 1 and group_list.dtype == torch.int64,
          "group_list must be a 1D int64 tensor")
    X = x[0]
    M = X.shape[0]
    if len(weight) == 1 and weight[0].dim() == 3:
        W = weight[0]
        G = W.shape[0]
        check(G <= 1024, f"{G} groups exceed the 1024 allowed for one 3D weight")
        ws = [W[g] for g in range(G)]
    else:
        check(all(w.dim() == 2 for w in weight) and len(weight) <= 128, "a weight list holds up to 128 2D tensors")
        check(len({w.shape[1] for w in weight}) == 1, "every weight in the list must have the same N")
        ws = list(weight)
        G = len(ws)
    check(group_list.shape[0] == G, f"group_list has {group_list.shape[0]} entries for {G} groups")
    check(all(w.shape[0] == X.shape[1] for w in ws), f"weights must be K-by-N with K = {X.shape[1]}")
    gl = group_list.tolist()
    if group_list_type == 0:
        check(all(a <= b for a, b in zip([0] + gl, gl)) and (gl[-1] if gl else 0) == M,
              f"cumulative group_list {gl} must be non-decreasing and end at M={M}")
        bounds = [0] + gl
    else:
        check(group_list_type == 1, f"group_list_type={group_list_type} must be 0 or 1")
        check(all(c >= 0 for c in gl) and sum(gl) == M, f"count group_list {gl} must be non-negative and sum to M={M}")
        bounds = [0]
        for c in gl:
            bounds.append(bounds[-1] + c)
    out = X.new_empty((M, ws[0].shape[1]))
    for g in range(G):
        s, t = bounds[g], bounds[g + 1]
        if t > s:
            torch.mm(X[s:t], ws[g], out=out[s:t])
    return [out]


def npu_swiglu(x, dim=-1):
    """Halves A, B of x along dim; silu(A) * B, computed in fp32, returned in x's dtype."""
    check(x.dtype in FLOATS and 1 <= x.dim() <= 8, "x must be 1-8D float16/bfloat16/float32")
    check(x.shape[dim] % 2 == 0, f"dim {dim} of size {x.shape[dim]} cannot be halved")
    a, b = x.float().chunk(2, dim=dim)
    return (F.silu(a) * b).to(x.dtype)
