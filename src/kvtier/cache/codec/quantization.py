"""Quantization of a block's payload for the cold tiers: none (the layout dtype), fp8 or int8.

fp8 (e4m3) keeps one float32 scale per (layer, K/V, head); int8 one per (layer, K/V, token, head).
The raw payload is the scales (float32) followed by one byte per value.
"""

from __future__ import annotations

import numpy as np
import torch

from kvtier.cache.keys import KVLayout

_TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,  # an fp8 device pool: its blocks are stored as they are
}
KV_DTYPES = tuple(_TORCH_DTYPES)
_FP8_MAX = 448.0  # largest finite float8_e4m3fn
_INT8_MAX = 127.0  # symmetric: -127..127, -128 unused
# float8_e4m3fn bit pattern -> float32 value, from torch's own conversion (so exactly the same values)
_FP8_TO_FLOAT32 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
_FP8_TO_FLOAT32.flags.writeable = False


def quantize(kv: torch.Tensor, quantization: str) -> memoryview:
    """The raw payload: the block's own bytes, or float32 scales followed by fp8/int8 values."""
    if quantization == "none":
        return as_bytes(kv)
    x = kv.float()
    if quantization == "fp8":
        # one scale per (layer, k/v, head): reduce over tokens and head_dim
        absmax = x.abs().amax(dim=(2, 4), keepdim=True)
        scale = _scale(absmax, _FP8_MAX, "fp8")
        q = (x / scale).clamp_(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn)
    else:
        # one scale per (layer, k/v, token, head): reduce over head_dim
        absmax = x.abs().amax(dim=4, keepdim=True)
        scale = _scale(absmax, _INT8_MAX, "int8")
        q = (x / scale).round_().clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    return memoryview(b"".join([as_bytes(scale), as_bytes(q)]))


def _scale(absmax: torch.Tensor, qmax: float, name: str) -> torch.Tensor:
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError(f"{name} quantization needs finite KV values (got inf or nan)")
    scale = absmax / qmax
    return torch.where(scale > 0, scale, torch.ones_like(scale)).contiguous()


def dequantize(raw: memoryview, quantization: str, layout: KVLayout, dtype: torch.dtype) -> torch.Tensor:
    shape = layout.block_shape
    if quantization == "none":
        return tensor_from(raw, dtype, shape)
    n_scales = scale_count(layout, quantization)
    scale_shape = (shape[0], 2, 1, shape[3], 1) if quantization == "fp8" else (*shape[:4], 1)
    scale = tensor_from(raw[: 4 * n_scales], torch.float32, scale_shape)
    if quantization == "fp8":
        # a 256-entry table beats torch's float8 -> float32 cast on CPU by ~5x (numbers in the bench)
        values = np.take(_FP8_TO_FLOAT32, np.frombuffer(raw[4 * n_scales :], dtype=np.uint8))
    else:
        values = np.frombuffer(raw[4 * n_scales :], dtype=np.int8).astype(np.float32)
    out = torch.from_numpy(values).reshape(shape).mul_(scale)  # `values` is a fresh, writable array
    return out if dtype == torch.float32 else out.to(dtype)


def raw_length(layout: KVLayout, quantization: str) -> int:
    n = layout.elements_per_block
    if quantization == "none":
        return n * kv_dtype(layout).itemsize
    return 4 * scale_count(layout, quantization) + n  # float32 scales + one byte per value


def scale_count(layout: KVLayout, quantization: str) -> int:
    per_head = layout.num_layers * 2 * layout.num_kv_heads
    return per_head if quantization == "fp8" else per_head * layout.block_size


def kv_dtype(layout: KVLayout) -> torch.dtype:
    if layout.dtype not in KV_DTYPES:
        raise ValueError(
            f"unsupported KV dtype {layout.dtype!r} for the codec; supported: {', '.join(KV_DTYPES)}"
        )
    return _TORCH_DTYPES[layout.dtype]


def as_bytes(t: torch.Tensor) -> memoryview:
    """A contiguous tensor's memory as bytes, without copying (bfloat16 has no numpy dtype: go via uint8)."""
    return t.reshape(-1).view(torch.uint8).numpy().data


def tensor_from(raw: memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A new tensor holding a copy of ``raw`` (the caller checked the size); one copy, no warnings."""
    return copy_bytes(raw, torch.empty(shape, dtype=dtype))


def copy_bytes(raw: memoryview, out: torch.Tensor) -> torch.Tensor:
    np.copyto(out.reshape(-1).view(torch.uint8).numpy(), np.frombuffer(raw, dtype=np.uint8))
    return out
