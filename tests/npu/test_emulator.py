"""Each emulated torch_npu op against its documented behaviour.

The expected values come from the documentation, not from the emulator's code: the formulas of the torch-npu
2.13 ``_op_plugin_docs.py`` (init_routing's ``expanded_row_idx[sorted_row_idx[i]] = i``, finalize's sum), the
"equivalent computation logic" the op-plugin docs give for npu_moe_gating_top_k, the op-plugin test's reference
loop for npu_moe_re_routing, and autograd for the backward op. Documented constraints must raise.
"""

import pytest
import torch
import torch.nn.functional as F


def test_gating_top_k_softmax_values_ids_and_column_major_row_idx(npu_emulator):
    x = torch.randn(7, 9, dtype=torch.bfloat16)
    y, ids, row_idx = npu_emulator.npu_moe_gating_top_k_softmax(x, None, k=3)
    p = torch.softmax(x.float(), -1)
    assert y.dtype == torch.bfloat16 and ids.dtype == row_idx.dtype == torch.int32
    assert torch.equal(ids.long(), p.topk(3).indices)
    torch.testing.assert_close(y, p.topk(3).values.to(torch.bfloat16))
    assert row_idx.tolist() == [[j * 7 + i for j in range(3)] for i in range(7)]
    finished = torch.tensor([True, False, False, False, False, False, True])
    _, ids_f, _ = npu_emulator.npu_moe_gating_top_k_softmax(x, finished, k=3)
    assert (ids_f[0] == 9).all() and (ids_f[6] == 9).all() and torch.equal(ids_f[1:6], ids[1:6])


def test_gating_top_k_softmax_ties_go_to_the_lower_index_and_k_is_limited(npu_emulator):
    x = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0]])
    _, ids, _ = npu_emulator.npu_moe_gating_top_k_softmax(x, k=2)
    assert ids.tolist() == [[1, 2]]
    with pytest.raises(RuntimeError, match="k="):
        npu_emulator.npu_moe_gating_top_k_softmax(torch.randn(2, 4), k=5)


def _gating_top_k_doc_reference(x, k, bias, k_group, group_count, group_select_mode, norm_type,
                                routed_scaling_factor, eps):
    """The op-plugin docs' 'equivalent computation logic' for npu_moe_gating_top_k (numpy -> torch)."""
    x = x.float()
    if norm_type == 0:
        x = torch.exp(x - torch.log(torch.exp(x).sum(-1, keepdim=True)))
    else:
        x = 1 / (1 + torch.exp(-x))
    original_x = x
    if bias is not None:
        x = x + bias.float()
    if group_count > 1:
        x = x.reshape(x.shape[0], group_count, -1)
        if group_select_mode == 0:
            group_x = x.amax(-1)
        else:
            group_x = x.sort(-1).values[..., -2:].sum(-1)
        indices = torch.argsort(-group_x, dim=-1, stable=True)[:, :k_group]
        mask = torch.ones(x.shape[0], group_count, dtype=torch.bool)
        mask[torch.arange(x.shape[0])[:, None], indices] = False
        x = torch.where(mask[..., None], float("-inf"), x).reshape(x.shape[0], -1)
    indices = torch.argsort(-x, dim=-1, stable=True)[:, :k]
    y = original_x.gather(1, indices)
    if norm_type == 1:
        y = y / (y.sum(-1, keepdim=True) + eps)
    return y * routed_scaling_factor, indices, original_x


@pytest.mark.parametrize("norm_type,groups,k_group,mode,bias,scale", [
    (1, 8, 4, 1, True, 2.5), (1, 1, 1, 0, False, 1.0), (0, 4, 2, 0, True, 1.0), (0, 1, 1, 0, True, 0.5)])
def test_gating_top_k_matches_the_documented_logic(npu_emulator, norm_type, groups, k_group, mode, bias, scale):
    x = torch.randn(11, 32)
    b = torch.randn(32) * 0.1 if bias else None
    y, ids, norm = npu_emulator.npu_moe_gating_top_k(
        x, 4, bias=b, k_group=k_group, group_count=groups, group_select_mode=mode, norm_type=norm_type,
        out_flag=True, routed_scaling_factor=scale, eps=1e-20)
    y_ref, ids_ref, norm_ref = _gating_top_k_doc_reference(x, 4, b, k_group, groups, mode, norm_type, scale, 1e-20)
    assert ids.dtype == torch.int32 and norm.dtype == torch.float32 and y.dtype == x.dtype
    assert torch.equal(ids.long(), ids_ref)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(norm, norm_ref)
    _, _, undefined = npu_emulator.npu_moe_gating_top_k(x, 4, norm_type=norm_type, out_flag=False)
    assert torch.isnan(undefined).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(group_count=16), "more than 2"), (dict(k=9, group_count=8, k_group=2), "k=9"),
    (dict(renorm=1), "renorm"), (dict(bias=torch.randn(32, dtype=torch.float64)), "bias")])
def test_gating_top_k_rejects_what_the_docs_forbid(npu_emulator, kwargs, match):
    kwargs = {"k": 2, **kwargs}
    with pytest.raises(RuntimeError, match=match):
        npu_emulator.npu_moe_gating_top_k(torch.randn(3, 32), kwargs.pop("k"), **kwargs)


def test_gating_top_k_backward_is_the_gradient_of_sigmoid_renorm_scale(npu_emulator):
    x = torch.randn(6, 16, dtype=torch.float64, requires_grad=True)
    ids = torch.randn(6, 16).topk(3).indices
    s = torch.sigmoid(x).gather(1, ids)
    y = 1.7 * s / (s.sum(-1, keepdim=True) + 1e-20)
    g = torch.randn(6, 3, dtype=torch.float64)
    (want,) = torch.autograd.grad(y, x, g)
    got = npu_emulator.npu_moe_gating_top_k_backward(torch.sigmoid(x.detach()).float(), g.float(), ids.int(),
                                                     norm_type=1, routed_scaling_factor=1.7)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    with pytest.raises(RuntimeError, match="sigmoid"):
        npu_emulator.npu_moe_gating_top_k_backward(torch.rand(6, 16), g.float(), ids.int(), norm_type=0)


def _init_routing_doc(x, expert_idx, start, end):
    """The docs' formula: sorted_expert, sorted_row = keyValueSort(expert_idx (flat, row-major));
    expanded_row_idx[sorted_row[i]] = i; expanded_x[i] = x[sorted_row[i] // K]; only ids in [start, end)."""
    N, K = expert_idx.shape
    pairs = sorted((int(e), r) for r, e in enumerate(expert_idx.flatten().tolist()) if start <= e < end)
    row_idx = [-1] * (N * K)
    for i, (_, r) in enumerate(pairs):
        row_idx[r] = i
    xs = torch.stack([x[r // K] for _, r in pairs]) if pairs else x.new_zeros(0, x.shape[1])
    counts = [sum(1 for e, _ in pairs if e == j) for j in range(start, end)]
    return xs, row_idx, [r for _, r in pairs], counts


@pytest.mark.parametrize("rng_range", [None, (2, 5)])
def test_init_routing_v2_sorts_stably_and_indexes_as_documented(npu_emulator, rng_range):
    x = torch.randn(9, 6)
    ids = torch.randint(0, 7, (9, 3), dtype=torch.int32)
    start, end = rng_range or (0, 7)
    kw = dict(expert_num=7, expert_tokens_num_type=1, expert_tokens_num_flag=True,
              active_expert_range=list(rng_range) if rng_range else [])
    xs, row_idx, counts, scale = npu_emulator.npu_moe_init_routing_v2(x, ids, row_idx_type=0, **kw)
    xs_ref, row_ref, order_ref, counts_ref = _init_routing_doc(x, ids, start, end)
    n = len(order_ref)
    assert row_idx.dtype == torch.int32 and counts.dtype == torch.int64 and xs.shape == (27, 6)
    assert row_idx.tolist() == row_ref and counts.tolist() == counts_ref
    torch.testing.assert_close(xs[:n], xs_ref)
    assert torch.isnan(xs[n:]).all() and torch.isnan(scale).all()  # undefined outputs are poisoned
    _, scatter_idx, _, _ = npu_emulator.npu_moe_init_routing_v2(x, ids, row_idx_type=1, **kw)
    assert scatter_idx[:n].tolist() == order_ref
    _, _, kv, _ = npu_emulator.npu_moe_init_routing_v2(x, ids, row_idx_type=0, **{**kw, "expert_tokens_num_type": 2})
    pairs = [(e, c) for e, c in zip(range(start, end), counts_ref) if c]
    assert kv.shape == (7, 2) and kv[: len(pairs)].tolist() == [list(p) for p in pairs]
    if len(pairs) < 7:
        assert kv[len(pairs)].tolist() == [0, 0]


@pytest.mark.parametrize("kwargs,match", [
    (dict(drop_pad_mode=1), "drop_pad_mode"), (dict(expert_tokens_num_type=0), "expert_tokens_num_type"),
    (dict(expert_tokens_num_flag=False), "flag"), (dict(expert_num=3), "expert ids")])
def test_init_routing_v2_rejects_modes_the_2_13_docs_exclude(npu_emulator, kwargs, match):
    kw = {**dict(expert_num=7, expert_tokens_num_type=1, expert_tokens_num_flag=True), **kwargs}
    with pytest.raises(RuntimeError, match=match):
        npu_emulator.npu_moe_init_routing_v2(torch.randn(4, 3), torch.full((4, 2), 5, dtype=torch.int32), **kw)


@pytest.mark.parametrize("as_list,group_list_type", [(False, 0), (False, 1), (True, 1)])
def test_grouped_matmul_multiplies_each_group_by_its_k_by_n_weight(npu_emulator, as_list, group_list_type):
    counts = [3, 0, 5, 2]
    x = torch.randn(10, 8)
    w_NK = torch.randn(4, 6, 8)                    # nn.Linear layout: passed as transposed views [E, K, N]
    weight = [w.t() for w in w_NK] if as_list else [w_NK.transpose(1, 2)]
    gl = torch.tensor(counts if group_list_type else [3, 3, 8, 10], dtype=torch.int64)
    (y,) = npu_emulator.npu_grouped_matmul([x], weight, group_list=gl, split_item=3, group_type=0,
                                            group_list_type=group_list_type)
    want = torch.cat([x[s:s + c] @ w_NK[e].t() for e, (s, c) in enumerate(zip([0, 3, 3, 8], counts))])
    torch.testing.assert_close(y, want)
    with pytest.raises(RuntimeError, match="sum to M|end at M"):
        npu_emulator.npu_grouped_matmul([x], weight, group_list=gl - 1 if group_list_type else gl + 1,
                                        split_item=3, group_type=0, group_list_type=group_list_type)


def test_grouped_matmul_layout_rules(npu_emulator):
    x = torch.randn(4, 8)
    gl = torch.tensor([4], dtype=torch.int64)
    with pytest.raises(RuntimeError, match="transposed"):
        npu_emulator.npu_grouped_matmul([torch.randn(8, 4).t()], [torch.randn(1, 8, 5)], group_list=gl,
                                        split_item=3, group_type=0, group_list_type=1)
    with pytest.raises(RuntimeError, match="strides"):
        npu_emulator.npu_grouped_matmul([x], [torch.randn(1, 8, 10)[:, :, ::2]], group_list=gl, split_item=3,
                                        group_type=0, group_list_type=1)
    with pytest.raises(RuntimeError, match="128"):
        npu_emulator.npu_grouped_matmul([x], [torch.randn(8, 5)] * 129, group_list=torch.zeros(129, dtype=torch.int64),
                                        split_item=3, group_type=0, group_list_type=1)
    ys = npu_emulator.npu_grouped_matmul([x, x[:2]], [torch.randn(8, 3), torch.randn(8, 2)], split_item=0,
                                         group_type=-1)
    assert [tuple(y.shape) for y in ys] == [(4, 3), (2, 2)]


def test_swiglu_is_silu_of_the_first_half_times_the_second(npu_emulator):
    x = torch.randn(5, 12, dtype=torch.bfloat16)
    a, b = x.float().chunk(2, -1)
    torch.testing.assert_close(npu_emulator.npu_swiglu(x), (F.silu(a) * b).to(torch.bfloat16))


@pytest.mark.parametrize("mode", [0, 2])
def test_finalize_routing_is_the_documented_weighted_sum(npu_emulator, mode):
    N, K, H, E = 6, 3, 5, 4
    rows = torch.randn(N * K, H)
    perm = torch.randperm(N * K)
    src_to_dst_rowmajor = perm  # pair (i, j) -> row perm[i*K + j]
    idx = perm.view(N, K).t().reshape(-1) if mode == 0 else perm
    skip1, skip2, bias, scales = torch.randn(N, H), torch.randn(N, H), torch.randn(E, H), torch.randn(N, K)
    expert = torch.randint(0, E, (N, K), dtype=torch.int32)
    out = npu_emulator.npu_moe_finalize_routing(rows, skip1, skip2, bias, scales, idx.int(), expert,
                                                drop_pad_mode=mode, k=K)
    want = skip1 + skip2
    for i in range(N):
        for j in range(K):
            want[i] += scales[i, j] * (rows[src_to_dst_rowmajor[i * K + j]] + bias[expert[i, j]])
    torch.testing.assert_close(out, want)
    unscaled = npu_emulator.npu_moe_finalize_routing(rows, None, None, None, None, idx.int(), None,
                                                     drop_pad_mode=mode, k=K)
    torch.testing.assert_close(unscaled, rows[src_to_dst_rowmajor].view(N, K, H).sum(1))
    with pytest.raises(RuntimeError, match="skip1"):
        npu_emulator.npu_moe_finalize_routing(rows, skip1, None, None, scales, idx.int(), None, drop_pad_mode=mode)
    with pytest.raises(NotImplementedError):
        npu_emulator.npu_moe_finalize_routing(rows, None, None, None, scales, idx.int(), None, drop_pad_mode=1)


def test_re_routing_matches_the_op_plugin_reference_loop(npu_emulator):
    counts = torch.tensor([[2, 1, 3], [1, 4, 2]], dtype=torch.int32)   # [ranks, experts], rank-major arrival
    tokens = torch.randn(13, 8).to(torch.bfloat16)
    scales = torch.randn(13)
    out, out_scales, idx, per_expert = npu_emulator.npu_moe_re_routing(tokens, counts, per_token_scales=scales)
    want_idx, src = [None] * 13, 0
    offset = [0, int(counts[:, 0].sum()), int(counts[:, :2].sum())]
    for r in range(2):
        for e in range(3):
            for _ in range(int(counts[r, e])):
                want_idx[offset[e]] = src
                offset[e] += 1
                src += 1
    assert idx.dtype == torch.int32 and idx.tolist() == want_idx
    assert torch.equal(out, tokens[want_idx]) and torch.equal(out_scales, scales[want_idx])
    assert per_expert.tolist() == [3, 5, 5] and per_expert.dtype == torch.int32
    with pytest.raises(RuntimeError, match="float16/bfloat16"):
        npu_emulator.npu_moe_re_routing(tokens.float(), counts)
    with pytest.raises(RuntimeError, match="sum"):
        npu_emulator.npu_moe_re_routing(tokens[:12], counts)
