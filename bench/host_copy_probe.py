"""How fast can a host-tier load move KV blocks from the page-locked slab to the GPU, by each way of
copying? (H200 figures: docs/benchmarks.md, issue 12, "Ways to copy host blocks to the device".)

The host tier copies one ``cudaMemcpyAsync`` per run of consecutive slots, and its write-backs leave
the slots fragmented, so a load of N blocks is up to N launches. A Triton kernel can instead read
the slab itself (page-locked memory is mapped into the GPU's address space under unified
addressing) and gather any list of slots in one launch, or one launch per group of layers, which a
layer-by-layer load would need. Each way below is timed with CUDA events, median of 10, and
checked against the slab byte for byte.

    PYTHONPATH=src python3 bench/host_copy_probe.py [--blocks 290] [--block-mib 2] [--groups 4]
"""

import argparse
import statistics

import torch
import triton
import triton.language as tl

from kvtier.cache.writes import slot_runs


@triton.jit
def gather_rows(src, dst, slots, row_elems, piece_lo, piece_elems, BLOCK: tl.constexpr):
    """dst[b, piece] = src[slots[b], piece_lo + piece]: one program per (block, BLOCK elements)."""
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < piece_elems
    slot = tl.load(slots + b).to(tl.int64)
    values = tl.load(src + slot * row_elems + piece_lo + offs, mask=mask)
    tl.store(dst + b.to(tl.int64) * row_elems + piece_lo + offs, values, mask=mask)


@triton.jit
def copy_pieces(src_rows, dst, dst_blocks, num_pool_blocks, layer, PIECE: tl.constexpr, BLOCK: tl.constexpr):
    """The layered load's copy without its sums: int64 words of one layer's K/V pieces."""
    j = tl.program_id(0)
    parts: tl.constexpr = PIECE // BLOCK
    half = tl.program_id(1) // parts
    offs = (tl.program_id(1) % parts) * BLOCK + tl.arange(0, BLOCK)
    src = tl.load(src_rows + j).to(tl.pointer_type(tl.int64))
    piece = (layer * 2 + half).to(tl.int64)
    values = tl.load(src + piece * PIECE + offs)
    tl.store(dst + (piece * num_pool_blocks + tl.load(dst_blocks + j)) * PIECE + offs, values)


def layered_ways(args, slab: torch.Tensor, slots: list[int]) -> dict:
    """kvtier's layered load (``LayerGather``: one launch a layer, copy and integrity sums) into an
    8B-shaped pool, alone and beside skinny matmuls on another stream (what an extend step of a
    few tokens is: weight reads at HBM rate), and its copy without the sums."""
    from kvtier.cache.tiers.host_gather import LayerGather

    layers, heads, dim, bs = 32, 8, 128, 16
    if slab.shape[1] * 4 != layers * 2 * bs * heads * dim * 2:
        return {}
    n = len(slots)
    pool = torch.zeros((layers, 2, n + 8, bs, heads, dim), dtype=torch.bfloat16, device="cuda")
    ids = torch.randperm(n + 8)[:n].cuda()
    rows = torch.tensor([slab[s].data_ptr() for s in slots], dtype=torch.int64, device="cuda")
    gather = LayerGather(pool, rows, ids, programs=args.programs)
    side = torch.cuda.Stream()
    x = torch.randn(32, 4096, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(4096, 14336, dtype=torch.bfloat16, device="cuda")

    def layered() -> None:
        for layer in range(layers):
            gather.copy_layer(layer)
        gather.sums()

    def beside_matmuls() -> None:
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            _matmuls(side, x, w)  # ~20 ms of weight reads, longer than the copy
        layered()
        torch.cuda.current_stream().wait_stream(side)

    urgent = torch.cuda.Stream(priority=-1)

    def beside_matmuls_urgent() -> None:  # the copy on a stream of higher priority
        side.wait_stream(torch.cuda.current_stream())
        urgent.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            _matmuls(side, x, w)
        with torch.cuda.stream(urgent):
            layered()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.current_stream().wait_stream(urgent)

    words = pool.view(torch.int64)

    def copy_only() -> None:
        piece = bs * heads * dim * 2 // 8
        for layer in range(layers):
            copy_pieces[(n, 2 * piece // 2048)](rows, words, ids, n + 8, layer, PIECE=piece, BLOCK=2048)

    def check(fn):
        def run() -> None:
            fn()

        run.pool_check = lambda: torch.equal(  # type: ignore[attr-defined]
            pool[:, :, ids].permute(2, 0, 1, 3, 4, 5).reshape(n, -1).view(torch.int32).cpu(), slab[slots]
        )
        return run

    def matmuls_alone() -> None:
        _matmuls(side, x, w)

    matmuls_alone.pool_check = lambda: "-"  # type: ignore[attr-defined]
    return {
        "kvtier LayerGather, 32 launches (copy + sums)": (check(layered), slots),
        "kvtier LayerGather beside skinny matmuls (timed: both)": (check(beside_matmuls), slots),
        "the same, the copy on a high-priority stream (timed: both)": (check(beside_matmuls_urgent), slots),
        "skinny matmuls alone (the 'both' row's other half)": (matmuls_alone, slots),
        "pointer-table copy, 32 launches, no sums": (check(copy_only), slots),
    }


def _matmuls(side: torch.cuda.Stream, x: torch.Tensor, w: torch.Tensor) -> None:
    for _ in range(600):
        torch.mm(x, w)


def timed(fn, repeats: int = 10) -> float:
    """Median milliseconds of ``fn`` on the current stream."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=290, help="blocks per load (the long chat's largest)")
    parser.add_argument("--block-mib", type=float, default=2.0, help="bytes per block (8B, 16 tokens: 2 MiB)")
    parser.add_argument("--groups", type=int, default=4, help="layer groups of a layer-by-layer load")
    parser.add_argument("--slab-blocks", type=int, default=1024)
    parser.add_argument(
        "--programs", type=int, default=16, help="programs of the layered copy (0: one a tile)"
    )
    args = parser.parse_args()
    row_bytes = int(args.block_mib * 2**20)
    row_elems = row_bytes // 4  # int32 elements: the kernel moves 4-byte words
    slab = torch.randint(-(2**31), 2**31 - 1, (args.slab_blocks, row_elems), dtype=torch.int32).pin_memory()
    gen = torch.Generator().manual_seed(0)
    fragmented = torch.randperm(args.slab_blocks, generator=gen)[: args.blocks].tolist()
    contiguous = list(range(args.blocks))
    out = torch.empty((args.blocks, row_elems), dtype=torch.int32, device="cuda")
    nbytes = args.blocks * row_bytes

    def per_run_memcpy(slots: list[int]):
        runs = slot_runs(slots, args.slab_blocks)  # the host tier's own split (one slab, one chunk)

        def run() -> None:
            for i, first, count in runs:
                out[i : i + count].copy_(slab[first : first + count], non_blocking=True)

        return run

    def uva_gather(slots: list[int], groups: int = 1, block: int = 4096):
        index = torch.tensor(slots, dtype=torch.int32, device="cuda")
        piece = row_elems // groups

        def run() -> None:
            for g in range(groups):
                grid = (len(slots), triton.cdiv(piece, block))
                gather_rows[grid](slab, out, index, row_elems, g * piece, piece, BLOCK=block)

        return run

    def strided_group_copy(groups: int):
        piece = row_elems // groups

        def run() -> None:  # torch's copy of a strided page-locked slice (one run of slots)
            for g in range(groups):
                lo = g * piece
                out[:, lo : lo + piece].copy_(slab[: args.blocks, lo : lo + piece], non_blocking=True)

        return run

    ways = {
        "memcpy, contiguous slots (1 copy)": (per_run_memcpy(contiguous), contiguous),
        f"memcpy per run, fragmented slots ({args.blocks} copies)": (per_run_memcpy(fragmented), fragmented),
        "Triton gather from the slab, fragmented, 1 launch": (uva_gather(fragmented), fragmented),
        f"Triton gather, fragmented, {args.groups} layer groups": (
            uva_gather(fragmented, args.groups),
            fragmented,
        ),
        f"torch strided copy, contiguous, {args.groups} layer groups": (
            strided_group_copy(args.groups),
            contiguous,
        ),
    }
    ways.update(layered_ways(args, slab, fragmented))
    size = f"{args.blocks} blocks of {row_bytes / 2**20:.1f} MiB = {nbytes / 1e6:.0f} MB"
    print(f"{size}; {torch.cuda.get_device_name()}")
    print("| way | ms | GB/s | of contiguous memcpy | checked |")
    print("|---|---|---|---|---|")
    base = None
    for name, (fn, slots) in ways.items():
        try:
            ms = timed(fn)
        except Exception as exc:  # a way the platform refuses is a finding, not a crash
            print(f"| {name} | failed: {type(exc).__name__}: {str(exc)[:120]} | | | |")
            continue
        out.zero_()
        fn()
        torch.cuda.synchronize()
        pool_check = getattr(fn, "pool_check", None)
        ok = pool_check() if pool_check is not None else torch.equal(out.cpu(), slab[slots])
        base = base or ms
        print(f"| {name} | {ms:.2f} | {nbytes / ms / 1e6:.1f} | {base / ms:.2f}x | {ok} |")


if __name__ == "__main__":
    main()
