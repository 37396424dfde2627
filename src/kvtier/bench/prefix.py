"""`kvtier bench prefix`: TTFT with a cached prefix."""

from __future__ import annotations

import argparse
import random
import statistics
from typing import Any

from kvtier.bench.engine_common import (
    FlopModel,
    Timeline,
    decode_weight_bytes,
    engine_settings,
    finish,
    make_engine,
    random_tokens,
    run_one,
    start,
)
from kvtier.bench.report import fraction, print_table, progress
from kvtier.config import EngineConfig
from kvtier.engine.engine import Engine
from kvtier.engine.request import SamplingParams
from kvtier.engine.tiers import host_copy_bandwidth


def bench_prefix_ttft(args: argparse.Namespace) -> None:
    engine = make_engine(args, enable_prefix_caching=True)
    title = (
        f"prefix-ttft: {args.prefix_len}-token shared prefix + a {args.min_suffix}-{args.max_suffix} "
        f"token suffix, cold vs cached prefix, median of {args.repeats}"
    )
    ctx = start(args, engine, title)
    ceilings = ctx.ceilings
    if engine.hierarchy is not None:
        print(f"note: tiers {engine.config.tiers.tiers!r} are on: a cold prompt may be loaded from them\n")
    cold_engine = engine
    if args.cold_mode == "off":  # a second engine on the same weights, prefix caching off
        config = EngineConfig.load(engine_settings(args, enable_prefix_caching=False))
        cold_engine = Engine(config, loaded=engine.loaded)
    vocab = engine.loaded.config.vocab_size
    rng = random.Random(args.seed)
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)

    def suffixes(r: random.Random, k: int) -> list[list[int]]:
        return [random_tokens(r, r.randint(args.min_suffix, args.max_suffix), vocab) for _ in range(k)]

    # warm-up: both paths once, on a prefix of its own (its own generator: the workload stays the same)
    warm_rng = random.Random(args.seed + 1)
    other = random_tokens(warm_rng, args.prefix_len, vocab)
    for s in suffixes(warm_rng, 2):
        run_one(engine, other + s, one)
    if cold_engine is not engine:
        run_one(cold_engine, other + suffixes(warm_rng, 1)[0], one)

    prefix = random_tokens(rng, args.prefix_len, vocab)
    tails = suffixes(rng, args.repeats)
    cold = []
    for s in tails:
        cold_engine.pool.reset_cache()  # nothing of this prompt is cached
        cold.append(run_one(cold_engine, prefix + s, one))
    engine.pool.reset_cache()
    run_one(engine, prefix, one)  # the prefix once: its full blocks get keys
    warm = [run_one(engine, prefix + s, one) for s in progress(tails, "warm prompts")]
    loaded = _loaded_from_tiers(engine, prefix, tails, one)

    flops = FlopModel.of(engine)
    weight_bytes = decode_weight_bytes(engine)
    kv_per_token = engine.layout.bytes_per_token

    def floor_s(t: Timeline) -> float | None:
        """The larger of compute (useful FLOPs / matmul rate) and memory (weights read once, cached
        KV read, new KV written / copy bandwidth)."""
        if not ceilings:
            return None
        cached, total = t.output.num_cached_tokens, len(t.output.prompt_token_ids)
        compute = flops.tokens(cached, total, 1) / ceilings["matmul_flops"]
        memory = (weight_bytes + kv_per_token * total) / ceilings["copy_bandwidth"]
        return max(compute, memory)

    summary: dict[str, Any] = {}
    rows = []
    for name, runs in (("cold", cold), ("warm", warm), ("tier", loaded)):
        if not runs:
            continue
        cached = [t.output.num_cached_tokens for t in runs]
        computed = [len(t.output.prompt_token_ids) - c for t, c in zip(runs, cached, strict=True)]
        useful = [flops.tokens(t.output.num_cached_tokens, len(t.output.prompt_token_ids), 1) for t in runs]
        eng = statistics.median(t.engine_ttft for t in runs)
        wall = statistics.median(t.wall_ttft for t in runs)
        floors = [floor_s(t) for t in runs]
        floor = statistics.median(f for f in floors if f is not None) if ceilings else None
        summary[name] = {
            "ttft_engine_s": [t.engine_ttft for t in runs],
            "ttft_wall_s": [t.wall_ttft for t in runs],
            "ttft_engine_median_s": eng,
            "ttft_wall_median_s": wall,
            "cached_tokens": cached,
            "prompt_tokens": [len(t.output.prompt_token_ids) for t in runs],
            "useful_flops_median": statistics.median(useful),
            "compute_floor_s": floor,
        }
        rows.append(
            [
                name,
                f"{statistics.median(cached):.0f}",
                f"{statistics.median(computed):.0f}",
                f"{1e3 * eng:.1f}",
                f"{1e3 * wall:.1f}",
                f"{1e3 * min(t.engine_ttft for t in runs):.1f}-{1e3 * max(t.engine_ttft for t in runs):.1f}",
                f"{1e3 * floor:.1f}" if floor else "-",
                fraction(floor, eng) if floor else "-",
            ]
        )
    headers = [
        "prefix",
        "cached tokens",
        "computed tokens",
        "TTFT ms",
        "wall TTFT ms",
        "TTFT range ms",
        "floor ms",
        "floor / TTFT",
    ]
    print_table(headers, rows)
    if loaded:
        summary["tier_load"] = _tier_load_summary(engine, loaded, summary["cold"]["ttft_engine_median_s"])
    ratio = summary["cold"]["ttft_engine_median_s"] / max(summary["warm"]["ttft_engine_median_s"], 1e-9)
    wall_ratio = summary["cold"]["ttft_wall_median_s"] / max(summary["warm"]["ttft_wall_median_s"], 1e-9)
    summary["speedup"] = ratio
    summary["speedup_wall"] = wall_ratio
    print(f"\ncold / warm TTFT: {ratio:.1f}x (engine metric), {wall_ratio:.1f}x (wall)")
    if loaded:
        t = summary["tier_load"]
        h2d = t["pinned_h2d_bytes_per_s"]
        ceiling = ""
        if h2d:
            share = fraction(t["bytes_per_s"], h2d)
            ceiling = f" ({share} of a pinned host-to-device copy, {h2d / 1e9:.1f} GB/s)"
        print(
            f"tier: the device pool emptied before each prompt, its prefix loaded from "
            f"{engine.config.tiers.tiers}: TTFT {t['ttft_of_cold']:.1%} of cold; "
            f"{t['loaded_bytes'] / 1e6:.3g} MB loaded at >= {t['bytes_per_s'] / 1e9:.3g} GB/s"
            f"{ceiling} (the whole TTFT counted as load time)"
        )
        if t["layered_copy_bytes_per_s"]:
            rate = t["layered_copy_bytes_per_s"]
            share = f" = {fraction(rate, h2d)} of the pinned copy" if h2d else ""
            print(
                f"layered: {t['layered_loads']} loads copied layer by layer under the compute, "
                f"their copies at {rate / 1e9:.3g} GB/s{share} (CUDA events)"
            )
    print(
        f"cold = {'pool reset before each prompt' if args.cold_mode == 'reset' else 'prefix caching off'}; "
        "warm = the prefix ran once, then prompts sharing it; the same suffixes in both. "
        "floor = max(useful FLOPs / matmul rate, weight + KV bytes / copy bandwidth)."
    )
    finish(args, ctx, title, summary)


def _loaded_from_tiers(
    engine: Engine, prefix: list[int], tails: list[list[int]], params: SamplingParams
) -> list[Timeline]:
    """With tiers below the pool: each prompt again after the device pool forgot the prefix, so
    its blocks come from the tiers: written through as they were computed, or written back as the
    pool evicts them (the host tier's default), which ``evict_all`` does here."""
    if engine.hierarchy is None or engine.kv is None:
        return []
    runs = []
    for s in progress(tails, "prompts loaded from the tiers"):
        engine.pool.evict_all()  # write-back tiers receive the prefix, as under memory pressure
        engine.kv.flush()
        engine.hierarchy.flush()  # every block of the prefix is stored
        runs.append(run_one(engine, prefix + s, params))
    return runs


def _tier_load_summary(engine: Engine, runs: list[Timeline], cold_ttft: float) -> dict[str, Any]:
    loaded = statistics.median(int(t.output.metrics.get("num_loaded_tokens", 0)) for t in runs)
    ttft = statistics.median(t.engine_ttft for t in runs)
    loaded_bytes = loaded * engine.layout.bytes_per_token
    stats = engine.hierarchy.stats if engine.hierarchy is not None else None
    layered = stats is not None and stats.layered_copy_seconds > 0
    return {
        # loads copied layer by layer under the compute: the copies' own rate (CUDA events)
        "layered_loads": stats.loads_layered if stats is not None else 0,
        "layered_copy_bytes_per_s": (
            stats.layered_copy_bytes / stats.layered_copy_seconds if stats is not None and layered else None
        ),
        "loaded_tokens_median": loaded,
        "loaded_bytes": loaded_bytes,
        "ttft_of_cold": ttft / cold_ttft,
        "bytes_per_s": loaded_bytes / ttft if ttft else 0.0,
        # a 256 MiB copy from page-locked memory: the ceiling of the load (CUDA only). Not 1 GiB:
        # beside the pool that took the memory it ran out of device memory on an H100
        "pinned_h2d_bytes_per_s": (
            host_copy_bandwidth(engine.device, 256 << 20) if engine.device.type == "cuda" else None
        ),
    }
