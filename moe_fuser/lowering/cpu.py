"""The ATen lowering: grouped expert matmuls in plain ATen ops (the CPU fast path).

Named ``"cpu"`` because it is the CPU path, but it is plain ATen and runs on any device (auto selection's
fallback where no device-specific lowering applies).

Forward, for T tokens routed to K experts each (N = T*K (token, slot) pairs, n of them kept):
1. one stable argsort of the flat expert ids groups the pairs by expert (dropped pairs, id -1, sort last);
   ``bincount(...).tolist()`` is the single host sync;
2. ``_Grouping`` places the pairs in one of two layouts, chosen from the counts:
   - *ragged*: rows sorted by expert, ``[n, X]``; each GEMM is one GEMM per active expert on its contiguous
     rows, written straight into the destination buffer: in float32 all of a group's in one native call that
     cuts them into tiles spread over the threads, each tile single-threaded (``moe_fuser.kernels.cpu_gemm``;
     ``torch.mm`` gives each small GEMM all threads, which then wait on one another), else, for stacked weights
     and a group of several experts, one ``torch._grouped_mm`` (no Python round per expert), else one ``mm``
     each;
   - *padded*: ``[E, C, X]`` with C the largest count and zero rows after each expert's own; each GEMM is one
     ``bmm``. On CPU a batched GEMM beats E small ``mm`` calls when experts get few rows each (fine-grained MoE:
     E=128 experts of ~16 rows ran ~1.6x faster single-threaded), at the price of the padding; it is used only
     when every expert has tokens (so no idle expert's weights are read), the mean count is small for the
     dtype (bf16's batched GEMM wins up to ~100 rows per expert, fp32's only up to ~24) and the padding at most
     doubles the rows (``PADDED_*`` below);
3. one gather of the token rows; the first projection (w1 and w3 into two halves of one buffer, or one GEMM
   for fused gate_up weights), the activation (in inference written over the first projection's output), the
   routing weight folded into the smaller of the activation
   ``[n, F]`` or the output ``[n, D]``, the second projection (with ``ExpertSpec.combine_dtype``: the output
   rows cast to it and weighted there);
4. one ``index_add_`` combines into ``out [T, D]`` (in ``combine_dtype`` when set): no ``[T, K, D]`` tensor, no
   per-token weight copy.

Both forwards (``forward`` saving for backward, ``forward_inference`` keeping nothing) stream groups of
consecutive experts through steps 3-4: ragged groups of the largest expert's rows (as the eager loop's
temporaries are one expert's) or, for tiny experts, of as many rows as keep the temporaries within the size of the
``[T, D]`` output or ``INFER_STREAM_MIN_BYTES``, the larger (inference; for stacked weights within the first
projection's output and activation of all T*K pairs, which the code stacked weights come from holds at once:
usually one group), or of at least ``TRAIN_STREAM_MIN_ROWS`` (training; the forward's within the size of the saved
``h``, ``TRAIN_FORWARD_BUDGET``);
padded groups of several tiny experts per ``bmm`` whose gathered rows fill at most ``PADDED_STREAM_BYTES``.
Temporaries stay bounded without a Python round per tiny expert.

Saved for backward: the first projection's output ``h [N, H]`` in sorted order (for separate w1/w3 its storage
holds the gate block then the up block, ``[2, N, F]``, so each half stays contiguous) and the sort order; with
per-expert weight lists, ``h`` in one tensor per range of experts, let go of during the backward (``CpuLowering``).
Backward rebuilds the same grouping and streams the same expert groups; per group it recomputes the activation
from ``h`` (elementwise) into one buffer shaped like ``h``, and runs
``dA = dy @ W2``, routing-weight grads as ``rowsum(dA * a) (+ dy . b2)`` (so ``y`` is never kept),
the activation's backward (written in place into that buffer), ``dx``, ``dW1``/``dW3``, ``dW2`` and bias grads as
grouped GEMMs and segment sums: ``D + F + H`` elements of temporaries per row (``_ffn_backward``). When autograd
will not run the backward again (no ``retain_graph``) the saved rows are the backward's to use up: where the silu
kernel below runs, the activation's gradient is written over them instead of into that buffer (``D + F`` per
row), and the groups take proportionally more rows for the same temporaries.
A silu activation (SwiGLU or plain, without a clamp; float32 or bfloat16; gate and up with unit column stride)
runs its elementwise work in ``moe_fuser.kernels.cpu_glu``: a SwiGLU's forward in one pass, and the backward's
recompute, ``rowsum(dA * a)`` and the activation's backward in one pass with one exp per element, instead of six to
eight ATen passes with two; where the kernels are not built, the same steps run in ATen (``_silu_kernel``).
Weight grads are allocated empty and written by the GEMMs (idle experts zeroed in a stacked buffer, None in a
weight list), never zero-filled first, and every large fresh buffer is advised for transparent huge pages
(``_advise_huge_pages``): on CPU, first-touch page faults of fresh stacked weight gradients otherwise cost more
than the elementwise work of the whole layer.

Mixed precision (``torch.autocast``): the rows arrive in the compute dtype and the weights in their own (bf16 and
fp32); each GEMM casts the expert group's weights it reads, and weight (and bias) gradients are written in the
weights' dtype, one expert group at a time (``CpuLowering.mixed_precision``), each weight's low-precision product
in slices (``MIXED_WGRAD_PIECES``).

Legend: T tokens, D model dim, F expert hidden dim, H = F (plain) or 2F (gated), E experts, K top-k,
N = T*K pairs, n kept pairs, C rows per expert in the padded layout, X any feature dim.
"""

from __future__ import annotations

import ctypes
import itertools
import math
import sys
from typing import Optional

import torch

from ..kernels import cpu_gemm, cpu_glu
from ..ops.activations import (act_backward, act_fn, clamp_gate_up, gated_activation, gated_activation_backward,
                               split_gate_up)
from ..spec import ExpertSpec

__all__ = ["CpuLowering", "sort_by_expert"]

_HUGE = 1 << 21
_MADV_HUGEPAGE = 14
try:  # Linux: transparent huge pages for large fresh buffers (see _advise_huge_pages)
    _MADVISE = ctypes.CDLL(None, use_errno=True).madvise if sys.platform.startswith("linux") else None
    if _MADVISE is not None:
        _MADVISE.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
except (OSError, AttributeError):
    _MADVISE = None

# Padded (bmm) layout: only when the mean rows per expert is at most this for the GEMMs' dtype (beyond it separate
# mm calls, which skip the padding, run as well or better) ... Measured on this project's CPU (AMD EPYC with
# avx512_bf16, 2 threads; fused_moe, padded against ragged): bf16's batched GEMM beats per-expert mm calls up to
# ~100 rows per expert (E=64 k=8 D=1024 F=256: 15.4 vs 18.0 ms at 64 rows, even at 128); fp32's runs no faster per
# row than mm, so its padding pays only while the per-call cost dominates (E=128 D=512 F=128: 12.7 vs 13.8 ms at
# 16 rows, even at 24, 5% slower at 32; E=8 k=2 D=1024 F=3584 at 64 rows: 101 vs 79 ms); fp16's lost at 16 rows
# already (51 vs 30 ms). Dtypes not listed never take it.
PADDED_MAX_MEAN_ROWS = {torch.bfloat16: 96, torch.float32: 24, torch.float64: 24}
# ... and the padding at most multiplies the rows by this.
PADDED_MAX_WASTE = 2.0
# Training (forward and backward) streams ragged groups of at least this many rows, several tiny experts each: the
# saved activations and weight gradients dwarf a group's temporaries there, and one Python round of ~25 ATen calls
# per expert made a training step 22% slower (E=128 k=8 D=512 F=128 T=256 bf16, weight lists). Inference groups
# stay within the output's size or INFER_STREAM_MIN_BYTES (``_streamed_ffn``).
TRAIN_STREAM_MIN_ROWS = 128
# ... and the training forward's groups may hold temporaries up to this many times the size of the first-projection
# output the call saves (``h``): the forward's peak is then at most twice what the layer keeps for backward, which
# the backward's gradients outgrow, and the forward of a stacked-weight layer mostly runs as one group (a compiled
# Mixtral training step, E=8 k=2 hidden 256: 2.5% faster than in groups of one expert, same peak).
TRAIN_FORWARD_BUDGET = 1.0
# Inference groups may always hold this many bytes of temporaries, however small the output: each group costs
# about ten ATen calls, and at decode (a few rows per expert) a group per expert made a compiled Mixtral 4% slower
# than inductor on transformers' grouped_mm (one group: equal; hidden 1024, 4 tokens, fp32).
INFER_STREAM_MIN_BYTES = 1 << 20
# The padded layout streams groups of consecutive experts whose gathered input rows (E_group * C * D elements)
# take at most this many bytes (at least one expert): smaller groups cost a few ATen calls each (measured: E=128
# k=8 D=512 bf16 inference ran ~10% slower in groups of 512 or 2048 padded rows than whole).
PADDED_STREAM_BYTES = 4 << 20
# Under mixed precision a weight gradient's low-precision product is formed in this many slices (``_mm_into``):
# the whole product next to the fresh gradient it is copied into made the backward's peak the gradients plus 1.5x
# one weight's size; the Switch layer's compiled training step under autocast held 0.35 MiB more than inductor's.
MIXED_WGRAD_PIECES = 8
# The most tensors a training forward with per-expert weight lists saves its first-projection output in (one per
# range of experts, see ``CpuLowering``): one per expert for up to this many experts.
MAX_SAVE_CHUNKS = 8


def sort_by_expert(topk_ids_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, list[int]]:
    """Stable order of the flat (token, slot) pairs by expert id, dropped pairs (-1) last, and the per-expert
    counts as a Python list (the one host sync)."""
    flat = topk_ids_TK.flatten()
    key = torch.where(flat < 0, num_experts, flat)
    order_N = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts].tolist()
    return order_N, counts


def _advise_huge_pages(t: torch.Tensor) -> torch.Tensor:
    """Ask the kernel to back a fresh (not yet touched) CPU buffer with transparent huge pages.

    A fresh allocation of more than a few MB comes straight from mmap, and its first write faults once per 4 KB
    page: for the stacked weight gradients of one training step (e.g. 3 x 58 MB) that is ~45k faults, ~20 ms of
    kernel time per 58 MB here. With ``MADV_HUGEPAGE`` it is one fault per 2 MB (3.4 ms instead of 23 ms for
    58 MB). Only the 2 MB-aligned interior of the buffer is advised; nothing else about it changes. A no-op
    where madvise is unavailable.
    """
    if _MADVISE is None or t.device.type != "cpu":
        return t
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    lo, hi = (start + _HUGE - 1) & ~(_HUGE - 1), end & ~(_HUGE - 1)
    if hi - lo >= 2 * _HUGE:
        _MADVISE(lo, hi - lo, _MADV_HUGEPAGE)
    return t


def _empty(shape, like: torch.Tensor) -> torch.Tensor:
    """A contiguous uninitialised buffer of ``like``'s dtype and device, advised for huge pages when it is large
    enough to hold some (most buffers of a streamed expert group are not: they skip the call)."""
    out = like.new_empty(shape)   # (new_empty: half of torch.empty's per-call cost, which counts per expert group)
    return _advise_huge_pages(out) if math.prod(shape) * like.element_size() >= 2 * _HUGE else out


def _is_stacked(*ws) -> bool:
    return all(w is None or isinstance(w, torch.Tensor) for w in ws)


def _transposed(ws):
    """Per-expert [in, out] views of nn.Linear weights [out, in]: one stacked view or a list of views."""
    if ws is None:
        return None
    if isinstance(ws, torch.Tensor):
        return ws.transpose(1, 2)
    return [w.t() for w in ws]


class _Grouping:
    """Where the kept (token, slot) pairs live while the experts run: ragged ``[n, X]`` or padded ``[E, C, X]``
    (see the module docstring). Every method takes and returns tensors in the chosen layout."""

    def __init__(self, topk_ids_TK: torch.Tensor, num_experts: int, stacked: bool, dtype: torch.dtype,
                 order_N: Optional[torch.Tensor] = None):
        self.T, K = topk_ids_TK.shape
        self.E = num_experts
        if order_N is None:
            order_N, counts = sort_by_expert(topk_ids_TK, num_experts)
        else:
            key = torch.where(topk_ids_TK < 0, num_experts, topk_ids_TK).flatten()
            counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts].tolist()
        self.counts = counts
        self.segs = _segments(counts)
        self.start = 0  # first row of this grouping in the full sorted order (see _subs)
        self.e0 = 0  # first expert of this grouping (a padded group's slice of the stacked weights)
        self.n = n = sum(counts)
        self.order_N = order_N
        self.order_n = order_N[:n]
        self.tok_n = self.order_n // K
        self.expert_n = topk_ids_TK.flatten()[self.order_n]
        self.C = C = max(counts, default=0)
        max_mean = PADDED_MAX_MEAN_ROWS.get(dtype, 0)
        self.padded = (stacked and n > 0 and all(counts) and n <= max_mean * num_experts
                       and num_experts * C <= PADDED_MAX_WASTE * n)
        # the padded layout's row indices (``_pad``) are built by the grouping that runs (``groups``): one streamed
        # in several expert groups never needs its own
        self.ptok = None
        self.offs = None   # built on first use (``_offsets``)

    def _pad(self) -> None:
        """Row indices of the padded layout ``[E, C, X]`` (every expert of the grouping has rows)."""
        dev = self.tok_n.device
        local_n = self.expert_n - self.e0
        starts = torch.tensor([0] + self.counts[:-1], device=dev).cumsum(0)
        self.prow_n = local_n * self.C + (torch.arange(self.n, device=dev) - starts[local_n])
        # Padding rows point at token 0 for the combine (they only carry exact zeros, see scatter_add) and at
        # an appended zero row T for the gather.
        self.ptok = torch.zeros(self.E * self.C, dtype=torch.int64, device=dev)
        self.ptok.index_copy_(0, self.prow_n, self.tok_n)
        self.ptok_gather = torch.full_like(self.ptok, self.T).index_copy_(0, self.prow_n, self.tok_n)

    def groups(self, row_bytes: int, min_rows: int = 0, widen: float = 1.0) -> list["_Grouping"]:
        """This grouping as consecutive expert groups to stream ([itself] when small): ragged groups of at most
        max(C, ``min_rows``) rows (C, the largest expert's: the eager loop's temporaries are one expert's, and so
        are these), times ``widen`` (a backward whose groups take fewer temporaries per row); padded groups whose
        gathered rows (``row_bytes`` each) fill at most ``PADDED_STREAM_BYTES``."""
        if self.padded:
            per = max(1, PADDED_STREAM_BYTES // (row_bytes * self.C))
            if per >= len(self.segs):
                if self.ptok is None:
                    self._pad()
                return [self]
            return self._subs([self.segs[i:i + per] for i in range(0, len(self.segs), per)])
        max_rows = int(max(self.C, min_rows) * widen)
        if self.n <= max_rows:
            return [self]
        runs, first = [], 0
        for i, (_, start, stop) in enumerate(self.segs):
            if i > first and stop - self.segs[first][1] > max_rows:
                runs.append(self.segs[first:i])
                first = i
        runs.append(self.segs[first:])
        return self._subs(runs)

    def _subs(self, runs: list[list[tuple[int, int, int]]]) -> list["_Grouping"]:
        """The sub-groupings of ``runs``, lists of consecutive experts (segments) that together are all of this
        grouping's, in order; in this grouping's layout. Their row indices are views made by one split per index
        tensor (not three slicing calls per sub-grouping)."""
        sizes = [run[-1][2] - run[0][1] for run in runs]
        views = zip(*(t.split_with_sizes(sizes) for t in (self.order_n, self.tok_n, self.expert_n)))
        subs = []
        for run, (order_n, tok_n, expert_n) in zip(runs, views):
            lo = run[0][1]
            sub = object.__new__(_Grouping)
            sub.T, sub.E, sub.padded, sub.e0 = self.T, self.E, self.padded, self.e0
            sub.segs = [(e, start - lo, stop - lo) for e, start, stop in run]
            sub.start, sub.n = self.start + lo, run[-1][2] - lo
            sub.order_n, sub.tok_n, sub.expert_n = order_n, tok_n, expert_n
            sub.offs = None
            sub.counts = [stop - start for _, start, stop in run]
            sub.C = max(sub.counts)
            if sub.padded:
                sub.E, sub.e0 = len(run), run[0][0]
                sub._pad()
            subs.append(sub)
        return subs

    def _mine(self, stacked: torch.Tensor) -> torch.Tensor:
        """A padded grouping's slice ``[e0, e0 + E)`` of a stacked per-expert tensor."""
        return stacked if self.e0 == 0 and stacked.shape[0] == self.E else stacked[self.e0:self.e0 + self.E]

    # -- moving rows in and out --------------------------------------------------------------------------
    def gather(self, src_TX: torch.Tensor) -> torch.Tensor:
        X = src_TX.shape[1]
        if self.padded:  # one gather straight into the padded layout, padding rows from an appended zero row
            src = torch.cat([src_TX, src_TX.new_zeros(1, X)])
            rows = torch.index_select(src, 0, self.ptok_gather, out=_empty((self.E * self.C, X), src_TX))
            return rows.view(self.E, self.C, X)
        return torch.index_select(src_TX, 0, self.tok_n, out=_empty((self.n, X), src_TX))

    def from_sorted(self, rows_nX: torch.Tensor) -> torch.Tensor:
        if not self.padded:
            return rows_nX
        X = rows_nX.shape[-1]
        out = _empty((self.E * self.C, X), rows_nX).zero_().index_copy_(0, self.prow_n, rows_nX)
        return out.view(self.E, self.C, X)

    def to_sorted(self, rows: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not self.padded:
            return rows if out is None else out.copy_(rows)
        flat = rows.reshape(self.E * self.C, *rows.shape[2:])
        return torch.index_select(flat, 0, self.prow_n, out=out) if out is not None else flat[self.prow_n]

    def column(self, values_n: torch.Tensor) -> torch.Tensor:
        """A per-pair scalar broadcastable against rows (zero on padding rows)."""
        return self.from_sorted(values_n.unsqueeze(1)) if self.padded else values_n.unsqueeze(1)

    def scatter_add(self, rows_D: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """sum of each token's rows -> [T, D] (added into ``out`` when given). Padding rows are exact zeros (their
        routing weight is 0), so adding them to token 0 changes nothing."""
        if out is None:
            out = rows_D.new_zeros(self.T, rows_D.shape[-1])
        if self.padded:
            return out.index_add_(0, self.ptok, rows_D.view(self.E * self.C, -1))
        return out.index_add_(0, self.tok_n, rows_D)

    # -- grouped GEMMs --------------------------------------------------------------------------------------
    def mm(self, rows: torch.Tensor, ws, bias=None, save_to: Optional[torch.Tensor] = None) -> torch.Tensor:
        """rows_e @ ws[e] (+ bias[e]) per expert; ws are per-expert [in, out] matrices. ``save_to`` ([n, out],
        sorted order) also receives the result."""
        dt = rows.dtype
        if self.padded:
            ws = self._mine(ws).to(dt)
            out = _empty((self.E, self.C, ws.shape[-1]), rows)
            if bias is None:
                torch.bmm(rows, ws, out=out)
            else:
                torch.baddbmm(self._mine(bias).to(dt).unsqueeze(1), rows, ws, out=out)
            if save_to is not None:
                self.to_sorted(out, out=save_to)
            return out
        cast = ws[0].dtype != dt   # checked once, not a .to() per expert: the experts share one dtype
        native = bias is None and not cast and _native_gemms(dt)
        if not native and len(self.segs) > 1 and bias is None and save_to is None and _grouped_mm_fits(rows, ws):
            lo, hi = self.segs[0][0], self.segs[-1][0] + 1
            return torch._grouped_mm(rows, ws[lo:hi], offs=self._offsets())
        X = ws[0].shape[-1]
        out = save_to if save_to is not None else _empty((self.n, X), rows)
        if bias is None and not cast:
            _mms([(_rows(rows, start, stop), ws[e], _rows(out, start, stop)) for e, start, stop in self.segs])
            return out
        for e, start, stop in self.segs:   # a bias, or weights cast one expert at a time (mixed precision)
            w = ws[e].to(dt) if cast else ws[e]
            if bias is None:
                torch.mm(_rows(rows, start, stop), w, out=_rows(out, start, stop))
            else:
                torch.addmm(bias[e].to(dt) if cast else bias[e], _rows(rows, start, stop), w,
                            out=_rows(out, start, stop))
        return out

    def _offsets(self) -> torch.Tensor:
        """int32 end row of each expert from the grouping's first to its last (``torch._grouped_mm``'s offs)."""
        if self.offs is None:
            ends = [0] * (self.segs[-1][0] + 1 - self.segs[0][0])
            for e, _, stop in self.segs:
                ends[e - self.segs[0][0]] = stop
            for i in range(1, len(ends)):   # an expert without rows ends where the one before it does
                ends[i] = max(ends[i], ends[i - 1])
            self.offs = torch.tensor(ends, dtype=torch.int32, device=self.order_n.device)
        return self.offs

    def mm_add_(self, acc: torch.Tensor, rows: torch.Tensor, ws) -> torch.Tensor:
        """acc += rows_e @ ws[e] per expert, in place."""
        if self.padded:
            return acc.baddbmm_(rows, self._mine(ws).to(rows.dtype))
        if ws[0].dtype == rows.dtype:
            _mms([(_rows(rows, start, stop), ws[e], _rows(acc, start, stop)) for e, start, stop in self.segs],
                 accumulate=True)
            return acc
        for e, start, stop in self.segs:   # mixed precision: one expert's cast weights at a time
            _rows(acc, start, stop).addmm_(_rows(rows, start, stop), ws[e].to(rows.dtype))
        return acc

    def wgrad(self, a_rows: torch.Tensor, b_rows: torch.Tensor, out) -> None:
        """out[e] = a_e^T @ b_e for this grouping's experts (``out``: a stacked [E, A, B] buffer or a list; under
        mixed precision in the weights' dtype, written from one expert group's product at a time)."""
        if self.padded:
            _mm_into(torch.bmm, a_rows.transpose(1, 2), b_rows, self._mine(out))
            return
        if self.segs and out[self.segs[0][0]].dtype == a_rows.dtype:
            _mms([(_rows(a_rows, start, stop).t(), _rows(b_rows, start, stop), out[e]) for e, start, stop in self.segs])
            return
        for e, start, stop in self.segs:
            _mm_into(torch.mm, _rows(a_rows, start, stop).t(), _rows(b_rows, start, stop), out[e])

    def segment_sum(self, rows: torch.Tensor, out) -> None:
        """out[e] += sum of expert e's rows (bias grads; ``out`` zero-initialised, stacked or a list)."""
        if self.padded:
            self._mine(out).add_(rows.sum(1, dtype=out.dtype))
        elif isinstance(out, torch.Tensor):
            out.index_add_(0, self.expert_n, rows.to(out.dtype))
        else:
            for e, start, stop in self.segs:
                out[e].add_(_rows(rows, start, stop).sum(0, dtype=out[e].dtype))

    def per_expert(self, bs) -> torch.Tensor:
        """A per-expert vector (a bias) broadcast to every row."""
        if self.padded:
            return self._mine(bs).unsqueeze(1)
        if isinstance(bs, torch.Tensor):
            return bs[self.expert_n]
        # a list: this grouping's experts only, each broadcast over its rows (no copy for a single expert)
        rows = [bs[e].expand(stop - start, -1) for e, start, stop in self.segs]
        return rows[0] if len(rows) == 1 else torch.cat(rows)


def _grouped_mm_fits(rows: torch.Tensor, ws) -> bool:
    """Whether ``torch._grouped_mm`` can run a ragged group's GEMM in one call where the native GEMMs do not
    (``_native_gemms``), instead of one ``mm`` per expert, each costing several microseconds of Python: stacked CPU
    weights of the rows' dtype, fp32 or bf16, row-major rows, 16-byte alignment. bf16 weights only in nn.Linear's
    layout (``[in, out]`` views of ``[out, in]`` storage): with ``[in, out]`` storage its CPU kernel ran ~10x slower
    than ``mm`` per expert (torch 2.13, AVX2); fp32 ran as fast as ``mm`` per expert in both layouts (bitwise
    equal), and faster where the experts are many (E=64: 2.9 against 3.5 ms)."""
    return (isinstance(ws, torch.Tensor) and rows.device.type == "cpu" and ws.dtype == rows.dtype
            and (rows.dtype == torch.float32 or (rows.dtype == torch.bfloat16 and ws.stride(-2) == 1))
            and rows.stride(-1) == 1 and _aligned(rows) and _aligned(ws) and hasattr(torch, "_grouped_mm"))


def _aligned(t: torch.Tensor) -> bool:
    """``torch._grouped_mm``'s layout rule: 16-byte aligned data and strides (other than unit ones)."""
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all(st == 1 or st * size % 16 == 0 for st in t.stride())


def _native_gemms(dtype: torch.dtype) -> bool:
    """Whether a group's GEMMs of this dtype go to ``moe_fuser.kernels.cpu_gemm`` (float32, the library built): one
    call for all of them, ahead of ``torch._grouped_mm``, which runs them one after another with all threads each
    (a compiled Mixtral block's training step, E=8 k=2 hidden 256, ran 5% faster; see the README)."""
    return dtype == torch.float32 and cpu_gemm.available()


def _mms(items, accumulate: bool = False) -> None:
    """``out = a @ b`` (or ``out += a @ b``) for each ``(a, b, out)`` of a group's experts: float32 in one native call
    that spreads their tiles over the threads (``moe_fuser.kernels.cpu_gemm``), else one ``torch.mm`` each."""
    if cpu_gemm.mm(items, accumulate):
        return
    for a, b, out in items:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)


def _mm_into(mm, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """``out = mm(a, b)`` (``torch.mm`` or ``torch.bmm``). Where ``out`` (a weight gradient) has the weights' wider
    dtype, the product goes through a low-precision temporary, ``MIXED_WGRAD_PIECES`` slices of ``out``'s first
    dim (rows, or experts for bmm) in turn."""
    if out.dtype == a.dtype:
        mm(a, b, out=out)
        return
    step = -(-out.shape[0] // MIXED_WGRAD_PIECES)
    bs = b.split(step) if mm is torch.bmm else itertools.repeat(b)   # mm: every row slice of a times all of b
    for a_i, b_i, out_i in zip(a.split(step), bs, out.split(step)):
        out_i.copy_(mm(a_i, b_i))


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, without the call where ``t`` has that dtype already: ATen calls cost several microseconds
    each from Python, and the backward runs its sequence once per expert group."""
    return t if t.dtype == dtype else t.to(dtype)


def _rows(t: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of ``t``: ``t`` itself when that is all of it (a one-expert group: no slice op)."""
    return t if start == 0 and stop == t.shape[0] else t[start:stop]


def _segments(counts: list[int]) -> list[tuple[int, int, int]]:
    """(expert, first row, end row) of each expert with rows, in the sorted order."""
    segs, start = [], 0
    for e, c in enumerate(counts):
        if c:
            segs.append((e, start, start + c))
            start += c
    return segs


def _saved_halves(h_NH: torch.Tensor, spec: ExpertSpec):
    """Views of the saved first-projection output: (h,) or, for separate w1/w3, (gate, up) blocks."""
    if spec.glu == "separate":
        N, H = h_NH.shape
        return tuple(h_NH.view(2, N, H // 2).unbind(0))
    return (h_NH,)


def _gate_up(parts, spec: ExpertSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """A GLU's (gate, up) views of the first projection's output ``parts`` (``_saved_halves``' form)."""
    return parts if spec.glu == "separate" else split_gate_up(parts[0], spec.glu)


def _act_inputs(parts, spec: ExpertSpec) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """What the activation reads from ``parts``: a GLU's (gate, up), or (h, None)."""
    return _gate_up(parts, spec) if spec.gated else (parts[0], None)


def _activate(parts, spec: ExpertSpec, inplace: bool = False) -> torch.Tensor:
    """The activation of the first projection's output ``parts`` (``_saved_halves``' form); with ``inplace``
    (nothing reads ``parts`` again) written over them where the activation allows (no clamp): one ``[n, F]``
    buffer fewer."""
    inplace = inplace and _activates_inplace(spec)
    gate, up = _act_inputs(parts, spec)
    if _silu_kernel(spec, gate, up):
        return cpu_glu.silu_glu(gate, up, gate if inplace else _empty(gate.shape, gate))
    if not spec.gated:
        return act_fn(spec.activation, gate, out=gate if inplace else None)
    return act_fn(spec.activation, gate, out=gate).mul_(up) if inplace else gated_activation(gate, up, spec)


def _silu_kernel(spec: ExpertSpec, *tensors: Optional[torch.Tensor]) -> bool:
    """Whether ``moe_fuser.kernels.cpu_glu`` runs this activation on these ``[rows, F]`` tensors (None: absent, as
    a plain activation's ``up``): silu (SwiGLU or plain) without a clamp, CPU float32 or bfloat16 with unit column
    stride (not an interleaved layout's halves), the kernels built."""
    return spec.activation == "silu" and spec.limit is None and cpu_glu.supports(*tensors)


def _activates_inplace(spec: ExpertSpec) -> bool:
    """Whether ``_activate`` can write the activation over the first projection's output (not a clamped GLU)."""
    return spec.limit is None and spec.activation != "gpt_oss"


def _pair_weights(G: _Grouping, topk_weights_TK: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The routing weight of each of G's rows, in sorted order and the activations' dtype: ``[n]``."""
    return topk_weights_TK.flatten()[G.order_n].to(dtype)


def _ffn(G: _Grouping, x_TD, g_n, w1t, w2t, w3t, b1, b2, b3, spec: ExpertSpec, saved_rows=None, out=None):
    """The experts on G's rows: gather, first projection (also written to ``saved_rows``, G's rows of the saved
    halves, when given), activation, routing weight ``g_n`` (folded into the smaller operand; with a
    ``combine_dtype``, applied to the output rows in that dtype), second projection, combine -> [T, D] (added into
    ``out`` when given). ``w*t``: per-expert [in, out] views (``_transposed``)."""
    D = x_TD.shape[1]
    F_ = w2t[0].shape[0]
    xs = G.gather(x_TD)
    save = (None, None) if saved_rows is None else saved_rows
    parts = (G.mm(xs, w1t, b1, save_to=save[0]),)
    if spec.glu == "separate":
        parts += (G.mm(xs, w3t, b3, save_to=save[1]),)
    del xs
    a = _activate(parts, spec, inplace=saved_rows is None)
    del parts
    g = G.column(g_n)
    fold_into_a = F_ <= D and b2 is None and spec.combine_dtype is None
    if fold_into_a:
        a.mul_(g)
    y = G.mm(a, w2t, b2)
    del a   # (in inference it is the first projection's output: gone before the combine allocates ``out``)
    if spec.combine_dtype is not None:
        y = y.to(spec.combine_dtype)
    if not fold_into_a:
        y.mul_(g)
    return G.scatter_add(y, out)


def _streamed_ffn(G: _Grouping, x_TD, topk_weights_TK, w1, w2, w3, b1, b2, b3, spec: ExpertSpec, saved=None):
    """``_ffn`` over G's expert groups in turn (``_Grouping.groups``), so the temporaries are one group's instead
    of all T*K rows'. With ``saved`` (training: ``(part, h)`` pairs, see ``_saved_parts``) each group writes its
    rows of its part's saved tensor."""
    g_n = _pair_weights(G, topk_weights_TK, spec.combine_dtype or x_TD.dtype)
    ws = (_transposed(w1), _transposed(w2), _transposed(w3), b1, b2, b3)
    T, D = x_TD.shape
    F_ = w2[0].shape[-1]
    row_bytes = D * x_TD.element_size()
    if saved is None:
        # inference: a group's temporaries (rows of xs, h, y, and of a unless it overwrites h) within one
        # expert's, the [T, D] output's size or INFER_STREAM_MIN_BYTES; for stacked weights within what the
        # first projection's output and the activation of all T*K pairs take (H + F per pair), as the code such
        # weights come from holds them at once (transformers' grouped_mm and batched_mm experts, one
        # torch._grouped_mm or bmm over every pair); weight lists come from a loop over experts, whose
        # temporaries are one expert's
        H = 2 * F_ if spec.gated else F_
        budget = max(T * D, INFER_STREAM_MIN_BYTES // x_TD.element_size())
        if isinstance(w2, torch.Tensor):
            budget = max(budget, G.order_N.shape[0] * (H + F_))
        min_rows = budget // (2 * D + H + (0 if _activates_inplace(spec) else F_))
    else:
        # training: a group's temporaries (rows of xs, then of a and y; h goes straight to the saved tensor)
        # within TRAIN_FORWARD_BUDGET times the size of what the call saves, or TRAIN_STREAM_MIN_ROWS rows
        budget = int(TRAIN_FORWARD_BUDGET * sum(h.numel() for _, h in saved))
        min_rows = max(TRAIN_STREAM_MIN_ROWS, budget // (D + F_))
    out_TD = None
    for part, h in saved if saved is not None else [(G, None)]:
        for sub in part.groups(row_bytes, min_rows):
            rows = None if h is None else _rows_of(h, spec, sub, part)
            out_TD = _ffn(sub, x_TD, _rows(g_n, sub.start, sub.start + sub.n), *ws, spec, saved_rows=rows, out=out_TD)
    return x_TD.new_zeros(x_TD.shape, dtype=spec.combine_dtype or x_TD.dtype) if out_TD is None else out_TD


def _rows_of(h: torch.Tensor, spec: ExpertSpec, sub: _Grouping, part: _Grouping) -> tuple[torch.Tensor, ...]:
    """``sub``'s rows of the saved halves in ``h``, which holds ``part``'s rows (from ``part.start`` on). Views:
    while one is alive, letting go of ``h`` frees nothing."""
    off = sub.start - part.start
    return tuple(_rows(half, off, off + sub.n) for half in _saved_halves(h, spec))


def expert_chunks(num_experts: int, chunks: int) -> list[tuple[int, int]]:
    """The expert ranges ``[lo, hi)`` whose rows the saved first-projection output is split into (``chunks``
    near-equal ranges of consecutive experts)."""
    return [(c * num_experts // chunks, (c + 1) * num_experts // chunks) for c in range(chunks)]


def _saved_parts(G: _Grouping, chunks: int) -> list[Optional[_Grouping]]:
    """G split along ``expert_chunks``: one sub-grouping per chunk, None for a chunk whose experts got no rows."""
    runs = [[s for s in G.segs if lo <= s[0] < hi] for lo, hi in expert_chunks(G.E, chunks)]
    subs = iter(G._subs([run for run in runs if run]) if G.segs else [])
    return [next(subs) if run else None for run in runs]


def _graph_kept() -> bool:
    """Whether autograd may run the current backward again (``retain_graph``, also outside any backward); True
    where this torch cannot tell (AOTAutograd asks the same private question)."""
    kept = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if kept is None else kept()


def _release(t: torch.Tensor) -> None:
    """Drop this tensor object's hold on its storage (see ``CpuLowering``): the memory goes back as soon as no
    other tensor shares it, and a reader of any other tensor on it still sees its data."""
    t.set_()


class CpuLowering:
    """The ATen lowering.

    Saving for backward in chunks: with per-expert weight lists (``nn.ModuleList`` models) the eager loop's
    backward frees each expert's saved activations as it goes while the per-expert weight gradients appear one
    by one, so its peak is about the gradients plus one expert's temporaries. A single saved ``h [T*K, H]`` would
    stay alive, whole, until the backward op returns, next to all the gradients. So for such weights on CPU
    (``save_chunks``) the forward saves ``h`` as one tensor per range of experts (``expert_chunks``), and the
    backward visits the chunks largest first, allocates each expert's weight gradients when it reaches that
    expert, and lets go of each chunk as soon as its activation backward is done, when autograd will not run
    this backward again (no ``retain_graph``; autograd then holds saved tensors only for this one use, and the
    op wrapper's backward and AOTAutograd's compiled backward both clear their own references first). Letting
    go is ``Tensor.set_()`` on the op's own argument: memory is freed only if nothing else shares it. A backward
    handed a chunk already let go of raises. Traced, the backward takes the output gradient's rows per chunk
    instead of the gradient (``grad_rows``, see ``moe_fuser.ops.experts``) and lets go of them the same way.

    Such a backward (one autograd will not run again, chunks or not) also uses the saved rows as scratch where
    the silu kernel runs: the activation's gradient is written over them instead of into a buffer of their size
    (``_ffn_backward``), so a caller that keeps the forward op's ``h`` to read after the backward passes
    ``retain_graph=True``.
    """

    name = "cpu"
    # Forms and sums the weighted expert outputs in ``ExpertSpec.combine_dtype`` when it is set (``_ffn``); its
    # backward then takes the output gradient in that dtype and casts each group's rows (no [T, D] copy).
    combine_dtypes = True
    # Takes rows in the compute dtype and weights in their own (autocast: bf16 rows, fp32 weights): each expert
    # group's weights are cast where used (forward and backward) and the weight gradients come back in the
    # weights' dtype. Casting all weights before the op instead would keep their low-precision copies alive
    # through the backward and return all low-precision gradients at once, each held until converted: 24 against
    # the eager loop's 16.8 MiB of peak for the Switch layer's training step under autocast.
    mixed_precision = True
    # ``forward(..., h_out=buf)`` writes the saved rows of the kept pairs only into ``buf [n, H]`` and
    # ``backward`` takes such an ``h`` back: expert parallelism saves every chunk's rows into one tensor, with
    # no padding rows for the empty slots of its per-row pair tables.
    saves_into = True

    def available(self, device: torch.device):
        return None

    @staticmethod
    def save_chunks(device: torch.device, stacked: bool, num_experts: int) -> int:
        """How many tensors the training forward saves ``h`` in (see the class docstring)."""
        return 1 if stacked or device.type != "cpu" else min(num_experts, MAX_SAVE_CHUNKS)

    def forward(self, x_TD, topk_weights_TK, topk_ids_TK, w1, w2, w3, b1, b2, b3, spec: ExpertSpec,
                chunks: int = 1, h_out: Optional[torch.Tensor] = None):
        """-> (out, h, order): ``h`` one ``[T*K, H]`` tensor (rows past the kept pairs zero), ``h_out`` when
        given (``[n, H]``, n the kept pairs: no padding rows; ``saves_into``), or, for ``chunks > 1``, a list of
        that many tensors holding the rows of each of ``expert_chunks``."""
        T, K = topk_ids_TK.shape
        F_ = w2[0].shape[-1]
        H = 2 * F_ if spec.gated else F_
        G = _Grouping(topk_ids_TK, spec.num_experts, _is_stacked(w1, w2, w3, b1, b2, b3), x_TD.dtype)
        if h_out is not None:
            if chunks != 1 or tuple(h_out.shape) != (G.n, H) or not h_out.is_contiguous():
                raise ValueError(f"h_out must be a contiguous [{G.n}, {H}] tensor (one row per kept pair) and "
                                 f"chunks 1; got {tuple(h_out.shape)}, chunks {chunks}")
            h_NH = h_out
            saved = [(G, h_NH)]
        elif chunks == 1:
            h_NH = _empty((T * K, H), x_TD)
            for h in _saved_halves(h_NH, spec):
                h[G.n:].zero_()
            saved = [(G, h_NH)]
        else:
            parts = _saved_parts(G, chunks)
            h_NH = [_empty((0 if p is None else p.n, H), x_TD) for p in parts]
            saved = [(p, h) for p, h in zip(parts, h_NH) if p is not None]
        out = _streamed_ffn(G, x_TD, topk_weights_TK, w1, w2, w3, b1, b2, b3, spec, saved)
        return out, h_NH, G.order_N

    def forward_inference(self, x_TD, topk_weights_TK, topk_ids_TK, w1, w2, w3, b1, b2, b3, spec: ExpertSpec):
        """Forward that keeps nothing for backward."""
        G = _Grouping(topk_ids_TK, spec.num_experts, _is_stacked(w1, w2, w3, b1, b2, b3), x_TD.dtype)
        return _streamed_ffn(G, x_TD, topk_weights_TK, w1, w2, w3, b1, b2, b3, spec)

    def grad_rows(self, grad_TD, topk_ids_TK, order_N, num_experts: int, chunks: int) -> list[torch.Tensor]:
        """The output gradient's rows of the kept pairs in sorted order, one tensor per ``expert_chunks`` range
        (as the training forward saved ``h``); ``backward(..., grad_rows=)`` takes them instead of the gradient."""
        G = _Grouping(topk_ids_TK, num_experts, False, grad_TD.dtype, order_N=order_N)
        return [grad_TD.new_empty((0, grad_TD.shape[1])) if p is None else p.gather(grad_TD)
                for p in _saved_parts(G, chunks)]

    def backward(self, grad_TD, x_TD, topk_weights_TK, topk_ids_TK, h_NH, order_N, w1, w2, w3, b1, b2, b3,
                 spec: ExpertSpec, needs_input_grad, grad_rows: Optional[list[torch.Tensor]] = None):
        """``grad_rows`` (with ``h`` in chunks, ``grad_TD`` None): the output gradient already gathered per chunk
        (``grad_rows``); each chunk is let go of once its experts are done, when the chunks of ``h`` are (see the
        class docstring)."""
        need_x, need_weights, need_w = needs_input_grad
        T, K = topk_ids_TK.shape
        G = _Grouping(topk_ids_TK, spec.num_experts, _is_stacked(w1, w2, w3, b1, b2, b3), x_TD.dtype,
                      order_N=order_N)
        # Autograd will not run this backward again (see the class docstring): the saved rows are this call's to
        # use up.
        spent = x_TD.device.type == "cpu" and not _graph_kept()
        if isinstance(h_NH, torch.Tensor):
            saved, release = [(G, h_NH, None)], False
        else:
            parts = _saved_parts(G, len(h_NH))
            if any(h.shape[0] != (0 if p is None else p.n) for p, h in zip(parts, h_NH)):
                raise RuntimeError("moe_fuser: this MoE layer's saved activations were already released by a "
                                   "backward pass through it; to backpropagate through the graph again, run "
                                   "the earlier backward with retain_graph=True")
            rows = grad_rows if grad_rows else [None] * len(parts)
            saved = sorted(((p, h, r) for p, h, r in zip(parts, h_NH, rows) if p is not None),
                           key=lambda phr: -phr[0].n)
            release = spent
        dx_TD = x_TD.new_zeros(x_TD.shape) if need_x else None
        dweights_N = topk_weights_TK.new_zeros(T * K) if need_weights else None
        grads_w = [None] * 6
        if need_w:
            grads_w = [_grad_buffer(w, G.counts) for w in (w1, w2, w3)] + \
                      [_grad_buffer(b, G.counts, zero=True) for b in (b1, b2, b3)]
        # Like the forward, backward streams expert groups, so only one group's temporaries are alive next to the
        # gradients (the eager loop's backward frees its per-expert activations as it goes, too).
        g_n = _pair_weights(G, topk_weights_TK, x_TD.dtype)
        D, F_ = x_TD.shape[1], w2[0].shape[-1]
        H = 2 * F_ if spec.gated else F_
        # Every group's rows share the saved tensors' dtype and layout (and its buffers are contiguous): whether
        # the kernel takes them is decided once. Where it writes the activation's gradient over the saved rows, a
        # group's temporaries are D + F per row instead of D + F + H: its rows grow by that ratio, for the same
        # bytes.
        kernel = bool(saved) and _silu_kernel(spec, *_act_inputs(_saved_halves(saved[0][1], spec), spec))
        overwrite = spent and kernel
        widen = (D + F_ + H) / (D + F_) if overwrite else 1.0
        for part, h, rows in saved:
            subs = part.groups(D * x_TD.element_size(), TRAIN_STREAM_MIN_ROWS, widen)
            for i, sub in enumerate(subs):
                done = (lambda h=h: _release(h)) if release and i == len(subs) - 1 else None
                off = sub.start - part.start
                dy = None if rows is None else _rows(rows, off, off + sub.n)
                _ffn_backward(sub, grad_TD, x_TD, _rows(g_n, sub.start, sub.start + sub.n),
                              _rows_of(h, spec, sub, part), w1, w2, w3, b2, spec, dx_TD, dweights_N, grads_w, done, dy,
                              kernel, overwrite)
                del dy
            if rows is not None and release:
                _release(rows)
        grads_w = [g.grads if isinstance(g, _ExpertGrads) else g for g in grads_w]
        return (dx_TD, None if dweights_N is None else dweights_N.view(T, K), *grads_w)


class _ExpertGrads:
    """Per-expert gradients of a weight list, each allocated when the backward first reaches its expert (so the
    gradients grow while the saved activations shrink, as in the eager loop), None for experts with no rows (the
    eager loop never touches them; the op turns None into zeros where it must return a tensor)."""

    def __init__(self, ws, zero: bool):
        self.ws, self.zero = ws, zero
        self.grads: list[Optional[torch.Tensor]] = [None] * len(ws)

    def __getitem__(self, e: int) -> torch.Tensor:
        if self.grads[e] is None:
            w = self.ws[e]
            self.grads[e] = w.new_zeros(w.shape) if self.zero else _empty(w.shape, w)
        return self.grads[e]


def _grad_buffer(ws, counts: list[int], zero: bool = False):
    """A gradient buffer shaped like ``ws``: for a stacked tensor, one contiguous buffer, zeroed, or
    uninitialised except the slices of experts that got no rows (the GEMMs write every other slice); for a list,
    ``_ExpertGrads``."""
    if ws is None:
        return None
    if not isinstance(ws, torch.Tensor):
        return _ExpertGrads(ws, zero)
    if zero:
        return ws.new_zeros(ws.shape)
    out = _empty(ws.shape, ws)
    for e, c in enumerate(counts):
        if not c:
            out[e].zero_()
    return out


def _backward_buffers(parts, spec: ExpertSpec) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """One buffer shaped like the saved rows ``parts``, which holds first the activation and then, in place, the
    gradient of the first projection's output: -> (``dh_parts``, what the GEMMs of the first projection's backward
    read: the whole buffer, or for separate w1/w3 its two blocks; ``slots``: a GLU's (gate, up) halves, or the
    whole buffer)."""
    if spec.glu == "separate":
        halves = _empty((2, *parts[0].shape), parts[0]).unbind(0)
        return halves, halves
    buf = _empty(parts[0].shape, parts[0])
    return (buf,), (split_gate_up(buf, spec.glu) if spec.gated else (buf,))


def _activate_into(parts, spec: ExpertSpec, slots) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The activation ``a`` of the saved rows ``parts`` written into ``slots[0]`` and, for a GLU other than
    GPT-OSS's, ``act(gate)`` (which the activation's backward reads again) into ``slots[1]``: -> (a, act_gate or
    None)."""
    if not spec.gated:
        return act_fn(spec.activation, parts[0], out=slots[0]), None
    gate, up = clamp_gate_up(*_gate_up(parts, spec), spec)
    if spec.activation == "gpt_oss":
        return slots[0].copy_(gated_activation(gate, up, spec)), None
    act_gate = act_fn(spec.activation, gate, out=slots[1])
    return torch.mul(act_gate, up, out=slots[0]), act_gate


def _activation_backward(parts, dA, spec: ExpertSpec, act_gate, out) -> None:
    """The activation's backward from ``dA`` (weighted), written into ``out`` (a GLU's (d_gate, d_up), or (dh,)),
    which may alias ``act_gate`` (as ``d_up``) or ``dA`` (as ``d_gate`` or ``dh``)."""
    if spec.gated:
        gated_activation_backward(*_gate_up(parts, spec), dA, spec, act_gate, out=out)
    else:
        act_backward(spec.activation, dA, parts[0], out=out[0])


def _down_grads(G: _Grouping, dy_g, a, dw2, db2) -> None:
    """The second projection's weight (and bias) gradients from the weighted output gradient ``dy_g`` and the
    activation ``a``: dW2 = dy_g^T a."""
    if dw2 is not None:
        G.wgrad(dy_g, a, dw2)
        if db2 is not None:
            G.segment_sum(dy_g, db2)


def _ffn_backward(G: _Grouping, grad_TD, x_TD, g_n, saved_rows, w1, w2, w3, b2, spec: ExpertSpec,
                  dx_TD, dweights_N, grads_w, saved_done=None, dy_rows=None, kernel=False,
                  overwrite=False) -> None:
    """Backward of ``_ffn`` on G's rows (routing weights ``g_n``, saved halves' rows ``saved_rows``, as in
    ``_ffn``), accumulating into the given gradient buffers (None: not needed).

    Temporaries: the gathered output gradient ``dy``, ``dA = dy @ W2`` and one buffer shaped like the saved rows
    (``_backward_buffers``), which holds the activation and act(gate) and then receives the activation's backward
    in place; ``D + F + H`` elements per row (then ``H + D`` for ``dx`` and the first projection's weight
    gradients). Order: dW2 (the last read of the activation), the routing-weight gradients ``rowsum(dA * a)``
    computed over the activation in place, the activation's backward. Where ``saved_done`` is given (to be called
    once the saved rows are no longer read) the activation's backward comes first instead, so that the saved rows
    go before any of G's gradients is allocated: its gate part then goes to ``dA``'s buffer, and the activation
    stays where it is until dW2. With ``kernel`` (the caller's ``_silu_kernel`` for the saved rows) a silu takes
    one pass for all of it, with the activation written over ``dA`` (times the routing weight, for dW2, unless a
    second-projection bias gradient needs the weighted ``dy``) and its gradient into the buffer, or, with
    ``overwrite`` (the saved rows are the call's to use up) or in the padded layout (whose rows are copies), over
    the saved rows: no buffer, ``D + F`` elements of temporaries per row, and the saved rows are done after
    dW1."""
    dw1, dw2, dw3, db1, db2, db3 = grads_w
    g = G.column(g_n)
    # unweighted (G's rows of the output gradient, or ``dy_rows`` already gathered); cast per group where the
    # output had a combine_dtype
    dy = _as(G.gather(grad_TD) if dy_rows is None else dy_rows, x_TD.dtype)
    dA = G.mm(dy, w2)
    parts = tuple(G.from_sorted(h) for h in saved_rows)
    need_dg = dweights_N is not None
    # the routing-weight gradient's bias term dy . b2, from the unweighted dy
    dg_b2 = (dy * G.per_expert(b2)).sum(-1, dtype=torch.float32) if need_dg and b2 is not None else None
    gate, up = _act_inputs(parts, spec)
    in_place = kernel and (overwrite or G.padded)
    if in_place:
        dh_parts, slots, (d_gate, d_up) = parts, None, (gate, up)
    else:
        dh_parts, slots = _backward_buffers(parts, spec)
        d_gate, d_up = slots if spec.gated else (slots[0], None)
    # the saved rows are read until the kernel, or, where it writes over them, until dW1
    done_after_kernel, done_at_end = (None, saved_done) if in_place and not G.padded else (saved_done, None)
    # dW2 = (g dy)^T a: the kernel puts g into a where no b2 gradient needs g dy; else dy is weighted, in place
    # unless the rows are the caller's (``dy_rows`` handed to the op)
    weight_a = kernel and b2 is None
    if weight_a:
        dy_g = dy
    elif dy_rows is None or dy.data_ptr() != dy_rows.data_ptr():
        dy_g = dy.mul_(g)
    else:
        dy_g = dy * g
    del dy
    if kernel:
        # one pass: the activation written over dA (dW2 reads it), its gradient into d_gate/d_up, dg
        dg = cpu_glu.silu_backward(gate, up, dA, g.reshape(-1), dA, d_gate, d_up, need_dg, weight_a)
        del parts, saved_rows, gate, up
        if done_after_kernel is not None:
            done_after_kernel()
        _down_grads(G, dy_g, dA, dw2, db2)
        del dy_g
    elif saved_done is None:
        del gate, up
        a, act_gate = _activate_into(parts, spec, slots)
        _down_grads(G, dy_g, a, dw2, db2)
        del dy_g
        dg = a.mul_(dA).sum(-1, dtype=torch.float32) if need_dg else None
        del a
        _activation_backward(parts, dA.mul_(g), spec, act_gate, out=slots)
    else:
        del gate, up
        a, act_gate = _activate_into(parts, spec, slots)
        dg = (dA * a).sum(-1, dtype=torch.float32) if need_dg else None
        grad_out = (dA,) + slots[1:]   # the activation (slots[0]) is read by dW2 below
        _activation_backward(parts, dA.mul_(g), spec, act_gate, out=grad_out)
        del parts, saved_rows
        saved_done()
        _down_grads(G, dy_g, a, dw2, db2)
        del dy_g, a
        if spec.glu == "separate" or not spec.gated:
            dh_parts = grad_out
        else:
            slots[0].copy_(dA)
    del dA, d_gate, d_up, slots
    if need_dg:
        if dg_b2 is not None:
            dg += dg_b2
        dweights_N.index_copy_(0, G.order_n, _as(G.to_sorted(dg), dweights_N.dtype))
    if dx_TD is not None:
        dxs = G.mm(dh_parts[0], w1)
        if spec.glu == "separate":
            G.mm_add_(dxs, dh_parts[1], w3)
        G.scatter_add(dxs, dx_TD)
        del dxs
    if dw1 is not None:
        xs = G.gather(x_TD)
        dh_parts = list(dh_parts)
        for dw, db in ((dw1, db1), (dw3, db3))[:len(dh_parts)]:
            dh = dh_parts.pop(0)   # dropped once used: dW3 is allocated with one [n, F] fewer alive
            G.wgrad(dh, xs, dw)
            if db is not None:
                G.segment_sum(dh, db)
            del dh
    if done_at_end is not None:
        del dh_parts
        done_at_end()
