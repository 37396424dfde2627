"""Small-M matrix products for decode: ``y = x @ W^T (+ b)`` with x [M, K], M of 1 to ~16, and W
[N, K] as ``nn.Linear`` stores it.

At batch 1 a projection reads its whole weight to make one row: the only thing that matters is
streaming W at the memory's rate. cuBLAS picks tiles made for larger M; on the 1B's small
projections (12.6 MB, 8.4 MB) it leaves most of the H200's 132 SMs idle for part of the call. Here:

- many programs over N (``BLOCK_N`` rows of W each, a few per SM so every SM keeps loads in
  flight), and **split-K** where N alone gives too few programs: each split reduces its own span
  of K and the last program of a tile to finish (a per-tile counter, reset by that program) sums the
  splits in a fixed order, adds the bias and writes y: one launch, deterministic;
- small M (1, 2 by default): a multiply-and-sum on the CUDA cores (``DOT=False``; the product tile
  is summed over K once, after the loop); larger M: ``tl.dot`` on M padded to 16;
- float32 accumulation; W loaded with ``evict_first`` (read once), x kept.

``linear(x, w, b, max_m, auto)`` is what the model calls: the kernel when the model enabled it
(``resolve``: the ``decode_gemv`` setting) and M <= the threshold, else ``F.linear``. Under CUDA
graphs M is fixed per captured bucket, so the choice is static per graph.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    part_ptr,
    lock_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    k_per_split,
    num_splits,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr,  # num_splits > 1 (a runtime number: fewer compiled variants)
    EVEN_K: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,  # float32 operands: float32 models, and the interpreter (its bf16 dot is wrong)
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # rows past N read row N-1 (never stored): the loads need no N mask and stay vectorised
    rn_load = tl.minimum(rn, N - 1).to(tl.int64)
    rm_load = tl.minimum(rm, M - 1)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    if DOT:
        w_rows = w_ptr + rn_load[:, None] * stride_wn
        x_rows = x_ptr + rm_load[:, None] * stride_xm
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(k_lo, k_hi, BLOCK_K):
            cols = (k + rk)[None, :]
            if EVEN_K:
                w = tl.load(w_rows + cols, eviction_policy="evict_first")
                xv = tl.load(x_rows + cols, eviction_policy="evict_last")
            else:
                w = tl.load(
                    w_rows + cols,
                    mask=cols < k_hi,
                    other=0.0,
                    eviction_policy="evict_first",
                )
                xv = tl.load(
                    x_rows + cols,
                    mask=cols < k_hi,
                    other=0.0,
                    eviction_policy="evict_last",
                )
            if DOT_F32:
                acc += tl.dot(
                    xv.to(tl.float32),
                    tl.trans(w.to(tl.float32)),
                    input_precision="ieee",
                )
            else:
                acc += tl.dot(xv.to(w.dtype), tl.trans(w), input_precision=PRECISION)
    else:
        # everything in one 3-d layout [M, N, K] (size-1 dims broadcast in place: no layout
        # conversion through shared memory); the sum over K happens once, after the loop
        w_rows = w_ptr + rn_load[None, :, None] * stride_wn
        x_rows = x_ptr + rm_load[:, None, None] * stride_xm
        acc3 = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k in range(k_lo, k_hi, BLOCK_K):
            cols = (k + rk)[None, None, :]
            if EVEN_K:
                w = tl.load(w_rows + cols, eviction_policy="evict_first")
                xv = tl.load(x_rows + cols, eviction_policy="evict_last")
            else:
                w = tl.load(
                    w_rows + cols,
                    mask=cols < k_hi,
                    other=0.0,
                    eviction_policy="evict_first",
                )
                xv = tl.load(
                    x_rows + cols,
                    mask=cols < k_hi,
                    other=0.0,
                    eviction_policy="evict_last",
                )
            acc3 += xv.to(tl.float32) * w.to(tl.float32)
        acc = tl.sum(acc3, axis=2)
    out_mask = (rm[:, None] < M) & (rn[None, :] < N)
    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    if not SPLIT:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn_load).to(tl.float32)[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    else:
        # partials of tile pid_n: [num_splits, BLOCK_M, BLOCK_N] float32, contiguous
        tile = part_ptr + pid_n.to(tl.int64) * (num_splits * BLOCK_M * BLOCK_N)
        offs = rm[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        tl.store(tile + pid_k * (BLOCK_M * BLOCK_N) + offs, acc)
        tl.debug_barrier()  # every thread's partial is written before the counter moves
        arrived = tl.atomic_add(lock_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == num_splits - 1:  # the last split of this tile: sum all, in split order
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(num_splits):
                total += tl.load(tile + s * (BLOCK_M * BLOCK_N) + offs, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(b_ptr + rn_load).to(tl.float32)[None, :]
            tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(lock_ptr + pid_n, 0)  # ready for the next call


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    dot: bool = False
    num_stages: int = 2

    def name(self) -> str:
        dot = "d" if self.dot else ""
        return f"n{self.block_n}k{self.block_k}s{self.split_k}w{self.num_warps}p{self.num_stages}{dot}"


@functools.cache
def num_sms(device_index: int) -> int:
    if not torch.cuda.is_available():
        return 8  # the interpreter: a few programs, so the tests exercise split-K
    return int(torch.cuda.get_device_properties(device_index).multi_processor_count)


def block_m(m: int, dot: bool) -> int:
    return max(16, triton.next_power_of_2(m)) if dot else triton.next_power_of_2(m)


# CUDA-core path, per BLOCK_M: (BLOCK_N, BLOCK_K) of 4096 products (32 float32 registers a thread
# at 4 warps), K blocks long enough that a program issues most of a row's loads at once (the H200
# run's fastest at M = 1 and 2; at M >= 4 tl.dot with 3 stages was faster than any of these)
_REDUCE_TILES = {1: (4, 1024), 2: (2, 2048)}


def split_for(n: int, k: int, block_n: int, block_k: int, sms: int) -> int:
    """Split K (by powers of two) until there are four programs per SM, each split keeping at
    least one K block."""
    tiles, split = triton.cdiv(n, block_n), 1
    while tiles * split < 4 * sms and k // (2 * split) >= block_k:
        split *= 2
    return split


def choose_config(m: int, n: int, k: int, sms: int) -> GemvConfig:
    """The default config (``decode_gemv=on`` off the measured table): M <= 2 on the CUDA cores
    (``_REDUCE_TILES``), larger M by ``tl.dot`` on M padded to 16 (3 stages up to M = 8); split-K
    where N alone leaves SMs without a few programs."""
    if m > 2:
        bn, bk, dot, stages = 32, 128, True, 3 if m <= 8 else 2
    else:
        bn, bk = _REDUCE_TILES[triton.next_power_of_2(m)]
        bk, dot, stages = min(bk, max(16, triton.next_power_of_2(k))), False, 2
    return GemvConfig(bn, bk, split_for(n, k, bn, bk, sms), 4, dot, stages)


_LOCKS: dict[tuple[torch.device, int], torch.Tensor] = {}


def _locks(device: torch.device, tiles: int) -> torch.Tensor:
    """Per-tile arrival counters, zero at rest (each call's last program resets its tile's).
    One buffer per device and size class; calls on one stream never overlap, so they share it."""
    size = max(1024, triton.next_power_of_2(tiles))
    key = (device, size)
    buf = _LOCKS.get(key)
    if buf is None:
        buf = _LOCKS[key] = torch.zeros(size, dtype=torch.int32, device=device)
    return buf


def gemv(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None = None,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """``F.linear(x, w, b)`` for x [..., K] with few rows, by the Triton kernel."""
    lead, k = x.shape[:-1], x.shape[-1]
    n = w.shape[0]
    if w.shape[1] != k:
        raise ValueError(f"gemv: x has {k} features, w is {tuple(w.shape)}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if w.stride(-1) != 1:
        w = w.contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y.view(*lead, n)
    dev_index = (x.device.index or 0) if x.device.type == "cuda" else 0
    cfg = config or choose_config(m, n, k, num_sms(dev_index))
    bm = block_m(m, cfg.dot)
    tiles = triton.cdiv(n, cfg.block_n)
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    split = triton.cdiv(k, k_per_split)  # never an empty split
    if split > 1:
        part = torch.empty((tiles, split, bm, cfg.block_n), dtype=torch.float32, device=x.device)
        locks = _locks(x.device, tiles)
    else:
        part = locks = y
    _gemv_kernel[(tiles, split)](
        x2,
        w,
        b if b is not None else w,
        y,
        part,
        locks,
        m,
        n,
        k,
        x2.stride(0),
        w.stride(0),
        y.stride(0),
        k_per_split,
        split,
        HAS_BIAS=b is not None,
        BLOCK_M=bm,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        SPLIT=split > 1,
        EVEN_K=k % cfg.block_k == 0 and k_per_split % cfg.block_k == 0,
        DOT=cfg.dot,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        DOT_F32=x.dtype == torch.float32 or x.device.type == "cpu",
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return y.view(*lead, n)


# -- dispatch ----------------------------------------------------------------------------------------
GEMV_MODES = ("auto", "on", "off")
# auto: (M rounded up to a power of two, N, K) -> the config that the H200 run measured fastest,
# for the shapes where it beat F.linear by >= 3% (bf16, per call under graph replay, F.linear's
# time -> the kernel's; `kvtier bench gpu-decode --parts gemv`, docs/benchmarks.md):
# (block_n, block_k, split_k, num_warps, num_stages, dot). Other shapes: F.linear, except at
# M <= AUTO_ALL_ROWS (choose_config's config there).
TUNED: dict[tuple[int, int, int], tuple[int, int, int, int, int, bool]] = {
    # synthetic:llama-3.2-1b (Llama 3.2 1B shapes): q/k/v, o, down, LM head (gate/up: cuBLAS)
    (1, 3072, 2048): (4, 1024, 1, 4, 2, False),  # 6.9 -> 5.2 us
    (1, 2048, 2048): (4, 2048, 1, 4, 1, False),  # 6.2 -> 4.1 us
    (2, 2048, 2048): (4, 1024, 1, 4, 2, False),  # 6.2 -> 5.1 us
    (1, 2048, 8192): (4, 2048, 1, 4, 2, False),  # 14.3 -> 11.1 us
    (2, 2048, 8192): (2, 2048, 1, 4, 2, False),  # 13.8 -> 11.8 us
    (1, 128256, 2048): (4, 1024, 1, 4, 2, False),  # 127.2 -> 123.0 us
    # synthetic:llama-3.1-8b (Llama 3.1 8B shapes)
    (1, 6144, 4096): (8, 512, 1, 4, 2, False),  # 16.8 -> 15.1 us
    (1, 4096, 4096): (4, 1024, 1, 4, 2, False),  # 13.6 -> 10.9 us
    (2, 4096, 4096): (2, 2048, 1, 4, 2, False),  # 13.4 -> 12.8 us
    (16, 4096, 4096): (32, 128, 8, 4, 2, True),  # 13.9 -> 13.4 us
    (1, 4096, 14336): (4, 1024, 1, 4, 2, False),  # 33.0 -> 31.0 us
    (1, 128256, 4096): (16, 256, 1, 4, 2, False),  # 254.2 -> 245.2 us
}


def tuned_config(m: int, n: int, k: int) -> GemvConfig | None:
    t = TUNED.get((triton.next_power_of_2(m), n, k))
    return None if t is None else GemvConfig(t[0], t[1], t[2], t[3], t[5], t[4])


# auto: every projection at M <= this on the kernel, measured shapes or not. Per call, gate/up at M = 1
# was 5% slower on the kernel (20.2 vs 19.2 us), but end to end the whole step on the kernel beat
# the per-shape choice on both models (H200, same run: 1B 1045 vs 978 tok/s, 8B 228 vs 222); the
# kernel won or tied on every measured shape at M = 1. Not so at M = 2 (gate/up 26 vs 20 us).
AUTO_ALL_ROWS = 1


def linear(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, max_m: int, auto: bool = False
) -> torch.Tensor:
    """The fused path's projection: the small-M kernel for at most ``max_m`` rows (0: never; with
    ``auto`` only the shapes measured faster, with their measured config, and any shape at M <=
    ``AUTO_ALL_ROWS``), ``F.linear`` otherwise."""
    m = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if 0 < m <= max_m:
        cfg = tuned_config(m, w.shape[0], w.shape[1])
        if cfg is not None or not auto or m <= AUTO_ALL_ROWS:
            return gemv(x, w, b, cfg)
    return F.linear(x, w, b)


def resolve(mode: str, device: torch.device, max_m: int) -> tuple[int, bool]:
    """(row threshold, auto) for ``linear``: ``off`` (0, -); ``on`` max_m wherever the kernel runs
    (CUDA, or the interpreter in tests); ``auto`` the measured shapes up to max_m, on CUDA only."""
    from kvtier.model.kernels import available

    if mode not in GEMV_MODES:
        raise ValueError(f"decode_gemv must be one of {', '.join(GEMV_MODES)}, got {mode!r}")
    if mode == "off" or not available(device) or (mode == "auto" and device.type != "cuda"):
        return 0, False
    return max_m, mode == "auto"
