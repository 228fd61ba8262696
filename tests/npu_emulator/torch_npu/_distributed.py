"""Emulated MC2 expert-parallel ops: ``npu_moe_distribute_dispatch_v2`` / ``npu_moe_distribute_combine_v2``.

The real ops fuse the EP all-to-all with the permutation inside HCCL; here they run over ``torch.distributed``
(gloo in the tests) on the process group whose "HCCL communicator name" is ``group_ep``. ``comm_name(group)``
stands in for ``group._get_backend(torch.device("npu")).get_hccl_comm_name(rank)`` and registers the group.

Documented behaviour kept: expert ``e`` lives on rank ``e // (moe_expert_num / ep_world_size)``; ``expand_x`` has
``A = global_bs * min(local_experts, K)`` rows (``global_bs`` 0 means BS * world and needs equal BS on every
rank), rows grouped by local expert with ``expert_token_nums`` (int64) giving the counts; rows past the received
ones are undefined (NaN). The docs leave the order of rows within one expert open and say that
``assist_info_for_combine`` / ``ep_recv_counts`` / ``expand_scales`` may only be handed to combine: the emulator
shuffles rows within each expert and encodes its own bookkeeping in ``assist_info_for_combine``. Combine sends each
row back along the dispatch path and returns ``out[t] = sum_j expert_scales[t, j] * row(t, j)`` in expand_x's
dtype. Constraints are checked for the product ``torch_npu.npu.get_device_name()`` reports (Atlas A3 by default,
Atlas A2 when it starts with ``Ascend910B``); quantisation, TP, shared-expert ranks, special experts, active masks
and elastic scaling are not emulated.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import npu
from ._routing import POISON_INDEX, check, not_emulated

_GROUPS: dict[str, dist.ProcessGroup] = {}


def comm_name(group: dist.ProcessGroup) -> str:
    name = f"emulated_hccl_{group.group_name}"
    _GROUPS[name] = group
    return name


def _product() -> str:
    name = npu.get_device_name()
    if name.startswith("Ascend910B"):
        return "A2"
    check(name.startswith("Ascend910_93"), f"device {name} has no MC2 dispatch/combine")
    return "A3"


def _group(group_ep: str, ep_world_size: int, ep_rank_id: int) -> dist.ProcessGroup:
    check(isinstance(group_ep, str) and 1 <= len(group_ep) < 128, "group_ep must be a communicator name")
    check(group_ep in _GROUPS, f"unknown communicator {group_ep!r}")
    g = _GROUPS[group_ep]
    check(dist.get_world_size(g) == ep_world_size and dist.get_rank(g) == ep_rank_id,
          f"ep_world_size/ep_rank_id ({ep_world_size}/{ep_rank_id}) do not match the group")
    return g


def _check_common(x_dtype, expert_ids, ep_world_size, moe_expert_num, H, kw, op: str, a3: dict, a2: dict):
    for name in ("x_active_mask", "elastic_info", "shared_expert_x", "performance_info"):
        if kw.get(name) is not None:
            not_emulated(f"{op}: {name}")
    if kw.get("tp_world_size", 0) not in (0, 1) or kw.get("group_tp", ""):
        not_emulated(f"{op}: TP communication")
    if kw.get("shared_expert_rank_num", 0) != 0 or any(kw.get(n, 0) for n in
                                                        ("zero_expert_num", "copy_expert_num", "const_expert_num")):
        not_emulated(f"{op}: shared-expert ranks and special experts")
    check(x_dtype in (torch.bfloat16, torch.float16), f"{op}: tokens must be bfloat16/float16, got {x_dtype}")
    check(expert_ids.dim() == 2 and expert_ids.dtype == torch.int32, f"{op}: expert_ids must be 2D int32")
    BS, K = expert_ids.shape
    check(0 < K <= 16 and K <= moe_expert_num, f"{op}: K={K} must lie in (0, 16] and not exceed moe_expert_num")
    check(moe_expert_num % ep_world_size == 0, f"{op}: moe_expert_num={moe_expert_num} must be divisible by "
          f"ep_world_size={ep_world_size}")
    local = moe_expert_num // ep_world_size
    limits = a3 if _product() == "A3" else a2
    check(limits["world"](ep_world_size), f"{op}: ep_world_size={ep_world_size} unsupported on {_product()}")
    check(1 <= moe_expert_num <= limits["E"], f"{op}: moe_expert_num={moe_expert_num} out of range")
    check(limits["local"](local, ep_world_size), f"{op}: {local} experts per rank unsupported on {_product()}")
    check(limits["H"](H), f"{op}: H={H} unsupported on {_product()}")
    check(0 < BS <= limits["BS"], f"{op}: BS={BS} must lie in (0, {limits['BS']}]")
    if expert_ids.numel():
        check(int(expert_ids.min()) >= 0 and int(expert_ids.max()) < moe_expert_num,
              f"{op}: expert ids must lie in [0, {moe_expert_num})")
        srt = expert_ids.sort(dim=1).values
        check(bool((srt[:, 1:] != srt[:, :-1]).all()), f"{op}: the K expert ids of a row must be distinct")
    return BS, K, local


_DISPATCH_A3 = dict(world=lambda w: 2 <= w <= 768, E=1024, local=lambda n, w: True,
                    H=lambda h: 1024 <= h <= 8192, BS=512)
_DISPATCH_A2 = dict(world=lambda w: w in (16, 32, 64, 128, 256), E=1024, local=lambda n, w: n <= 24,
                    H=lambda h: 0 < h <= 7168 and h % 32 == 0, BS=256)
_COMBINE_A3 = dict(world=lambda w: 2 <= w <= 384, E=512, local=lambda n, w: n * w <= 1280,
                   H=lambda h: 1024 <= h <= 7168, BS=512)
_COMBINE_A2 = dict(world=lambda w: w in (16, 32, 64), E=512, local=lambda n, w: n <= 24,
                   H=lambda h: 0 < h <= 7168 and h % 32 == 0, BS=256)


def _rows_a(group, BS: int, K: int, local: int, world: int, global_bs: int) -> int:
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([BS], dtype=torch.int64), group=group)
    max_bs = max(int(s) for s in sizes)
    if global_bs == 0:
        check(all(int(s) == BS for s in sizes), "global_bs=0 needs the same BS on every rank; pass "
              "global_bs = max_bs * ep_world_size")
        global_bs = BS * world
    else:
        check(global_bs == max_bs * world, f"global_bs={global_bs} must be max_bs * ep_world_size = {max_bs * world}")
    return global_bs * min(local, K)


def _exchange(group, world: int, send_counts: list[int], *tensors: torch.Tensor) -> tuple[list[int], list]:
    counts_in = torch.tensor(send_counts, dtype=torch.int64)
    counts_out = torch.empty_like(counts_in)
    dist.all_to_all_single(counts_out, counts_in, group=group)
    recv_counts = counts_out.tolist()
    out = []
    for t in tensors:
        r = t.new_empty((sum(recv_counts), *t.shape[1:]))
        dist.all_to_all_single(r, t.contiguous(), recv_counts, send_counts, group=group)
        out.append(r)
    return recv_counts, out


def npu_moe_distribute_dispatch_v2(x, expert_ids, group_ep, ep_world_size, ep_rank_id, moe_expert_num, *,
                                   scales=None, x_active_mask=None, expert_scales=None, elastic_info=None,
                                   group_tp="", tp_world_size=0, tp_rank_id=0, expert_shard_type=0,
                                   shared_expert_num=1, shared_expert_rank_num=0, quant_mode=0, global_bs=0,
                                   expert_token_nums_type=1, comm_alg="", zero_expert_num=0, copy_expert_num=0,
                                   const_expert_num=0):
    if quant_mode != 0 or scales is not None:
        not_emulated("dispatch quantisation (quant_mode / scales)")
    kw = dict(x_active_mask=x_active_mask, elastic_info=elastic_info, group_tp=group_tp,
              tp_world_size=tp_world_size, shared_expert_rank_num=shared_expert_rank_num,
              zero_expert_num=zero_expert_num, copy_expert_num=copy_expert_num, const_expert_num=const_expert_num)
    check(x.dim() == 2 and x.shape[0] == expert_ids.shape[0], "x must be [BS, H] like expert_ids' rows")
    BS, K, local = _check_common(x.dtype, expert_ids, ep_world_size, moe_expert_num, x.shape[1], kw, "dispatch_v2",
                                 _DISPATCH_A3, _DISPATCH_A2)
    check(expert_token_nums_type in (0, 1), "expert_token_nums_type must be 0 (cumsum) or 1 (counts)")
    a3 = _product() == "A3"
    if expert_scales is not None:
        check(not a3, "expert_scales is not supported on Atlas A3")
        check(expert_scales.shape == expert_ids.shape and expert_scales.dtype == torch.float32,
              "expert_scales must be float32 [BS, K]")
    group = _group(group_ep, ep_world_size, ep_rank_id)
    A = _rows_a(group, BS, K, local, ep_world_size, global_bs)
    H = x.shape[1]

    flat = expert_ids.flatten().long()
    order = torch.argsort(flat, stable=True)
    ids_sorted = flat[order]
    send_counts = torch.bincount(ids_sorted // local, minlength=ep_world_size).tolist()
    meta = torch.stack([torch.full_like(order, ep_rank_id), order // K, order % K, ids_sorted % local], dim=1)
    payload = [x[order // K], meta]
    if expert_scales is not None:
        payload.append(expert_scales.flatten()[order])
    _, received = _exchange(group, ep_world_size, send_counts, *payload)
    rows, rmeta = received[0], received[1]
    n = rows.shape[0]
    check(n <= A, f"received {n} rows but the output holds A={A}")
    # group by local expert; the order inside an expert is undocumented: shuffle it
    gen = torch.Generator().manual_seed(1000 + ep_rank_id)
    key = rmeta[:, 3].double() + torch.rand(n, generator=gen, dtype=torch.float64) * 0.5
    perm = torch.argsort(key)
    expand_x = torch.full((A, H), float("nan"), dtype=x.dtype)
    expand_x[:n] = rows[perm]
    assist = torch.full((A * 128,), POISON_INDEX, dtype=torch.int32)
    assist[0] = n
    assist[1 : 1 + 3 * n] = rmeta[perm, :3].flatten().int()
    counts = torch.bincount(rmeta[:, 3], minlength=local)
    expert_token_nums = counts if expert_token_nums_type == 1 else torch.cumsum(counts, 0)
    by_rank = torch.zeros(local, ep_world_size, dtype=torch.int64)
    by_rank.index_put_((rmeta[:, 3], rmeta[:, 0]), torch.ones(n, dtype=torch.int64), accumulate=True)
    ep_recv_counts = torch.cumsum(by_rank.flatten(), 0).int()
    if not a3:
        extra = 2 * (A // min(local, K)) * K * max(1, ep_world_size // 8)
        ep_recv_counts = torch.cat([ep_recv_counts, torch.zeros(extra, dtype=torch.int32)])
    expand_scales = torch.zeros(0, dtype=torch.float32)
    if expert_scales is not None:
        expand_scales = torch.full((A,), float("nan"), dtype=torch.float32)
        expand_scales[:n] = received[2][perm]
    return (expand_x, torch.zeros(0, dtype=torch.float32), assist, expert_token_nums.to(torch.int64),
            ep_recv_counts, torch.zeros(0, dtype=torch.int32), expand_scales)


def npu_moe_distribute_combine_v2(expand_x, expert_ids, assist_info_for_combine, ep_send_counts, expert_scales,
                                  group_ep, ep_world_size, ep_rank_id, moe_expert_num, *, tp_send_counts=None,
                                  x_active_mask=None, expand_scales=None, shared_expert_x=None, elastic_info=None,
                                  ori_x=None, const_expert_alpha_1=None, const_expert_alpha_2=None,
                                  const_expert_v=None, performance_info=None, group_tp="", tp_world_size=0,
                                  tp_rank_id=0, expert_shard_type=0, shared_expert_num=1, shared_expert_rank_num=0,
                                  global_bs=0, comm_quant_mode=0, comm_alg="", zero_expert_num=0, copy_expert_num=0,
                                  const_expert_num=0):
    if comm_quant_mode != 0:
        not_emulated("communication quantisation")
    kw = dict(x_active_mask=x_active_mask, elastic_info=elastic_info, shared_expert_x=shared_expert_x,
              performance_info=performance_info, group_tp=group_tp, tp_world_size=tp_world_size,
              shared_expert_rank_num=shared_expert_rank_num, zero_expert_num=zero_expert_num,
              copy_expert_num=copy_expert_num, const_expert_num=const_expert_num)
    check(expand_x.dim() == 2, "expand_x must be 2D [A, H]")
    BS, K, local = _check_common(expand_x.dtype, expert_ids, ep_world_size, moe_expert_num, expand_x.shape[1], kw,
                                 "combine_v2", _COMBINE_A3, _COMBINE_A2)
    check(expert_scales is not None and expert_scales.dtype == torch.float32
          and expert_scales.shape == expert_ids.shape, "expert_scales must be float32 [BS, K]")
    a3 = _product() == "A3"
    if a3:
        check(expand_scales is None, "expand_scales is not supported on Atlas A3")
        check(ep_send_counts.dim() == 1 and ep_send_counts.shape[0] == ep_world_size * local,
              "ep_send_counts must be dispatch's ep_recv_counts")
    else:
        check(expand_scales is not None, "expand_scales is required on Atlas A2")
    group = _group(group_ep, ep_world_size, ep_rank_id)
    A = _rows_a(group, BS, K, local, ep_world_size, global_bs)
    check(expand_x.shape[0] == A and assist_info_for_combine.shape[0] == A * 128,
          f"expand_x / assist_info_for_combine must have A={A} / A*128 entries")
    n = int(assist_info_for_combine[0])
    rmeta = assist_info_for_combine[1 : 1 + 3 * n].long().view(n, 3)
    order = torch.argsort(rmeta[:, 0], stable=True)
    send_counts = torch.bincount(rmeta[:, 0], minlength=ep_world_size).tolist()
    _, (rows, back) = _exchange(group, ep_world_size, send_counts, expand_x[:n][order], rmeta[order, 1:])
    out = torch.zeros(BS, expand_x.shape[1], dtype=torch.float32)
    w = expert_scales[back[:, 0], back[:, 1]].unsqueeze(1)
    out.index_add_(0, back[:, 0], rows.float() * w)
    return out.to(expand_x.dtype)
