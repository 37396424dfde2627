"""`kvtier bench gpu-decode`'s CUDA-only parts: the paged decode kernel alone (Triton at each split
count and tile, the torch reference, PyTorch FlexAttention over the paged pool) and the kernel time
of one eager step by name, with the CUDA-event and CUDA-graph timers they use."""

from __future__ import annotations

import random
import statistics
from typing import TYPE_CHECKING, Any

import torch

from kvtier.engine.request import SamplingParams

if TYPE_CHECKING:
    from kvtier.bench.gpu_decode import GpuDecodeRun


def cuda_time(fn: Any, dev: torch.device, reps: int = 50) -> float:
    """Median seconds of ``fn`` by CUDA events, after warm-up."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize(dev)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def graph_time(fn: Any, dev: torch.device, reps: int = 20) -> float:
    """Median device seconds of ``fn`` replayed from a CUDA graph: the kernel's own time, with no
    Python launch cost (which is what a decode graph pays)."""
    fn()
    torch.cuda.synchronize(dev)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return cuda_time(g.replay, dev, reps)


# -- attention kernel --------------------------------------------------------------------------------
def paged_problem(
    dev: torch.device, rows: int, ctx: int, kv_heads: int, heads: int, dim: int, page: int = 16
) -> dict[str, Any]:
    nb_row = -(-ctx // page)
    num_blocks = rows * nb_row + 8
    pool = torch.randn((2, num_blocks, page, kv_heads, dim), device=dev, dtype=torch.bfloat16)
    perm = torch.randperm(num_blocks, device=dev)[: rows * nb_row].int()
    table = perm.view(rows, nb_row).contiguous()
    q = torch.randn((rows, heads, dim), device=dev, dtype=torch.bfloat16)
    lens = torch.full((rows,), ctx, dtype=torch.int32, device=dev)
    return dict(pool=pool, table=table, q=q, lens=lens, ctx=ctx, page=page)


def flex_decode(p: dict[str, Any], dev: torch.device) -> Any:
    """FlexAttention over the whole pool with a mask mapping each physical key to its row."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    pool, table, q = p["pool"], p["table"], p["q"]
    rows, _, dim = q.shape
    _, nb, page, kvh, _ = pool.shape
    owner = torch.full((nb,), -1, dtype=torch.int32, device=dev)
    logical = torch.zeros((nb,), dtype=torch.int32, device=dev)
    owner[table.flatten().long()] = torch.arange(rows, device=dev, dtype=torch.int32).repeat_interleave(
        table.shape[1]
    )
    logical[table.flatten().long()] = torch.arange(table.shape[1], device=dev, dtype=torch.int32).repeat(rows)
    lens = p["lens"]
    k = pool[0].reshape(1, nb * page, kvh, dim).transpose(1, 2)
    v = pool[1].reshape(1, nb * page, kvh, dim).transpose(1, 2)
    qq = q.transpose(0, 1).unsqueeze(0)  # [1, H, rows, D]: row r is query r

    def mask(b: Any, h: Any, qi: Any, ki: Any) -> Any:
        blk = ki // page
        return (owner[blk] == qi) & (logical[blk] * page + ki % page < lens[qi])

    bm = create_block_mask(mask, None, None, rows, nb * page, device=dev, BLOCK_SIZE=(16, 128))
    fn = torch.compile(flex_attention)
    return lambda: fn(qq, k, v, block_mask=bm, enable_gqa=True)


def part_attention(run: GpuDecodeRun) -> None:
    from kvtier.model.attention import AttentionMetadata, TorchReferenceAttention
    from kvtier.model.kernels.paged_decode import choose_splits, paged_decode

    dev = run.dev
    out: list[dict[str, Any]] = []
    shapes = [(1, 512), (1, 4096), (1, 32768), (8, 4096), (64, 1024), (64, 4096)]
    for rows, ctx in shapes:
        p = paged_problem(dev, rows, ctx, 8, 32, 128)
        kv_bytes = rows * ctx * 2 * 8 * 128 * 2
        row: dict[str, Any] = {"rows": rows, "ctx": ctx, "kv_bytes": kv_bytes}
        auto = choose_splits(rows, 8, ctx, 64, dev)
        row["auto_splits"] = auto
        for splits in (1, 2, 4, 8, 16, 32, 64):
            if splits > max(1, ctx // 64):
                continue
            for bn in (32, 64, 128):
                t = graph_time(
                    lambda s=splits, b=bn, p=p: paged_decode(
                        p["q"], p["pool"], p["table"], p["lens"], 0.088, None, s, block_n=b
                    ),
                    dev,
                )
                row[f"triton_s{splits}_b{bn}_us"] = t * 1e6
        meta = AttentionMetadata(
            slot_mapping=torch.zeros(0, dtype=torch.int64, device=dev),
            query_start_loc=torch.arange(rows + 1, dtype=torch.int32, device=dev),
            context_lens=p["lens"],
            block_tables=p["table"],
            query_lens_host=[1] * rows,
            context_lens_host=[ctx] * rows,
            num_decodes=rows,
        )
        ref = TorchReferenceAttention()

        def reference(p: dict[str, Any] = p, m: Any = meta, ref: Any = ref) -> Any:
            return ref._decode(p["q"], p["pool"], m, 0.088, None, 16, None)

        row["torch_reference_us"] = cuda_time(reference, dev, reps=10) * 1e6
        try:
            if (rows, ctx) in ((1, 4096), (64, 1024)):
                row["flex_us"] = cuda_time(flex_decode(p, dev), dev, reps=20) * 1e6
        except Exception as e:  # FlexAttention is experimental: record why it did not run
            row["flex_error"] = repr(e)[:300]
        best = min((v, k) for k, v in row.items() if k.startswith("triton_"))
        row["best"] = best[1]
        row["best_us"] = best[0]
        row["best_fraction_of_bw"] = kv_bytes / (best[0] / 1e6) / run.bw()
        row["auto_us"] = row[f"triton_s{auto}_b64_us"]
        out.append(row)
        run.log(
            f"attention rows={rows} ctx={ctx}: auto(s={auto}) {row['auto_us']:.1f} us, best {best[1]} "
            f"{best[0]:.1f} us ({row['best_fraction_of_bw']:.0%} of bw), reference "
            f"{row['torch_reference_us']:.1f} us, flex {row.get('flex_us', row.get('flex_error', '-'))}"
        )
    run.results["attention"] = out


# -- profile -----------------------------------------------------------------------------------------
def part_profile(run: GpuDecodeRun) -> None:
    from torch.profiler import ProfilerActivity, profile

    from kvtier.bench.gpu_decode import decode_tps

    out: dict[str, Any] = {}
    for model in run.models:
        eng = run.engine(model, cuda_graph_max_batch=0, kv_cache_memory=2 << 30)
        decode_tps(run, eng, new=16, runs=1)  # warm
        rng = random.Random(4)
        (rid,) = eng.add_request(
            [rng.randrange(100) for _ in range(512)], SamplingParams(max_tokens=40, ignore_eos=True)
        )
        for _ in range(8):
            eng.step()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                eng.step()
        rows = []
        for e in prof.key_averages():
            # torch renamed self_cuda_time_total to self_device_time_total
            device_total = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
            dev_us = float(device_total or 0)
            if dev_us > 0:
                rows.append((dev_us / 10, e.count / 10, e.key[:90]))
        rows.sort(reverse=True)
        total = sum(r[0] for r in rows)
        out[model] = {
            "kernel_us_per_step": total,
            "kernels_per_step": sum(r[1] for r in rows),
            "top": rows[:15],
        }
        run.log(f"profile {model}: {total:.0f} us of kernels per step, {sum(r[1] for r in rows):.0f} kernels")
        for us, cnt, name in rows[:12]:
            run.log(f"   {us:8.1f} us  x{cnt:5.0f}  {name}")
        eng.abort(rid)
        del eng
        run.free()
    run.results["profile"] = out
