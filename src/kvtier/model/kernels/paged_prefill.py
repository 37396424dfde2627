"""Paged prefill / extend attention in Triton: the new tokens of many sequences, in one flat batch,
attend causally to their cached prefix in the pool and to themselves, without gathering the prefix.

The new tokens' K/V must already be in the pool (the backend writes them first), so one loop over
the row's keys covers prefix and chunk alike. One program handles ``BLOCK_M`` query tokens of one
row and one KV head, with all the query heads of its GQA group: the tile's rows are (token, head)
pairs, ``BLOCK_M * GROUP_PAD`` of them, so every K/V tile read serves the whole group. Keys run
from the row's window start to the tile's last query position; the causal and window masks are
applied per element, so tiles need no alignment with the pool's pages.

A short extend over a long cached prefix (a 26-token follow-up to a 4k prompt) has few tiles: 16
programs for the 8B, each walking all 4k keys, 123 us a layer on an H200 where the bytes allow
~5. Such a batch also splits each tile's keys into ``NUM_SPLITS`` spans (split-K, as the decode
kernel does) and merges the spans' partial softmaxes with the decode kernel's combine step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvtier.model.kernels.paged_decode import (
    LOG2E,
    MAX_SPLITS,
    choose_splits,
    combine_splits,
    dot_precision,
    fp8_scales,
)


# Triton compiles one variant per "divisible by 16 / equal to 1" class of each integer argument:
# these change with every batch (the number of decode rows before the prefill rows, the block
# table's width), so specialising on them compiled new variants mid-serving (0.4 s each).
@triton.jit(do_not_specialize=["window", "row_offset", "stride_bt", "token_offset"])
def _prefill_kernel(
    q_ptr,
    k_cache,
    v_cache,
    block_tables,
    query_start,
    context_lens,
    out_ptr,
    mid_o,
    mid_lse,
    token_offset,
    k_scale,
    v_scale,
    sm_scale,
    window,
    row_offset,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_bt,
    stride_ot,
    stride_oh,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    FP8: tl.constexpr,
    PRECISION: tl.constexpr,
):
    row = tl.program_id(0) + row_offset
    tile = tl.program_id(1) // NUM_SPLITS
    split = tl.program_id(1) % NUM_SPLITS
    kvh = tl.program_id(2)
    q_lo = tl.load(query_start + row)
    qlen = tl.load(query_start + row + 1) - q_lo
    if tile * BLOCK_M < qlen:
        ctx = tl.load(context_lens + row)
        first_pos = ctx - qlen  # position of the row's first new token
        r = tl.arange(0, BLOCK_M * GROUP_PAD)
        tok = tile * BLOCK_M + r // GROUP_PAD  # index of the query token within the row
        g = r % GROUP_PAD
        rmask = (tok < qlen) & (g < GROUP)
        d = tl.arange(0, D_PAD)
        dmask = d < HEAD_DIM
        qpos = first_pos + tok
        q_off = (q_lo + tok).to(tl.int64) * stride_qt + (kvh * GROUP + g) * stride_qh
        q = tl.load(q_ptr + q_off[:, None] + d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        if FP8:
            ks = tl.load(k_scale + kvh)
            vs = tl.load(v_scale + kvh)
        last = tl.minimum(first_pos + tile * BLOCK_M + BLOCK_M, ctx)  # keys [lo, last)
        lo = tl.where(window > 0, tl.maximum(first_pos + tile * BLOCK_M - window + 1, 0), 0)
        lo = (lo // BLOCK_N) * BLOCK_N
        if NUM_SPLITS > 1:  # this program's span of the tile's keys, whole BLOCK_N tiles each
            span = tl.cdiv(tl.cdiv(last - lo, BLOCK_N), NUM_SPLITS) * BLOCK_N
            lo = lo + split * span
            last = tl.minimum(last, lo + span)
        m = tl.full([BLOCK_M * GROUP_PAD], float("-inf"), tl.float32)
        l_sum = tl.zeros([BLOCK_M * GROUP_PAD], tl.float32)
        acc = tl.zeros([BLOCK_M * GROUP_PAD, D_PAD], tl.float32)
        bt_row = block_tables + row.to(tl.int64) * stride_bt
        for start in range(lo, last, BLOCK_N):
            kpos = start + tl.arange(0, BLOCK_N)
            kmask = kpos < last
            blk = tl.load(bt_row + kpos // PAGE, mask=kmask, other=0).to(tl.int64)
            off = blk * stride_kb + (kpos % PAGE) * stride_ks + kvh * stride_kh
            kv_mask = kmask[:, None] & dmask[None, :]
            k = tl.load(k_cache + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_cache + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
            if FP8:
                k = (k.to(tl.float32) * ks).to(q.dtype)
                v = (v.to(tl.float32) * vs).to(q.dtype)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale
            visible = kmask[None, :] & (kpos[None, :] <= qpos[:, None])
            visible = visible & ((window <= 0) | (kpos[None, :] > qpos[:, None] - window))
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
            alpha = tl.exp2(m - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_sum = l_sum * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m = m_new
        empty = l_sum == 0.0
        o = acc / tl.where(empty, 1.0, l_sum)[:, None]
        if NUM_SPLITS == 1:
            o_off = (q_lo + tok).to(tl.int64) * stride_ot + (kvh * GROUP + g) * stride_oh
            tl.store(
                out_ptr + o_off[:, None] + d[None, :],
                o.to(out_ptr.dtype.element_ty),
                mask=rmask[:, None] & dmask[None, :],
            )
        else:
            # mid_o: [tokens, q heads, splits, D_PAD] float32 from the first prefill token on;
            # mid_lse: [tokens, q heads, splits]; the combine kernel's layout
            num_heads = tl.num_programs(2) * GROUP
            base = ((q_lo + tok - token_offset).to(tl.int64) * num_heads + kvh * GROUP + g) * NUM_SPLITS
            base = base + split
            tl.store(mid_o + base[:, None] * D_PAD + d[None, :], o, mask=rmask[:, None] & dmask[None, :])
            lse = tl.where(empty, float("-inf"), m + tl.log2(tl.where(empty, 1.0, l_sum)))
            tl.store(mid_lse + base, lse, mask=rmask)


def paged_prefill(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    first_row: int,
    num_rows: int,
    max_query_len: int,
    scale: float,
    sliding_window: int | None,
    out: torch.Tensor,
    kv_scales: torch.Tensor | None = None,
    token_span: tuple[int, int] | None = None,
    max_context: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Rows ``first_row .. first_row + num_rows`` of the batch: their queries ``q[query_start_loc[r]
    : query_start_loc[r + 1]]`` (q: [T, heads, D]) sit at the last positions of their contexts and
    see every key up to their own position (the window's last ones when set). Writes ``out`` rows.

    ``token_span`` (first token of those rows, their token count) and ``max_context`` (their
    longest context), known on the host, let a batch of few query tiles split its keys;
    ``num_splits`` (with ``token_span``) fixes their number instead (``precompile_splits``).
    """
    _, heads, dim = q.shape
    _, _, page, kv_heads, _ = kv_layer.shape
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} KV heads")
    if num_rows == 0 or max_query_len == 0:
        return out
    fp8, k_scale, v_scale = fp8_scales(kv_layer, kv_scales, q)
    group = heads // kv_heads
    group_pad = triton.next_power_of_2(group)
    block_m = max(1, 64 // group_pad)  # 64 (token, head) rows per tile
    d_pad = max(16, triton.next_power_of_2(dim))
    block_n = 64 if d_pad <= 128 else 32
    k_cache, v_cache = kv_layer[0], kv_layer[1]
    tiles = triton.cdiv(max_query_len, block_m)
    splits = num_splits or _splits(
        num_rows * tiles, kv_heads, heads, d_pad, block_n, token_span, max_context, q.device
    )
    token_offset, num_tokens = token_span or (0, 0)
    mid_o = mid_lse = out  # unused with one split
    if splits > 1:
        mid_o = torch.empty((num_tokens, heads, splits, d_pad), dtype=torch.float32, device=q.device)
        mid_lse = torch.empty((num_tokens, heads, splits), dtype=torch.float32, device=q.device)
    _prefill_kernel[(num_rows, tiles * splits, kv_heads)](
        q,
        k_cache,
        v_cache,
        block_tables,
        query_start_loc,
        context_lens,
        out,
        mid_o,
        mid_lse,
        token_offset,
        k_scale,
        v_scale,
        scale * LOG2E,
        sliding_window or 0,
        first_row,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        GROUP_PAD=group_pad,
        HEAD_DIM=dim,
        D_PAD=d_pad,
        PAGE=page,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        NUM_SPLITS=splits,
        FP8=fp8,
        PRECISION=dot_precision(q.dtype),
        num_warps=4,
    )
    if splits > 1:
        combine_splits(mid_o, mid_lse, out[token_offset : token_offset + num_tokens])
    return out


def precompile_splits(kv_layer: torch.Tensor, heads: int, dtype: torch.dtype) -> None:
    """Compile every key-split variant of the extend kernel (and its combine step) before serving.

    The split count is a compile-time constant, chosen per batch from the batch's shape: on the
    H200 a variant first met in the middle of a run compiled for ~1 s while every request waited
    (the 8B chat's timed runs). Each launch here is one query token over one key of pool block 0
    (read, never written), so its cost is the compile or, once Triton has cached it, nothing.
    """
    dim = kv_layer.shape[-1]
    device = kv_layer.device
    q = torch.zeros((1, heads, dim), dtype=dtype, device=device)
    out = torch.empty_like(q)
    tables = torch.zeros((1, 1), dtype=torch.int32, device=device)
    query_start = torch.tensor([0, 1], dtype=torch.int32, device=device)
    context_lens = torch.ones(1, dtype=torch.int32, device=device)
    splits = 1
    while splits <= MAX_SPLITS:
        paged_prefill(
            q, kv_layer, tables, query_start, context_lens, 0, 1, 1, 1.0, None, out,
            token_span=(0, 1), max_context=1, num_splits=splits,
        )  # fmt: skip
        splits *= 2


SPLIT_WORKSPACE_BYTES = 64 << 20  # the partial results of a split batch, at most


def _splits(
    programs: int,
    kv_heads: int,
    heads: int,
    d_pad: int,
    block_n: int,
    token_span: tuple[int, int] | None,
    max_context: int | None,
    device: torch.device,
) -> int:
    """Key splits per tile: enough programs to fill the GPU (one when the tiles already do, or when
    the host did not say where the rows' tokens are), within the workspace bound."""
    if token_span is None or max_context is None:
        return 1
    n = choose_splits(programs, kv_heads, max_context, block_n, device)
    while n > 1 and token_span[1] * heads * n * (d_pad + 1) * 4 > SPLIT_WORKSPACE_BYTES:
        n //= 2
    return n
