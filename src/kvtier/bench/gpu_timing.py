"""`kvtier bench gpu-decode`'s CUDA-only parts: the paged decode kernel alone (Triton at each split
count and tile, the torch reference, PyTorch FlexAttention over the paged pool) and the kernel time
of one eager step by name, with the CUDA-event and CUDA-graph timers they use."""

from __future__ import annotations

import os
import random
import statistics
import time
from typing import TYPE_CHECKING, Any

import torch

from kvtier.bench.report import print_table
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
        a, b = (
            torch.cuda.Event(enable_timing=True),
            torch.cuda.Event(enable_timing=True),
        )
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
    dev: torch.device,
    rows: int,
    ctx: int,
    kv_heads: int,
    heads: int,
    dim: int,
    page: int = 16,
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
                        p["q"],
                        p["pool"],
                        p["table"],
                        p["lens"],
                        0.088,
                        None,
                        s,
                        block_n=b,
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
            [rng.randrange(100) for _ in range(512)],
            SamplingParams(max_tokens=40, ignore_eos=True),
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


# -- small-M projections -----------------------------------------------------------------------------
GEMV_MS = (1, 2, 4, 8, 16, 32, 64)
L2_FLUSH_BYTES = 256 << 20  # weight copies per timed graph: more than the H200's 50 MB L2, so every
# call streams its weight from memory, as a decode step does (it never re-reads a projection)


def projection_shapes(model: str) -> list[tuple[str, int, int, int]]:
    """(name, N, K, calls per decode step) of each projection of the fused path."""
    from kvtier.model.loader import SYNTHETIC_MODELS

    spec = SYNTHETIC_MODELS[model.removeprefix("synthetic:")]
    h, inter, layers = (
        spec["hidden_size"],
        spec["intermediate_size"],
        spec["num_hidden_layers"],
    )
    heads, kv = spec["num_attention_heads"], spec["num_key_value_heads"]
    d = spec.get("head_dim", h // heads)
    return [
        ("qkv", (heads + 2 * kv) * d, h, layers),
        ("o", h, heads * d, layers),
        ("gate_up", 2 * inter, h, layers),
        ("down", h, inter, layers),
        ("lm_head", spec["vocab_size"], h, 1),
    ]


def gemv_candidates(m: int, n: int, k: int, sms: int) -> list[Any]:
    """The auto config and a few neighbours (tile sizes, split counts, warps, stages)."""
    from kvtier.model.kernels.gemv import GemvConfig, choose_config, split_for

    auto = choose_config(m, n, k, sms)
    out = [auto]
    bm = triton_next_pow2(m)
    if not auto.dot:
        for bn, bk, warps in REDUCE_SWEEP:
            if bm * bn * bk <= 2048 * warps and bk <= triton_next_pow2(k):
                out.append(GemvConfig(bn, bk, split_for(n, k, bn, bk, sms), warps))
    for bn, bk, stages in DOT_SWEEP if m <= 16 else DOT_SWEEP[:2]:
        out.append(GemvConfig(bn, bk, split_for(n, k, bn, bk, sms), 4, True, stages))
    for split in (auto.split_k // 2, auto.split_k * 2):
        if split >= 1:
            out.append(GemvConfig(auto.block_n, auto.block_k, split, auto.num_warps, auto.dot))
    out.append(GemvConfig(auto.block_n, auto.block_k, auto.split_k, 8, auto.dot))
    out.append(GemvConfig(auto.block_n, auto.block_k, auto.split_k, auto.num_warps, auto.dot, 1))
    return list(dict.fromkeys(out))


REDUCE_SWEEP = [
    (8, 512, 4),
    (4, 1024, 4),
    (4, 2048, 4),
    (2, 2048, 4),
    (8, 1024, 8),
    (4, 2048, 8),
    (16, 256, 4),
]
DOT_SWEEP = [(32, 128, 3), (16, 256, 3), (64, 64, 4), (16, 128, 4)]


def triton_next_pow2(m: int) -> int:
    return 1 << (m - 1).bit_length()


def time_calls(fn: Any, copies: list[torch.Tensor], dev: torch.device) -> tuple[float, torch.Tensor]:
    """Seconds per call of ``fn(w)`` over the weight copies, back to back in one CUDA graph (launch
    gaps as in a decode graph), and the graph's output of the first copy."""
    outs: list[torch.Tensor] = []

    def body() -> None:
        outs.clear()
        outs.extend(fn(w) for w in copies)

    total = graph_time(body, dev, reps=10)
    return total / len(copies), outs[0]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item())


def weight_copies(run: GpuDecodeRun, n: int, k: int) -> list[torch.Tensor]:
    dtype = getattr(torch, run.dtype)
    nbytes = n * k * torch.finfo(dtype).bits // 8
    count = max(2, -(-L2_FLUSH_BYTES // nbytes))
    return [torch.randn(n, k, device=run.dev, dtype=dtype) * 0.02 for _ in range(count)]


def gemv_shape(
    run: GpuDecodeRun, copies: list[torch.Tensor], m: int, sms: int, sweep: bool = True
) -> dict[str, Any]:
    """Every variant at one (M, N, K) (without ``sweep``: F.linear both ways and the kernel's
    auto config only): checked against F.linear in float32, then timed."""
    import torch.nn.functional as F

    from kvtier.model.kernels.gemv import gemv

    (n, k), dev = copies[0].shape, run.dev
    nbytes = copies[0].numel() * copies[0].element_size()
    x = torch.randn(m, k, device=dev, dtype=copies[0].dtype)
    ref = F.linear(x.float(), copies[0].float())
    row: dict[str, Any] = {
        "m": m,
        "n": n,
        "k": k,
        "weight_bytes": nbytes,
        "copies": len(copies),
    }
    variants: list[tuple[str, Any]] = [("torch", None), ("cublaslt", None)]
    configs = gemv_candidates(m, n, k, sms)
    variants += [(f"triton:{c.name()}", c) for c in (configs if sweep else configs[:1])]
    row["sweep"] = sweep
    default_blas = torch.backends.cuda.preferred_blas_library()
    for name, cfg in variants:
        try:
            if name == "cublaslt":
                torch.backends.cuda.preferred_blas_library("cublaslt")

            def fn(w: torch.Tensor, cfg: Any = cfg) -> torch.Tensor:
                return F.linear(x, w) if cfg is None else gemv(x, w, None, cfg)

            err = rel_err(fn(copies[0]), ref)
            t, graph_out = time_calls(fn, copies, dev)
            graph_err = rel_err(graph_out, ref)
            ok = max(err, graph_err) < 2e-2
            row[name] = {"us": t * 1e6, "err": err, "graph_err": graph_err, "ok": ok}
        except Exception as e:  # a config that does not compile or run: recorded, not fatal
            row[name] = {"error": repr(e)[:300], "ok": False}
        finally:
            torch.backends.cuda.preferred_blas_library(default_blas)
    triton = {k: v for k, v in row.items() if k.startswith("triton:") and v.get("ok")}
    row["auto"] = f"triton:{gemv_candidates(m, n, k, sms)[0].name()}"
    if triton:
        best = min(triton, key=lambda k: triton[k]["us"])
        row["best_triton"] = best
    return row


def part_gemv(run: GpuDecodeRun) -> None:
    """Each projection of each model at M = 1..64 rows: F.linear (torch's default BLAS and
    cuBLASLt) and the small-M Triton kernel (auto config and neighbours), per call under CUDA-graph
    replay, as a fraction of the copy bandwidth; and per decode step summed over the layers. The
    config sweep stops after KVTIER_GEMV_SWEEP_S seconds (default 110; compiles dominate), the rest
    times only the auto config."""
    from kvtier.model.kernels.gemv import num_sms

    sms = num_sms(run.dev.index or 0)
    bw = run.bw()
    out: dict[str, Any] = {"bandwidth": bw, "sms": sms, "models": {}}
    run.results["gemv"] = out
    budget = float(os.environ.get("KVTIER_GEMV_SWEEP_S", "110"))
    t0 = time.perf_counter()
    table = []
    for model in run.models:
        rows: list[dict[str, Any]] = []
        for proj, n, k, calls in projection_shapes(model):
            copies = weight_copies(run, n, k)
            for m in GEMV_MS:
                # the config sweep where the kernel can win (M <= 16), while the time allows
                sweep = m <= 16 and time.perf_counter() - t0 < budget
                r = gemv_shape(run, copies, m, sms, sweep)
                r.update(proj=proj, calls_per_step=calls)
                rows.append(r)
                us = {
                    v: r[v]["us"]
                    for v in ("torch", "cublaslt", r["auto"], r.get("best_triton", ""))
                    if r.get(v, {}).get("us")
                }
                table.append(
                    [model.removeprefix("synthetic:"), proj, str(m), f"{n}x{k}"]
                    + [f"{us[v]:.1f}" if v in us else "-" for v in ("torch", "cublaslt", r["auto"])]
                    + [
                        f"{us[r['best_triton']]:.1f} {r['best_triton'][7:]}" if "best_triton" in r else "-",
                        f"{r['weight_bytes'] / (min(us.values()) / 1e6) / bw:.0%}" if us else "-",
                    ]
                )
                run.log(f"gemv {model} {proj} M={m}: " + ", ".join(f"{v} {t:.1f} us" for v, t in us.items()))
                bad = {
                    v: r[v].get("error") or r[v].get("err")
                    for v in r
                    if isinstance(r[v], dict) and not r[v]["ok"]
                }
                if bad:
                    run.log(f"   FAILED (not timed or wrong): {bad}")
            del copies
            run.free()
            out["models"][model] = {"rows": rows, "per_step": step_sums(rows)}
            run.save()
    print_table(
        [
            "model",
            "proj",
            "M",
            "NxK",
            "torch us",
            "cublasLt us",
            "triton auto us",
            "triton best",
            "best of bw",
        ],
        table,
    )
    steps = [
        [m.removeprefix("synthetic:"), str(M)]
        + [f"{s[v]:.3f}" for v in ("torch", "cublaslt", "auto", "best_triton", "best")]
        for m, res in out["models"].items()
        for M, s in res["per_step"].items()
    ]
    print_table(
        [
            "model",
            "M",
            "torch ms",
            "cublasLt ms",
            "auto ms",
            "best triton ms",
            "best of all ms",
        ],
        steps,
    )


def step_sums(rows: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """Milliseconds of projections per decode step, per M, for each variant (weights x calls)."""
    sums: dict[int, dict[str, float]] = {}
    for r in rows:
        s = sums.setdefault(
            r["m"],
            {v: 0.0 for v in ("torch", "cublaslt", "auto", "best_triton", "best")},
        )
        t = {
            "torch": r["torch"].get("us"),
            "cublaslt": r["cublaslt"].get("us"),
            "auto": r[r["auto"]].get("us") if r[r["auto"]].get("ok") else None,
            "best_triton": r[r["best_triton"]]["us"] if "best_triton" in r else None,
        }
        nan = float("nan")
        for v, us in t.items():
            s[v] += (us if us is not None else nan) * r["calls_per_step"] / 1e3
        s["best"] += min(u for u in t.values() if u is not None) * r["calls_per_step"] / 1e3
    return sums
