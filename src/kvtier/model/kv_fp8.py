"""Scales for an fp8 (e4m3) KV pool: one per (layer, K or V, KV head), measured once at start-up.

The pool stores ``value / scale``. A static per-head scale keeps a block self-contained (a tier
stores the fp8 bytes as they are, no per-block metadata) and costs the kernels one multiply. It is
measured on a fixed pseudo-random prompt: twice the largest |K| / |V| seen per head, over e4m3's
largest value (448), rounded up to a power of two, so that measuring again (another process, the
same weights) gives the same scales and the cache keys, which include them, agree. Values beyond
the range are clamped, not wrapped.
"""

from __future__ import annotations

import hashlib

import torch

from kvtier.model.attention import FP8_MAX, AttentionMetadata
from kvtier.model.llama import CausalLM

CALIBRATION_TOKENS = 512
HEADROOM = 2.0


@torch.inference_mode()
def calibrate_kv_scales(model: CausalLM, block_size: int, tokens: int = CALIBRATION_TOKENS) -> torch.Tensor:
    """[num_layers, 2, num_kv_heads] float32 scales on the model's device."""
    cfg = model.config
    weight = model.lm_head.weight
    device, dtype = weight.device, weight.dtype
    n = min(tokens, cfg.max_position_embeddings)
    nb = -(-n // block_size)
    cache = torch.zeros(
        (cfg.num_layers, 2, nb, block_size, cfg.num_kv_heads, cfg.head_dim), dtype=dtype, device=device
    )
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(cfg.vocab_size, (n,), generator=gen).to(device)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n, device=device),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=device),
        context_lens=torch.tensor([n], dtype=torch.int32, device=device),
        block_tables=torch.arange(nb, dtype=torch.int32, device=device)[None],
        query_lens_host=[n],
        context_lens_host=[n],
        num_decodes=0,
    )
    model.set_kv_scales(None)
    model(ids, torch.arange(n, device=device), cache, meta, logits_indices=ids[:0])
    amax = cache.abs().amax(dim=(2, 3, 5)).float()  # [L, 2, H]
    raw = (amax * HEADROOM / FP8_MAX).clamp_min(2.0**-20)
    return torch.exp2(torch.ceil(torch.log2(raw)))


def scales_digest(scales: torch.Tensor) -> str:
    return hashlib.blake2b(scales.float().cpu().numpy().tobytes(), digest_size=8).hexdigest()
