"""`kvtier bench persist prefill | demo`: what storing KV below the device costs a step, and how soon
another process can read it (was bench/bench_persist.py, which now calls this).

``prefill``: cold prefills (random prompts, nothing cached anywhere) of ``--prompt-len`` tokens, one
engine per tier configuration (all alive, the runs interleaved), in one process on one device: no
tiers; host write-back (the host tier's default: nothing is written unless evicted); host
write-through (every block copied out at commit); host + disk with the default policies (host
write-back, disk write-through); disk write-through alone. For each: the median prefill time (TTFT
of a 1-token answer), its ratio to no tiers, and the write lag: from the answer to the moment the
write queue is empty, i.e. the time after which another process reads the whole prefix (an upper
bound: each block is readable as soon as its own write ends). CPU runs leave out the host tier.

``demo``: the multi-turn chat of ``kvtier demo`` (prefix caching on), with tiers none and with the
disk tier written through (a fresh folder), in one process: wall time, TTFT p50 and their ratios.

Disk folders are fresh temporary folders, removed at the end. Never asserts on time.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from typing import Any

from kvtier.bench.report import finish, machine_info, print_machine, print_table, sync
from kvtier.config import EngineConfig, parse_bytes
from kvtier.engine.engine import Engine, resolve_device
from kvtier.engine.request import SamplingParams
from kvtier.model.loader import LoadedModel, load_model

PREFILL_CONFIGS: dict[str, dict[str, Any]] = {
    "none": {"tiers": "none"},
    "host write-back": {"tiers": "host", "write_policy": "write-back"},
    "host write-through": {"tiers": "host", "write_policy": "write-through"},
    "host+disk auto": {"tiers": "host,disk", "write_policy": "auto"},
    "disk write-through": {"tiers": "disk", "write_policy": "write-through"},
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("workload", nargs="?", choices=("prefill", "demo"), default="prefill")
    p.add_argument("--model", default="synthetic:small")
    p.add_argument("--device", default="auto")
    p.add_argument("--kv-cache-memory", help="the pool of every configuration (default 8GiB CUDA, 1GiB CPU)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--prompt-len", type=int, default=1024, help="prefill: prompt tokens")
    p.add_argument("--repeats", type=int, default=5, help="prefill: runs of each configuration (median)")
    p.add_argument("--conversations", type=int, default=4, help="demo")
    p.add_argument("--turns", type=int, default=4, help="demo")
    p.add_argument("--system-tokens", type=int, default=768, help="demo")
    p.add_argument("--max-tokens", type=int, default=32, help="demo: tokens per answer")


def bench_persist(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    if args.kv_cache_memory is None:  # fixed, so that every configuration gets the same pool
        args.kv_bytes = (8 << 30) if device.type == "cuda" else (1 << 30)
    else:
        args.kv_bytes = parse_bytes(args.kv_cache_memory)
    machine = machine_info(device)
    loaded = load_model(args.model, device)
    if args.workload == "prefill":
        title = f"persist prefill: {args.model}, {args.prompt_len} tokens cold, median of {args.repeats}"
        print_machine(title, machine)
        results = _bench_prefill(args, loaded)
    else:
        title = f"persist demo: {args.model}, {args.conversations} conversations x {args.turns} turns"
        print_machine(title, machine)
        results = _bench_demo(args, loaded)
    finish(args, title, machine, results)


def _engine(args: argparse.Namespace, loaded: LoadedModel, settings: dict[str, Any], folder: str) -> Engine:
    config = EngineConfig.load(
        {
            "model": args.model,
            "device": args.device,
            "kv_cache_memory": args.kv_bytes,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "disk_path": folder,
            "load_policy": "cost",
            **settings,
        }
    )
    return Engine(config, loaded)


def _prefill(engine: Engine, prompt: list[int]) -> tuple[float, float, int]:
    """(prefill seconds, write lag seconds, cached tokens) of one cold request."""
    sync(engine.device)
    start = time.perf_counter()
    engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    out = None
    while engine.has_unfinished():
        for o in engine.step():
            out = o if o.finished else out
    done = time.perf_counter()
    engine.flush_writes(timeout=120.0)
    lag = time.perf_counter() - done
    if out is None:
        raise RuntimeError("the request gave no output")
    return done - start, lag, out.num_cached_tokens


def _bench_prefill(args: argparse.Namespace, loaded: LoadedModel) -> dict[str, Any]:
    vocab = loaded.config.vocab_size
    rng = random.Random(args.seed)
    cuda = resolve_device(args.device).type == "cuda"
    names = [n for n in PREFILL_CONFIGS if cuda or "host" not in n]
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvtier-bench-") as tmp:
        # Every engine alive at once and the runs interleaved (none, host, ..., none, host, ...):
        # on a shared machine the load drifts, and each configuration then sees the same drift.
        engines = {
            n: _engine(args, loaded, PREFILL_CONFIGS[n], os.path.join(tmp, str(i)))
            for i, n in enumerate(names)
        }
        for engine in engines.values():
            _prefill(engine, [rng.randrange(vocab) for _ in range(args.prompt_len)])  # warm-up
        times: dict[str, list[float]] = {n: [] for n in names}
        lags: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(args.repeats):
            for name, engine in engines.items():
                t, lag, cached = _prefill(engine, [rng.randrange(vocab) for _ in range(args.prompt_len)])
                if cached:
                    raise RuntimeError(
                        f"a cold prompt hit the cache ({cached} tokens): the figures would lie"
                    )
                times[name].append(t)
                lags[name].append(lag)
        for name, engine in engines.items():
            dropped = engine.hierarchy.writes.dropped if engine.hierarchy is not None else 0
            engine.close()
            rows.append((name, statistics.median(times[name]), statistics.median(lags[name]), dropped))
    base = rows[0][1]
    print_table(
        ["tiers", "prefill ms", "x none", "write lag ms", "dropped"],
        [[n, f"{t * 1e3:.1f}", f"{t / base:.3f}", f"{lag * 1e3:.1f}", str(d)] for n, t, lag, d in rows],
    )
    return {
        "prompt_len": args.prompt_len,
        "configs": {n: {"prefill_s": times[n], "write_lag_s": lags[n], "dropped": d} for n, _, _, d in rows},
    }


def _bench_demo(args: argparse.Namespace, loaded: LoadedModel) -> dict[str, Any]:
    from rich.console import Console
    from rich.progress import Progress

    from kvtier.demo import DemoSpec, _run

    spec = DemoSpec(
        args.model, args.conversations, args.turns, args.system_tokens, args.max_tokens, args.device
    )
    results = []
    with (
        tempfile.TemporaryDirectory(prefix="kvtier-bench-") as tmp,
        Progress(console=Console(stderr=True), transient=True) as progress,
    ):
        for label, settings in (("none", {"tiers": "none"}), ("disk write-through", {"tiers": "disk"})):
            engine = _engine(args, loaded, {**settings, "write_policy": "auto"}, tmp)
            result = _run(label, engine, spec, progress)
            start = time.perf_counter()
            engine.flush_writes(timeout=120.0)
            lag = time.perf_counter() - start
            written = engine.hierarchy.stats.blocks_written if engine.hierarchy is not None else 0
            engine.close()
            results.append((label, result, lag, written))
    base = results[0][1]
    print(f"{spec.system_tokens}-token system prompt, {spec.max_tokens} tokens per answer\n")
    rows = []
    for label, r, lag, written in results:
        ttft = statistics.median(r.ttft)
        rows.append(
            [
                label,
                f"{r.wall:.2f}",
                f"{r.wall / base.wall:.3f}",
                f"{ttft * 1e3:.0f}",
                f"{ttft / statistics.median(base.ttft):.3f}",
                str(written),
                f"{lag * 1e3:.1f}",
            ]
        )
    print_table(["tiers", "wall s", "x none", "TTFT p50 ms", "x none", "blocks written", "lag ms"], rows)
    same = results[0][1].outputs == results[1][1].outputs
    print("identical greedy output" if same else "DIFFERENT greedy output")
    return {
        "identical_output": same,
        "runs": {
            label: {"wall_s": r.wall, "ttft_s": r.ttft, "write_lag_s": lag, "blocks_written": w}
            for label, r, lag, w in results
        },
    }
