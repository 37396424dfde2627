"""Paged decode attention and the paged KV write, in Triton.

Kept in one file (over 450 lines) because the decode, split-combine, KV-write and rotary-write
kernels share the pool's paged layout, its padding-slot rule and its fp8 scale rule: read together.

Decode: one query token per row, keys and values read straight from the pool through the block
table (no gather). One program handles one (row, KV head, split): all the query heads of a GQA group
at once, so each K/V tile is read from memory once for the whole group. The keys of a row are cut
into ``num_splits`` equal spans (split-K, "flash-decoding"): with few rows, a single program per
head would leave most of the GPU idle. Splits write a partial output and its log-sum-exp; a second
small kernel combines them. The span of each split is computed *in the kernel* from the row's own
length, so the grid depends only on (rows, heads, splits): one CUDA graph serves every length.

KV write: one program per new token; a negative slot means "padding, write nothing" (CUDA-graph
batches are padded to their bucket). An fp8 pool stores ``value / scale`` as e4m3, one scale per
(layer, K or V, KV head); the attention kernel multiplies it back.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

FP8_MAX = 448.0  # largest finite float8_e4m3fn
LOG2E = 1.4426950408889634


@triton.jit(do_not_specialize=["window", "stride_bt"])  # they vary per batch: see paged_prefill.py
def _decode_kernel(
    q_ptr,
    k_cache,
    v_cache,
    block_tables,
    context_lens,
    out_ptr,
    mid_o,
    mid_lse,
    k_scale,
    v_scale,
    sm_scale,
    window,
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
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    FP8: tl.constexpr,
    PRECISION: tl.constexpr,  # of float32 dots: exact (ieee) for a float32 model
):
    row = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(context_lens + row)
    start = tl.where(window > 0, tl.maximum(ctx - window, 0), 0)
    per_split = tl.cdiv(tl.cdiv(ctx - start, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = start + split * per_split
    hi = tl.minimum(lo + per_split, ctx)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D_PAD)
    heads = kvh * GROUP + g
    gmask = g < GROUP
    dmask = d < HEAD_DIM
    q = tl.load(
        q_ptr + row * stride_qt + heads[:, None] * stride_qh + d[None, :],
        mask=gmask[:, None] & dmask[None, :],
        other=0.0,
    )
    if FP8:
        ks = tl.load(k_scale + kvh)
        vs = tl.load(v_scale + kvh)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_sum = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    bt_row = block_tables + row.to(tl.int64) * stride_bt
    for tile in range(lo, hi, BLOCK_N):
        toks = tile + tl.arange(0, BLOCK_N)
        tmask = toks < hi
        blk = tl.load(bt_row + toks // PAGE, mask=tmask, other=0).to(tl.int64)
        off = blk * stride_kb + (toks % PAGE) * stride_ks + kvh * stride_kh
        kv_mask = tmask[:, None] & dmask[None, :]
        k = tl.load(k_cache + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if FP8:
            k = (k.to(tl.float32) * ks).to(q.dtype)
            v = (v.to(tl.float32) * vs).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        s = tl.where(tmask[None, :], s * sm_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, 1)
        pv = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        acc = acc * alpha[:, None] + pv
        m = m_new

    empty = l_sum == 0.0
    o = acc / tl.where(empty, 1.0, l_sum)[:, None]
    omask = gmask[:, None] & dmask[None, :]
    if NUM_SPLITS == 1:
        dst = out_ptr + row * stride_ot + heads[:, None] * stride_oh + d[None, :]
        tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=omask)
    else:
        # mid_o: [rows, q heads, splits, D_PAD] float32, contiguous; mid_lse: [rows, q heads, splits]
        num_heads = tl.num_programs(1) * GROUP
        base = (row * num_heads + heads) * NUM_SPLITS + split
        tl.store(mid_o + base[:, None] * D_PAD + d[None, :], o, mask=omask)
        lse = tl.where(empty, float("-inf"), m + tl.log2(tl.where(empty, 1.0, l_sum)))
        tl.store(mid_lse + base, lse, mask=gmask)


@triton.jit
def _combine_kernel(
    mid_o,
    mid_lse,
    out_ptr,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    row = tl.program_id(0)
    head = tl.program_id(1)
    base = (row * tl.num_programs(1) + head) * NUM_SPLITS
    s = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, D_PAD)
    lse = tl.load(mid_lse + base + s)
    mx = tl.max(lse, 0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.where(lse == float("-inf"), 0.0, tl.exp2(lse - mx))
    parts = tl.load(mid_o + (base + s)[:, None] * D_PAD + d[None, :])
    total = tl.sum(w, 0)
    o = tl.sum(parts * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(
        out_ptr + row * stride_ot + head * stride_oh + d, o.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM
    )


def fp8_scales(
    kv_layer: torch.Tensor, kv_scales: torch.Tensor | None, placeholder: torch.Tensor
) -> tuple[bool, torch.Tensor, torch.Tensor]:
    """Whether the pool is fp8, and the K and V scales its kernels take (``placeholder``, never
    read, when there are none: the kernels load scales only for an fp8 pool)."""
    fp8 = kv_layer.dtype == torch.float8_e4m3fn
    if fp8 and kv_scales is None:
        raise ValueError("an fp8 KV pool needs kv_scales")
    if kv_scales is None:
        return fp8, placeholder, placeholder
    return fp8, kv_scales[0], kv_scales[1]


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of the attention kernels' dots: exact for a float32 model."""
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def _num_sms(device_index: int) -> int:
    if not torch.cuda.is_available():
        return 8  # the interpreter: a few splits, so the tests exercise the combine step
    return int(torch.cuda.get_device_properties(device_index).multi_processor_count)


MAX_SPLITS = 64  # the most key splits choose_splits picks (a power of two)


def choose_splits(rows: int, kv_heads: int, max_context: int, block_n: int, device: torch.device) -> int:
    """Splits per row: enough programs for two per SM, never more than the longest row has tiles.

    A power of two, so that few variants get compiled; callers that capture CUDA graphs pass the
    longest context the graph may see, since the grid is frozen at capture.
    """
    sms = _num_sms(device.index or 0) if device.type == "cuda" else _num_sms(-1)
    want = -(-2 * sms // max(1, rows * kv_heads))
    useful = max(1, -(-max_context // block_n))
    n = 1
    while n * 2 <= min(want, useful, MAX_SPLITS):
        n *= 2
    return n


def block_n_for(head_dim: int) -> int:
    return 64 if head_dim <= 128 else 32


def paged_decode(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    num_splits: int,
    out: torch.Tensor | None = None,
    kv_scales: torch.Tensor | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Attention of one query token per row over its paged context.

    q: [rows, heads, D] (head_dim contiguous); kv_layer: [2, num_blocks, page, kv_heads, D];
    block_tables: [>= rows, max_blocks] int32; context_lens: [>= rows] int32 (0 gives zeros);
    kv_scales: [2, kv_heads] float32 for an fp8 pool. Returns [rows, heads, D] in q's dtype.
    """
    rows, heads, dim = q.shape
    _, _, page, kv_heads, _ = kv_layer.shape
    if num_splits < 1 or num_splits & (num_splits - 1):
        raise ValueError(f"num_splits must be a power of two >= 1, got {num_splits}")
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} KV heads")
    group = heads // kv_heads
    d_pad = max(16, triton.next_power_of_2(dim))
    block_n = block_n or block_n_for(dim)
    fp8, k_scale, v_scale = fp8_scales(kv_layer, kv_scales, q)
    if out is None:
        out = torch.empty_like(q)
    if rows == 0:
        return out
    k_cache, v_cache = kv_layer[0], kv_layer[1]
    mid_o = mid_lse = out  # unused with one split
    if num_splits > 1:
        mid_o = torch.empty((rows, heads, num_splits, d_pad), dtype=torch.float32, device=q.device)
        mid_lse = torch.empty((rows, heads, num_splits), dtype=torch.float32, device=q.device)
    _decode_kernel[(rows, kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        mid_o,
        mid_lse,
        k_scale,
        v_scale,
        scale * LOG2E,
        sliding_window or 0,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=dim,
        D_PAD=d_pad,
        PAGE=page,
        BLOCK_N=block_n,
        NUM_SPLITS=num_splits,
        FP8=fp8,
        PRECISION=dot_precision(q.dtype),
        num_warps=4,
    )
    if num_splits > 1:
        combine_splits(mid_o, mid_lse, out)
    return out


def combine_splits(mid_o: torch.Tensor, mid_lse: torch.Tensor, out: torch.Tensor) -> None:
    """Merge the per-split partial softmaxes of split-K attention into ``out`` ([rows, heads, D]):
    mid_o [rows, heads, splits, D_PAD] float32, mid_lse [rows, heads, splits] (log2 sum-exp)."""
    rows, heads, splits, d_pad = mid_o.shape
    _combine_kernel[(rows, heads)](
        mid_o,
        mid_lse,
        out,
        out.stride(0),
        out.stride(1),
        HEAD_DIM=out.shape[2],
        D_PAD=d_pad,
        NUM_SPLITS=splits,
    )


@triton.jit
def _write_kv_kernel(
    k_ptr,
    v_ptr,
    slots,
    k_cache,
    v_cache,
    k_scale,
    v_scale,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,
    stride_cs,
    stride_ch,
    HEADS: tl.constexpr,
    H_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    PAGE: tl.constexpr,
    FP8: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slots + t)
    if slot >= 0:
        h = tl.arange(0, H_PAD)
        d = tl.arange(0, D_PAD)
        mask = (h < HEADS)[:, None] & (d < HEAD_DIM)[None, :]
        k = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask, other=0.0)
        v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask, other=0.0)
        dst = (slot // PAGE) * stride_cb + (slot % PAGE) * stride_cs + h[:, None] * stride_ch + d[None, :]
        if FP8:
            ks = tl.load(k_scale + h, mask=h < HEADS, other=1.0)
            vs = tl.load(v_scale + h, mask=h < HEADS, other=1.0)
            k = tl.clamp(k.to(tl.float32) / ks[:, None], -448.0, 448.0)
            v = tl.clamp(v.to(tl.float32) / vs[:, None], -448.0, 448.0)
        tl.store(k_cache + dst, k.to(k_cache.dtype.element_ty), mask=mask)
        tl.store(v_cache + dst, v.to(v_cache.dtype.element_ty), mask=mask)


def write_kv(
    kv_layer: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scales: torch.Tensor | None = None,
) -> None:
    """k, v: [T, kv_heads, D] (any token and head strides, D contiguous) into the pool at
    ``slot_mapping`` ([T] int64; < 0 skips the token)."""
    t, heads, dim = k.shape
    if t == 0:
        return
    k_cache, v_cache = kv_layer[0], kv_layer[1]
    fp8, k_scale, v_scale = fp8_scales(kv_layer, kv_scales, k)
    _write_kv_kernel[(t,)](
        k,
        v,
        slot_mapping,
        k_cache,
        v_cache,
        k_scale,
        v_scale,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        HEADS=heads,
        H_PAD=triton.next_power_of_2(heads),
        HEAD_DIM=dim,
        D_PAD=triton.next_power_of_2(dim),
        PAGE=kv_layer.shape[2],
        FP8=fp8,
        num_warps=4,
    )


@triton.jit
def _rotary_write_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    positions,
    cos_ptr,
    sin_ptr,
    slots,
    k_cache,
    v_cache,
    k_scale,
    v_scale,
    stride_t,
    stride_cos,
    stride_cb,
    stride_cs,
    stride_ch,
    Q_HEADS: tl.constexpr,
    KV_HEADS: tl.constexpr,
    QH_PAD: tl.constexpr,
    KH_PAD: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    PAGE: tl.constexpr,
    FP8: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions + t).to(tl.int64)
    d = tl.arange(0, HALF_PAD)
    dmask = d < HALF
    c = tl.load(cos_ptr + pos * stride_cos + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s = tl.load(sin_ptr + pos * stride_cos + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    # q: rotated in place (heads are HALF * 2 apart: q, k, v are views of one [T, heads, D] tensor)
    hq = tl.arange(0, QH_PAD)
    qmask = (hq < Q_HEADS)[:, None] & dmask[None, :]
    qp = q_ptr + t * stride_t + hq[:, None] * (2 * HALF) + d[None, :]
    # the reference's x * cos + rotate_half(x) * sin, each product and the sum rounded to the dtype
    # (written out twice, for q and k: a nested @triton.jit helper broke Triton's interpreter)
    q1 = tl.load(qp, mask=qmask, other=0.0)
    q2 = tl.load(qp + HALF, mask=qmask, other=0.0)
    dt = q1.dtype
    a1, a2 = q1.to(tl.float32), q2.to(tl.float32)
    o1 = ((a1 * c).to(dt).to(tl.float32) + (-a2 * s).to(dt).to(tl.float32)).to(dt)
    o2 = ((a2 * c).to(dt).to(tl.float32) + (a1 * s).to(dt).to(tl.float32)).to(dt)
    tl.store(qp, o1, mask=qmask)
    tl.store(qp + HALF, o2, mask=qmask)
    slot = tl.load(slots + t)
    if slot >= 0:
        hk = tl.arange(0, KH_PAD)
        kmask = (hk < KV_HEADS)[:, None] & dmask[None, :]
        kp = k_ptr + t * stride_t + hk[:, None] * (2 * HALF) + d[None, :]
        vp = v_ptr + t * stride_t + hk[:, None] * (2 * HALF) + d[None, :]
        b1 = tl.load(kp, mask=kmask, other=0.0).to(tl.float32)
        b2 = tl.load(kp + HALF, mask=kmask, other=0.0).to(tl.float32)
        k1 = ((b1 * c).to(dt).to(tl.float32) + (-b2 * s).to(dt).to(tl.float32)).to(dt)
        k2 = ((b2 * c).to(dt).to(tl.float32) + (b1 * s).to(dt).to(tl.float32)).to(dt)
        v1 = tl.load(vp, mask=kmask, other=0.0)
        v2 = tl.load(vp + HALF, mask=kmask, other=0.0)
        dst = (slot // PAGE) * stride_cb + (slot % PAGE) * stride_cs + hk[:, None] * stride_ch + d[None, :]
        if FP8:
            ks = tl.load(k_scale + hk, mask=hk < KV_HEADS, other=1.0)[:, None]
            vs = tl.load(v_scale + hk, mask=hk < KV_HEADS, other=1.0)[:, None]
            k1 = tl.clamp(k1.to(tl.float32) / ks, -448.0, 448.0)
            k2 = tl.clamp(k2.to(tl.float32) / ks, -448.0, 448.0)
            v1 = tl.clamp(v1.to(tl.float32) / vs, -448.0, 448.0)
            v2 = tl.clamp(v2.to(tl.float32) / vs, -448.0, 448.0)
        out_ty = k_cache.dtype.element_ty
        tl.store(k_cache + dst, k1.to(out_ty), mask=kmask)
        tl.store(k_cache + dst + HALF, k2.to(out_ty), mask=kmask)
        tl.store(v_cache + dst, v1.to(out_ty), mask=kmask)
        tl.store(v_cache + dst + HALF, v2.to(out_ty), mask=kmask)


def rotary_write_kv(
    qkv: torch.Tensor,
    num_heads: int,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_layer: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scales: torch.Tensor | None = None,
) -> None:
    """One launch for rotary on q (in place) and k, and the K/V write into the pool.

    qkv: [T, num_heads + 2 * kv_heads, D] (the fused projection's output, head rows contiguous);
    k is rotated only on its way into the pool (nothing else reads it). Slots < 0 write nothing.
    """
    t, total, dim = qkv.shape
    kv_heads = kv_layer.shape[3]
    if total != num_heads + 2 * kv_heads or qkv.stride(1) != dim or qkv.stride(2) != 1:
        raise ValueError("rotary_write_kv wants the fused [T, heads + 2 * kv_heads, D] projection output")
    if t == 0:
        return
    fp8, k_scale, v_scale = fp8_scales(kv_layer, kv_scales, cos)
    k_cache, v_cache = kv_layer[0], kv_layer[1]
    _rotary_write_kernel[(t,)](
        qkv,
        qkv[:, num_heads:],
        qkv[:, num_heads + kv_heads :],
        positions,
        cos,
        sin,
        slot_mapping,
        k_cache,
        v_cache,
        k_scale,
        v_scale,
        qkv.stride(0),
        cos.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        Q_HEADS=num_heads,
        KV_HEADS=kv_heads,
        QH_PAD=triton.next_power_of_2(num_heads),
        KH_PAD=triton.next_power_of_2(kv_heads),
        HALF=dim // 2,
        HALF_PAD=triton.next_power_of_2(dim // 2),
        PAGE=kv_layer.shape[2],
        FP8=fp8,
        num_warps=4,
    )
