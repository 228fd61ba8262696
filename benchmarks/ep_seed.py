"""The seed article's hand-written expert-parallel MoE layer, written the way users write it (the baseline).

Five steps, each waiting for the one before (SEED.md): gate -> top-k -> all-to-all dispatch of every (token,
slot) pair to the rank owning its expert (a token whose k experts share a rank travels k times) -> each local
expert's FFN on its rows -> all-to-all back -> weighted sum. Split sizes come from a counts all-to-all and
``.tolist()``. Experts are the seed's ``nn.Sequential(Linear(D, F), SiLU(), Linear(F, D))``, bias-free.

``collectives="inplace"``: the legacy in-place ``torch.distributed.all_to_all_single(out, in, out_splits,
in_splits)`` (no autograd: inference); ``"functional"``: ``_functional_collectives.all_to_all_single_autograd``
(trains). Used by ``bench_ep.py`` and by the compiler tests (``moe_fuser.patterns.expert_parallel`` must
recognise both forms).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn

__all__ = ["SeedEPMoE", "balanced_owners"]


def balanced_owners(num_experts: int, world: int) -> list[int]:
    """Owner rank of each expert: consecutive blocks, the first E % world ranks one more."""
    base, extra = divmod(num_experts, world)
    return [r for r in range(world) for _ in range(base + (r < extra))]


class SeedEPMoE(nn.Module):
    def __init__(self, d_model: int, d_ff: int, num_experts: int, top_k: int, group: dist.ProcessGroup,
                 collectives: str = "inplace"):
        super().__init__()
        self.top_k, self.group, self.collectives = top_k, group, collectives
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        owners = balanced_owners(num_experts, world)
        self.local_ids = [e for e, r in enumerate(owners) if r == rank]
        self.world = world
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(d_model, d_ff, bias=False), nn.SiLU(), nn.Linear(d_ff, d_model, bias=False))
            for _ in self.local_ids)
        self.register_buffer("owner", torch.tensor(owners), persistent=False)

    def _a2a(self, inp, out_splits, in_splits):
        if self.collectives == "functional":
            return funcol.all_to_all_single_autograd(inp, out_splits, in_splits, self.group)
        out = inp.new_empty((sum(out_splits),) + tuple(inp.shape[1:]))
        dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, D = x.shape
        k = self.top_k
        # 1. gate (fp32, the seed's pitfall 3)
        probs = self.gate(x).float().softmax(dim=-1)
        weights, ids = probs.topk(k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        # 2. dispatch: pairs sorted by destination rank; counts first, then rows and expert ids
        flat_ids = ids.flatten()
        dest = self.owner[flat_ids]
        order = torch.argsort(dest, stable=True)
        send_counts = torch.histc(dest.float(), bins=self.world, min=0, max=self.world - 1).long()
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
        recv_x = self._a2a(x[order // k], recv_splits, send_splits)
        recv_ids = torch.empty(sum(recv_splits), dtype=flat_ids.dtype)
        dist.all_to_all_single(recv_ids, flat_ids[order], recv_splits, send_splits, group=self.group)
        # 3. experts, one after the other
        out = torch.zeros_like(recv_x)
        for i, e in enumerate(self.local_ids):
            rows = torch.where(recv_ids == e)[0]
            out = out.index_put((rows,), self.experts[i](recv_x[rows]).to(out.dtype))   # autocast: bf16 rows
        # 4. combine: back to the home ranks, 5. weighted sum
        back = self._a2a(out, send_splits, recv_splits)
        y = torch.empty_like(back).index_put((order,), back)
        return (y.view(T, k, D) * weights.unsqueeze(-1).to(y.dtype)).sum(dim=1)
