"""Paged attention: the metadata a batch carries, the backend interface, and the torch reference.

KV cache layout (one tensor for the whole model):
``kv_cache[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]``; index 0 of the second
axis is K, 1 is V. Per layer, ``kv_cache[l, 0]`` is a contiguous ``[num_blocks, block_size, H, D]``
array (the layout paged flash-attention kernels expect), and a token lives at
``slot = block_id * block_size + offset``. One block of every layer is ``kv_cache[:, :, block_id]``,
the unit that the cache tiers store.

A batch is flattened: all new tokens of all sequences in one ``[T]`` axis, decode rows (one query
token) first, then prefill rows (a chunk of a prompt, or a whole one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Where each sequence's queries are in the flat batch and where its keys are in the pool.

    Device tensors feed the kernels; the host lists let the reference loop without a device sync.
    """

    slot_mapping: torch.Tensor  # [T] int64: cache slot each new token's K/V is written to
    query_start_loc: torch.Tensor  # [B + 1] int32: cumulative query lengths (cu_seqlens_q)
    context_lens: torch.Tensor  # [B] int32: keys each row attends to (cached + new)
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    query_lens_host: list[int]
    context_lens_host: list[int]
    num_decodes: int  # rows [0, num_decodes) have exactly one query token
    # Split-K factor of the decode kernel; None: the backend picks from the batch. A CUDA graph fixes
    # it at capture (its grid is frozen), for the longest context the graph may see.
    decode_splits: int | None = None

    @property
    def num_rows(self) -> int:
        return len(self.query_lens_host)


class AttentionBackend(Protocol):
    """Writes the new tokens' K/V into the paged cache, then attends causally over each row's context.

    q: [T, num_heads, head_dim]; k, v: [T, num_kv_heads, head_dim]; kv_layer: ``kv_cache[l]``, shape
    [2, num_blocks, block_size, num_kv_heads, head_dim]. Returns [T, num_heads, head_dim]. Row i's
    query j sits at position ``context_lens[i] - query_lens[i] + j`` and sees keys 0..that position
    (and only the last ``sliding_window`` of them when a window is set). An fp8 pool comes with
    ``kv_scales`` ([2, num_kv_heads] float32): it stores ``value / scale`` as e4m3.
    """

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_layer: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        kv_scales: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


FP8_MAX = 448.0  # largest finite float8_e4m3fn


def quantize_kv(x: torch.Tensor, dtype: torch.dtype, scales: torch.Tensor | None) -> torch.Tensor:
    """[T, heads, D] -> the pool's dtype; an fp8 pool stores x / scale (per head), clamped to range."""
    if scales is None:
        return x.to(dtype)
    return (x.float() / scales[:, None]).clamp(-FP8_MAX, FP8_MAX).to(dtype)


def write_kv(
    kv_layer: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scales: torch.Tensor | None = None,
) -> None:
    _, num_blocks, block_size, heads, dim = kv_layer.shape
    for i, x in enumerate((k, v)):
        data = quantize_kv(x, kv_layer.dtype, None if kv_scales is None else kv_scales[i])
        dst = kv_layer[i].view(num_blocks * block_size, heads, dim)
        if data.dtype == torch.float8_e4m3fn:  # index_copy_ has no fp8 kernels: copy the bytes
            dst, data = dst.view(torch.uint8), data.view(torch.uint8)
        dst.index_copy_(0, slot_mapping, data)


def dequantize(x: torch.Tensor, dtype: torch.dtype, scales: torch.Tensor | None) -> torch.Tensor:
    """Gathered [R, heads, S, D] K or V -> dtype, times its per-head scale for an fp8 pool."""
    if scales is None:
        return x.to(dtype)
    return (x.float() * scales[None, :, None, None]).to(dtype)


def gather_kv(kv_layer: torch.Tensor, block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, nb] block ids -> K and V as [R, heads, nb * block_size, dim]."""
    rows, nb = block_tables.shape
    _, _, block_size, heads, dim = kv_layer.shape
    idx = block_tables.long()
    if kv_layer.dtype == torch.float8_e4m3fn:  # indexing has no fp8 kernels: gather the bytes
        k8, v8 = gather_kv(kv_layer.view(torch.uint8), block_tables)
        return k8.view(kv_layer.dtype), v8.view(kv_layer.dtype)
    # index_select, not kv[idx]: the same gather, but advanced indexing runs a parallel region
    # that, on a busy 2-core CPU, took 6 ms on average (0.008 median) for 3 blocks
    flat = idx.reshape(-1)
    k = kv_layer[0].index_select(0, flat).view(rows, nb * block_size, heads, dim).transpose(1, 2)
    v = kv_layer[1].index_select(0, flat).view(rows, nb * block_size, heads, dim).transpose(1, 2)
    return k, v


def _visible(
    query_pos: torch.Tensor,
    key_pos: torch.Tensor,
    context_len: torch.Tensor | int,
    sliding_window: int | None,
) -> torch.Tensor:
    mask = (key_pos <= query_pos) & (key_pos < context_len)
    if sliding_window is not None:
        mask &= key_pos > query_pos - sliding_window
    return mask


class TorchReferenceAttention:
    """Gather + ``scaled_dot_product_attention``: runs anywhere, and is the oracle for GPU kernels.

    Decode rows are done in one padded batch; prefill rows one at a time (their query counts differ
    too much to pad).
    """

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_layer: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        kv_scales: torch.Tensor | None = None,
    ) -> torch.Tensor:
        write_kv(kv_layer, k, v, meta.slot_mapping, kv_scales)
        out = torch.empty_like(q)
        block_size = kv_layer.shape[2]
        nd = meta.num_decodes
        if nd:
            out[:nd] = self._decode(q[:nd], kv_layer, meta, scale, sliding_window, block_size, kv_scales)
        prefill_attention(q, kv_layer, meta, scale, sliding_window, kv_scales, out)
        return out

    @staticmethod
    def _decode(
        q: torch.Tensor,
        kv_layer: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
        block_size: int,
        kv_scales: torch.Tensor | None,
    ) -> torch.Tensor:
        nd = meta.num_decodes
        nb = -(-max(meta.context_lens_host[:nd]) // block_size)
        kk, vv = gather_kv(kv_layer, meta.block_tables[:nd, :nb])
        ctx = meta.context_lens[:nd].long()[:, None]  # [nd, 1]
        key_pos = torch.arange(nb * block_size, device=q.device)[None, :]
        mask = _visible(ctx - 1, key_pos, ctx, sliding_window)[:, None, None, :]  # [nd, 1, 1, S]
        return _sdpa(q.unsqueeze(2), kk, vv, mask, scale, kv_scales).squeeze(2)


def prefill_attention(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None,
    kv_scales: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    """The rows after the decodes, one at a time: gather the row's blocks, masked SDPA, into ``out``."""
    block_size = kv_layer.shape[2]
    start = meta.num_decodes
    for row in range(meta.num_decodes, meta.num_rows):
        qlen, ctx = meta.query_lens_host[row], meta.context_lens_host[row]
        nb = -(-ctx // block_size)
        kk, vv = gather_kv(kv_layer, meta.block_tables[row : row + 1, :nb])
        qq = q[start : start + qlen].transpose(0, 1).unsqueeze(0)  # [1, H, qlen, D]
        query_pos = torch.arange(ctx - qlen, ctx, device=q.device)[:, None]
        key_pos = torch.arange(nb * block_size, device=q.device)[None, :]
        # ctx as a Python int: a scalar tensor made here would be a host-to-device copy and a
        # sync per prefill row per layer (seen with torch.cuda.set_sync_debug_mode).
        mask = _visible(query_pos, key_pos, ctx, sliding_window)
        o = _sdpa(qq, kk, vv, mask, scale, kv_scales)
        out[start : start + qlen] = o[0].transpose(0, 1)
        start += qlen


def _sdpa(
    q: torch.Tensor,
    kk: torch.Tensor,
    vv: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    kv_scales: torch.Tensor | None,
) -> torch.Tensor:
    """Masked SDPA of ``q`` ([B, H, Q, D]) over gathered pool blocks, dequantized to q's dtype."""
    ks, vs = (None, None) if kv_scales is None else (kv_scales[0], kv_scales[1])
    return F.scaled_dot_product_attention(
        q,
        dequantize(kk, q.dtype, ks),
        dequantize(vv, q.dtype, vs),
        attn_mask=mask,
        scale=scale,
        enable_gqa=True,
    )


class TritonPagedAttention:
    """CUDA: the KV write, decode rows and prefill / extend rows in Triton kernels reading the pool
    through the block table (``kernels/paged_decode.py``, ``kernels/paged_prefill.py``: one launch
    for all prefill rows, no gather). ``paged_prefill=False`` keeps the reference's per-row gather +
    SDPA for prefill rows.

    Needs no host data for decode rows when ``meta.decode_splits`` is set, so it can be captured in a
    CUDA graph.
    """

    def __init__(self, paged_prefill: bool = True) -> None:
        self.paged_prefill = paged_prefill

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_layer: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        kv_scales: torch.Tensor | None = None,
    ) -> torch.Tensor:
        from kvtier.model.kernels import paged_decode as kernels

        kernels.write_kv(kv_layer, k, v, meta.slot_mapping, kv_scales)
        return self.attend(q, kv_layer, meta, scale, sliding_window, kv_scales)

    def attend(
        self,
        q: torch.Tensor,
        kv_layer: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        kv_scales: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``forward`` without the write: the new K/V are in the pool already (the fused rotary
        kernel put them there)."""
        from kvtier.model.kernels import paged_decode as kernels

        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        nd = meta.num_decodes
        if nd:
            splits = meta.decode_splits
            if splits is None:
                longest = max(meta.context_lens_host[:nd])
                splits = kernels.choose_splits(
                    nd, kv_layer.shape[3], longest, kernels.block_n_for(q.shape[2]), q.device
                )
            kernels.paged_decode(
                q[:nd],
                kv_layer,
                meta.block_tables,
                meta.context_lens,
                scale,
                sliding_window,
                splits,
                out=out[:nd],
                kv_scales=kv_scales,
            )
        if meta.num_rows > nd and self.paged_prefill:
            from kvtier.model.kernels.paged_prefill import paged_prefill

            paged_prefill(
                q,
                kv_layer,
                meta.block_tables,
                meta.query_start_loc,
                meta.context_lens,
                nd,
                meta.num_rows - nd,
                max(meta.query_lens_host[nd:]),
                scale,
                sliding_window,
                out,
                kv_scales,
                token_span=(nd, sum(meta.query_lens_host[nd:])),  # decode rows: one token each
                max_context=max(meta.context_lens_host[nd:]),
            )
        elif meta.num_rows > nd:
            prefill_attention(q, kv_layer, meta, scale, sliding_window, kv_scales, out)
        return out


# the names make_attention_backend knows (checked by the config)
ATTENTION_BACKENDS = ("auto", "torch", "triton")


def make_attention_backend(name: str, device: torch.device) -> AttentionBackend:
    """``torch`` is the reference and runs everywhere; ``triton`` needs CUDA (or Triton's
    interpreter); ``auto`` is triton on CUDA when triton is installed, else torch."""
    from kvtier.model import kernels

    if name == "torch" or (name == "auto" and not (device.type == "cuda" and kernels.available(device))):
        return TorchReferenceAttention()
    if name in ("auto", "triton"):
        if not kernels.available(device):
            raise ValueError(
                f"attention_backend='triton' needs a CUDA device and the triton package (device is {device})"
            )
        return TritonPagedAttention()
    raise ValueError(f"unknown attention backend {name!r}; supported: {', '.join(ATTENTION_BACKENDS)}")
