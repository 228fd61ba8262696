"""The Ascend NPU lowering: the fused MoE as torch_npu's fused MoE ops (the ops-transformer kernels).

Entry points: ``NpuLowering`` (registered as ``"npu"``; auto-selected for tensors on an ``npu`` device when
``torch_npu`` imports), its ``route`` (the routing hook ``moe_forward`` uses), ``explain_constraints`` (what runs
off the fused ops, and why, for the compiler's explain), ``npu_expert_parallel`` (expert parallelism) and
``get_inner_compiler`` (torchair's backend for ``torch.compile(..., backend="moe_fuser", options={"inner":
"npu"})``).

Single device, forward (``CHOICES`` holds every version-dependent argument, in one place):

    route:    npu_moe_gating_top_k_softmax (softmax routers)   or   npu_moe_gating_top_k (sigmoid / bias / groups)
              -> renormalise and scale in ATen where the op does not
    permute:  npu_moe_init_routing_v2(x, ids)   dropped pairs (capacity, id -1) become pseudo-expert E, so every
              row is defined and they sort last; per-expert counts (expert_tokens_num_type=1)
    experts:  npu_grouped_matmul(w1 [, w3]) -> npu_swiglu (SiLU-GLU; else ATen) -> npu_grouped_matmul(w2)
              weights are nn.Linear [E, out, in]: passed as transposed [E, in, out] *views* (K-by-N, no copy);
              group_list = counts (group_list_type=1), the dropped rows appended to the last group so the counts
              sum to the row count as documented (their output is multiplied by a zero weight)
    combine:  npu_moe_finalize_routing(rows, scales=weights, bias=b2, index)   with the column-major index and
              drop_pad_mode=0: the only form the torch-npu 2.13 docs allow (``CHOICES.finalize_drop_pad_mode=2``
              switches to the row-major index newer releases accept, saving a transpose)

Backward (our own: routing, permutation and finalize are documented for inference only): init_routing_v2 gathers
the output gradient in the forward's row order; grouped matmuls give dA = dy @ W2 and dx rows = dh @ W1 (the
nn.Linear layout already is K-by-N there); the activation's backward is ATen (``expert_activation_backward``);
finalize with unit scales sums each token's K dx rows; weight gradients are per-expert ATen matmuls after one
host sync of the counts (torch-npu 2.13 documents no K-grouped matmul). The gating ops get an autograd.Function:
``npu_moe_gating_top_k_backward`` for sigmoid routers, the softmax vector-Jacobian product in ATen otherwise.

Constraints are checked before lowering (``expert_constraints``, ``route_plan``, ``mc2_constraints``): dtypes
(fp16/bf16/fp32), group limits (<= 1024 groups for one 3D weight, <= 128 per-expert tensors), inner dims < 65536,
k limits, the gating op's group rules (E % groups == 0, more than 2 experts per group, E <= 2048), MC2's world
sizes, E divisible by ranks, K <= 16, hidden size, batch. A violated constraint selects the fallback (the ATen
lowering ``"cpu"`` for experts, ATen ``route`` for routing, all_to_all for EP), counted in ``FALLBACKS`` and
logged once on the ``moe_fuser`` logger; ``explain_constraints`` states the same decisions statically.

Expert parallelism (``npu_expert_parallel``, ``NpuLowering.expert_parallel``: ``ep_experts`` hands it every EP
call when this lowering is selected, in place of moe_fuser's own exchange): one all_gather checks that the ranks
agree on the configuration and on whether every rank can use ``npu_moe_distribute_dispatch_v2`` / ``combine_v2``
(MC2: its constraints hold, which includes "inference only", no dropped pairs and an HCCL communicator);
otherwise ``all_to_all_single`` + ``npu_moe_re_routing`` + the single-device ops, whose backward runs the exchange
in reverse, so training works with any placement (uneven included). Both are one custom op
(``moe_fuser::npu_ep_experts``, with a fake kernel and a backward op), so the layer traces under torch.compile.
The path taken is counted in ``EP_PATHS`` and logged once, each reason for leaving MC2 recorded like a fallback.

Compiling (``get_inner_compiler``): torchair in "reduce-overhead" (aclgraph) mode by default, since moe_fuser's
custom ops have meta kernels but no Ascend IR converters. Host syncs: none in the single-device forward; one in
its backward (the per-expert weight-gradient ranges); the EP exchange needs its split sizes on the host.

Testing without hardware: ``available`` accepts CPU tensors only when ``torch_npu`` is the test emulator
(``tests/npu_emulator``, marked ``EMULATOR = True``) *and* the environment sets ``MOE_FUSER_NPU_EMULATOR=1``.

Legend: T tokens, D model dim, F expert hidden dim, H = F or 2F (gated), E experts, K top-k, N = T*K rows
(pairs), L local experts, R rows received by this rank (EP), A MC2's padded receive rows.
"""

from __future__ import annotations

import datetime
import importlib
import logging
import os
import sys
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

from ..distributed.dispatch import ExpertParallelError
from ..distributed.ep_moe import DEFAULT_TIMEOUT_S
from ..ops.activations import expert_activation, expert_activation_backward
from ..ops.experts import _spec, _unpack_all, fake_weight_grads, pack_weights, register_ep_autograd
from ..ops.routing import renormalize, round_weights
from ..spec import ExpertSpec, MoESpec, RouterSpec

__all__ = ["CHOICES", "EP_PATHS", "FALLBACKS", "NpuLowering", "OpChoices", "explain_constraints",
           "expert_constraints", "get_inner_compiler", "mc2_constraints", "npu_expert_parallel", "route_plan"]

log = logging.getLogger("moe_fuser")

EMULATOR_ENV = "MOE_FUSER_NPU_EMULATOR"
NPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MC2_DTYPES = (torch.float16, torch.bfloat16)
RE_ROUTING_DTYPES = (torch.float16, torch.bfloat16)
INNER_LIMIT = 65536          # npu_grouped_matmul: every inner (last) dim must be below this
MAX_GROUPS_3D = 1024         # npu_grouped_matmul: groups for one [E, K, N] weight
MAX_GROUPS_LIST = 128        # npu_grouped_matmul: tensors in a weight list (per-expert ModuleList weights)
MAX_EXPERT_NUM = 10240       # npu_moe_init_routing_v2: expert_num (we pass E + 1)
SOFTMAX_TOPK_MAX_K = 1024    # npu_moe_gating_top_k_softmax
GATING_MAX_E = 2048          # npu_moe_gating_top_k
SIGMOID_EPS = 1e-20          # npu_moe_gating_top_k's default, equal to SIGMOID_RENORM_EPS


# ---------------------------------------------------------------------------------------------- torch_npu access

_import_error: Optional[str] = None


def torch_npu_module():
    """The ``torch_npu`` module, or None (the import error is kept for ``available``'s message)."""
    global _import_error
    mod = sys.modules.get("torch_npu")
    if mod is not None or _import_error is not None:
        return mod
    try:
        return importlib.import_module("torch_npu")
    except Exception as exc:  # without CANN the import fails with OSError (libhccl.so), not only ImportError
        _import_error = f"{type(exc).__name__}: {exc}"
        return None


def _emulated(mod) -> bool:
    return getattr(mod, "EMULATOR", False) is True and os.environ.get(EMULATOR_ENV) == "1"


# ------------------------------------------------------------------------------------- version-dependent choices

@dataclass(frozen=True)
class OpChoices:
    """Every argument whose portable value depends on the torch_npu / CANN release (NPU_OPS.md, "Version
    differences"). ``CHOICES`` is what the lowering passes; tests swap it to prove both index layouts."""

    expert_tokens_num_type: int = 1   # init_routing_v2 counts per expert (type 0, cumsum, is not in the 2.13 docs)
    group_list_type: int = 1          # grouped_matmul's group_list holds those counts as they are
    row_idx_type: int = 0             # init_routing_v2 expanded_row_idx: the row each flat pair (i*K + j) landed on
    finalize_drop_pad_mode: int = 0   # 0: column-major index i + j*N (every release); 2: row-major i*K + j (newer)

    def finalize_index(self, dst_N: torch.Tensor, T: int, K: int) -> torch.Tensor:
        """init_routing_v2's row-major destination index in the layout finalize_routing reads."""
        if self.finalize_drop_pad_mode == 0:
            return dst_N.view(T, K).t().reshape(-1)
        return dst_N


CHOICES = OpChoices()


# ------------------------------------------------------------------------------------------ constraints and plans

FALLBACKS: Counter = Counter()
"""``(stage, reason) -> count`` of every decision to leave the fused NPU ops at run time."""


def _record(stage: str, reasons: Sequence[str]) -> None:
    for reason in reasons:
        key = (stage, reason)
        if key not in FALLBACKS:
            log.info("moe_fuser npu: %s falls back: %s", stage, reason)
        FALLBACKS[key] += 1


def expert_constraints(spec: ExpertSpec, dtype: torch.dtype, hidden_size: int, ffn_size: int,
                       weights_as_list: bool = False) -> list[str]:
    """Why the expert part cannot run on the fused NPU ops (empty: it can)."""
    E = spec.num_experts
    H = 2 * ffn_size if spec.glu in ("concat", "interleaved") else ffn_size
    out = []
    if dtype not in NPU_DTYPES:
        out.append(f"dtype {dtype} is not supported by npu_grouped_matmul / npu_moe_init_routing_v2 "
                   "(float16, bfloat16, float32)")
    if weights_as_list and E > MAX_GROUPS_LIST:
        out.append(f"{E} per-expert weight tensors exceed npu_grouped_matmul's {MAX_GROUPS_LIST}-tensor list "
                   "(stack them into one [E, out, in] tensor)")
    if not weights_as_list and E > MAX_GROUPS_3D:
        out.append(f"E={E} exceeds npu_grouped_matmul's {MAX_GROUPS_3D} groups for one 3D weight")
    if E + 1 > MAX_EXPERT_NUM:
        out.append(f"E={E} exceeds npu_moe_init_routing_v2's expert_num limit {MAX_EXPERT_NUM - 1}")
    big = [name for name, v in (("D", hidden_size), ("H", H)) if v >= INNER_LIMIT]
    if big:
        out.append(f"{'/'.join(big)} >= {INNER_LIMIT}: npu_grouped_matmul's inner-dim limit")
    return out


def _activation_note(spec: ExpertSpec) -> Optional[str]:
    if spec.activation == "silu" and spec.glu in ("separate", "concat") and spec.limit is None:
        return None
    return (f"activation {spec.activation}{'-glu' if spec.gated else ''}"
            f"{' clamped at ' + repr(spec.limit) if spec.limit is not None and spec.activation != 'gpt_oss' else ''}"
            f"{' (' + spec.glu + ' gate/up)' if spec.glu == 'interleaved' else ''} runs as ATen ops between the "
            "grouped matmuls (npu_swiglu covers SiLU-GLU with gate and up halves)")


@dataclass(frozen=True)
class RoutePlan:
    """How routing runs on the gating ops: which op, its arguments, and what ATen adds afterwards."""

    op: str                      # "softmax_topk" (npu_moe_gating_top_k_softmax) or "gating_topk"
    k: int
    norm_type: int = 0           # gating_topk: 0 softmax, 1 sigmoid
    group_count: int = 1
    k_group: int = 1
    group_select_mode: int = 0
    op_scaling: float = 1.0      # routed_scaling_factor handed to the op (sigmoid only: it renormalises first)
    renorm_after: bool = False   # ATen renormalisation (softmax routers)
    scale_after: float = 1.0     # ATen scaling (softmax routers)


def route_plan(router: RouterSpec, num_experts: int, dtype: torch.dtype,
               has_bias: bool) -> tuple[Optional[RoutePlan], list[str]]:
    """The gating-op plan for this router, or (None, why it stays on ATen ``route``)."""
    if router.external:
        return None, []
    if router.first_max:
        return None, ["a top-1 by max/argmax (ties to the lowest expert id): the gating ops' tie order is topk's"]
    E, k = num_experts, router.top_k
    if dtype not in NPU_DTYPES:
        return None, [f"routing dtype {dtype} is not supported by the gating ops (float16, bfloat16, float32)"]
    if router.topk_first and router.scoring == "sigmoid":
        return None, ["top-k of the logits then a sigmoid of the k (Llama 4): no gating op computes it"]
    if router.topk_first or (router.scoring == "softmax" and router.num_groups == 1 and not has_bias):
        if k > SOFTMAX_TOPK_MAX_K:
            return None, [f"k={k} exceeds npu_moe_gating_top_k_softmax's limit {SOFTMAX_TOPK_MAX_K}"]
        # top-k of the logits, softmax over the k == softmax, top-k, renormalise
        return RoutePlan("softmax_topk", k, renorm_after=router.renormalize or router.topk_first,
                         scale_after=router.scaling_factor), []
    gc, kg = router.num_groups, router.topk_groups
    per_group = E // gc
    why = []
    if E > GATING_MAX_E:
        why.append(f"E={E} exceeds npu_moe_gating_top_k's {GATING_MAX_E} experts")
    if E % gc or per_group <= 2:
        why.append(f"npu_moe_gating_top_k needs more than 2 experts per group (E={E}, groups={gc})")
    elif -(-per_group // 32) * 32 * gc > GATING_MAX_E:
        why.append(f"npu_moe_gating_top_k needs align32(E/groups) * groups <= {GATING_MAX_E}")
    if k > per_group * kg:
        why.append(f"k={k} exceeds the {per_group * kg} experts of the selected groups")
    if router.scoring == "sigmoid" and router.renorm_min:
        why.append("sigmoid router with a clamped renormalisation sum: npu_moe_gating_top_k does not clamp it")
    if router.scoring == "sigmoid" and router.renormalize and router.eps != SIGMOID_EPS:
        why.append(f"sigmoid router renormalised with eps={router.eps:g}: npu_moe_gating_top_k adds {SIGMOID_EPS:g}")
    if router.scoring == "sigmoid" and not router.renormalize:
        why.append("sigmoid router without renormalisation: npu_moe_gating_top_k always renormalises sigmoid "
                   "weights")
    if why:
        return None, why
    mode = 0 if router.group_score == "max" else 1
    if router.scoring == "sigmoid":
        return RoutePlan("gating_topk", k, 1, gc, kg, mode, op_scaling=router.scaling_factor), []
    return RoutePlan("gating_topk", k, 0, gc, kg, mode, renorm_after=router.renormalize,
                     scale_after=router.scaling_factor), []


def _soc_family() -> Optional[str]:
    npu = torch_npu_module()
    try:
        name = npu.npu.get_device_name()
    except Exception:
        return None
    if name.startswith("Ascend910_93"):
        return "A3"
    if name.startswith("Ascend910B"):
        return "A2"
    return None


def mc2_constraints(num_experts: int, top_k: int, world_size: int, hidden_size: int, tokens_per_rank: int,
                    dtype: torch.dtype, training: bool, contiguous_even_placement: bool,
                    soc: Optional[str]) -> list[str]:
    """Why npu_moe_distribute_dispatch_v2 / combine_v2 cannot carry this layer (empty: they can). The limits are
    the intersection of dispatch's and combine's for the product (Atlas A2 / A3)."""
    E, K, R, Hd, BS = num_experts, top_k, world_size, hidden_size, tokens_per_rank
    why = []
    if training:
        why.append("MC2 dispatch/combine are documented for inference only (no backward)")
    if soc not in ("A2", "A3"):
        why.append("MC2 needs an Atlas A2 or A3 device")
        return why
    if dtype not in MC2_DTYPES:
        why.append(f"MC2 moves bfloat16/float16 tokens only, not {dtype}")
    if not contiguous_even_placement or E % R:
        why.append(f"MC2 needs E={E} divisible by the {R} ranks, expert e on rank e // (E/R)")
    if not 0 < K <= 16:
        why.append(f"MC2 needs K <= 16 (K={K})")
    local = E // R if R else 0
    if soc == "A3":
        if not 2 <= R <= 384:
            why.append(f"MC2 on Atlas A3 needs 2..384 ranks (got {R})")
        if not 1 <= E <= 512 or local * R > 1280:
            why.append(f"MC2 on Atlas A3 needs E <= 512 and local experts * ranks <= 1280 (E={E})")
        if not 1024 <= Hd <= 7168:
            why.append(f"MC2 on Atlas A3 needs hidden size in [1024, 7168] (got {Hd})")
        if not 0 < BS <= 512:
            why.append(f"MC2 on Atlas A3 needs 1..512 tokens per rank (got {BS})")
    else:
        if R not in (16, 32, 64):
            why.append(f"MC2 on Atlas A2 needs 16, 32 or 64 ranks (got {R})")
        if local > 24 or E > 512:
            why.append(f"MC2 on Atlas A2 needs E <= 512 and at most 24 experts per rank (E={E})")
        if not (0 < Hd <= 7168 and Hd % 32 == 0):
            why.append(f"MC2 on Atlas A2 needs hidden size <= 7168, a multiple of 32 (got {Hd})")
        if not 0 < BS <= 256:
            why.append(f"MC2 on Atlas A2 needs 1..256 tokens per rank (got {BS})")
    return why


def explain_constraints(spec: MoESpec, *, dtype: torch.dtype, hidden_size: int, ffn_size: int,
                        weights_as_list: bool = False, has_selection_bias: Optional[bool] = None,
                        ep_world_size: Optional[int] = None, tokens_per_rank: Optional[int] = None,
                        training: bool = False, soc: Optional[str] = None, ep_num_experts: Optional[int] = None,
                        ep_even_placement: bool = True) -> list[str]:
    """Each stage of ``spec`` that would leave torch_npu's fused MoE ops on an NPU, as "stage -> fallback: why"
    lines (empty: routing, permutation, expert matmuls and combine all run on the fused ops). ``dtype`` is the
    hidden states' dtype; routing runs in ``spec.router.dtype`` (promoted with it). Expert parallelism (MC2, or
    all_to_all_single + npu_moe_re_routing): ``ep_world_size`` ranks, ``ep_num_experts`` global experts when
    ``spec`` counts only the local ones, ``ep_even_placement``: expert e on rank e // (E / ranks) (MC2's
    layout); ``training``: a gradient may flow; ``soc``: "A2" / "A3" (the detected product by default)."""
    lines = []
    r = spec.router
    if not r.external:
        route_dtype = dtype if r.dtype is None else torch.promote_types(r.dtype, dtype)
        bias = r.selection_bias if has_selection_bias is None else has_selection_bias
        _, why = route_plan(r, spec.num_experts, route_dtype, bias)
        lines += [f"routing -> ATen route(): {w}" for w in why]
    why = expert_constraints(spec.experts, dtype, hidden_size, ffn_size, weights_as_list)
    lines += [f"experts -> ATen lowering 'cpu': {w}" for w in why]
    if not why and _activation_note(spec.experts):
        lines.append(f"experts -> ATen activation: {_activation_note(spec.experts)}")
    if ep_world_size is not None:
        why = mc2_constraints(ep_num_experts or spec.num_experts, spec.top_k, ep_world_size, hidden_size,
                              tokens_per_rank or 1, dtype, training, ep_even_placement,
                              _soc_family() if soc is None else soc)
        lines += [f"expert parallel -> all_to_all_single + npu_moe_re_routing: {w}" for w in why]
        if dtype not in RE_ROUTING_DTYPES:
            lines.append(f"expert parallel -> ATen regrouping: npu_moe_re_routing takes float16/bfloat16, not {dtype}")
    return lines


# ---------------------------------------------------------------------------------------------------- helpers

def _kn(ws) -> list[torch.Tensor]:
    """nn.Linear weights [E, out, in] (or E x [out, in]) as npu_grouped_matmul's K-by-N views [E, in, out]."""
    if isinstance(ws, torch.Tensor):
        return [ws.transpose(1, 2)]
    return [w.t() for w in ws]


def _as_is(ws) -> list[torch.Tensor]:
    """nn.Linear weights used as K-by-N directly (dy @ W: K = out, N = in), for the data gradients."""
    return [ws] if isinstance(ws, torch.Tensor) else list(ws)


def _stacked(bs) -> Optional[torch.Tensor]:
    if bs is None or isinstance(bs, torch.Tensor):
        return bs
    return torch.stack(list(bs))


def _gmm(npu, x_MK: torch.Tensor, weights: list[torch.Tensor], group_list_E: torch.Tensor) -> torch.Tensor:
    return npu.npu_grouped_matmul([x_MK.contiguous()], weights, group_list=group_list_E, split_item=3,
                                  group_type=0, group_list_type=CHOICES.group_list_type)[0]


def _group_list_covering(counts_E: torch.Tensor, rows: int) -> torch.Tensor:
    """Per-expert counts whose sum is exactly ``rows`` (as npu_grouped_matmul requires): the rows past the
    counted ones (dropped pairs, MC2 padding) join the last group. No host sync."""
    extra = rows - counts_E.sum()
    return torch.cat([counts_E[:-1], counts_E[-1:] + extra])


def _permute(npu, x_TD: torch.Tensor, ids32_TK: torch.Tensor, expert_num: int):
    """init_routing_v2 over ``expert_num`` experts: (rows [N, D] grouped by expert, destination row of each
    flat pair [N] int32, counts [expert_num] int64)."""
    rows, dst, counts, _ = npu.npu_moe_init_routing_v2(
        x_TD.contiguous(), ids32_TK, active_num=-1, expert_num=expert_num, drop_pad_mode=0,
        expert_tokens_num_type=CHOICES.expert_tokens_num_type, expert_tokens_num_flag=True, quant_mode=-1,
        active_expert_range=[0, expert_num], row_idx_type=CHOICES.row_idx_type)
    return rows, dst, counts


def _ids_dropped_last(topk_ids_TK: torch.Tensor, E: int) -> torch.Tensor:
    return torch.where(topk_ids_TK < 0, E, topk_ids_TK).to(torch.int32)


def _inverse(dst_N: torch.Tensor) -> torch.Tensor:
    """The flat pair on each row (the stable argsort of the ids), from the row of each pair."""
    dst = dst_N.long()
    return torch.empty_like(dst).scatter_(0, dst, torch.arange(dst.numel(), device=dst.device))


def _activation(npu, h_NH: torch.Tensor, spec: ExpertSpec) -> torch.Tensor:
    if _activation_note(spec) is None:
        return npu.npu_swiglu(h_NH, dim=-1)
    return expert_activation(h_NH, spec)


def _first_projection(npu, xs_ND, group_list, w1, w3, b1, b3, expert_N, spec: ExpertSpec) -> torch.Tensor:
    h_NH = _gmm(npu, xs_ND, _kn(w1), group_list)
    if b1 is not None:
        h_NH = h_NH + _stacked(b1)[expert_N]
    if spec.glu == "separate":
        u_NF = _gmm(npu, xs_ND, _kn(w3), group_list)
        if b3 is not None:
            u_NF = u_NF + _stacked(b3)[expert_N]
        h_NH = torch.cat([h_NH, u_NF], dim=1)
    return h_NH


def _expert_rows(ids32_TK: torch.Tensor, order_N: torch.Tensor, E: int) -> torch.Tensor:
    """Expert of each sorted row (dropped rows, pseudo-expert E, count as the last expert they ride with)."""
    return ids32_TK.flatten().long()[order_N].clamp(max=E - 1)


def _ranges(counts: list[int]):
    start = 0
    for e, c in enumerate(counts):
        if c:
            yield e, start, start + c
        start += c


def _zeros_like(ws):
    if ws is None:
        return None
    # contiguous, as the op's fake kernel declares, also for transposed-view weights (GPT-OSS layout)
    return ws.new_zeros(ws.shape) if isinstance(ws, torch.Tensor) else [w.new_zeros(w.shape) for w in ws]


def _weight_grads(xs_ND, a_NF, dy_ND, dh_NH, counts: list[int], w1, w2, w3, b1, b2, b3, spec: ExpertSpec):
    """Per-expert weight and bias gradients (ATen matmuls over each expert's contiguous rows)."""
    F_ = a_NF.shape[1]
    dw1, dw2, dw3 = _zeros_like(w1), _zeros_like(w2), _zeros_like(w3)
    db1, db2, db3 = _zeros_like(b1), _zeros_like(b2), _zeros_like(b3)
    for e, s, t in _ranges(counts):
        torch.mm(dy_ND[s:t].t(), a_NF[s:t], out=dw2[e])
        gate = dh_NH[s:t, :F_] if spec.glu == "separate" else dh_NH[s:t]
        torch.mm(gate.t(), xs_ND[s:t], out=dw1[e])
        if db1 is not None:
            db1[e].copy_(gate.sum(0))
        if spec.glu == "separate":
            torch.mm(dh_NH[s:t, F_:].t(), xs_ND[s:t], out=dw3[e])
            if db3 is not None:
                db3[e].copy_(dh_NH[s:t, F_:].sum(0))
        if db2 is not None:
            db2[e].copy_(dy_ND[s:t].sum(0))
    return [dw1, dw2, dw3, db1, db2, db3]


def _aten():
    from .cpu import CpuLowering
    return CpuLowering()


# ---------------------------------------------------------------------------------------------------- routing

class _NpuGating(torch.autograd.Function):
    """The gating op forward; its gradient w.r.t. the logits (the ops are documented without autograd, except
    npu_moe_gating_top_k whose backward op covers sigmoid scores)."""

    @staticmethod
    def forward(ctx, logits_TE, bias_E, plan: RoutePlan):
        npu = torch_npu_module()
        if plan.op == "softmax_topk":
            y_TK, ids_TK, _ = npu.npu_moe_gating_top_k_softmax(logits_TE, None, plan.k)
            norm_TE = None
        else:
            y_TK, ids_TK, norm_TE = npu.npu_moe_gating_top_k(
                logits_TE, plan.k, bias=bias_E, k_group=plan.k_group, group_count=plan.group_count,
                group_select_mode=plan.group_select_mode, renorm=0, norm_type=plan.norm_type, out_flag=True,
                routed_scaling_factor=plan.op_scaling, eps=SIGMOID_EPS)
        ctx.plan = plan
        ctx.save_for_backward(logits_TE, ids_TK, norm_TE)
        ctx.mark_non_differentiable(ids_TK)
        return y_TK, ids_TK

    @staticmethod
    def backward(ctx, grad_y_TK, _grad_ids):
        logits_TE, ids_TK, norm_TE = ctx.saved_tensors
        plan = ctx.plan
        if plan.op == "gating_topk" and plan.norm_type == 1:
            grad = torch_npu_module().npu_moe_gating_top_k_backward(
                norm_TE, grad_y_TK.contiguous(), ids_TK, renorm=0, norm_type=1,
                routed_scaling_factor=plan.op_scaling, eps=SIGMOID_EPS)
            return grad.to(logits_TE.dtype), None, None
        p_TE = torch.softmax(logits_TE.float(), dim=-1) if norm_TE is None else norm_TE
        g_TE = torch.zeros_like(p_TE).scatter_(1, ids_TK.long(), grad_y_TK.float() * plan.op_scaling)
        grad = p_TE * (g_TE - (g_TE * p_TE).sum(-1, keepdim=True))
        return grad.to(logits_TE.dtype), None, None


def npu_route(router_logits_TE: torch.Tensor, spec: RouterSpec, selection_bias_E: Optional[torch.Tensor]):
    """(topk_weights, topk_ids int64) from the gating ops, or None where ``route_plan`` says ATen."""
    dtype = router_logits_TE.dtype if spec.dtype is None else torch.promote_types(spec.dtype, router_logits_TE.dtype)
    E = router_logits_TE.shape[-1]
    plan, why = route_plan(spec, E, dtype, selection_bias_E is not None)
    if plan is not None and plan.op == "gating_topk" and selection_bias_E is not None \
            and selection_bias_E.dtype != dtype:
        plan, why = None, [f"a {selection_bias_E.dtype} selection bias on {dtype} scores selects in the promoted "
                           "dtype; the gating op would round the bias"]
    if plan is None:
        _record("routing", why)
        return None
    logits = router_logits_TE.to(dtype)
    bias = None if selection_bias_E is None else selection_bias_E.to(dtype)
    if plan.op == "softmax_topk":
        bias = None
    y_TK, ids_TK = _NpuGating.apply(logits, bias, plan)
    if plan.renorm_after:
        y_TK = renormalize(y_TK, spec)
    if plan.scale_after != 1.0:
        y_TK = y_TK * plan.scale_after
    return round_weights(y_TK, spec), ids_TK.long()


# ---------------------------------------------------------------------------------------------------- lowering

@torch.compiler.assume_constant_result
def _unavailable(device_type: str) -> str:
    """Why the lowering cannot run on ``device_type`` ("" if it can). Evaluated eagerly even while dynamo traces
    (the first look may import torch_npu)."""
    npu = torch_npu_module()
    if npu is None:
        return f"torch_npu cannot be imported ({_import_error}); install torch_npu and the CANN toolkit"
    if device_type == "npu" or (device_type == "cpu" and _emulated(npu)):
        return ""
    return f"the npu lowering runs on npu tensors, not {device_type}"


class NpuLowering:
    name = "npu"

    def available(self, device: torch.device) -> Optional[str]:
        return _unavailable(device.type) or None

    def route(self, router_logits_TE, spec: RouterSpec, selection_bias_E=None):
        return npu_route(router_logits_TE, spec, selection_bias_E)

    def expert_parallel(self, x_TD, topk_weights_TK, topk_ids_TK, w1, w2, w3=None, b1=None, b2=None, b3=None,
                        **kw):
        """The whole EP layer's expert part (``moe_fuser.distributed.ep_experts`` calls it instead of running its
        own exchange): ``npu_expert_parallel``."""
        return npu_expert_parallel(x_TD, topk_weights_TK, topk_ids_TK, w1, w2, w3, b1, b2, b3, **kw)

    @staticmethod
    def _reasons(x_TD, w1, w2, spec: ExpertSpec) -> list[str]:
        return expert_constraints(spec, x_TD.dtype, x_TD.shape[1], w2[0].shape[-1],
                                  weights_as_list=not isinstance(w1, torch.Tensor))

    def forward(self, x_TD, topk_weights_TK, topk_ids_TK, w1, w2, w3, b1, b2, b3, spec: ExpertSpec):
        reasons = self._reasons(x_TD, w1, w2, spec)
        if reasons or x_TD.shape[0] == 0:
            _record("experts", reasons)
            return _aten().forward(x_TD, topk_weights_TK, topk_ids_TK, w1, w2, w3, b1, b2, b3, spec)
        npu = torch_npu_module()
        T, K = topk_ids_TK.shape
        E = spec.num_experts
        ids32_TK = _ids_dropped_last(topk_ids_TK, E)
        xs_ND, dst_N, counts = _permute(npu, x_TD, ids32_TK, E + 1)
        group_list = _group_list_covering(counts[:E], T * K)
        order_N = _inverse(dst_N)
        expert_N = _expert_rows(ids32_TK, order_N, E) if b1 is not None or b3 is not None else None
        h_NH = _first_projection(npu, xs_ND, group_list, w1, w3, b1, b3, expert_N, spec)
        y_ND = _gmm(npu, _activation(npu, h_NH, spec), _kn(w2), group_list)
        scales_TK = (topk_weights_TK * (topk_ids_TK >= 0)).to(x_TD.dtype)
        bias_ids = ids32_TK.clamp(max=E - 1) if b2 is not None else None
        out_TD = npu.npu_moe_finalize_routing(y_ND, None, None, _stacked(b2), scales_TK,
                                              CHOICES.finalize_index(dst_N, T, K), bias_ids,
                                              drop_pad_mode=CHOICES.finalize_drop_pad_mode, k=K)
        return out_TD, h_NH, order_N

    def backward(self, grad_TD, x_TD, topk_weights_TK, topk_ids_TK, h_NH, order_N, w1, w2, w3, b1, b2, b3,
                 spec: ExpertSpec, needs_input_grad):
        if self._reasons(x_TD, w1, w2, spec) or x_TD.shape[0] == 0:
            return _aten().backward(grad_TD, x_TD, topk_weights_TK, topk_ids_TK, h_NH, order_N, w1, w2, w3, b1,
                                    b2, b3, spec, needs_input_grad)
        need_x, need_weights, need_w = needs_input_grad
        npu = torch_npu_module()
        T, K = topk_ids_TK.shape
        E = spec.num_experts
        F_ = w2[0].shape[-1]
        dtype = x_TD.dtype
        ids32_TK = _ids_dropped_last(topk_ids_TK, E)
        dy_ND, dst_N, counts = _permute(npu, grad_TD, ids32_TK, E + 1)
        group_list = _group_list_covering(counts[:E], T * K)
        keep_TK = topk_ids_TK >= 0
        g_N = (topk_weights_TK * keep_TK).flatten()[order_N]
        dA_NF = _gmm(npu, dy_ND, _as_is(w2), group_list)
        a_NF = _activation(npu, h_NH, spec)

        dweights_TK = None
        if need_weights:
            dg_N = (dA_NF.float() * a_NF.float()).sum(-1)
            if b2 is not None:
                dg_N = dg_N + (dy_ND.float() * _stacked(b2)[_expert_rows(ids32_TK, order_N, E)].float()).sum(-1)
            dg_N = dg_N * keep_TK.flatten()[order_N]
            dweights_TK = torch.zeros(T * K, dtype=topk_weights_TK.dtype, device=x_TD.device)
            dweights_TK = dweights_TK.index_copy_(0, order_N, dg_N.to(dweights_TK.dtype)).view(T, K)

        g_col = g_N.to(dtype).unsqueeze(1)
        dh_NH = expert_activation_backward(h_NH, dA_NF * g_col, spec)
        dy_ND = dy_ND * g_col

        dx_TD = None
        if need_x:
            if spec.glu == "separate":
                dxs_ND = _gmm(npu, dh_NH[:, :F_], _as_is(w1), group_list) + \
                    _gmm(npu, dh_NH[:, F_:], _as_is(w3), group_list)
            else:
                dxs_ND = _gmm(npu, dh_NH, _as_is(w1), group_list)
            dx_TD = npu.npu_moe_finalize_routing(dxs_ND, None, None, None, keep_TK.to(dtype),
                                                 CHOICES.finalize_index(dst_N, T, K), None,
                                                 drop_pad_mode=CHOICES.finalize_drop_pad_mode, k=K)
        grads_w = [None] * 6
        if need_w:
            xs_ND = _permute(npu, x_TD, ids32_TK, E + 1)[0]
            grads_w = _weight_grads(xs_ND, a_NF, dy_ND, dh_NH, counts[:E].tolist(), w1, w2, w3, b1, b2, b3, spec)
        return (dx_TD, dweights_TK, *grads_w)


# ------------------------------------------------------------------------------------------ expert parallelism

EP_PATHS: Counter = Counter()
"""``path -> count`` of expert-parallel layers ``npu_expert_parallel`` ran: ``"mc2"`` (dispatch_v2 /
combine_v2) or ``"all_to_all"`` (all_to_all_single + npu_moe_re_routing + the single-device ops)."""

_EP_PATH_NAMES = {"mc2": "MC2 (npu_moe_distribute_dispatch_v2 / npu_moe_distribute_combine_v2)",
                  "all_to_all": "all_to_all_single + npu_moe_re_routing + the single-device ops"}

# What every rank of the group must agree on (checked field by field before any token moves)
_EP_HEADER = ("num_experts", "top_k", "hidden", "dtype", "expert_cols", "placement", "expert_config")
_EP_FIELD_NAMES = {"hidden": "hidden size D", "dtype": "dtype (code)", "expert_cols": "w2 columns (F)",
                   "placement": "expert placement (crc)",
                   "expert_config": "expert activation/GLU/bias configuration (crc)"}


def _hccl_comm_name(group: dist.ProcessGroup) -> Optional[str]:
    """The HCCL communicator name MC2 ops take as ``group_ep`` (None where the group has none, e.g. gloo)."""
    npu = torch_npu_module()
    if _emulated(npu):
        return npu.comm_name(group)
    try:
        return group._get_backend(torch.device("npu")).get_hccl_comm_name(dist.get_rank())
    except Exception:
        return None


def _crc(value) -> int:
    return zlib.crc32(repr(value).encode()) & 0x7FFFFFFF


@dataclass(frozen=True)
class _EPLayout:
    """The group and the expert placement of one call, read from the owner tensor at run time."""

    group: dist.ProcessGroup
    world: int
    rank: int
    owners: tuple[int, ...]
    owner_splits: tuple[int, ...]     # experts per rank
    rank_major_E: torch.Tensor        # global id -> position in rank-major (owner, id) order

    @property
    def num_local(self) -> int:
        return self.owner_splits[self.rank]


def _num_held(w1: Sequence[torch.Tensor]) -> int:
    return w1[0].shape[0] if len(w1) == 1 and w1[0].dim() == 3 else len(w1)


def _layout(group_name: str, owner_E: torch.Tensor, w1: Sequence[torch.Tensor],
            device: torch.device) -> _EPLayout:
    """Checked before any collective: the owners name ranks of the group, and this rank holds its experts."""
    group = _resolve_process_group(group_name)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    owners = tuple(int(r) for r in owner_E.tolist())
    outside = sorted({r for r in owners if not 0 <= r < world})
    if outside:
        raise ValueError(f"expert_placement names ranks {outside}, outside the group of {world} ranks")
    held = _num_held(w1)
    mine = [e for e, r in enumerate(owners) if r == rank]
    if held != len(mine):
        raise ValueError(f"rank {rank} holds {held} experts but the placement gives it {len(mine)} (global ids "
                         f"{mine}); pass only this rank's experts' weights, in global-id order")
    E = len(owners)
    rank_major = sorted(range(E), key=lambda e: (owners[e], e))
    rank_major_E = torch.empty(E, dtype=torch.int64, device=device)
    rank_major_E[torch.tensor(rank_major, dtype=torch.int64, device=device)] = torch.arange(E, device=device)
    return _EPLayout(group, world, rank, owners, tuple(owners.count(r) for r in range(world)), rank_major_E)


def _wait(work, what: str, lay: _EPLayout, timeout_s: float) -> None:
    try:
        work.wait(timeout=datetime.timedelta(seconds=timeout_s))
    except RuntimeError as exc:
        raise ExpertParallelError(
            f"moe_fuser expert parallelism (npu): {what} failed or did not finish within {timeout_s:g} s on rank "
            f"{lay.rank} of {lay.world}: a peer rank died, stalls, or stopped calling the MoE layer (every rank "
            f"must call it the same number of times). Cause: {exc}") from exc


def _exchange(inp: torch.Tensor, send: Sequence[int], recv: Sequence[int], lay: _EPLayout, what: str,
              timeout_s: float) -> torch.Tensor:
    """all_to_all_single: ``send[r]`` rows of ``inp`` to rank r, ``recv[r]`` rows from it (bounded wait)."""
    out = inp.new_empty((sum(recv),) + tuple(inp.shape[1:]))
    work = dist.all_to_all_single(out, inp.contiguous(), list(recv), list(send), group=lay.group, async_op=True)
    _wait(work, what, lay, timeout_s)
    return out


def _agree(lay: _EPLayout, header: Sequence[int], mc2_ok: bool, T: int, device: torch.device,
           timeout_s: float) -> tuple[list, int]:
    """One all_gather: every rank's configuration (a mismatch raises a ValueError naming the field on every
    rank), whether it can use MC2, and its token count. Returns (ranks that cannot use MC2, the most tokens)."""
    row = torch.tensor([*header, int(mc2_ok), T], dtype=torch.int64, device=device)
    rows = [torch.empty_like(row) for _ in range(lay.world)]
    _wait(dist.all_gather(rows, row, group=lay.group, async_op=True), "the configuration exchange", lay,
          timeout_s)
    table = torch.stack(rows).tolist()
    for i, name in enumerate(_EP_HEADER):
        values = [r[i] for r in table]
        if len(set(values)) > 1:
            per_rank = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            raise ValueError(f"moe_fuser expert parallelism (npu): the ranks disagree on "
                             f"{_EP_FIELD_NAMES.get(name, name)} ({per_rank}); every rank of the group must call "
                             "the MoE layer with the same configuration")
    n = len(_EP_HEADER)
    return [r for r, row in enumerate(table) if not row[n]], max(row[n + 1] for row in table)


def _choose(path: str, reasons: Sequence[str]) -> None:
    """Count the EP path taken; log it (and each reason for leaving MC2) once per process."""
    if path not in EP_PATHS:
        log.info("moe_fuser npu: expert parallel over %s", _EP_PATH_NAMES[path])
    EP_PATHS[path] += 1
    _record("expert parallel", reasons)


def _local_rows_expert(counts_L: torch.Tensor, rows: int) -> torch.Tensor:
    """Local expert of each expert-major row (``counts_L`` covers ``rows``), without a host sync."""
    L = counts_L.shape[0]
    return torch.repeat_interleave(torch.arange(L, device=counts_L.device), counts_L, output_size=rows)


def _local_experts_forward(npu, rows_RD, counts_L, ws, spec: ExpertSpec):
    """Grouped experts on expert-major rows: (y [R, D] (+ b2), h [R, H], local expert of each row)."""
    w1, w2, w3, b1, b2, b3 = ws
    R = rows_RD.shape[0]
    group_list = _group_list_covering(counts_L, R)
    expert_R = _local_rows_expert(group_list, R) if any(b is not None for b in (b1, b2, b3)) else None
    h_RH = _first_projection(npu, rows_RD, group_list, w1, w3, b1, b3, expert_R, spec)
    y_RD = _gmm(npu, _activation(npu, h_RH, spec), _kn(w2), group_list)
    if b2 is not None:
        y_RD = y_RD + _stacked(b2)[expert_R]
    return y_RD, h_RH, expert_R


def _rank_major_ids(topk_ids_TK: torch.Tensor, lay: _EPLayout) -> torch.Tensor:
    """Expert ids renumbered rank-major (so init_routing_v2 groups the pairs by destination rank); dropped
    pairs (-1) become pseudo-expert E and sort last."""
    E = len(lay.owners)
    return torch.where(topk_ids_TK < 0, E, lay.rank_major_E[topk_ids_TK.clamp(min=0)]).to(torch.int32)


def _send_counts(counts: torch.Tensor, lay: _EPLayout) -> list[int]:
    """Pairs this rank sends to each rank, from init_routing_v2's rank-major per-expert counts."""
    E = len(lay.owners)
    return [int(c.sum()) for c in counts[:E].split(list(lay.owner_splits))]


def _first_width(ws, spec: ExpertSpec) -> int:
    F_ = ws[1][0].shape[-1] if not isinstance(ws[1], torch.Tensor) else ws[1].shape[-1]
    return 2 * F_ if spec.gated else F_


def _regroup(npu, rows_RD: torch.Tensor, recv_RL: torch.Tensor):
    """Rank-major received rows -> expert-major: (rows, gather index into the received rows, counts per local
    expert). npu_moe_re_routing where its documented limits hold (float16/bfloat16 tokens, H < 16384, counts
    > 0), else an ATen stable sort (recorded)."""
    world, L = recv_RL.shape
    counts_L = recv_RL.sum(0)
    why = []
    if rows_RD.dtype not in RE_ROUTING_DTYPES:
        why.append(f"npu_moe_re_routing takes float16/bfloat16 tokens, not {rows_RD.dtype}")
    if rows_RD.shape[1] >= 16384:
        why.append("npu_moe_re_routing needs the hidden size below 16384")
    if L and not bool((recv_RL > 0).all()):
        why.append("npu_moe_re_routing documents token counts > 0; some (rank, expert) pair received none")
    if not L:
        return rows_RD, torch.arange(rows_RD.shape[0], device=rows_RD.device), counts_L.long()
    if not why:
        rows, _, idx, counts = npu.npu_moe_re_routing(rows_RD, recv_RL, expert_token_num_type=1, idx_type=0)
        return rows, idx.long(), counts.long()
    _record("expert parallel", why)
    expert_R = torch.repeat_interleave(torch.arange(L, device=rows_RD.device).repeat(world), recv_RL.flatten())
    idx = torch.argsort(expert_R, stable=True)
    return rows_RD[idx], idx, counts_L.long()


def _mc2_experts(npu, x_TD, weights_TK, ids_TK, ws, spec: ExpertSpec, name: str, lay: _EPLayout,
                 global_bs: int, soc: str) -> torch.Tensor:
    """Inference EP over MC2: dispatch_v2 -> local grouped experts -> combine_v2 (rows within an expert arrive in
    an undocumented order; only the counts are used)."""
    E = len(lay.owners)
    ids32_TK = ids_TK.to(torch.int32)
    scales_TK = weights_TK.float()
    expand_x, _, assist, counts_L, recv_counts, _, expand_scales = npu.npu_moe_distribute_dispatch_v2(
        x_TD, ids32_TK, name, lay.world, lay.rank, E, expert_scales=scales_TK if soc == "A2" else None,
        global_bs=global_bs, expert_token_nums_type=1)
    y_AD, _, _ = _local_experts_forward(npu, expand_x, counts_L, ws, spec)
    return npu.npu_moe_distribute_combine_v2(
        y_AD, ids32_TK, assist, recv_counts, scales_TK, name, lay.world, lay.rank, E,
        expand_scales=expand_scales if soc == "A2" else None, global_bs=global_bs)


def _mc2_reasons(lay: _EPLayout, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, save: bool):
    """(why MC2 cannot carry this call on this rank, the HCCL communicator name, the Ascend product)."""
    E, (T, K) = len(lay.owners), topk_ids_TK.shape
    even = E % lay.world == 0 and all(r == e // (E // lay.world) for e, r in enumerate(lay.owners))
    soc = _soc_family()
    why = mc2_constraints(E, K, lay.world, x_TD.shape[1], T, x_TD.dtype, save, even, soc)
    if topk_ids_TK.numel() and bool((topk_ids_TK < 0).any()):
        why.append("MC2 dispatches every pair: dropped pairs (expert id -1) need the all_to_all path")
    name = _hccl_comm_name(lay.group)
    if name is None:
        why.append("the process group has no HCCL communicator (MC2 needs the hccl backend)")
    return why, name, soc


def _a2a_forward(npu, x_TD, weights_TK, ids_TK, ws, spec: ExpertSpec, lay: _EPLayout, timeout_s: float):
    """EP over all_to_all_single + npu_moe_re_routing + the single-device ops: (out, and what the backward
    needs: destination row of each pair, received rows (expert-major), their routing weights, the gather index
    from rank-major, received counts [world, L], first projection)."""
    T, K = ids_TK.shape
    E, L = len(lay.owners), lay.num_local
    rid32_TK = _rank_major_ids(ids_TK, lay)
    xs_ND, dst_N, counts = _permute(npu, x_TD, rid32_TK, E + 1)
    order_N = _inverse(dst_N)
    send = _send_counts(counts, lay)
    # rank r receives this rank's counts for r's experts -> [world, L], rank-major
    recv_RL = _exchange(counts[:E], lay.owner_splits, [L] * lay.world, lay, "the counts exchange",
                        timeout_s).view(lay.world, L)
    recv = recv_RL.sum(1).tolist() if L else [0] * lay.world
    n_kept = sum(send)
    g_N = (weights_TK * (ids_TK >= 0)).flatten()[order_N].float()
    rows_RD = _exchange(xs_ND[:n_kept], send, recv, lay, "the token dispatch", timeout_s)
    g_R = _exchange(g_N[:n_kept], send, recv, lay, "the routing-weight dispatch", timeout_s)
    rows_RD, perm_R, counts_L = _regroup(npu, rows_RD, recv_RL)
    g_R = g_R[perm_R]
    if L and rows_RD.shape[0]:
        y_RD, h_RH, _ = _local_experts_forward(npu, rows_RD, counts_L, ws, spec)
    else:
        y_RD = rows_RD.new_zeros(rows_RD.shape)
        h_RH = rows_RD.new_zeros(rows_RD.shape[0], _first_width(ws, spec))
    back_RD = torch.empty_like(y_RD).index_copy_(0, perm_R, y_RD)       # rank-major again
    y_kept = _exchange(back_RD, recv, send, lay, "the combine", timeout_s)
    y_ND = torch.cat([y_kept, y_kept.new_zeros(T * K - n_kept, y_kept.shape[1])])
    out_TD = npu.npu_moe_finalize_routing(y_ND, None, None, None, (weights_TK * (ids_TK >= 0)).to(x_TD.dtype),
                                          CHOICES.finalize_index(dst_N, T, K), None,
                                          drop_pad_mode=CHOICES.finalize_drop_pad_mode, k=K)
    return out_TD, dst_N.to(torch.int32), rows_RD, g_R, perm_R, recv_RL, h_RH


@torch.library.custom_op("moe_fuser::npu_ep_experts", mutates_args=())
def _npu_ep_op(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
               w1: list[torch.Tensor], w2: list[torch.Tensor], w3: list[torch.Tensor],
               b1: list[torch.Tensor], b2: list[torch.Tensor], b3: list[torch.Tensor],
               owner: torch.Tensor, group_name: str, activation: str, glu: str, alpha: float, limit: float,
               timeout_s: float, save: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                          torch.Tensor]:
    """The EP layer's expert part on Ascend: MC2 when every rank can use it, else all_to_all + re_routing.
    Outputs: out [T, D], then (only with ``save``) what the backward op needs."""
    npu = torch_npu_module()
    lay = _layout(group_name, owner, w1, x.device)
    ws = _unpack_all(w1, w2, w3, b1, b2, b3)
    spec = _spec(max(1, lay.num_local), activation, glu, bool(b1 or b2 or b3), alpha, limit)
    T, K = topk_ids.shape
    D = x.shape[1]
    why, name, soc = _mc2_reasons(lay, x, topk_ids, save)
    header = [len(lay.owners), K, D, _crc(x.dtype), w2[0].shape[-1], _crc(lay.owners),
              _crc((activation, glu, alpha, limit, bool(b1), bool(b2), bool(b3)))]
    refusing, most_tokens = _agree(lay, header, not why, T, x.device, timeout_s)
    if not refusing:
        _choose("mc2", [])
        out = _mc2_experts(npu, x, topk_weights, topk_ids, ws, spec, name, lay, most_tokens * lay.world, soc)
        return (out, topk_ids.new_zeros(0, dtype=torch.int32), x.new_zeros(0, D),
                topk_weights.new_zeros(0, dtype=torch.float32), topk_ids.new_zeros(0, dtype=torch.int64),
                topk_ids.new_zeros(0, lay.num_local, dtype=torch.int64), x.new_zeros(0, _first_width(ws, spec)))
    _choose("all_to_all", why or [f"rank(s) {refusing} cannot use MC2 (every rank must)"])
    out_TD, *kept = _a2a_forward(npu, x, topk_weights, topk_ids, ws, spec, lay, timeout_s)
    if save:
        return (out_TD, *kept)
    dst_N, rows_RD, g_R, perm_R, recv_RL, h_RH = kept
    return (out_TD, dst_N[:0], rows_RD[:0], g_R[:0], perm_R[:0], recv_RL[:0], h_RH[:0])


@_npu_ep_op.register_fake
def _(x, topk_weights, topk_ids, w1, w2, w3, b1, b2, b3, owner, group_name, activation, glu, alpha, limit,
      timeout_s, save):
    R = torch.library.get_ctx().new_dynamic_size()
    world = dist.get_world_size(_resolve_process_group(group_name))
    T, K = topk_ids.shape
    F_ = w2[0].shape[-1]
    return (x.new_empty(x.shape), topk_ids.new_empty((T * K if save else 0,), dtype=torch.int32),
            x.new_empty((R, x.shape[1])), topk_weights.new_empty((R,), dtype=torch.float32),
            topk_ids.new_empty((R,), dtype=torch.int64),
            topk_ids.new_empty((world if save else 0, _num_held(w1)), dtype=torch.int64),
            x.new_empty((R, 2 * F_ if glu else F_)))


@torch.library.custom_op("moe_fuser::npu_ep_experts_backward", mutates_args=())
def _npu_ep_backward_op(
        grad: torch.Tensor, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
        dst_N: torch.Tensor, rows_RD: torch.Tensor, g_R: torch.Tensor, perm_R: torch.Tensor, recv_RL: torch.Tensor,
        h_RH: torch.Tensor, w1: list[torch.Tensor], w2: list[torch.Tensor], w3: list[torch.Tensor],
        b1: list[torch.Tensor], b2: list[torch.Tensor], b3: list[torch.Tensor], owner: torch.Tensor,
        group_name: str, activation: str, glu: str, alpha: float, limit: float, timeout_s: float, need_w: bool
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor],
           list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """The all_to_all path's backward: the output gradient travels the tokens' way, input and routing-weight
    gradients come back, weight gradients stay on the experts' owner."""
    npu = torch_npu_module()
    lay = _layout(group_name, owner, w1, x.device)
    ws = _unpack_all(w1, w2, w3, b1, b2, b3)
    spec = _spec(max(1, lay.num_local), activation, glu, bool(b1 or b2 or b3), alpha, limit)
    _, w2_, w3_, _, b2_, _ = ws
    T, K = topk_ids.shape
    E, L = len(lay.owners), lay.num_local
    F_ = h_RH.shape[1] // 2 if spec.gated else h_RH.shape[1]
    order_N = _inverse(dst_N)
    dy_ND, _, counts = _permute(npu, grad.contiguous(), _rank_major_ids(topk_ids, lay), E + 1)
    send = _send_counts(counts, lay)
    recv = recv_RL.sum(1).tolist() if L else [0] * lay.world
    n_kept = sum(send)
    dy_RD = _exchange(dy_ND[:n_kept], send, recv, lay, "the gradient dispatch", timeout_s)[perm_R]
    R = dy_RD.shape[0]
    dxs_RD = torch.zeros_like(dy_RD)
    dg_R = g_R.new_zeros(R)
    grads_w = [_zeros_like(w) if need_w else None for w in ws]
    if L and R:
        counts_L = recv_RL.sum(0)
        group_list = _group_list_covering(counts_L, R)
        expert_R = _local_rows_expert(group_list, R)
        dA_RF = _gmm(npu, dy_RD, _as_is(w2_), group_list)
        a_RF = _activation(npu, h_RH, spec)
        dg_R = (dA_RF.float() * a_RF.float()).sum(-1)
        if b2_ is not None:
            dg_R = dg_R + (dy_RD.float() * _stacked(b2_)[expert_R].float()).sum(-1)
        g_col = g_R.to(dy_RD.dtype).unsqueeze(1)
        dh_RH = expert_activation_backward(h_RH, dA_RF * g_col, spec)
        dy_RD = dy_RD * g_col
        if spec.glu == "separate":
            dxs_RD = _gmm(npu, dh_RH[:, :F_], _as_is(ws[0]), group_list) + \
                _gmm(npu, dh_RH[:, F_:], _as_is(w3_), group_list)
        else:
            dxs_RD = _gmm(npu, dh_RH, _as_is(ws[0]), group_list)
        if need_w:
            grads_w = _weight_grads(rows_RD, a_RF, dy_RD, dh_RH, counts_L.tolist(), *ws, spec)
    back_RD = torch.empty_like(dxs_RD).index_copy_(0, perm_R, dxs_RD)
    back_R = torch.empty_like(dg_R).index_copy_(0, perm_R, dg_R)
    dxs_kept = _exchange(back_RD, recv, send, lay, "the input-gradient combine", timeout_s)
    dg_kept = _exchange(back_R, recv, send, lay, "the routing-weight-gradient combine", timeout_s)
    dxs_ND = torch.cat([dxs_kept, dxs_kept.new_zeros(T * K - n_kept, dxs_kept.shape[1])])
    dg_N = torch.cat([dg_kept, dg_kept.new_zeros(T * K - n_kept)])
    keep_TK = topk_ids >= 0
    dx_TD = npu.npu_moe_finalize_routing(dxs_ND, None, None, None, keep_TK.to(x.dtype),
                                         CHOICES.finalize_index(dst_N, T, K), None,
                                         drop_pad_mode=CHOICES.finalize_drop_pad_mode, k=K)
    dweights_TK = torch.zeros(T * K, dtype=torch.float32, device=x.device).index_copy_(0, order_N, dg_N)
    dweights_TK = (dweights_TK.view(T, K) * keep_TK).to(topk_weights.dtype)
    return (dx_TD, dweights_TK, *[pack_weights(g) for g in grads_w])


@_npu_ep_backward_op.register_fake
def _(grad, x, topk_weights, topk_ids, dst_N, rows_RD, g_R, perm_R, recv_RL, h_RH, w1, w2, w3, b1, b2, b3, owner,
      group_name, activation, glu, alpha, limit, timeout_s, need_w):
    return (x.new_empty(x.shape), topk_weights.new_empty(topk_weights.shape),
            *fake_weight_grads((w1, w2, w3, b1, b2, b3), need_w))


register_ep_autograd(_npu_ep_op, _npu_ep_backward_op)


def npu_expert_parallel(x_TD, topk_weights_TK, topk_ids_TK, w1, w2, w3=None, b1=None, b2=None, b3=None, *,
                        spec: ExpertSpec, group: dist.ProcessGroup, placement,
                        timeout_s: float = DEFAULT_TIMEOUT_S) -> torch.Tensor:
    """The expert part under expert parallelism on Ascend (same contract as
    ``moe_fuser.distributed.ep_experts``, which hands it every EP call when the npu lowering is selected): this
    rank's tokens with global expert ids, this rank's experts' weights (in global-id order); ``placement``: an
    ExpertPlacement or an integer tensor of owner ranks (read at each call). MC2 when ``mc2_constraints`` hold
    on every rank, else all_to_all_single + npu_moe_re_routing + the single-device ops; ``EP_PATHS`` counts
    the choice and the ``moe_fuser`` logger states it (with the reasons) once. One custom op (with a fake kernel
    and a backward op), so it traces under torch.compile. Ranks configured differently raise a ValueError; a
    peer that died or stalls makes the others raise ``ExpertParallelError`` within ``timeout_s`` (MC2's own
    collectives run under HCCL's timeouts)."""
    packed = [pack_weights(w) for w in (w1, w2, w3, b1, b2, b3)]
    # Keep what a backward needs only when a gradient can flow; MC2 is for inference only.
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (x_TD, topk_weights_TK, *sum(packed, [])))
    owner = placement if isinstance(placement, torch.Tensor) else torch.tensor(placement.owner, dtype=torch.int64)
    out = _npu_ep_op(x_TD, topk_weights_TK, topk_ids_TK, *packed, owner, group.group_name, spec.activation,
                     spec.glu or "", float(spec.alpha), spec.op_limit, float(timeout_s), save)
    return out[0]


# ------------------------------------------------------------------------------------------- inner compiler

def get_inner_compiler(options: Mapping) -> Callable:
    """torchair's dynamo backend, for the moe_fuser backend's ``options={"inner": "npu"}`` (``options`` here is its
    ``inner_options``). The mode defaults to "reduce-overhead" (aclgraph): moe_fuser's custom ops have the meta
    kernels that mode needs, but no Ascend IR converters, which "max-autotune" (GE graph) would. Override with
    ``{"mode": ...}`` or a full ``{"config": torchair.CompilerConfig()}``."""
    if torch_npu_module() is None:
        raise ValueError(f"options inner='npu' needs torch_npu and CANN ({_import_error}); install them, or use "
                         "inner='inductor'")
    try:
        import torchair
    except ImportError:  # older wheels expose it only as a submodule
        from torch_npu.dynamo import torchair
    unknown = set(options) - {"mode", "config"}
    if unknown:
        raise ValueError(f"inner_options {sorted(unknown)} are unknown for inner='npu'; use 'mode' "
                         "('reduce-overhead' or 'max-autotune') or 'config' (a torchair.CompilerConfig)")
    config = options.get("config")
    if config is None:
        config = torchair.CompilerConfig()
        config.mode = options.get("mode", "reduce-overhead")
    return torchair.get_npu_backend(compiler_config=config)
