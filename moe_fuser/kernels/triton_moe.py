"""Triton kernels of the fused MoE experts (forward and backward) and their launchers.

Entry points (launchers, below the kernels): ``align(ids_N, E, block_m)`` sorts the (token, slot) pairs by
expert and cuts every expert's rows into blocks; ``experts_forward`` and ``experts_backward`` run the expert
FFN on those blocks. ``moe_fuser.lowering.cuda.TritonLowering`` adapts them to the lowering contract.

How it works. Rows live in the *sorted* order: position ``s`` holds pair ``order[s]`` (token ``order[s] // K``),
experts in ascending order, each expert's pairs in pair order (a stable sort), the dropped pairs (id -1, or an
id outside [0, E)) last as group ``E``. A block is ``BLOCK_M`` consecutive sorted rows of one group; a table of
``B = N // BLOCK_M + E + 1`` blocks (an upper bound, so no host sync is needed to size any grid) holds for each
block its group, first row and row count; unused entries have group -1 and their programs return at once.
``_count_kernel`` and ``_scatter_kernel`` build it: one program per group scans all N ids (counts, then a
stable counting sort by prefix sums), so the alignment costs O(G * N) cheap integer work in two launches.

Forward, three launches after the alignment:
1. ``_gate_up_kernel``: per (block, F slab), gathers the token rows of ``x`` straight into the A tile, multiplies
   by the expert's gate (and up) weights with fp32 accumulation, adds the biases, stores ``h`` (the first
   projection, which the op saves for backward) and ``a = act(gate) * up`` (or ``act(h)``). GLU layouts:
   separate ``w1``/``w3``, ``concat`` ([gate; up] rows) and ``interleaved`` (rows alternate), all read in place.
2. ``_down_kernel``: per (block, D slab), ``a @ W2[e]^T + b2`` times the routing weight; the combine either
   stores the rows in sorted order for 3. (deterministic) or atomically adds them into an fp32 ``[T, D]``.
3. ``_combine_kernel``: each token sums its K rows in slot order (fixed order: deterministic).

Backward (``experts_backward``), with ``g`` the routing weight and ``dy`` the output grad rows:
1. ``_down_bwd_kernel``: ``dA = dy[tok] @ W2[e]`` per (block, F slab); the epilogue recomputes the activation
   from ``h``, writes partial routing-weight grads ``rowsum(dA * a)`` (+ ``dy . b2`` in slab 0) per slab (summed
   after: deterministic), ``dh = act'(h) * g * dA`` and ``a`` (for ``dW2``).
2. ``dx``: ``_down_kernel`` again with A = ``dh`` and B = ``W1`` (two phases for separate ``w1``/``w3``), no
   scale, same combine.
3. ``_wgrad_kernel``: per (expert, weight tile), a reduction over that expert's rows: ``dW2 = (g dy)^T a``,
   ``dW1 = dh^T x`` (gathered rows), biases as the row sums of the left operand. One program reduces all of an
   expert's rows (no split-K): a heavily loaded expert's tiles take longest.
No launcher synchronises with the host: every grid is sized from T, K, E, D, F alone.

Numerics: fp32 accumulation everywhere; ``h``, ``a`` and the sorted rows are stored in the input dtype (like the
ATen lowering); the activation is computed in fp32 from the rounded ``h`` so forward and backward agree. fp32
inputs use IEEE fp32 dots unless ``torch.backends.cuda.matmul.allow_tf32`` is set. Triton's CPU interpreter
computes bf16 ``tl.dot`` wrongly (errors ~1e10), so under the interpreter bf16 tiles are cast to fp32 before
each dot (``CAST_F32``); compiled kernels dot bf16 directly.

Block configurations come from ``moe_fuser.kernels.tuning`` (JSON data keyed by E, N, K, dtype, device).

Legend: T tokens, D model dim, F expert hidden dim, H = F (plain) or 2F (gated), E experts, K top-k,
N = T*K pairs, B blocks, G = E + 1 groups (E experts + dropped).
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

__all__ = ["INTERPRET", "Alignment", "align", "experts_backward", "experts_forward"]

# Decided when this module is imported, like Triton's own choice between compiled and interpreted kernels.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

GLU_CODES = {None: 0, "separate": 1, "concat": 2, "interleaved": 3}

# Pairs scanned per step by the alignment kernels: big enough to amortise the loop, small enough for registers.
ALIGN_BLOCK = 1024
# Columns per program of the combine kernel (D of 2048-8192 gives 2-8 programs per token).
COMBINE_BLOCK_D = 1024


# ----------------------------------------------------------------------------------------------- kernels


@triton.jit
def _tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Grouped ordering: GROUP_M row blocks share each weight slab while it is in L2."""
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size
    pid_n = (pid % width) // size
    return pid_m, pid_n


@triton.jit
def _block_slab(blocks_ptr, NUM_BLOCKS, NCOLS, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(block, column slab, block's group) of this program of a (B * cdiv(NCOLS, BLOCK_N),) grid."""
    pid_m, pid_n = _tile(tl.program_id(0), NUM_BLOCKS, tl.cdiv(NCOLS, BLOCK_N), GROUP_M)
    return pid_m, pid_n, tl.load(blocks_ptr + pid_m)


@triton.jit
def _slab_cols(pid_n, NCOLS, BLOCK_N: tl.constexpr):
    """(columns, their mask) of column slab pid_n."""
    offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs, offs < NCOLS


@triton.jit
def _block_rows(blocks_ptr, pid_m, NUM_BLOCKS, BLOCK_M: tl.constexpr):
    """(row mask, sorted rows as int64) of block pid_m of the table."""
    row0 = tl.load(blocks_ptr + NUM_BLOCKS + pid_m)
    nrows = tl.load(blocks_ptr + 2 * NUM_BLOCKS + pid_m)
    offs_m = tl.arange(0, BLOCK_M)
    return offs_m < nrows, (row0 + offs_m).to(tl.int64)


@triton.jit
def _glu_cols(offs_f, F, GLU: tl.constexpr):
    """Columns of h holding gate f and up f: alternating (GLU == 3) or [gate | up]."""
    if GLU == 3:
        col_g = 2 * offs_f
        col_u = 2 * offs_f + 1
    else:
        col_g = offs_f
        col_u = F + offs_f
    return col_g, col_u


@triton.jit
def _matmul_k(acc, a_ptrs, b_ptrs, mask_m, mask_n, KD, step_a, step_b,
              BLOCK_K: tl.constexpr, CAST_F32: tl.constexpr, PRECISION: tl.constexpr):
    """acc + A @ B over KD with fp32 accumulation, A [M, K] and B [K, N] tiles masked by rows, columns and K,
    advancing by step_a and step_b per BLOCK_K step; CAST_F32 casts the tiles to fp32 before each dot. (The loop
    body stays inline: the interpreter pays for every device-function call.)"""
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, KD, BLOCK_K):
        mask_k = offs_k < KD - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if CAST_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += step_a
        b_ptrs += step_b
    return acc


@triton.jit
def _act(x, ACT: tl.constexpr):
    if ACT == "silu":
        y = x * tl.sigmoid(x)
    elif ACT == "gelu":
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == "gelu_tanh":
        # 0.5 * (1 + tanh(z)) == sigmoid(2z)
        y = x * tl.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))
    elif ACT == "relu2":
        r = tl.maximum(x, 0.0)
        y = r * r
    else:  # relu
        y = tl.maximum(x, 0.0)
    return y


@triton.jit
def _act_grad(x, ACT: tl.constexpr):
    """d act(x) / dx."""
    if ACT == "silu":
        s = tl.sigmoid(x)
        d = s * (1.0 + x * (1.0 - s))
    elif ACT == "gelu":
        d = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476)) + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
    elif ACT == "gelu_tanh":
        s = tl.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))
        d = s + x * s * (1.0 - s) * 1.5957691216057308 * (1.0 + 0.134145 * x * x)
    elif ACT == "relu2":
        d = 2.0 * tl.maximum(x, 0.0)
    else:  # relu
        d = tl.where(x > 0.0, 1.0, 0.0)
    return d


@triton.jit
def _clamp_gate_up(gate, up, limit, CLAMP: tl.constexpr):
    """gate and up as the GLU reads them: with CLAMP (GPT-OSS, DeepSeek-V4) the gate at most limit, the up half
    within +-limit."""
    if CLAMP:
        g = tl.minimum(gate, limit)
        u = tl.minimum(tl.maximum(up, -limit), limit)
    else:
        g = gate
        u = up
    return g, u


@triton.jit
def _glu(gate, up, alpha, limit, ACT: tl.constexpr, GATED: tl.constexpr, CLAMP: tl.constexpr):
    """The second projection's input from the first projection's output (fp32)."""
    if GATED:
        g, u = _clamp_gate_up(gate, up, limit, CLAMP)
        if ACT == "gpt_oss":
            a = (u + 1.0) * g * tl.sigmoid(alpha * g)
        else:
            a = _act(g, ACT) * u
    else:
        a = _act(gate, ACT)
    return a


@triton.jit
def _glu_grad(gate, up, dA, alpha, limit, ACT: tl.constexpr, GATED: tl.constexpr, CLAMP: tl.constexpr):
    """(d gate, d up) from d a (fp32); d up is unused when not GATED. A clamped value passes no gradient."""
    if GATED:
        g, u = _clamp_gate_up(gate, up, limit, CLAMP)
        if ACT == "gpt_oss":
            s = tl.sigmoid(alpha * g)
            d_up = dA * g * s
            d_gate = dA * (u + 1.0) * (s + alpha * g * s * (1.0 - s))
        else:
            d_up = dA * _act(g, ACT)
            d_gate = dA * u * _act_grad(g, ACT)
        if CLAMP:
            d_up = tl.where((up >= -limit) & (up <= limit), d_up, 0.0)
            d_gate = tl.where(gate <= limit, d_gate, 0.0)
    else:
        d_gate = dA * _act_grad(gate, ACT)
        d_up = d_gate
    return d_gate, d_up


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, N, E, BLOCK: tl.constexpr):
    """Grid (G,): program g counts the pairs of group g (expert g; g == E: ids outside [0, E), the dropped)."""
    g = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    total = tl.zeros((BLOCK,), tl.int32)
    for s in range(0, N, BLOCK):
        m = s + offs < N
        ids = tl.load(ids_ptr + s + offs, mask=m, other=0)
        key = tl.where((ids < 0) | (ids >= E), E, ids)
        total += ((key == g) & m).to(tl.int32)
    tl.store(counts_ptr + g, tl.sum(total, 0))


@triton.jit
def _scatter_kernel(ids_ptr, counts_ptr, order_ptr, inv_ptr, starts_ptr, blocks_ptr, N, E, NUM_BLOCKS,
                    BLOCK: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_M: tl.constexpr):
    """Grid (G,): program g puts its pairs at start_g + (rank within group g in pair order), a stable counting
    sort (order[s] = pair, inv[pair] = s, or -1 for a dropped pair), writes starts[g] (and starts[G] = N) and the
    block-table entries of its rows; the last program also marks the unused tail of the table (group -1).
    blocks is int32 [3, B]: group, first sorted row, row count."""
    g = tl.program_id(0)
    gs = tl.arange(0, BLOCK_G)
    counts = tl.load(counts_ptr + gs, mask=gs <= E, other=0)
    before = gs < g
    start = tl.sum(tl.where(before, counts, 0), 0)
    first_block = tl.sum(tl.where(before, (counts + BLOCK_M - 1) // BLOCK_M, 0), 0)
    count = tl.sum(tl.where(gs == g, counts, 0), 0)
    tl.store(starts_ptr + g, start)
    if g == E:
        tl.store(starts_ptr + E + 1, start + count)

    offs = tl.arange(0, BLOCK)
    run = start
    for s in range(0, N, BLOCK):
        m = s + offs < N
        ids = tl.load(ids_ptr + s + offs, mask=m, other=0)
        key = tl.where((ids < 0) | (ids >= E), E, ids)
        hit = (key == g) & m
        pos = run + tl.cumsum(hit.to(tl.int32), 0) - 1
        tl.store(order_ptr + pos, (s + offs).to(tl.int64), mask=hit)
        tl.store(inv_ptr + s + offs, tl.where(g < E, pos, -1), mask=hit)
        run += tl.sum(hit.to(tl.int32), 0)

    num = (count + BLOCK_M - 1) // BLOCK_M
    for b in range(0, num, BLOCK):
        j = b + offs
        m = j < num
        tl.store(blocks_ptr + first_block + j, tl.zeros((BLOCK,), tl.int32) + g, mask=m)
        tl.store(blocks_ptr + NUM_BLOCKS + first_block + j, start + j * BLOCK_M, mask=m)
        tl.store(blocks_ptr + 2 * NUM_BLOCKS + first_block + j, tl.minimum(count - j * BLOCK_M, BLOCK_M), mask=m)
    if g == E:
        for b in range(first_block + num, NUM_BLOCKS, BLOCK):
            j = b + offs
            tl.store(blocks_ptr + j, tl.zeros((BLOCK,), tl.int32) - 1, mask=j < NUM_BLOCKS)


@triton.jit
def _gate_up_kernel(
        x_ptr, w1_ptr, w3_ptr, b1_ptr, b3_ptr, h_ptr, a_ptr, order_ptr, blocks_ptr,
        D, F, E, NUM_BLOCKS, TOPK,
        stride_xt, stride_xd, stride_w1e, stride_w1f, stride_w1d, stride_w3e, stride_w3f, stride_w3d,
        stride_b1e, stride_b3e, stride_hn, stride_an, alpha, limit,
        GLU: tl.constexpr, ACT: tl.constexpr, CLAMP: tl.constexpr, HAS_B1: tl.constexpr, HAS_B3: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        CAST_F32: tl.constexpr, PRECISION: tl.constexpr):
    """Grid (B * cdiv(F, BLOCK_N),): program (block b, slab j) computes, for the rows of block b and the columns
    f of slab j, h = x[tok] @ W1[e]^T (+ b1) (the gate and, when gated, the up columns) and a = act/GLU(h); it
    writes h in its layout ([gate | up], or alternating columns for GLU == 3) and a [N, F]. A block of the
    dropped group writes zeros into its rows of h."""
    pid_m, pid_n, e = _block_slab(blocks_ptr, NUM_BLOCKS, F, BLOCK_N, GROUP_M)
    if e < 0:
        return
    mask_m, rows = _block_rows(blocks_ptr, pid_m, NUM_BLOCKS, BLOCK_M)
    offs_f, mask_f = _slab_cols(pid_n, F, BLOCK_N)
    mask = mask_m[:, None] & mask_f[None, :]
    col_g, col_u = _glu_cols(offs_f, F, GLU)
    h_rows = h_ptr + rows[:, None] * stride_hn
    if e == E:
        zero = tl.zeros((BLOCK_M, BLOCK_N), h_ptr.dtype.element_ty)
        tl.store(h_rows + col_g[None, :], zero, mask=mask)
        if GLU != 0:
            tl.store(h_rows + col_u[None, :], zero, mask=mask)
        return

    tok = tl.load(order_ptr + rows, mask=mask_m, other=0) // TOPK
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tok[:, None] * stride_xt + offs_k[None, :] * stride_xd
    e64 = e.to(tl.int64)
    if GLU == 1:
        up_ptrs = w3_ptr + e64 * stride_w3e + offs_f[None, :] * stride_w3f + offs_k[:, None] * stride_w3d
        up_step = BLOCK_K * stride_w3d
    else:
        up_ptrs = w1_ptr + e64 * stride_w1e + col_u[None, :] * stride_w1f + offs_k[:, None] * stride_w1d
        up_step = BLOCK_K * stride_w1d
    gate_ptrs = w1_ptr + e64 * stride_w1e + col_g[None, :] * stride_w1f + offs_k[:, None] * stride_w1d
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        mask_k = offs_k < D - k0
        xa = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wg = tl.load(gate_ptrs, mask=mask_k[:, None] & mask_f[None, :], other=0.0)
        if CAST_F32:
            xa = xa.to(tl.float32)
            wg = wg.to(tl.float32)
        acc_g = tl.dot(xa, wg, acc_g, input_precision=PRECISION)
        if GLU != 0:
            wu = tl.load(up_ptrs, mask=mask_k[:, None] & mask_f[None, :], other=0.0)
            if CAST_F32:
                wu = wu.to(tl.float32)
            acc_u = tl.dot(xa, wu, acc_u, input_precision=PRECISION)
            up_ptrs += up_step
        x_ptrs += BLOCK_K * stride_xd
        gate_ptrs += BLOCK_K * stride_w1d

    if HAS_B1:
        acc_g += tl.load(b1_ptr + e64 * stride_b1e + col_g, mask=mask_f, other=0.0).to(tl.float32)[None, :]
        if GLU >= 2:
            acc_u += tl.load(b1_ptr + e64 * stride_b1e + col_u, mask=mask_f, other=0.0).to(tl.float32)[None, :]
    if HAS_B3:
        acc_u += tl.load(b3_ptr + e64 * stride_b3e + offs_f, mask=mask_f, other=0.0).to(tl.float32)[None, :]
    hg = acc_g.to(h_ptr.dtype.element_ty)
    tl.store(h_rows + col_g[None, :], hg, mask=mask)
    hu = acc_u.to(h_ptr.dtype.element_ty)
    if GLU != 0:
        tl.store(h_rows + col_u[None, :], hu, mask=mask)
    a = _glu(hg.to(tl.float32), hu.to(tl.float32), alpha, limit, ACT, GLU != 0, CLAMP)
    tl.store(a_ptr + rows[:, None] * stride_an + offs_f[None, :], a.to(a_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _down_kernel(
        a_ptr, w_ptr, w3_ptr, b_ptr, g_ptr, order_ptr, blocks_ptr, y_ptr, out_ptr,
        KD, NOUT, E, NUM_BLOCKS, TOPK,
        stride_an, stride_ak, stride_we, stride_wk, stride_wn, stride_w3e, stride_w3k, stride_w3n,
        stride_be, stride_yn, stride_ot,
        TWO_PHASE: tl.constexpr, HAS_BIAS: tl.constexpr, SCALE: tl.constexpr, ATOMIC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        CAST_F32: tl.constexpr, PRECISION: tl.constexpr):
    """Grid (B * cdiv(NOUT, BLOCK_N),): program (block b, slab j) computes A[rows of b] @ W[e] for the output
    columns of slab j, W[e] read as B[k, n] through its strides (forward: W2[e]^T; backward dx: W1[e]). With
    TWO_PHASE the reduction runs over A's first KD columns against W and its next KD columns against W3
    (separate w1/w3). Epilogue: + bias[e], * routing weight (SCALE), then the rows go to y [N, NOUT] in sorted
    order, or (ATOMIC) are added into the fp32 out [T, NOUT] at their token rows."""
    pid_m, pid_n, e = _block_slab(blocks_ptr, NUM_BLOCKS, NOUT, BLOCK_N, GROUP_M)
    if (e < 0) | (e == E):
        return
    mask_m, rows = _block_rows(blocks_ptr, pid_m, NUM_BLOCKS, BLOCK_M)
    offs_n, mask_n = _slab_cols(pid_n, NOUT, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    e64 = e.to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    a_ptrs = a_ptr + rows[:, None] * stride_an + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + e64 * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    acc = _matmul_k(acc, a_ptrs, w_ptrs, mask_m, mask_n, KD, BLOCK_K * stride_ak, BLOCK_K * stride_wk,
                    BLOCK_K, CAST_F32, PRECISION)
    if TWO_PHASE:
        a_ptrs = a_ptr + rows[:, None] * stride_an + (KD + offs_k[None, :]) * stride_ak
        w_ptrs = w3_ptr + e64 * stride_w3e + offs_k[:, None] * stride_w3k + offs_n[None, :] * stride_w3n
        acc = _matmul_k(acc, a_ptrs, w_ptrs, mask_m, mask_n, KD, BLOCK_K * stride_ak, BLOCK_K * stride_w3k,
                        BLOCK_K, CAST_F32, PRECISION)

    if HAS_BIAS:
        acc += tl.load(b_ptr + e64 * stride_be + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if SCALE or ATOMIC:
        pair = tl.load(order_ptr + rows, mask=mask_m, other=0)
        if SCALE:
            acc *= tl.load(g_ptr + pair, mask=mask_m, other=0.0).to(tl.float32)[:, None]
        if ATOMIC:
            tok = pair // TOPK
            tl.atomic_add(out_ptr + tok[:, None] * stride_ot + offs_n[None, :], acc, mask=mask, sem="relaxed")
    if not ATOMIC:
        tl.store(y_ptr + rows[:, None] * stride_yn + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_kernel(y_ptr, inv_ptr, out_ptr, D, stride_yn, stride_ot, TOPK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (T, cdiv(D, BLOCK_D)): out[t] = sum over slots j in order of y[inv[t*K + j]] in fp32 (a fixed order,
    hence deterministic); a dropped pair (inv -1) adds nothing."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m = offs < D
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for j in tl.static_range(TOPK):
        pos = tl.load(inv_ptr + t * TOPK + j + tl.zeros((BLOCK_D,), tl.int64))
        acc += tl.load(y_ptr + pos * stride_yn + offs, mask=m & (pos >= 0), other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_ot + offs, acc.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _down_bwd_kernel(
        dy_ptr, w2_ptr, b2_ptr, h_ptr, g_ptr, order_ptr, blocks_ptr, dh_ptr, a_ptr, dg_ptr,
        D, F, E, N, NUM_BLOCKS, TOPK,
        stride_dyt, stride_w2e, stride_w2d, stride_w2f, stride_b2e, stride_hn, stride_an, alpha, limit,
        GLU: tl.constexpr, ACT: tl.constexpr, CLAMP: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_A: tl.constexpr,
        NEED_DG: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        CAST_F32: tl.constexpr, PRECISION: tl.constexpr):
    """Grid (B * cdiv(F, BLOCK_N),): program (block b, slab j) computes dA = dy[tok] @ W2[e][:, slab] for the rows
    of block b, recomputes a from h, and writes: dg partials rowsum(dA * a) (+ dy . b2[e] in slab 0) into
    dg[j, pair] (NEED_DG), dh = act'(h) * g * dA in h's layout, and a (STORE_A). Dropped rows are skipped."""
    pid_m, pid_n, e = _block_slab(blocks_ptr, NUM_BLOCKS, F, BLOCK_N, GROUP_M)
    if (e < 0) | (e == E):
        return
    mask_m, rows = _block_rows(blocks_ptr, pid_m, NUM_BLOCKS, BLOCK_M)
    offs_f, mask_f = _slab_cols(pid_n, F, BLOCK_N)
    mask = mask_m[:, None] & mask_f[None, :]
    pair = tl.load(order_ptr + rows, mask=mask_m, other=0)
    tok = pair // TOPK
    offs_k = tl.arange(0, BLOCK_K)
    e64 = e.to(tl.int64)

    dy_ptrs = dy_ptr + tok[:, None] * stride_dyt + offs_k[None, :]
    w_ptrs = w2_ptr + e64 * stride_w2e + offs_k[:, None] * stride_w2d + offs_f[None, :] * stride_w2f
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    bias_dot = tl.zeros((BLOCK_M,), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        mask_k = offs_k < D - k0
        dyv = tl.load(dy_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wv = tl.load(w_ptrs, mask=mask_k[:, None] & mask_f[None, :], other=0.0)
        if HAS_BIAS and NEED_DG:
            if pid_n == 0:
                bv = tl.load(b2_ptr + e64 * stride_b2e + k0 + offs_k, mask=mask_k, other=0.0)
                bias_dot += tl.sum(dyv.to(tl.float32) * bv.to(tl.float32)[None, :], 1)
        if CAST_F32:
            dyv = dyv.to(tl.float32)
            wv = wv.to(tl.float32)
        acc = tl.dot(dyv, wv, acc, input_precision=PRECISION)
        dy_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_w2d

    col_g, col_u = _glu_cols(offs_f, F, GLU)
    h_rows = h_ptr + rows[:, None] * stride_hn
    hg = tl.load(h_rows + col_g[None, :], mask=mask, other=0.0).to(tl.float32)
    if GLU != 0:
        hu = tl.load(h_rows + col_u[None, :], mask=mask, other=0.0).to(tl.float32)
    else:
        hu = hg
    if NEED_DG or STORE_A:
        a = _glu(hg, hu, alpha, limit, ACT, GLU != 0, CLAMP)
        a = a.to(a_ptr.dtype.element_ty).to(tl.float32)
        if NEED_DG:
            part = tl.sum(tl.where(mask, acc * a, 0.0), 1)
            if HAS_BIAS:
                part += bias_dot
            tl.store(dg_ptr + pid_n * N + pair, part, mask=mask_m)
        if STORE_A:
            tl.store(a_ptr + rows[:, None] * stride_an + offs_f[None, :], a.to(a_ptr.dtype.element_ty), mask=mask)
    gw = tl.load(g_ptr + pair, mask=mask_m, other=0.0).to(tl.float32)
    dA = (acc * gw[:, None]).to(dh_ptr.dtype.element_ty).to(tl.float32)
    d_gate, d_up = _glu_grad(hg, hu, dA, alpha, limit, ACT, GLU != 0, CLAMP)
    dh_rows = dh_ptr + rows[:, None] * stride_hn
    tl.store(dh_rows + col_g[None, :], d_gate.to(dh_ptr.dtype.element_ty), mask=mask)
    if GLU != 0:
        tl.store(dh_rows + col_u[None, :], d_up.to(dh_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _wgrad_kernel(
        l_ptr, r_ptr, dw_ptr, db_ptr, order_ptr, g_ptr, starts_ptr,
        M, NN, TOPK,
        stride_lr, stride_lc, stride_rr, stride_rc, stride_we, stride_wm, stride_wn, stride_be,
        L_GATHER: tl.constexpr, R_GATHER: tl.constexpr, L_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        CAST_F32: tl.constexpr, PRECISION: tl.constexpr):
    """Grid (E, cdiv(M, BLOCK_M) * cdiv(NN, BLOCK_N)): program (e, tile) reduces over expert e's sorted rows
    s in [starts[e], starts[e+1]): dW[e][m, n] = sum_s L[s, m] * R[s, n], where a *_GATHER operand reads token
    row order[s] // K instead of row s and L_SCALE multiplies L's rows by the routing weight g[order[s]]. The
    tiles of the first column block also write db[e][m] = sum_s L[s, m] (HAS_BIAS). An expert with no rows gets
    zeros."""
    e = tl.program_id(0)
    pid_m, pid_n = _tile(tl.program_id(1), tl.cdiv(M, BLOCK_M), tl.cdiv(NN, BLOCK_N), GROUP_M)
    start = tl.load(starts_ptr + e)
    end = tl.load(starts_ptr + e + 1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < NN
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    bacc = tl.zeros((BLOCK_M,), tl.float32)
    for s0 in range(start, end, BLOCK_K):
        srows = s0 + offs_k
        mask_k = srows < end
        pair = tl.load(order_ptr + srows, mask=mask_k, other=0)
        if L_GATHER:
            lrow = pair // TOPK
        else:
            lrow = srows.to(tl.int64)
        if R_GATHER:
            rrow = pair // TOPK
        else:
            rrow = srows.to(tl.int64)
        lt = tl.load(l_ptr + lrow[None, :] * stride_lr + offs_m[:, None] * stride_lc,
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if L_SCALE:
            gw = tl.load(g_ptr + pair, mask=mask_k, other=0.0).to(tl.float32)
            lt = (lt.to(tl.float32) * gw[None, :]).to(l_ptr.dtype.element_ty)
        rv = tl.load(r_ptr + rrow[:, None] * stride_rr + offs_n[None, :] * stride_rc,
                     mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if HAS_BIAS:
            bacc += tl.sum(lt.to(tl.float32), 1)
        if CAST_F32:
            lt = lt.to(tl.float32)
            rv = rv.to(tl.float32)
        acc = tl.dot(lt, rv, acc, input_precision=PRECISION)
    e64 = e.to(tl.int64)
    tl.store(dw_ptr + e64 * stride_we + offs_m[:, None] * stride_wm + offs_n[None, :] * stride_wn,
             acc.to(dw_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
    if HAS_BIAS:
        if pid_n == 0:
            tl.store(db_ptr + e64 * stride_be + offs_m, bacc.to(db_ptr.dtype.element_ty), mask=mask_m)


# --------------------------------------------------------------------------------------------- launchers


class Alignment(NamedTuple):
    """The pairs sorted by expert and cut into blocks (``align``)."""

    order_N: torch.Tensor  # int64: sorted position -> pair (stable; dropped pairs last)
    inv_N: torch.Tensor  # int32: pair -> sorted position, -1 for a dropped pair
    starts_G1: torch.Tensor  # int32 [E + 2]: first sorted row of each group, then N
    blocks_3B: torch.Tensor  # int32 [3, B]: group (-1 unused), first sorted row, row count
    block_m: int

    @property
    def num_blocks(self) -> int:
        return self.blocks_3B.shape[1]


def align(ids_N: torch.Tensor, num_experts: int, block_m: int) -> Alignment:
    """Sort the pairs by expert (ids outside [0, E) count as dropped) and cut each expert's rows into blocks of
    ``block_m``; two launches, no host sync."""
    ids_N = ids_N.contiguous()
    N, E = ids_N.numel(), num_experts
    B = N // block_m + E + 1
    dev = ids_N.device
    counts = torch.empty(E + 1, dtype=torch.int32, device=dev)
    order = torch.empty(N, dtype=torch.int64, device=dev)
    inv = torch.empty(N, dtype=torch.int32, device=dev)
    starts = torch.empty(E + 2, dtype=torch.int32, device=dev)
    blocks = torch.empty(3, B, dtype=torch.int32, device=dev)
    block = min(ALIGN_BLOCK, max(16, triton.next_power_of_2(max(N, B))))
    _count_kernel[(E + 1,)](ids_N, counts, N, E, BLOCK=block)
    _scatter_kernel[(E + 1,)](ids_N, counts, order, inv, starts, blocks, N, E, B, BLOCK=block,
                              BLOCK_G=triton.next_power_of_2(E + 1), BLOCK_M=block_m)
    return Alignment(order, inv, starts, blocks, block_m)


def _precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: IEEE fp32 for fp32 inputs unless torch allows TF32 matmuls (and always in the
    interpreter, where bf16 tiles are cast to fp32); 16-bit inputs keep Triton's default ("tf32", unused)."""
    if INTERPRET:
        return "ieee"
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "tf32"


def _tiles(cfg: dict) -> dict:
    """Launch keywords of one kernel's config (BLOCK_M is shared through the alignment)."""
    return dict(BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def _combine(al: Alignment, y_ND: Optional[torch.Tensor], out32_TD: Optional[torch.Tensor], T: int, K: int,
             dtype: torch.dtype) -> torch.Tensor:
    """The token sums: from the sorted rows (deterministic) or the atomic fp32 accumulator."""
    if out32_TD is not None:
        return out32_TD if dtype == torch.float32 else out32_TD.to(dtype)
    D = y_ND.shape[1]
    out = torch.empty(T, D, dtype=dtype, device=y_ND.device)
    _combine_kernel[(T, triton.cdiv(D, COMBINE_BLOCK_D))](y_ND, al.inv_N, out, D, y_ND.stride(0), out.stride(0),
                                                          TOPK=K, BLOCK_D=COMBINE_BLOCK_D)
    return out


def _row_outputs(N: int, D: int, T: int, dtype: torch.dtype, device, atomic: bool):
    if atomic:
        return None, torch.zeros(T, D, dtype=torch.float32, device=device)
    return torch.empty(N, D, dtype=dtype, device=device), None


def _sizes(x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, w2: torch.Tensor, glu: Optional[str]):
    """(T, K, D, E, F, H, N) from the operands' shapes."""
    T, K = topk_ids_TK.shape
    E, F_ = w2.shape[0], w2.shape[-1]
    return T, K, x_TD.shape[1], E, F_, 2 * F_ if glu else F_, T * K


def experts_forward(x_TD, topk_weights_TK, topk_ids_TK, w1, w2, w3, b1, b2, b3, *, glu: Optional[str],
                    activation: str, alpha: float, limit: float, config: dict, atomic: bool):
    """(out_TD, h_NH, order_N) of the experts; weights stacked ``[E, ...]``, biases ``[E, ...]`` contiguous.
    ``config``: ``BLOCK_M`` and per-kernel tiles (``moe_fuser.kernels.tuning``)."""
    T, K, D, E, F_, H, N = _sizes(x_TD, topk_ids_TK, w2, glu)
    dev, dt = x_TD.device, x_TD.dtype
    h_NH = torch.empty(N, H, dtype=dt, device=dev)
    if N == 0:
        return torch.zeros_like(x_TD), h_NH, torch.empty(0, dtype=torch.int64, device=dev)
    bm = config["BLOCK_M"]
    al = align(topk_ids_TK.flatten(), E, bm)
    B = al.num_blocks
    cast, prec = INTERPRET and dt == torch.bfloat16, _precision(dt)
    a_NF = torch.empty(N, F_, dtype=dt, device=dev)
    w3_ = w1 if w3 is None else w3
    c1 = config["gate_up"]
    _gate_up_kernel[(B * triton.cdiv(F_, c1["BLOCK_N"]),)](
        x_TD, w1, w3_, x_TD if b1 is None else b1, x_TD if b3 is None else b3, h_NH, a_NF, al.order_N, al.blocks_3B,
        D, F_, E, B, K, x_TD.stride(0), x_TD.stride(1), *w1.stride(), *w3_.stride(),
        0 if b1 is None else b1.stride(0), 0 if b3 is None else b3.stride(0), h_NH.stride(0), a_NF.stride(0),
        float(alpha), float(limit), GLU=GLU_CODES[glu], ACT=activation, CLAMP=math.isfinite(limit),
        HAS_B1=b1 is not None, HAS_B3=b3 is not None, BLOCK_M=bm, CAST_F32=cast, PRECISION=prec, **_tiles(c1))

    g_N = topk_weights_TK.flatten().contiguous()
    y_ND, out32 = _row_outputs(N, D, T, dt, dev, atomic)
    c2 = config["down"]
    _down_kernel[(B * triton.cdiv(D, c2["BLOCK_N"]),)](
        a_NF, w2, w2, x_TD if b2 is None else b2, g_N, al.order_N, al.blocks_3B,
        x_TD if y_ND is None else y_ND, x_TD if out32 is None else out32,
        F_, D, E, B, K, a_NF.stride(0), a_NF.stride(1), w2.stride(0), w2.stride(2), w2.stride(1), 0, 0, 0,
        0 if b2 is None else b2.stride(0), 0 if y_ND is None else y_ND.stride(0),
        0 if out32 is None else out32.stride(0),
        TWO_PHASE=False, HAS_BIAS=b2 is not None, SCALE=True, ATOMIC=atomic, BLOCK_M=bm, CAST_F32=cast,
        PRECISION=prec, **_tiles(c2))
    return _combine(al, y_ND, out32, T, K, dt), h_NH, al.order_N


def experts_backward(grad_TD, x_TD, topk_weights_TK, topk_ids_TK, h_NH, w1, w2, w3, b1, b2, b3, *,
                     glu: Optional[str], activation: str, alpha: float, limit: float, config: dict, atomic: bool,
                     need_x: bool, need_weights: bool, need_w: bool):
    """(dx_TD, dweights_TK, dw1, dw2, dw3, db1, db2, db3); None where not needed or absent."""
    T, K, D, E, F_, H, N = _sizes(x_TD, topk_ids_TK, w2, glu)
    dev, dt = x_TD.device, x_TD.dtype
    grad_TD = grad_TD.contiguous()
    bm = config["BLOCK_M"]
    al = align(topk_ids_TK.flatten(), E, bm)
    B = al.num_blocks
    cast, prec = INTERPRET and dt == torch.bfloat16, _precision(dt)
    g_N = topk_weights_TK.flatten().contiguous()
    w3_ = w1 if w3 is None else w3

    c = config["down_bwd"]
    num_f = triton.cdiv(F_, c["BLOCK_N"])
    dh_NH = torch.empty(N, H, dtype=dt, device=dev)
    a_NF = torch.empty(N, F_, dtype=dt, device=dev) if need_w else dh_NH
    dg_JN = torch.zeros(num_f, N, dtype=torch.float32, device=dev) if need_weights else g_N
    if N:
        _down_bwd_kernel[(B * num_f,)](
            grad_TD, w2, x_TD if b2 is None else b2, h_NH, g_N, al.order_N, al.blocks_3B, dh_NH, a_NF, dg_JN,
            D, F_, E, N, B, K, grad_TD.stride(0), *w2.stride(), 0 if b2 is None else b2.stride(0),
            h_NH.stride(0), a_NF.stride(0), float(alpha), float(limit), GLU=GLU_CODES[glu], ACT=activation,
            CLAMP=math.isfinite(limit), HAS_BIAS=b2 is not None, STORE_A=need_w, NEED_DG=need_weights, BLOCK_M=bm,
            CAST_F32=cast, PRECISION=prec, **_tiles(c))
    dweights_TK = dg_JN.sum(0).view(T, K).to(topk_weights_TK.dtype) if need_weights else None

    dx_TD = None
    if need_x:
        if N == 0:
            dx_TD = torch.zeros_like(x_TD)
        else:
            two_phase = glu == "separate"
            y_ND, out32 = _row_outputs(N, D, T, dt, dev, atomic)
            c = config["dx"]
            _down_kernel[(B * triton.cdiv(D, c["BLOCK_N"]),)](
                dh_NH, w1, w3_, x_TD, g_N, al.order_N, al.blocks_3B,
                x_TD if y_ND is None else y_ND, x_TD if out32 is None else out32,
                F_ if two_phase else H, D, E, B, K, dh_NH.stride(0), dh_NH.stride(1), *w1.stride(), *w3_.stride(),
                0, 0 if y_ND is None else y_ND.stride(0), 0 if out32 is None else out32.stride(0),
                TWO_PHASE=two_phase, HAS_BIAS=False, SCALE=False, ATOMIC=atomic, BLOCK_M=bm, CAST_F32=cast,
                PRECISION=prec, **_tiles(c))
            dx_TD = _combine(al, y_ND, out32, T, K, dt)

    grads_w = [None] * 6
    if need_w:
        c = config["wgrad"]

        def wgrad(left, right, dw, db, l_gather, r_gather, l_scale):
            M, NN = dw.shape[1], dw.shape[2]
            grid = (E, triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(NN, c["BLOCK_N"]))
            _wgrad_kernel[grid](
                left, right, dw, dw if db is None else db, al.order_N, g_N, al.starts_G1, M, NN, K,
                left.stride(0), left.stride(1), right.stride(0), right.stride(1), *dw.stride(),
                0 if db is None else db.stride(0), L_GATHER=l_gather, R_GATHER=r_gather, L_SCALE=l_scale,
                HAS_BIAS=db is not None, BLOCK_M=c["BLOCK_M"], CAST_F32=cast, PRECISION=prec, **_tiles(c))

        def like(t):
            return None if t is None else torch.empty(t.shape, dtype=t.dtype, device=dev)

        dw1, dw2, dw3, db1, db2, db3 = (like(t) for t in (w1, w2, w3, b1, b2, b3))
        wgrad(grad_TD, a_NF, dw2, db2, True, False, True)
        if glu == "separate":
            wgrad(dh_NH[:, :F_], x_TD, dw1, db1, False, True, False)
            wgrad(dh_NH[:, F_:], x_TD, dw3, db3, False, True, False)
        else:
            wgrad(dh_NH, x_TD, dw1, db1, False, True, False)
        grads_w = [dw1, dw2, dw3, db1, db2, db3]
    return (dx_TD, dweights_TK, *grads_w)
