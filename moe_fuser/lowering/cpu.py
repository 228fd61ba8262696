"""The ATen lowering: sorted, grouped expert matmuls in plain ATen ops (the CPU fast path).

Named ``"cpu"`` because it is the CPU path, but it is plain ATen and runs on any device (the fallback that auto
selection uses where no device-specific lowering applies).

Forward, for T tokens routed to K experts each (N = T*K (token, slot) pairs):
1. one stable argsort of the flat expert ids groups the pairs by expert (dropped pairs, id -1, sort last);
   ``bincount(...).tolist()`` is the single host sync, giving each expert's contiguous row range;
2. one ``index_select`` gathers the token rows in that order: ``xs [n, D]``;
3. per expert, ``mm`` writes the first projection straight into its rows of ``h [N, H]`` (for separate w1/w3
   both halves land side by side, so the activation is one elementwise pass); fused gate_up weights make it a
   single GEMM per expert;
4. the activation, then per expert the second projection into ``y [n, D]``;
5. ``y *= routing weight`` in place and one ``index_add_`` combines into ``out [T, D]``: no ``[T, K, D]``
   tensor and no per-token weight copy.

Backward reuses the grouping (``order`` and ``h`` are the op's saved outputs): gather the output grad rows,
``dA = dy @ W2`` per expert, routing-weight grads as ``rowsum(dA * a) (+ dy . b2)`` (so ``y`` is never kept),
the activation's backward (``expert_activation_backward``), then ``dx``, ``dW1``/``dW3``,
``dW2`` and the biases as per-expert GEMMs and row sums. Weight grads of stacked weights are written into one
``[E, ...]`` tensor; per-expert lists get a list.

Legend: T tokens, D model dim, F expert hidden dim, H = F (plain) or 2F (gated), E experts, K top-k,
N = T*K pairs, n kept pairs.
"""

from __future__ import annotations

import torch

from ..ops.activations import expert_activation, expert_activation_backward
from ..spec import ExpertSpec

__all__ = ["CpuLowering", "sort_by_expert"]


def sort_by_expert(topk_ids_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, list[int]]:
    """Stable order of the flat (token, slot) pairs by expert id, dropped pairs (-1) last, and the per-expert
    counts as a Python list (the one host sync)."""
    flat = topk_ids_TK.flatten()
    key = torch.where(flat < 0, num_experts, flat)
    order_N = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts].tolist()
    return order_N, counts


def _ranges(counts: list[int]):
    start = 0
    for e, c in enumerate(counts):
        if c:
            yield e, start, start + c
        start += c


def _weight(ws, e):
    return None if ws is None else ws[e]


class CpuLowering:
    name = "cpu"

    def available(self, device: torch.device):
        return None

    def forward(self, x_TD, topk_weights_TK, topk_ids_TK, w1, w2, w3, b1, b2, b3, spec: ExpertSpec):
        T, K = topk_ids_TK.shape
        D = x_TD.shape[1]
        order_N, counts = sort_by_expert(topk_ids_TK, spec.num_experts)
        n = sum(counts)
        F_ = w2[0].shape[-1]
        H = 2 * F_ if spec.gated else F_
        tok_n = order_N[:n] // K
        xs = x_TD.index_select(0, tok_n)

        h_NH = torch.empty(T * K, H, dtype=x_TD.dtype, device=x_TD.device)
        h_NH[n:].zero_()
        for e, s, t in _ranges(counts):
            if spec.glu == "separate":
                torch.mm(xs[s:t], w1[e].t(), out=h_NH[s:t, :F_])
                torch.mm(xs[s:t], w3[e].t(), out=h_NH[s:t, F_:])
                if b3 is not None:
                    h_NH[s:t, F_:] += b3[e]
            else:
                torch.mm(xs[s:t], w1[e].t(), out=h_NH[s:t])
            if b1 is not None:
                h_NH[s:t, : w1[e].shape[0]] += b1[e]

        a_nF = expert_activation(h_NH[:n], spec)
        y_nD = torch.empty(n, D, dtype=x_TD.dtype, device=x_TD.device)
        for e, s, t in _ranges(counts):
            torch.mm(a_nF[s:t], w2[e].t(), out=y_nD[s:t])
            if b2 is not None:
                y_nD[s:t] += b2[e]
        y_nD.mul_(topk_weights_TK.flatten()[order_N[:n]].to(y_nD.dtype).unsqueeze(1))
        out_TD = torch.zeros_like(x_TD).index_add_(0, tok_n, y_nD)
        return out_TD, h_NH, order_N

    def backward(self, grad_TD, x_TD, topk_weights_TK, topk_ids_TK, h_NH, order_N, w1, w2, w3, b1, b2, b3,
                 spec: ExpertSpec, needs_input_grad):
        need_x, need_weights, need_w = needs_input_grad
        T, K = topk_ids_TK.shape
        D = x_TD.shape[1]
        counts = torch.bincount(torch.where(topk_ids_TK < 0, spec.num_experts, topk_ids_TK).flatten(),
                                minlength=spec.num_experts + 1)[: spec.num_experts].tolist()
        n = sum(counts)
        F_ = w2[0].shape[-1]
        order_n = order_N[:n]
        tok_n = order_n // K
        g_n = topk_weights_TK.flatten()[order_n]
        dy_nD = grad_TD.index_select(0, tok_n)

        dA_nF = torch.empty(n, F_, dtype=x_TD.dtype, device=x_TD.device)
        for e, s, t in _ranges(counts):
            torch.mm(dy_nD[s:t], w2[e], out=dA_nF[s:t])
        a_nF = expert_activation(h_NH[:n], spec)

        dweights_TK = None
        if need_weights:
            dg_n = (dA_nF.float() * a_nF.float()).sum(-1)
            if b2 is not None:
                b2_rows = torch.stack([b2[e] for e in range(spec.num_experts)]) if isinstance(b2, (list, tuple)) else b2
                e_n = topk_ids_TK.flatten()[order_n]
                dg_n = dg_n + (dy_nD.float() * b2_rows[e_n].float()).sum(-1)
            dweights_TK = torch.zeros(T * K, dtype=topk_weights_TK.dtype, device=x_TD.device)
            dweights_TK.index_copy_(0, order_n, dg_n.to(dweights_TK.dtype))
            dweights_TK = dweights_TK.view(T, K)

        g_col = g_n.to(x_TD.dtype).unsqueeze(1)
        dA_nF.mul_(g_col)
        dh_nH = expert_activation_backward(h_NH[:n], dA_nF, spec)
        dy_nD.mul_(g_col)

        dx_TD = None
        if need_x:
            dxs = torch.empty(n, D, dtype=x_TD.dtype, device=x_TD.device)
            for e, s, t in _ranges(counts):
                if spec.glu == "separate":
                    torch.mm(dh_nH[s:t, :F_], w1[e], out=dxs[s:t])
                    dxs[s:t].addmm_(dh_nH[s:t, F_:], w3[e])
                else:
                    torch.mm(dh_nH[s:t], w1[e], out=dxs[s:t])
            dx_TD = torch.zeros_like(x_TD).index_add_(0, tok_n, dxs)

        grads_w = [None] * 6
        if need_w:
            xs = x_TD.index_select(0, tok_n)
            dw1, dw2 = _zeros_like_weights(w1), _zeros_like_weights(w2)
            dw3 = _zeros_like_weights(w3)
            db1, db2, db3 = _zeros_like_weights(b1), _zeros_like_weights(b2), _zeros_like_weights(b3)
            for e, s, t in _ranges(counts):
                torch.mm(dy_nD[s:t].t(), a_nF[s:t], out=dw2[e])
                if spec.glu == "separate":
                    torch.mm(dh_nH[s:t, :F_].t(), xs[s:t], out=dw1[e])
                    torch.mm(dh_nH[s:t, F_:].t(), xs[s:t], out=dw3[e])
                    if db3 is not None:
                        db3[e].copy_(dh_nH[s:t, F_:].sum(0))
                    if db1 is not None:
                        db1[e].copy_(dh_nH[s:t, :F_].sum(0))
                else:
                    torch.mm(dh_nH[s:t].t(), xs[s:t], out=dw1[e])
                    if db1 is not None:
                        db1[e].copy_(dh_nH[s:t].sum(0))
                if db2 is not None:
                    db2[e].copy_(dy_nD[s:t].sum(0))
            grads_w = [dw1, dw2, dw3, db1, db2, db3]
        return (dx_TD, dweights_TK, *grads_w)


def _zeros_like_weights(ws):
    if ws is None:
        return None
    if isinstance(ws, torch.Tensor):
        return torch.zeros_like(ws)
    return [torch.zeros_like(w) for w in ws]
