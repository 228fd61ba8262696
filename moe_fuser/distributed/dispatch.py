"""Token dispatch and combine for expert parallelism: the communication half of the EP op, apart from compute.

``TokenDispatcher`` moves routed tokens to the ranks that own their experts and the results back, over any
``torch.distributed`` backend (only ``all_to_all_single`` and ``all_gather`` are used, with ``async_op=True``).
The expert computation is a callback, so any lowering runs between dispatch and combine (vLLM's modular kernel,
torchtitan's token dispatcher). Metadata is frozen dataclasses: ``ChunkSplits`` (split sizes, from the counts
table), ``OriginPlan`` / ``GatewayPlan`` / ``ComputePlan`` (index tensors at the three roles a rank plays).

How a token travels (two levels; nodes are blocks of ``ranks_per_node`` consecutive ranks, ``Topology``):

    origin rank --A: inter-node, once per destination node--> gateway rank (same local index on that node)
    gateway     --B: intra-node, once per destination rank--> compute rank (owns some of the token's experts)
    compute: out_row = sum over the token's experts here of w_j * expert_j(x)      (partial result)
    compute     --B back--> gateway: sums the node's partials      --A back--> origin: sums the nodes' partials

A token's row crosses the inter-node link at most once per node and reaches each rank at most once, however many
of its top-k experts live there. With one node, level A is the identity (no collective); with one rank per node
level B is (the gateway computes itself). Pair metadata (row, expert, fp32 weight as int32 bits: 12 bytes per
routed pair) travels beside the rows; a dropped pair (id -1) travels nowhere.

Counts exchange: one ``all_gather`` of a fixed-size int64 row per rank: a header (configuration fingerprint,
compared field by field so that ranks configured differently fail with a ``ValueError`` naming the field) and,
per chunk, the rows and pairs this rank sends to each node and to each rank. From this table every rank derives
every split size of both levels for every chunk, so nothing else needs a host sync.

Overlap: the tokens are cut into C chunks (the max of the ranks' choices); later chunks are dispatched while
chunk c is computed, and chunk c's results travel back while chunk c+1 is computed (X' is X's way back):

    prologue: A(0), A(1), B(0)
    for c:    A(c+2); B(c+1) [needs A(c+1), for c >= 1]; compute(c) [needs B(c)], B'(c);
              B(1) [for c = 0: A(1) travelled during compute(0)]; A'(c) [needs B'(c): the node's partials]
    epilogue: the origin sums what came back

Each level runs on its own process group (one per node for B, one per local index for A; made once per group
when the EP group is the whole job), so a quick intra-node exchange never queues behind an inter-node one
(gloo runs a group's operations in order). Every rank issues the same collectives in the same order (the
schedule depends only on the shared table). Every wait has a timeout: a rank that died or stalls makes the
others raise ``ExpertParallelError`` naming the step, instead of hanging.

Legend: T tokens (this rank), K top-k, D model dim, W ranks in the group, N nodes, C chunks; R_* rows and n_*
pairs received at a level; rows are token rows, pairs are (token, expert) assignments.
"""

from __future__ import annotations

import datetime
import time
import zlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

from .placement import ExpertPlacement, Topology

__all__ = ["ChunkSplits", "ComputePlan", "DispatchPlan", "ExpertParallelError", "GatewayPlan", "OriginPlan",
           "TokenDispatcher", "traffic"]

MAX_CHUNKS = 16           # chunks per call; the counts row has a slot for each (it must have a fixed size)
HEADER_FIELDS = ("magic", "num_experts", "top_k", "hidden", "dtype", "expert_rows", "expert_cols",
                 "ranks_per_node", "placement", "expert_config", "chunks")
_MAGIC = 0x4D4F4545      # "MOEE": a peer running something else entirely shows up as a magic mismatch
_KINDS = 4               # per chunk: rows to node b, pairs to node b, rows to rank d, pairs to rank d

# What this process did in EP calls, for benchmarks: bytes it sent to other nodes / to its own node (forward +
# backward), calls of the exchange, seconds spent in the compute callbacks (the expert GEMMs).
traffic = {"inter_node_bytes": 0, "intra_node_bytes": 0, "calls": 0, "compute_seconds": 0.0}


_LEVEL_GROUPS: dict[tuple, dict] = {}


class ExpertParallelError(RuntimeError):
    """A collective of the EP exchange failed or did not finish in time (a peer died, stalls or diverged)."""


def _dtype_code(dtype: torch.dtype) -> int:
    return zlib.crc32(str(dtype).encode()) & 0x7FFFFFFF


@dataclass(frozen=True)
class ChunkSplits:
    """Split sizes (one entry per rank of the group) of one chunk at this rank, both directions."""

    a_send_rows: tuple[int, ...]
    a_send_pairs: tuple[int, ...]
    a_recv_rows: tuple[int, ...]
    a_recv_pairs: tuple[int, ...]
    b_send_rows: tuple[int, ...]
    b_send_pairs: tuple[int, ...]
    b_recv_rows: tuple[int, ...]
    b_recv_pairs: tuple[int, ...]
    two_level_b: bool   # False: one rank per node, the gateway is the compute rank (level B is the identity)

    @property
    def compute_rows(self) -> int:
        return sum(self.b_recv_rows) if self.two_level_b else sum(self.a_recv_rows)

    @property
    def compute_pairs(self) -> int:
        return sum(self.b_recv_pairs) if self.two_level_b else sum(self.a_recv_pairs)


@dataclass(frozen=True)
class OriginPlan:
    """At the token's home rank: ``tok_rows`` is the token of each level-A row sent (node-major, token order);
    ``tj_pairs`` the flat (t*K + j) of each pair sent; ``meta`` the pairs' (row, expert, weight bits)."""

    tok_rows: torch.Tensor
    tj_pairs: torch.Tensor
    meta: Optional[torch.Tensor]


@dataclass(frozen=True)
class GatewayPlan:
    """At a gateway: level-B row i forwards received level-A row ``row_src[i]``; pair j is A pair
    ``pair_src[j]``; ``meta`` the (row, local expert, weight bits) sent on."""

    row_src: torch.Tensor
    pair_src: torch.Tensor
    meta: Optional[torch.Tensor]


@dataclass(frozen=True)
class ComputePlan:
    """At a compute rank: pair i uses received row ``row_of_pair[i]``, local expert ``local_expert[i]`` with
    routing weight ``weight[i]`` (fp32)."""

    num_rows: int
    row_of_pair: torch.Tensor
    local_expert: torch.Tensor
    weight: torch.Tensor


@dataclass(frozen=True)
class DispatchPlan:
    table: torch.Tensor                       # [W, header + MAX_CHUNKS * 4 * W] int64, the gathered counts
    splits: tuple[ChunkSplits, ...]
    origin: tuple[OriginPlan, ...]
    gateway: tuple[Optional[GatewayPlan], ...]
    compute: tuple[Optional[ComputePlan], ...]

    @property
    def num_chunks(self) -> int:
        return len(self.splits)


Compute = Callable[[int, ComputePlan, torch.Tensor], tuple[torch.Tensor, Optional[torch.Tensor]]]


class TokenDispatcher:
    """Dispatch/combine for one process group, expert placement and node topology (see the module docstring).

    ``plan(...)`` runs the counts exchange and returns the origin side of a ``DispatchPlan``; ``run(...)`` moves
    rows through both levels, calling ``compute`` per chunk, and returns what came back at the origin.
    ``restore(...)`` rebuilds a full plan from the tensors ``pack(...)`` saved (the op's backward)."""

    def __init__(self, group: dist.ProcessGroup, placement: ExpertPlacement, topo: Topology, timeout_s: float):
        self.group_name = group.group_name   # no reference kept: destroy_process_group() stays effective
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.placement = placement
        self.topo = topo
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.timeout_s = timeout_s
        self.owner_E = torch.tensor(placement.owner, dtype=torch.int64)
        self.local_index_E = torch.tensor(placement.local_index(), dtype=torch.int64)
        self.node_of_rank_W = torch.arange(self.world) // topo.ranks_per_node
        self.peers = topo.peers(self.rank)
        self.node_ranks = topo.node_ranks(self.rank)
        self.level_a = topo.num_nodes > 1
        self.level_b = topo.ranks_per_node > 1
        self._groups: Optional[dict] = None

    def group(self) -> dist.ProcessGroup:
        return _resolve_process_group(self.group_name)

    # ---- collectives with bounded waits -------------------------------------------------------------------
    def _wait(self, work, what: str) -> None:
        try:
            work.wait(timeout=self.timeout)
        except RuntimeError as exc:
            raise ExpertParallelError(
                f"moe_fuser expert parallelism: {what} failed or did not finish within {self.timeout_s:g} s on "
                f"rank {self.rank} of {self.world}: a peer rank died, stalls, or stopped calling the MoE layer "
                f"(every rank must call it the same number of times). Cause: {exc}") from exc

    def _level_groups(self) -> None:
        """One process group per node (level B) and per local index (level A), made on first use: every rank
        creates all of them, in the same order (``new_group`` is collective). Their own queues keep a fast
        intra-node exchange from waiting behind inter-node ones (gloo runs a group's operations in order), and
        their all-to-alls involve only the ranks that exchange anything. ``new_group`` needs every process of
        the job: for an EP group smaller than the world both levels use the EP group itself (zero splits to
        the ranks outside the level)."""
        if self._groups is not None:
            return
        key = (self.group_name, self.world, self.rank, self.topo.ranks_per_node)
        if key in _LEVEL_GROUPS:     # shared by dispatchers of other placements: made once per group
            self._groups = _LEVEL_GROUPS[key]
            return
        parent = self.group()
        ranks = dist.get_process_group_ranks(parent)
        rpn, N = self.topo.ranks_per_node, self.topo.num_nodes
        if len(ranks) != dist.get_world_size():
            self._groups = _LEVEL_GROUPS[key] = {"A": parent, "B": parent}
            return
        groups = {}
        if self.level_b:
            for b in range(N):
                g = dist.new_group([ranks[b * rpn + i] for i in range(rpn)], timeout=self.timeout)
                if b == self.topo.node(self.rank):
                    groups["B"] = g
        if self.level_a:
            for i in range(rpn):
                g = dist.new_group([ranks[b * rpn + i] for b in range(N)], timeout=self.timeout)
                if i == self.rank % rpn:
                    groups["A"] = g
        self._groups = _LEVEL_GROUPS[key] = groups

    def _a2a(self, level: str, inp: torch.Tensor, send: Sequence[int], recv: Sequence[int],
             out: Optional[torch.Tensor] = None):
        """All-to-all within this rank's level-A (peers) or level-B (node) group; split sizes per group rank.
        Received into ``out`` when given (contiguous, ``sum(recv)`` rows), else into a fresh tensor."""
        self._level_groups()
        group = self._groups[level]
        if group is not self.group():
            members = self.peers if level == "A" else self.node_ranks
            send, recv = [send[r] for r in members], [recv[r] for r in members]
        if out is None:
            out = inp.new_empty((sum(recv),) + tuple(inp.shape[1:]))
        work = dist.all_to_all_single(out, inp.contiguous(), list(recv), list(send), group=group, async_op=True)
        return out, work

    # ---- counts exchange ------------------------------------------------------------------------------------
    def plan(self, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor, chunks: int,
             header: Sequence[int]) -> DispatchPlan:
        """Count what each chunk sends where, gather every rank's counts (checking the configuration
        fingerprint ``header``), and build the origin side of each chunk."""
        T, K = topk_ids_TK.shape
        W, N = self.world, self.topo.num_nodes
        chunks = max(1, min(chunks, MAX_CHUNKS, max(T, 1)))
        size = -(-T // chunks) if T else 0
        ids_N = topk_ids_TK.reshape(-1)
        valid_N = ids_N >= 0
        owner_N = torch.where(valid_N, self.owner_E[ids_N.clamp(min=0)], -1)
        node_N = torch.where(valid_N, self.node_of_rank_W[owner_N.clamp(min=0)], -1)
        tok_N = torch.arange(T * K) // K
        chunk_N = tok_N // max(size, 1)

        counts = torch.zeros(MAX_CHUNKS, _KINDS, W, dtype=torch.int64)
        hit_TW = torch.zeros(T, W, dtype=torch.bool)
        hit_TW[tok_N[valid_N], owner_N[valid_N]] = True
        hit_TN = torch.zeros(T, N, dtype=torch.bool)
        hit_TN[tok_N[valid_N], node_N[valid_N]] = True
        chunk_T = torch.arange(T) // max(size, 1)
        for kind, (hit, width) in ((0, (hit_TN, N)), (2, (hit_TW, W))):
            t_idx, col = hit.nonzero(as_tuple=True)
            counts[:, kind, :width] = torch.bincount(chunk_T[t_idx] * width + col,
                                                     minlength=MAX_CHUNKS * width).view(MAX_CHUNKS, width)
        for kind, (dest, width) in ((1, (node_N, N)), (3, (owner_N, W))):
            counts[:, kind, :width] = torch.bincount(chunk_N[valid_N] * width + dest[valid_N],
                                                     minlength=MAX_CHUNKS * width).view(MAX_CHUNKS, width)
        header = list(header[:-1]) + [chunks]
        row = torch.cat([torch.tensor(header, dtype=torch.int64), counts.flatten()])
        gathered = [torch.empty_like(row) for _ in range(W)]
        self._wait(dist.all_gather(gathered, row, group=self.group(), async_op=True), "the counts exchange")
        table = torch.stack(gathered)
        self._check_header(table)

        num_chunks = int(table[:, HEADER_FIELDS.index("chunks")].max())
        splits = self._splits(table, num_chunks)

        # Origin side: pairs sorted by (chunk, node, token, slot); rows = distinct (chunk, node, token), sorted.
        w_bits_N = topk_weights_TK.to(torch.float32).reshape(-1).contiguous().view(torch.int32)
        pair_N = valid_N.nonzero().squeeze(1)
        pair_N = pair_N[torch.argsort((chunk_N[pair_N] * N + node_N[pair_N]) * (T * K) + pair_N)]
        t_idx, b_idx = hit_TN.nonzero(as_tuple=True)
        section_R = chunk_T[t_idx] * N + b_idx
        row_order = torch.argsort(section_R * max(T, 1) + t_idx)
        rows_tok, section_R = t_idx[row_order], section_R[row_order]
        # a pair's row index within its (chunk, node) section of the rows
        row_pos_TN = torch.full((T, N), -1, dtype=torch.int64)
        row_pos_TN[rows_tok, b_idx[row_order]] = torch.arange(rows_tok.shape[0])
        section_size = torch.bincount(section_R, minlength=MAX_CHUNKS * N)
        section_start = torch.cumsum(section_size, 0) - section_size
        tok_P, node_P = tok_N[pair_N], node_N[pair_N]
        row_rel_P = row_pos_TN[tok_P, node_P] - section_start[chunk_N[pair_N] * N + node_P]
        meta_P3 = torch.stack([row_rel_P.to(torch.int32), ids_N[pair_N].to(torch.int32), w_bits_N[pair_N]], 1)

        origin = []
        r0 = p0 = 0
        for c in range(num_chunks):
            nr, np_ = sum(splits[c].a_send_rows), sum(splits[c].a_send_pairs)
            origin.append(OriginPlan(rows_tok[r0:r0 + nr], pair_N[p0:p0 + np_], meta_P3[p0:p0 + np_]))
            r0, p0 = r0 + nr, p0 + np_
        return DispatchPlan(table, tuple(splits), tuple(origin), (None,) * num_chunks, (None,) * num_chunks)

    def _check_header(self, table: torch.Tensor) -> None:
        hdr = table[:, : len(HEADER_FIELDS)].tolist()
        for i, name in enumerate(HEADER_FIELDS):
            if name == "chunks":
                continue
            values = [h[i] for h in hdr]
            if len(set(values)) > 1:
                per_rank = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
                what = {"dtype": "dtype (code)", "placement": "expert placement (crc)",
                        "expert_config": "expert activation/GLU/bias configuration (crc)",
                        "expert_rows": "w1 rows (F or 2F)", "expert_cols": "w2 columns (F)",
                        "hidden": "hidden size D"}.get(name, name)
                raise ValueError(f"moe_fuser expert parallelism: the ranks disagree on {what} ({per_rank}); "
                                 "every rank of the group must call the MoE layer with the same configuration")

    def _splits(self, table: torch.Tensor, num_chunks: int) -> list[ChunkSplits]:
        W, N, rpn = self.world, self.topo.num_nodes, self.topo.ranks_per_node
        counts = table[:, len(HEADER_FIELDS):].view(W, MAX_CHUNKS, _KINDS, W)
        r, node = self.rank, self.topo.node(self.rank)
        node_W = self.node_of_rank_W
        is_peer_W = torch.zeros(W, dtype=torch.bool)
        is_peer_W[self.peers] = True
        same_node_W = node_W == node
        out = []
        for c in range(num_chunks):
            cnt = counts[:, c]                                     # [src, kind, col]
            a_send = [torch.where(is_peer_W, cnt[r, k, node_W], 0) for k in (0, 1)]
            a_recv = [torch.where(is_peer_W, cnt[:, k, node], 0) for k in (0, 1)]
            # gateway g forwards, to rank d of its node, what g's peers (all nodes) send to d
            b_send, b_recv = [], []
            for k in (2, 3):
                via_peers_W = cnt[self.peers, k, :].sum(0)           # [d]
                b_send.append(torch.where(same_node_W, via_peers_W, 0))
                recv = torch.zeros(W, dtype=torch.int64)
                for g in self.node_ranks:
                    recv[g] = cnt[Topology(W, rpn).peers(g), k, r].sum()
                b_recv.append(recv)
            lists = [t.tolist() for t in (*a_send, *a_recv, *b_send, *b_recv)]
            out.append(ChunkSplits(*map(tuple, lists), two_level_b=self.level_b))
        del N
        return out

    def _count_traffic(self, splits: Sequence[ChunkSplits], row_bytes: int, dispatch_pair_bytes: int,
                       combine_pair_bytes: int) -> None:
        """Add the bytes this rank sends in one ``run``: rows both ways, pair payloads one way each."""
        node = self.topo.node(self.rank)
        for s in splits:
            for dst in range(self.world):
                if dst == self.rank:
                    continue
                a = (row_bytes * (s.a_send_rows[dst] + s.a_recv_rows[dst])
                     + dispatch_pair_bytes * s.a_send_pairs[dst] + combine_pair_bytes * s.a_recv_pairs[dst])
                b = 0
                if self.level_b:
                    b = (row_bytes * (s.b_send_rows[dst] + s.b_recv_rows[dst])
                         + dispatch_pair_bytes * s.b_send_pairs[dst] + combine_pair_bytes * s.b_recv_pairs[dst])
                if self.topo.node(dst) != node:
                    traffic["inter_node_bytes"] += a + b
                else:
                    traffic["intra_node_bytes"] += a + b

    # ---- the pipeline ------------------------------------------------------------------------------------
    def _gateway_plan(self, s: ChunkSplits, meta_A: torch.Tensor, num_rows_A: int) -> GatewayPlan:
        """Dedup the received A pairs per destination rank of this node; re-index them for level B."""
        rpn = self.topo.ranks_per_node
        row_abs = meta_A[:, 0].long() + _section_offsets(s.a_recv_rows, s.a_recv_pairs)
        expert = meta_A[:, 1].long()
        dest = self.owner_E[expert] - self.node_ranks[0]
        key = dest * max(num_rows_A, 1) + row_abs
        key_sorted, pair_src = torch.sort(key, stable=True)
        uniq, inverse = torch.unique_consecutive(key_sorted, return_inverse=True)
        row_src = uniq % max(num_rows_A, 1)
        rows_per_dest = torch.bincount(uniq // max(num_rows_A, 1), minlength=rpn)
        start = torch.cumsum(rows_per_dest, 0) - rows_per_dest
        row_rel = inverse - start[dest[pair_src]]
        meta_B = torch.stack([row_rel.to(torch.int32), self.local_index_E[expert[pair_src]].to(torch.int32),
                              meta_A[pair_src, 2]], 1)
        return GatewayPlan(row_src, pair_src, meta_B)

    def _compute_plan(self, rows: Sequence[int], pairs: Sequence[int], meta: torch.Tensor,
                      local: bool) -> ComputePlan:
        row_abs = meta[:, 0].long() + _section_offsets(rows, pairs)
        expert = meta[:, 1].long()
        if not local:
            expert = self.local_index_E[expert]
        weight = meta[:, 2].contiguous().view(torch.float32)
        return ComputePlan(sum(rows), row_abs, expert, weight)

    def run(self, plan: DispatchPlan, send_rows: Callable[[int], torch.Tensor], compute: Compute,
            recv_into: Optional[Callable[[int], torch.Tensor]] = None
            ) -> tuple[DispatchPlan, list[tuple[torch.Tensor, Optional[torch.Tensor]]]]:
        """Dispatch ``send_rows(c)`` (rows in ``plan.origin[c].tok_rows`` order) of every chunk, call
        ``compute(c, compute_plan, rows_received)`` -> ``(rows_back [R, D], pairs_back [n] or None)``, and
        combine. ``recv_into(c)``, when given, is the buffer (``[R, D]``, contiguous) that chunk c's rows are
        received into at the compute rank (the forward keeps them for backward without a copy). Returns the plan
        completed with its gateway and compute parts (built on the fly when the plan came from ``plan``) and,
        per chunk, ``(rows, pairs)`` back at the origin in ``tok_rows`` / ``tj_pairs`` order (rows summed over
        the node's ranks and pairs one per sent pair)."""
        C = plan.num_chunks
        building = plan.compute[0] is None if C else False
        gateway, comp = list(plan.gateway), list(plan.compute)
        a_in: dict[int, tuple] = {}
        b_in: dict[int, tuple] = {}
        b_back: dict[int, tuple] = {}
        a_back: dict[int, tuple] = {}
        results: list = [None] * C
        row_bytes = pair_bytes = 0

        def a_issue(c):
            nonlocal row_bytes
            s, o = plan.splits[c], plan.origin[c]
            rows = send_rows(c)
            row_bytes = rows.shape[1] * rows.element_size()
            meta = o.meta if building else None
            if not self.level_a:
                if recv_into is not None and not self.level_b:   # this rank computes its own rows
                    rows = recv_into(c).copy_(rows)
                a_in[c] = (rows, None, meta, None)
                return
            into = recv_into(c) if recv_into is not None and not self.level_b else None
            rows_in, w1 = self._a2a("A", rows, s.a_send_rows, s.a_recv_rows, out=into)
            meta_in, w2 = self._a2a("A", meta, s.a_send_pairs, s.a_recv_pairs) if meta is not None else (None, None)
            a_in[c] = (rows_in, w1, meta_in, w2)

        def b_issue(c):
            s = plan.splits[c]
            rows_A, w1, meta_A, w2 = a_in.pop(c)
            for w in (w1, w2):
                if w is not None:
                    self._wait(w, f"the inter-node dispatch of chunk {c}")
            if not self.level_b:
                if building:
                    comp[c] = self._compute_plan(s.a_recv_rows, s.a_recv_pairs, meta_A, local=False)
                b_in[c] = (rows_A, None, None, None)
                return
            if building:
                gateway[c] = self._gateway_plan(s, meta_A, rows_A.shape[0])
            g = gateway[c]
            rows_B, w1 = self._a2a("B", rows_A.index_select(0, g.row_src), s.b_send_rows, s.b_recv_rows,
                                   out=None if recv_into is None else recv_into(c))
            meta_B, w2 = self._a2a("B", g.meta, s.b_send_pairs, s.b_recv_pairs) if building else (None, None)
            b_in[c] = (rows_B, w1, meta_B, w2)

        def compute_issue(c):
            nonlocal pair_bytes
            s = plan.splits[c]
            rows, w1, meta, w2 = b_in.pop(c)
            for w in (w1, w2):
                if w is not None:
                    self._wait(w, f"the intra-node dispatch of chunk {c}")
            if building and self.level_b:
                comp[c] = self._compute_plan(s.b_recv_rows, s.b_recv_pairs, meta, local=True)
            t0 = time.perf_counter()
            out_rows, out_pairs = compute(c, comp[c], rows)
            traffic["compute_seconds"] += time.perf_counter() - t0
            if out_pairs is not None:
                pair_bytes = out_pairs.element_size()
            if not self.level_b:
                b_back[c] = (out_rows, None, out_pairs, None)
                return
            r, w1 = self._a2a("B", out_rows, s.b_recv_rows, s.b_send_rows)
            p, w2 = (self._a2a("B", out_pairs, s.b_recv_pairs, s.b_send_pairs) if out_pairs is not None
                     else (None, None))
            b_back[c] = (r, w1, p, w2)

        def a_back_issue(c):
            s = plan.splits[c]
            rows, w1, pairs, w2 = b_back.pop(c)
            for w in (w1, w2):
                if w is not None:
                    self._wait(w, f"the intra-node combine of chunk {c}")
            if self.level_b:
                g = gateway[c]
                rows = rows.new_zeros((sum(s.a_recv_rows), rows.shape[1])).index_add_(0, g.row_src, rows)
                if pairs is not None:
                    pairs = pairs.new_empty(g.pair_src.shape[0]).index_copy_(0, g.pair_src, pairs)
            if not self.level_a:
                a_back[c] = (rows, None, pairs, None)
                return
            r, w1 = self._a2a("A", rows, s.a_recv_rows, s.a_send_rows)
            p, w2 = self._a2a("A", pairs, s.a_recv_pairs, s.a_send_pairs) if pairs is not None else (None, None)
            a_back[c] = (r, w1, p, w2)

        def finish(c):
            rows, w1, pairs, w2 = a_back.pop(c)
            for w in (w1, w2):
                if w is not None:
                    self._wait(w, f"the inter-node combine of chunk {c}")
            results[c] = (rows, pairs)

        if C:
            a_issue(0)
            if C > 1:
                a_issue(1)
            b_issue(0)
            for c in range(C):
                if c + 2 < C:
                    a_issue(c + 2)              # in flight during compute(c) and compute(c + 1)
                if 1 <= c < C - 1:
                    b_issue(c + 1)              # its A went out before compute(c - 1)
                compute_issue(c)
                if c == 0 and C > 1:
                    b_issue(1)                  # A(1) went out with A(0): let compute(0) cover it
                a_back_issue(c)                 # results onto the slow link as soon as the node has them
            for c in range(C):
                finish(c)
        self._count_traffic(plan.splits, row_bytes, 12 if building else 0, pair_bytes)
        traffic["calls"] += 1
        full = DispatchPlan(plan.table, plan.splits, plan.origin, tuple(gateway), tuple(comp))
        return full, results

    # ---- saving a plan for backward -------------------------------------------------------------------------
    def pack(self, plan: DispatchPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """(idx int64, weight fp32): every index tensor of the plan, concatenated chunk by chunk."""
        parts, weights = [], []
        for c in range(plan.num_chunks):
            o, g, p = plan.origin[c], plan.gateway[c], plan.compute[c]
            parts += [o.tok_rows, o.tj_pairs]
            if self.level_b:
                parts += [g.row_src, g.pair_src]
            parts += [p.row_of_pair, p.local_expert]
            weights.append(p.weight)
        idx = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
        w = torch.cat(weights) if weights else torch.zeros(0, dtype=torch.float32)
        return idx, w

    def restore(self, table: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> DispatchPlan:
        num_chunks = int(table[:, HEADER_FIELDS.index("chunks")].max())
        splits = self._splits(table, num_chunks)
        origin, gateway, comp = [], [], []
        i = j = 0

        def take(n):
            nonlocal i
            i += n
            return idx[i - n:i]

        for s in splits:
            origin.append(OriginPlan(take(sum(s.a_send_rows)), take(sum(s.a_send_pairs)), None))
            if self.level_b:
                gateway.append(GatewayPlan(take(sum(s.b_send_rows)), take(sum(s.a_recv_pairs)), None))
            else:
                gateway.append(None)
            n = s.compute_pairs
            comp.append(ComputePlan(s.compute_rows, take(n), take(n), weight[j:j + n]))
            j += n
        return DispatchPlan(table, tuple(splits), tuple(origin), tuple(gateway), tuple(comp))


def _section_offsets(rows: Sequence[int], pairs: Sequence[int]) -> torch.Tensor:
    """For pairs received in per-source sections, the row offset of each pair's source section."""
    rows_t = torch.tensor(list(rows), dtype=torch.int64)
    start = torch.cumsum(rows_t, 0) - rows_t
    return torch.repeat_interleave(start, torch.tensor(list(pairs), dtype=torch.int64))
