"""What storing KV below the device costs a step, and how soon another process can read it.

    python3 bench/bench_persist.py prefill [--model synthetic:llama-3.1-8b --prompt-len 4096]
    python3 bench/bench_persist.py demo    [--model synthetic:small]

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

Disk folders are fresh temporary folders, removed at the end. This script never asserts on time.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

try:
    import kvtier  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kvtier.config import EngineConfig
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


def _machine(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return (
        f"device {name}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )


def _engine(args: argparse.Namespace, loaded: LoadedModel, settings: dict[str, Any], folder: str) -> Engine:
    config = EngineConfig.load(
        {
            "model": args.model,
            "device": args.device,
            "kv_cache_memory": args.kv_cache_memory,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "disk_path": folder,
            "load_policy": "cost",
            **settings,
        }
    )
    return Engine(config, loaded)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prefill(engine: Engine, prompt: list[int]) -> tuple[float, float, int]:
    """(prefill seconds, write lag seconds, cached tokens) of one cold request."""
    _sync(engine.device)
    start = time.perf_counter()
    engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    out = None
    while engine.has_unfinished():
        for o in engine.step():
            out = o if o.finished else out
    done = time.perf_counter()
    engine.flush_writes(timeout=120.0)
    lag = time.perf_counter() - done
    assert out is not None
    return done - start, lag, out.num_cached_tokens


def cmd_prefill(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    loaded = load_model(args.model, device)
    vocab = loaded.config.vocab_size
    rng = random.Random(args.seed)
    names = [n for n in PREFILL_CONFIGS if device.type == "cuda" or "host" not in n]
    print(_machine(device))
    print(f"model {args.model}, cold prefill of {args.prompt_len} tokens, {args.repeats} runs each (median)")
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
                assert cached == 0, "a cold prompt hit the cache"
                times[name].append(t)
                lags[name].append(lag)
        for name, engine in engines.items():
            dropped = engine.hierarchy.writes.dropped if engine.hierarchy is not None else 0
            engine.close()
            rows.append((name, statistics.median(times[name]), statistics.median(lags[name]), dropped))
    base = rows[0][1]
    print(f"{'tiers':<22}{'prefill ms':>12}{'x none':>9}{'write lag ms':>14}{'dropped':>9}")
    for name, t, lag, dropped in rows:
        print(f"{name:<22}{t * 1e3:>12.1f}{t / base:>9.3f}{lag * 1e3:>14.1f}{dropped:>9}")


def cmd_demo(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.progress import Progress

    from kvtier.demo import DemoSpec, _run

    device = resolve_device(args.device)
    loaded = load_model(args.model, device)
    spec = DemoSpec(
        args.model, args.conversations, args.turns, args.system_tokens, args.max_tokens, args.device
    )
    print(_machine(device))
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
    print(
        f"demo: {spec.conversations} conversations x {spec.turns} turns, "
        f"{spec.system_tokens}-token system prompt"
    )
    header = ("tiers", "wall s", "x none", "TTFT p50 ms", "x none", "blocks written", "lag ms")
    pairs = list(zip(header, WIDTHS, strict=True))
    print(f"{pairs[0][0]:<{pairs[0][1]}}" + "".join(f"{h:>{w}}" for h, w in pairs[1:]))
    for label, r, lag, written in results:
        ttft = statistics.median(r.ttft)
        print(
            f"{label:<20}{r.wall:>9.2f}{r.wall / base.wall:>8.3f}{ttft * 1e3:>13.0f}"
            f"{ttft / statistics.median(base.ttft):>8.3f}{written:>16}{lag * 1e3:>8.1f}"
        )
    same = results[0][1].outputs == results[1][1].outputs
    print("identical greedy output" if same else "DIFFERENT greedy output")


WIDTHS = (20, 9, 8, 13, 8, 16, 8)


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("prefill", "demo"):
        p = sub.add_parser(name)
        p.add_argument("--model", default="synthetic:small")
        p.add_argument("--device", default="auto")
        p.add_argument("--threads", type=int, default=None)
        p.add_argument("--kv-cache-memory", type=int, default=None)
        p.add_argument("--max-num-batched-tokens", type=int, default=2048)
        p.add_argument("--seed", type=int, default=0)
    sub.choices["prefill"].add_argument("--prompt-len", type=int, default=1024)
    sub.choices["prefill"].add_argument("--repeats", type=int, default=5)
    demo = sub.choices["demo"]
    demo.add_argument("--conversations", type=int, default=4)
    demo.add_argument("--turns", type=int, default=4)
    demo.add_argument("--system-tokens", type=int, default=768)
    demo.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.kv_cache_memory is None:  # fixed, so that every configuration gets the same pool
        args.kv_cache_memory = (8 << 30) if resolve_device(args.device).type == "cuda" else (1 << 30)
    {"prefill": cmd_prefill, "demo": cmd_demo}[args.command](args)


if __name__ == "__main__":
    main()
