"""The small element-wise steps of a decoder layer, fused: one launch each instead of five to ten.

At batch 1 a decode step is a chain of tiny kernels; in eager torch RMSNorm alone is ~7 launches and
rotary ~10 per layer. Each kernel here rounds to the model's dtype exactly where the torch
reference does (``layers.py``), so the fused path computes the same numbers, not just close ones.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rmsnorm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    stride_x,
    stride_r,
    stride_o,
    n,
    eps,
    HAS_RES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    dtype = x.dtype
    if HAS_RES:
        # residual <- x + residual (rounded to the dtype, as torch's add does), normalised after
        x = (
            x.to(tl.float32) + tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        ).to(dtype)
        tl.store(res_ptr + row * stride_r + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x32 * x32, 0) / n + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = (x32 * rstd).to(dtype).to(tl.float32) * w
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """``RMSNorm(x + residual)``; with a residual, it is updated in place to ``x + residual``.

    x, residual: [T, n] with a contiguous last axis. Returns a new [T, n] tensor.
    """
    rows, n = x.shape
    out = torch.empty((rows, n), dtype=torch.result_type(x, weight), device=x.device)
    if rows == 0:
        return out
    res = residual if residual is not None else x
    _add_rmsnorm_kernel[(rows,)](
        x,
        res,
        weight,
        out,
        x.stride(0),
        res.stride(0),
        out.stride(0),
        n,
        eps,
        HAS_RES=residual is not None,
        BLOCK=triton.next_power_of_2(n),
        num_warps=4 if n <= 2048 else 8,
    )
    return out


@triton.jit
def _rotary_kernel(
    x_ptr,
    positions,
    cos_ptr,
    sin_ptr,
    stride_t,
    stride_h,
    stride_cos,
    heads,
    HALF: tl.constexpr,
    H_PAD: tl.constexpr,
    HALF_PAD: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions + t).to(tl.int64)
    h = tl.arange(0, H_PAD)
    d = tl.arange(0, HALF_PAD)
    mask = (h < heads)[:, None] & (d < HALF)[None, :]
    base = x_ptr + t * stride_t + h[:, None] * stride_h + d[None, :]
    x1 = tl.load(base, mask=mask, other=0.0)
    x2 = tl.load(base + HALF, mask=mask, other=0.0)
    dtype = x1.dtype
    # cos/sin rows are [cos(f), cos(f)] (rotate-half convention): the first half serves both halves
    c = tl.load(cos_ptr + pos * stride_cos + d, mask=d < HALF, other=0.0).to(tl.float32)[None, :]
    s = tl.load(sin_ptr + pos * stride_cos + d, mask=d < HALF, other=0.0).to(tl.float32)[None, :]
    a1 = x1.to(tl.float32)
    a2 = x2.to(tl.float32)
    # the reference: x * cos + rotate_half(x) * sin, each product and the sum rounded to the dtype
    o1 = ((a1 * c).to(dtype).to(tl.float32) + (-a2 * s).to(dtype).to(tl.float32)).to(dtype)
    o2 = ((a2 * c).to(dtype).to(tl.float32) + (a1 * s).to(dtype).to(tl.float32)).to(dtype)
    tl.store(base, o1, mask=mask)
    tl.store(base + HALF, o2, mask=mask)


def rotary_(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate ``x`` ([T, heads, D], D contiguous; a view into a wider tensor is fine) in place.

    cos, sin: [max_positions, D] tables in x's dtype; positions: [T] int64.
    """
    t, heads, dim = x.shape
    if t == 0:
        return
    _rotary_kernel[(t,)](
        x,
        positions,
        cos,
        sin,
        x.stride(0),
        x.stride(1),
        cos.stride(0),
        heads,
        HALF=dim // 2,
        H_PAD=triton.next_power_of_2(heads),
        HALF_PAD=triton.next_power_of_2(dim // 2),
        num_warps=4,
    )


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, stride_g, stride_o, n, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    g = tl.load(gu_ptr + row * stride_g + cols, mask=mask, other=0.0)
    u = tl.load(gu_ptr + row * stride_g + n + cols, mask=mask, other=0.0)
    g32 = g.to(tl.float32)
    act = (g32 / (1.0 + tl.exp(-g32))).to(g.dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (act * u.to(tl.float32)).to(g.dtype), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2I] (gate then up, as one fused projection writes them) -> silu(gate) * up, [T, I]."""
    rows, two_n = gate_up.shape
    n = two_n // 2
    out = torch.empty((rows, n), dtype=gate_up.dtype, device=gate_up.device)
    if rows == 0:
        return out
    block = 1024
    _silu_mul_kernel[(rows, triton.cdiv(n, block))](
        gate_up, out, gate_up.stride(0), out.stride(0), n, BLOCK=block, num_warps=4
    )
    return out
