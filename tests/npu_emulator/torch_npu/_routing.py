"""Emulated gating, permutation and combine ops (see the package docstring for the rules they follow).

Notation as in the docs: N rows (tokens), K top-k, E experts, H hidden. Indices are int32 unless noted; the
"flat" index of pair (i, j) is ``i*K + j`` (row-major) and its column-major index is ``j*N + i``.
"""

from __future__ import annotations

import torch

FLOATS = (torch.float16, torch.bfloat16, torch.float32)
POISON_INDEX = -(2 ** 31)  # written where the docs call an index output undefined


def check(cond, msg: str) -> None:
    if not cond:
        raise RuntimeError(f"[torch_npu emulator] {msg}")


def not_emulated(what: str):
    raise NotImplementedError(f"[torch_npu emulator] {what} is not emulated (moe_fuser never uses it)")


def _topk_ids(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k indices, ties to the lower index (a stable descending sort), int64."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


def npu_moe_gating_top_k_softmax(x, finished=None, k=1):
    """softmax over the last dim (in fp32), then top-k: ``(y in x.dtype, expert_idx, row_idx)`` with
    ``row_idx[i, j] = j*N + i``; rows with ``finished=True`` get expert id E."""
    check(x.dim() in (2, 3), f"x must be 2D or 3D, got {x.dim()}D")
    check(x.dtype in FLOATS, f"x dtype {x.dtype} unsupported (float16, bfloat16, float32)")
    E = x.shape[-1]
    check(0 < k <= E and k <= 1024, f"k={k} must satisfy 0 < k <= {E} and k <= 1024")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, E)
    N = x2.shape[0]
    p = torch.softmax(x2.float(), dim=-1)
    ids = _topk_ids(p, k)
    y = p.gather(1, ids).to(x.dtype)
    if finished is not None:
        check(finished.dtype == torch.bool and tuple(finished.shape) == tuple(lead),
              f"finished must be bool of shape {tuple(lead)}")
        ids = torch.where(finished.reshape(-1, 1), torch.full_like(ids, E), ids)
    row_idx = torch.arange(k, device=x.device).view(1, k) * N + torch.arange(N, device=x.device).view(N, 1)
    return y.reshape(*lead, k), ids.int().reshape(*lead, k), row_idx.int().reshape(*lead, k)


def npu_moe_gating_top_k(x, k, *, bias=None, input_ids=None, tid2eid=None, k_group=1, group_count=1,
                         group_select_mode=0, renorm=0, norm_type=0, out_flag=False, routed_scaling_factor=1.0,
                         eps=1e-20):
    """The docs' equivalent logic: s = softmax(x) or sigmoid(x) in fp32; selection on s + bias, restricted to the
    best ``k_group`` of ``group_count`` groups (group score: max, or sum of its top 2); y = s at the chosen ids
    (no bias); sigmoid: y /= (sum(y) + eps); y *= routed_scaling_factor. Returns (y in x.dtype, expert_idx,
    norm_out fp32 [N, E], undefined unless ``out_flag``)."""
    if input_ids is not None or tid2eid is not None:
        not_emulated("hash routing (input_ids / tid2eid)")
    check(x.dim() == 2, f"x must be 2D, got {x.dim()}D")
    check(x.dtype in FLOATS, f"x dtype {x.dtype} unsupported")
    N, E = x.shape
    check(E <= 2048, f"the expert count {E} exceeds 2048")
    check(group_count > 0 and E % group_count == 0 and E // group_count > 2,
          f"group_count={group_count}: E={E} must split into groups of more than 2 experts")
    per_group = E // group_count
    check(-(-per_group // 32) * 32 * group_count <= 2048, "align32(E / group_count) * group_count exceeds 2048")
    check(1 <= k_group <= group_count, f"k_group={k_group} must lie in [1, group_count={group_count}]")
    check(1 <= k <= per_group * k_group, f"k={k} must lie in [1, E / group_count * k_group = {per_group * k_group}]")
    check(renorm == 0, "renorm: only 0 (norm before top-k) is supported")
    check(norm_type in (0, 1), f"norm_type={norm_type} must be 0 (softmax) or 1 (sigmoid)")
    check(group_select_mode in (0, 1), f"group_select_mode={group_select_mode} must be 0 or 1")
    if bias is not None:
        check(bias.dim() == 1 and bias.shape[0] == E and bias.dtype == x.dtype,
              f"bias must be 1D [{E}] with x's dtype {x.dtype}")
    s = torch.softmax(x.float(), dim=-1) if norm_type == 0 else torch.sigmoid(x.float())
    sel = s if bias is None else s + bias.float()
    if group_count > 1:
        grouped = sel.view(N, group_count, per_group)
        if group_select_mode == 0:
            group_score = grouped.amax(-1)
        else:
            group_score = grouped.topk(2, dim=-1).values.sum(-1)
        best = _topk_ids(group_score, k_group)
        keep = torch.zeros(N, group_count, dtype=torch.bool, device=x.device).scatter_(1, best, True)
        sel = torch.where(keep.unsqueeze(-1), grouped, float("-inf")).view(N, E)
    ids = _topk_ids(sel, k)
    y = s.gather(1, ids)
    if norm_type == 1:
        y = y / (y.sum(-1, keepdim=True) + eps)
    y = y * routed_scaling_factor
    norm_out = s if out_flag else torch.full_like(s, float("nan"))
    return y.to(x.dtype), ids.int(), norm_out


def npu_moe_gating_top_k_backward(x_norm, grad_y, expert_idx, *, renorm=0, norm_type=0, routed_scaling_factor=1.0,
                                  eps=1e-20):
    """Gradient w.r.t. x of ``npu_moe_gating_top_k`` (sigmoid only): the vector-Jacobian product of
    y = r * s[ids] / (sum s[ids] + eps), s = sigmoid(x), given ``x_norm = s`` (the forward's norm_out)."""
    check(norm_type == 1, "only norm_type=1 (sigmoid) is supported")
    check(renorm in (0, 1), f"renorm={renorm} must be 0 or 1")
    check(x_norm.dim() == 2 and x_norm.dtype == torch.float32, "x_norm must be 2D float32")
    M, E = x_norm.shape
    check(2 <= E <= 2048, f"the expert count {E} must lie in [2, 2048]")
    check(grad_y.dim() == 2 and grad_y.shape[0] == M and 1 <= grad_y.shape[1] <= E and grad_y.dtype in FLOATS,
          "grad_y must be [M, K] float16/bfloat16/float32 with 1 <= K <= E")
    check(grad_y.is_contiguous() and expert_idx.is_contiguous(), "grad_y and expert_idx must be contiguous")
    check(expert_idx.dtype == torch.int32 and expert_idx.shape == grad_y.shape, "expert_idx must be int32 like grad_y")
    ids = expert_idx.long()
    s = x_norm.gather(1, ids)
    total = s.sum(-1, keepdim=True) + eps
    g = grad_y.float() * routed_scaling_factor
    ds = g / total - (g * s).sum(-1, keepdim=True) / total ** 2
    grad = torch.zeros_like(x_norm).scatter_(1, ids, ds * s * (1 - s))
    return grad.to(grad_y.dtype)


def npu_moe_init_routing_v2(x, expert_idx, *, scale=None, offset=None, active_num=-1, expert_capacity=-1,
                            expert_num=-1, drop_pad_mode=0, expert_tokens_num_type=0, expert_tokens_num_flag=False,
                            quant_mode=-1, active_expert_range=[], row_idx_type=0):  # noqa: B006 (documented)
    """Dropless routing (the 2.13 docs' only mode): a stable sort of the flat ids (``i*K + j``) groups the pairs
    by expert, then by token. Returns (expanded_x [N*K, H], expanded_row_idx [N*K] int32, expert tokens int64,
    expanded_scale [N*K] fp32). Only pairs whose expert lies in ``active_expert_range = [start, end)`` are kept;
    rows past the kept ones are undefined (NaN here). ``row_idx_type=0``: for each flat pair, the row it landed on
    (-1 if not kept); ``1``: for each kept row, its flat pair (the rest undefined)."""
    if quant_mode == 1:
        not_emulated("dynamic quantisation (quant_mode=1)")
    check(quant_mode == -1, f"quant_mode={quant_mode}: only -1 and 1 are supported")
    check(offset is None, "offset must be None without quantisation")
    check(drop_pad_mode == 0, f"drop_pad_mode={drop_pad_mode}: only 0 (dropless) is supported")
    check(expert_tokens_num_type in (1, 2), f"expert_tokens_num_type={expert_tokens_num_type}: only 1 and 2")
    check(expert_tokens_num_flag is True, "expert_tokens_num_flag: only True is supported")
    check(x.dim() == 2, f"x must be 2D, got {x.dim()}D")
    if x.dtype == torch.int8:
        not_emulated("int8 x")
    check(x.dtype in FLOATS, f"x dtype {x.dtype} unsupported")
    check(expert_idx.dim() == 2 and expert_idx.shape[0] == x.shape[0], "expert_idx must be [NUM_ROWS, K]")
    check(expert_idx.dtype == torch.int32, f"expert_idx must be int32, got {expert_idx.dtype}")
    limit = 5120 if expert_tokens_num_type == 2 else 10240
    check(0 < expert_num <= limit, f"expert_num={expert_num} must lie in (0, {limit}]")
    check(active_num >= -1, f"active_num={active_num} must be >= -1")
    start, end = active_expert_range if active_expert_range else (0, expert_num)
    check(0 <= start < end <= expert_num, f"active_expert_range={active_expert_range} must satisfy "
          f"0 <= start < end <= expert_num={expert_num}")
    N, K = expert_idx.shape
    flat = expert_idx.flatten().long()
    if flat.numel():
        check(int(flat.min()) >= 0 and int(flat.max()) < expert_num,
              f"expert ids must lie in [0, expert_num={expert_num})")
    if scale is not None:
        check(scale.dim() == 1 and scale.shape[0] == N and scale.dtype == torch.float32,
              "scale must be float32 [NUM_ROWS] without quantisation")
    in_range = (flat >= start) & (flat < end)
    order = torch.argsort(torch.where(in_range, flat, expert_num), stable=True)
    n_valid = int(in_range.sum())
    if active_num > 0:
        n_valid = min(n_valid, active_num)
    kept = order[:n_valid]

    expanded_x = torch.full((N * K, x.shape[1]), float("nan"), dtype=x.dtype, device=x.device)
    expanded_x[:n_valid] = x[kept // K]
    if row_idx_type == 0:
        row_idx = torch.full((N * K,), -1, dtype=torch.int64, device=x.device)
        row_idx[kept] = torch.arange(n_valid, device=x.device)
    else:
        check(row_idx_type == 1, f"row_idx_type={row_idx_type} must be 0 or 1")
        row_idx = torch.full((N * K,), POISON_INDEX, dtype=torch.int64, device=x.device)
        row_idx[:n_valid] = kept
    counts = torch.bincount(flat[in_range] - start, minlength=end - start)
    if expert_tokens_num_type == 1:
        tokens = counts.to(torch.int64)
    else:
        tokens = torch.full((expert_num, 2), POISON_INDEX, dtype=torch.int64, device=x.device)
        nz = torch.nonzero(counts).flatten()
        tokens[: nz.numel(), 0] = nz + start
        tokens[: nz.numel(), 1] = counts[nz]
        if nz.numel() < expert_num:
            tokens[nz.numel()] = 0
    expanded_scale = torch.full((N * K,), float("nan"), dtype=torch.float32, device=x.device)
    if scale is not None:
        expanded_scale[:n_valid] = scale[kept // K]
    return expanded_x, row_idx.int(), tokens, expanded_scale


def npu_moe_finalize_routing(expanded_permuted_rows, skip1, skip2, bias, scales, expanded_src_to_dst_row,
                             export_for_source_row, drop_pad_mode=0, k=1):
    """out[i] = skip1[i] + skip2[i] + sum_j scales[i, j] * (rows[idx(i, j)] + bias[expert[i, j]]), accumulated in
    fp32. ``drop_pad_mode=0``: idx(i, j) = expanded_src_to_dst_row[i + j*N] (column-major, the only mode the 2.13
    docs allow); ``2``: expanded_src_to_dst_row[i*K + j] (row-major, op-plugin master docs)."""
    if drop_pad_mode in (1, 3):
        not_emulated(f"the drop/pad layout (drop_pad_mode={drop_pad_mode})")
    check(drop_pad_mode in (0, 2), f"drop_pad_mode={drop_pad_mode} must be 0..3")
    rows = expanded_permuted_rows
    check(rows.dim() == 2 and rows.dtype in FLOATS, "expanded_permuted_rows must be 2D float16/bfloat16/float32")
    idx = expanded_src_to_dst_row
    check(idx.dim() == 1 and idx.dtype == torch.int32, "expanded_src_to_dst_row must be 1D int32")
    if scales is not None:
        check(scales.dim() == 2 and scales.dtype == rows.dtype, "scales must be [NUM_ROWS, K] with the rows' dtype")
        N, K = scales.shape
    else:
        K = k
        check(K > 0 and idx.shape[0] % K == 0, f"k={k} must divide the index length {idx.shape[0]}")
        N = idx.shape[0] // K
    check(idx.shape[0] == N * K and rows.shape[0] == N * K, f"rows and index must have NUM_ROWS*K = {N * K} rows")
    if skip2 is None:
        check(skip1 is None, "skip1 must be None when skip2 is None")
    H = rows.shape[1]
    for name, s in (("skip1", skip1), ("skip2", skip2)):
        if s is not None:
            check(tuple(s.shape) == (N, H) and s.dtype == rows.dtype, f"{name} must be [{N}, {H}] {rows.dtype}")
    if idx.numel():
        check(int(idx.min()) >= 0 and int(idx.max()) <= N * K - 1,
              "expanded_src_to_dst_row values must lie in [0, NUM_ROWS*K - 1]")
    pos = idx.long().view(K, N).t() if drop_pad_mode == 0 else idx.long().view(N, K)
    out = torch.zeros(N, H, dtype=torch.float32, device=rows.device)
    for s in (skip1, skip2):
        if s is not None:
            out += s.float()
    if bias is not None:
        check(bias.dim() == 2 and bias.shape[1] == H and bias.dtype == rows.dtype, "bias must be [E, H], rows' dtype")
        check(export_for_source_row is not None and export_for_source_row.dtype == torch.int32
              and tuple(export_for_source_row.shape) == (N, K), "bias needs export_for_source_row int32 [N, K]")
        if export_for_source_row.numel():
            check(int(export_for_source_row.min()) >= 0 and int(export_for_source_row.max()) < bias.shape[0],
                  "export_for_source_row values must index bias rows")
    for j in range(K):
        term = rows[pos[:, j]].float()
        if bias is not None:
            term = term + bias[export_for_source_row[:, j].long()].float()
        if scales is not None:
            term = term * scales[:, j : j + 1].float()
        out += term
    return out.to(rows.dtype)


def npu_moe_re_routing(tokens, expert_token_num_per_rank, *, per_token_scales=None, expert_token_num_type=1,
                       idx_type=0):
    """Regroup tokens received rank-major (for each source rank, its tokens grouped by local expert) into
    expert-major order (for each local expert, its tokens by source rank). Returns (permute_tokens,
    permute_per_token_scales, permute_token_idx int32 with permute_tokens[i] = tokens[permute_token_idx[i]],
    expert_token_num [E] in the counts' dtype)."""
    check(expert_token_num_type == 1, "expert_token_num_type: only 1 (counts) is supported")
    check(idx_type == 0, "idx_type: only 0 (gather index) is supported")
    check(tokens.dim() == 2 and tokens.dtype in (torch.float16, torch.bfloat16, torch.int8),
          f"tokens must be 2D float16/bfloat16/int8, got {tokens.dtype}")
    A, H = tokens.shape
    check(0 < H < 16384, f"the token length H={H} must lie in (0, 16384)")
    counts = expert_token_num_per_rank
    check(counts.dim() == 2 and counts.dtype in (torch.int32, torch.int64), "expert_token_num_per_rank: 2D int32/int64")
    check(int(counts.min()) >= 0 if counts.numel() else True, "token counts must be non-negative")
    check(int(counts.sum()) == A, f"the token counts sum to {int(counts.sum())}, not to the {A} tokens")
    if per_token_scales is not None:
        check(per_token_scales.dim() == 1 and per_token_scales.shape[0] == A
              and per_token_scales.dtype == torch.float32, "per_token_scales must be float32 [A]")
    R, E = counts.shape
    src_start = torch.cumsum(counts.flatten().long(), 0) - counts.flatten().long()  # rank-major source offsets
    # destination order: expert-major, then source rank
    dst_src = src_start.view(R, E).t().flatten()
    dst_len = counts.long().t().flatten()
    idx = torch.cat([torch.arange(int(s), int(s) + int(n), device=tokens.device)
                     for s, n in zip(dst_src.tolist(), dst_len.tolist())] or
                    [torch.zeros(0, dtype=torch.int64, device=tokens.device)])
    scales_out = (per_token_scales[idx] if per_token_scales is not None
                  else torch.full((A,), float("nan"), dtype=torch.float32, device=tokens.device))
    return tokens[idx], scales_out, idx.int(), counts.sum(0).to(counts.dtype)
