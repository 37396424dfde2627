"""Engine benchmarks: batch-1 decode speed, offline throughput, and TTFT with a cached prefix.

    python3 bench/bench_engine.py decode       [--prompt-len 128 --output-len 128]
    python3 bench/bench_engine.py throughput   [--num-requests N --min-len 100 --max-len 1024]
    python3 bench/bench_engine.py prefix-ttft  [--prefix-len 2048 --min-suffix 16 --max-suffix 32]

Common options: --model synthetic:small (default) or a checkpoint folder, --device auto|cpu|cuda,
--dtype auto|float32|float16|bfloat16, --threads N, engine settings (--block-size, --kv-cache-memory,
--max-num-batched-tokens, --max-num-seqs, --tiers, --set NAME=VALUE for any other), --json PATH.

Each run prints the machine, the engine settings, the measured ceilings of this device (a large
tensor copy for memory bandwidth, a square matmul for the FLOP rate; --no-ceilings skips them) and
a table. Achieved figures are put next to those ceilings, as the design's "Performance method"
asks: decode reports the weight (and KV) bytes each step must read over the step time (GB/s, and the
fraction of copy bandwidth); throughput reports useful model FLOP/s (linear layers + causal attention,
as a fraction of the matmul rate); prefix-ttft gives each TTFT's floor, the larger of its useful
FLOPs over the matmul rate and its weight + KV bytes over the copy bandwidth.

Every subcommand runs a warm-up request first. Times come from ``time.perf_counter`` after the step
that returned the token; the engine's step reads the sampled ids back to the host, which synchronises
CUDA, and the script synchronises again before every timer starts. The KV tiers below the device
pool are off by default (--tiers none) so that a "cold" prompt is really computed, not loaded from
disk left by an earlier run.

This script never asserts on time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

try:
    import kvtier  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kvtier.config import EngineConfig
from kvtier.engine.engine import Engine
from kvtier.engine.llm import LLM
from kvtier.engine.request import RequestOutput, SamplingParams

GB = 1e9


# -- set-up --------------------------------------------------------------------------------------
def parse_bytes(text: str) -> int:
    """``4294967296``, ``4GiB``, ``512MiB``, ``2GB``: bytes."""
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9}
    low = text.strip().lower()
    for suffix, mult in units.items():
        if low.endswith(suffix):
            return int(float(low[: -len(suffix)]) * mult)
    return int(float(low))


def engine_settings(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "model": args.model,
        "device": args.device,
        "dtype": args.dtype,
        "seed": args.model_seed,
        "tiers": args.tiers,
        "block_size": args.block_size,
        "kv_cache_memory": parse_bytes(args.kv_cache_memory) if args.kv_cache_memory else None,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_num_seqs": args.max_num_seqs,
    }
    for item in args.set or []:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set wants NAME=VALUE, got {item!r}")
        settings[name.strip()] = value.strip()
    settings.update(extra)
    return {k: v for k, v in settings.items() if v is not None}


def make_engine(args: argparse.Namespace, **extra: Any) -> Engine:
    return LLM(**engine_settings(args, **extra)).engine


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> float | None:
    """1-minute load average: other processes on the machine make every figure here noisier."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def machine_info(dev: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if dev.type == "cuda" else None,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "host": platform.node(),
        "load_average_1m": load_average(),
    }
    return info


def settings_info(engine: Engine) -> dict[str, Any]:
    cfg, mc = engine.config, engine.loaded.config
    params = unique_params(engine.model)
    return {
        "model": engine.loaded.name,
        "params": sum(p.numel() for p in params),
        "dtype": str(mc.dtype).removeprefix("torch."),
        "block_size": cfg.pool.block_size,
        "kv_blocks": engine.num_blocks,
        "kv_pool_bytes": engine.num_blocks * engine.layout.bytes_per_block,
        "max_num_batched_tokens": cfg.scheduler.max_num_batched_tokens,
        "max_num_seqs": cfg.scheduler.max_num_seqs,
        "prefix_caching": cfg.pool.enable_prefix_caching,
        "tiers": cfg.tiers.tiers,
        "attention_backend": cfg.model.attention_backend,
    }


# -- what a model must move and compute ------------------------------------------------------------
def unique_params(model: torch.nn.Module) -> list[torch.Tensor]:
    seen: set[int] = set()
    out = []
    for p in model.parameters():  # tied weights appear once
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            out.append(p)
    return out


def decode_weight_bytes(engine: Engine) -> int:
    """Weight bytes one decode step must read: every parameter but the embedding table, of which a
    step reads one row (unless it is tied to the LM head, which reads all of it)."""
    model = engine.model
    total = sum(p.numel() * p.element_size() for p in unique_params(model))
    embed = model.model.embed_tokens.weight
    if embed.data_ptr() != model.lm_head.weight.data_ptr():
        total -= embed.numel() * embed.element_size()
    return total


@dataclass
class FlopModel:
    """Useful FLOPs: 2 per weight per token through the layers, 4 * heads * head_dim per (query,
    visible key) pair per layer for causal attention, and the LM head only for sampled tokens."""

    layer_flops: int  # per token
    attn_flops: int  # per token per visible key
    head_flops: int  # per sampled token

    @classmethod
    def of(cls, engine: Engine) -> FlopModel:
        mc = engine.loaded.config
        layer_weights = sum(p.numel() for p in engine.model.model.layers.parameters() if p.dim() == 2)
        return cls(
            2 * layer_weights,
            4 * mc.num_layers * mc.num_heads * mc.head_dim,
            2 * engine.model.lm_head.weight.numel(),
        )

    def tokens(self, start: int, end: int, sampled: int) -> float:
        """Positions [start, end) computed with the keys before them cached; ``sampled`` logits."""
        n = end - start
        keys = (end * (end + 1) - start * (start + 1)) // 2  # position p sees p + 1 keys
        return float(self.layer_flops * n + self.attn_flops * keys + self.head_flops * sampled)


# -- ceilings ---------------------------------------------------------------------------------------
def best_seconds(fn: Any, device: torch.device, repeats: int = 5) -> float:
    """The fastest of a few calls: a ceiling is the best the device does, not its typical time."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return min(times)


def measure_ceilings(device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """Copy bandwidth (bytes read + written per second) and square-matmul FLOP/s in the model dtype."""
    nbytes = (1 << 30) if device.type == "cuda" else (512 << 20)  # well past any CPU's last-level cache
    n = 8192 if device.type == "cuda" else 2048
    copy_s = copy_seconds(device, nbytes)
    mm_s = matmul_seconds(device, dtype, n)
    return {"copy_bandwidth": 2 * nbytes / copy_s, "matmul_flops": 2 * n**3 / mm_s, "matmul_n": n}


def copy_seconds(device: torch.device, nbytes: int) -> float:
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return best_seconds(lambda: dst.copy_(src), device)


def matmul_seconds(device: torch.device, dtype: torch.dtype, n: int) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return best_seconds(lambda: a @ b, device)


# -- running requests ------------------------------------------------------------------------------
@dataclass
class Timeline:
    output: RequestOutput
    t_add: float  # perf_counter just before add_request
    token_times: list[float] = field(default_factory=list)  # perf_counter after each step with a token

    @property
    def wall_ttft(self) -> float:
        return self.token_times[0] - self.t_add

    @property
    def engine_ttft(self) -> float:
        return float(self.output.metrics["ttft"])


def run_one(engine: Engine, prompt: Sequence[int], params: SamplingParams) -> Timeline:
    """One request alone through the step loop, stamping the time of every step that gave a token."""
    sync(engine.device)
    t_add = time.perf_counter()
    (rid,) = engine.add_request(list(prompt), params)
    times: list[float] = []
    final = None
    seen = 0
    while final is None:
        for out in engine.step():
            if out.request_id != rid:
                continue
            n = len(out.outputs[0].token_ids)
            if n > seen:
                times.extend([time.perf_counter()] * (n - seen))
                seen = n
            if out.finished:
                final = out
    if final.error:
        raise RuntimeError(f"request {rid} failed: {final.error}")
    return Timeline(final, t_add, times)


def random_tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(vocab) for _ in range(n)]


# -- output -------------------------------------------------------------------------------------------
def print_table(headers: list[str], rows: list[list[str]]) -> None:
    """A markdown table; every column but the first is right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        padded = [
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    print(line(headers))
    print(
        "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    )
    for r in rows:
        print(line(r))


def print_header(
    title: str, machine: dict[str, Any], settings: dict[str, Any], ceilings: dict[str, float]
) -> None:
    print(f"## {title}\n")
    threads = f"{machine['torch_threads']} torch threads, {machine['cpu_count']} CPUs"
    cuda = f", CUDA {machine['cuda']}" if machine["cuda"] else ""
    load = machine["load_average_1m"]
    busy = f"; load average {load:.2f}" if load is not None else ""
    print(
        f"machine:  {machine['device']} ({machine['device_name']}); torch {machine['torch']}{cuda}; "
        f"{threads}{busy}"
    )
    print(
        f"model:    {settings['model']} ({settings['params'] / 1e6:.1f}M params, {settings['dtype']}); "
        f"attention {settings['attention_backend']}"
    )
    print(
        f"engine:   block {settings['block_size']}, {settings['kv_blocks']} KV blocks "
        f"({settings['kv_pool_bytes'] / GB:.2f} GB), max_num_batched_tokens "
        f"{settings['max_num_batched_tokens']}, max_num_seqs {settings['max_num_seqs']}, prefix caching "
        f"{'on' if settings['prefix_caching'] else 'off'}, tiers {settings['tiers']}"
    )
    if ceilings:
        print(
            f"ceilings: copy {ceilings['copy_bandwidth'] / GB:.1f} GB/s (read + write), matmul "
            f"{ceilings['matmul_flops'] / 1e12:.3f} TFLOP/s "
            f"({int(ceilings['matmul_n'])}^3 {settings['dtype']}; best of 5)"
        )
    print()


def fraction(value: float, ceiling: float | None) -> str:
    return f"{100 * value / ceiling:.1f}%" if ceiling else "-"


@dataclass
class Context:
    """What every subcommand prints first and writes to its JSON: the machine and its ceilings."""

    machine: dict[str, Any]
    settings: dict[str, Any]
    ceilings: dict[str, float]


def start(args: argparse.Namespace, engine: Engine, title: str) -> Context:
    ceilings = {} if args.no_ceilings else measure_ceilings(engine.device, engine.loaded.config.dtype)
    ctx = Context(machine_info(engine.device), settings_info(engine), ceilings)
    print_header(title, ctx.machine, ctx.settings, ceilings)
    return ctx


def finish(args: argparse.Namespace, ctx: Context, title: str, results: dict[str, Any]) -> None:
    load = load_average()
    ctx.machine["load_average_1m_after"] = load
    if load is not None:
        print(f"\nload average at the end: {load:.2f}")
        cpus = os.cpu_count() or 1  # this run itself keeps about min(threads, cpus) busy
        start_load = ctx.machine["load_average_1m"] or 0.0
        if (
            ctx.machine["device"] == "cpu"
            and max(load, start_load) > cpus + 0.75
            and torch.get_num_threads() > 1
        ):
            print(
                f"warning: the machine was busy (load average up to {max(load, start_load):.1f} on {cpus} "
                f"CPUs): {torch.get_num_threads()} torch threads stall when another process takes a core. "
                "Rerun on a quiet machine, or with --threads 1 for steadier figures."
            )
    if args.json:
        doc = {
            "bench": args.command,
            "title": title,
            "argv": sys.argv[1:],
            "machine": ctx.machine,
            "settings": ctx.settings,
            "ceilings": ctx.ceilings,
            "results": results,
        }
        Path(args.json).write_text(json.dumps(doc, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")


# -- decode --------------------------------------------------------------------------------------------
def bench_decode(args: argparse.Namespace) -> None:
    engine = make_engine(args)
    title = f"decode: batch 1, {args.prompt_len}-token prompt, {args.output_len} tokens, greedy"
    ctx = start(args, engine, title)
    ceilings = ctx.ceilings
    vocab = engine.loaded.config.vocab_size
    rng = random.Random(args.seed)
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    run_one(engine, random_tokens(rng, args.prompt_len, vocab), params)  # warm-up
    weight_bytes = decode_weight_bytes(engine)
    kv_per_token = engine.layout.bytes_per_token
    rows, runs = [], []
    for i in range(args.repeats):
        tl = run_one(engine, random_tokens(rng, args.prompt_len, vocab), params)
        steps = [b - a for a, b in zip(tl.token_times, tl.token_times[1:], strict=False)]
        decode_s = tl.token_times[-1] - tl.token_times[0]
        n = len(steps)
        step_s = decode_s / n
        # each step reads the weights plus the KV of the context so far (prompt + tokens before it)
        kv_bytes = kv_per_token * (args.prompt_len + (n + 1) / 2)
        run = {
            "ttft_engine_s": tl.engine_ttft,
            "ttft_wall_s": tl.wall_ttft,
            "decode_tokens": n,
            "decode_s": decode_s,
            "tokens_per_s": n / decode_s,
            "step_mean_s": step_s,
            "step_median_s": statistics.median(steps),
            "step_p90_s": sorted(steps)[int(0.9 * (n - 1))],
            "tokens_per_s_median_step": 1 / statistics.median(steps),
            "weight_bytes_per_step": weight_bytes,
            "weight_bandwidth": weight_bytes / step_s,
            "kv_bytes_per_step": kv_bytes,
            "total_bandwidth": (weight_bytes + kv_bytes) / step_s,
        }
        runs.append(run)
        rows.append(decode_row(f"run {i + 1}", run, ceilings))
    summary = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    rows.append(decode_row("median", summary, ceilings))
    headers = [
        "run", "TTFT ms", "decode tok/s", "tok/s (median step)", "step ms (mean)", "step ms (median)",
        "step ms (p90)", "weights GB/s", "weights+KV GB/s", "of copy BW",
    ]  # fmt: skip
    print_table(headers, rows)
    print(
        f"\n{weight_bytes / 1e6:.1f} MB of weights and {kv_per_token * args.prompt_len / 1e6:.2f}-"
        f"{kv_per_token * (args.prompt_len + args.output_len) / 1e6:.2f} MB of KV per decode step; "
        f"decode time is first token to last ({args.output_len - 1} steps)."
    )
    finish(args, ctx, title, {"runs": runs, "median": summary})


def decode_row(name: str, r: dict[str, float], ceilings: dict[str, float]) -> list[str]:
    return [
        name,
        f"{1e3 * r['ttft_engine_s']:.1f}",
        f"{r['tokens_per_s']:.1f}",
        f"{r['tokens_per_s_median_step']:.1f}",
        f"{1e3 * r['step_mean_s']:.2f}",
        f"{1e3 * r['step_median_s']:.2f}",
        f"{1e3 * r['step_p90_s']:.2f}",
        f"{r['weight_bandwidth'] / GB:.2f}",
        f"{r['total_bandwidth'] / GB:.2f}",
        fraction(r["total_bandwidth"], ceilings.get("copy_bandwidth")),
    ]


# -- throughput ------------------------------------------------------------------------------------------
def bench_throughput(args: argparse.Namespace) -> None:
    engine = make_engine(args)
    n = args.num_requests
    title = (
        f"throughput: {n} requests, input and output lengths uniform in "
        f"[{args.min_len}, {args.max_len}] (seed {args.seed}), random token ids, ignore_eos"
    )
    ctx = start(args, engine, title)
    ceilings = ctx.ceilings
    vocab = engine.loaded.config.vocab_size
    rng = random.Random(args.seed)
    lens = [
        (rng.randint(args.min_len, args.max_len), rng.randint(args.min_len, args.max_len)) for _ in range(n)
    ]
    prompts = [random_tokens(rng, i, vocab) for i, _ in lens]
    params = [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True) for _, o in lens]

    warm = random.Random(args.seed + 1)
    for _ in range(args.warmup_requests):  # warm-up: a few short requests batched together
        engine.add_request(random_tokens(warm, 64, vocab), SamplingParams(max_tokens=8, ignore_eos=True))
    for _ in engine.run_until_done():
        pass
    engine.pool.reset_cache()
    steps0, preempt0 = engine.stats.steps, engine.scheduler.num_preemptions

    sync(engine.device)
    t0 = time.perf_counter()
    for p, sp in zip(prompts, params, strict=True):
        engine.add_request(p, sp)
    final = [out for out in engine.run_until_done() if out.finished]
    sync(engine.device)
    elapsed = time.perf_counter() - t0

    errors = [o.error for o in final if o.error]
    in_tokens = sum(i for i, _ in lens)
    out_tokens = sum(len(o.outputs[0].token_ids) for o in final)
    flops = FlopModel.of(engine)
    useful = sum(flops.tokens(0, i + o - 1, o) for i, o in lens)
    ttfts = sorted(float(o.metrics["ttft"]) for o in final if "ttft" in o.metrics)
    results = {
        "num_requests": n,
        "finished": len(final),
        "errors": len(errors),
        "input_tokens": in_tokens,
        "output_tokens": out_tokens,
        "expected_output_tokens": sum(o for _, o in lens),
        "elapsed_s": elapsed,
        "requests_per_s": len(final) / elapsed,
        "output_tokens_per_s": out_tokens / elapsed,
        "total_tokens_per_s": (in_tokens + out_tokens) / elapsed,
        "steps": engine.stats.steps - steps0,
        "preemptions": engine.scheduler.num_preemptions - preempt0,
        "useful_flops": useful,
        "useful_flops_per_s": useful / elapsed,
        "ttft_median_s": statistics.median(ttfts) if ttfts else None,
        "ttft_p90_s": ttfts[int(0.9 * (len(ttfts) - 1))] if ttfts else None,
    }
    headers = [
        "requests", "in tokens", "out tokens", "elapsed s", "req/s", "out tok/s", "total tok/s",
        "TFLOP/s", "of matmul", "steps", "preempted",
    ]  # fmt: skip
    row = [
        str(n),
        str(in_tokens),
        str(out_tokens),
        f"{elapsed:.1f}",
        f"{results['requests_per_s']:.3f}",
        f"{results['output_tokens_per_s']:.1f}",
        f"{results['total_tokens_per_s']:.1f}",
        f"{useful / elapsed / 1e12:.4f}",
        fraction(useful / elapsed, ceilings.get("matmul_flops")),
        str(results["steps"]),
        str(results["preemptions"]),
    ]
    print_table(headers, [row])
    if errors:
        print(f"\n{len(errors)} requests failed, e.g.: {errors[0]}")
    if ttfts:
        print(
            f"\nTTFT median {results['ttft_median_s']:.2f} s, p90 {results['ttft_p90_s']:.2f} s "
            "(every request queued at the start)"
        )
    finish(args, ctx, title, results)


# -- prefix TTFT --------------------------------------------------------------------------------------------
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
    warm = [run_one(engine, prefix + s, one) for s in tails]

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
    for name, runs in (("cold", cold), ("warm", warm)):
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
    ratio = summary["cold"]["ttft_engine_median_s"] / summary["warm"]["ttft_engine_median_s"]
    wall_ratio = summary["cold"]["ttft_wall_median_s"] / summary["warm"]["ttft_wall_median_s"]
    summary["speedup"] = ratio
    summary["speedup_wall"] = wall_ratio
    print(f"\ncold / warm TTFT: {ratio:.1f}x (engine metric), {wall_ratio:.1f}x (wall)")
    print(
        f"cold = {'pool reset before each prompt' if args.cold_mode == 'reset' else 'prefix caching off'}; "
        "warm = the prefix ran once, then prompts sharing it; the same suffixes in both. "
        "floor = max(useful FLOPs / matmul rate, weight + KV bytes / copy bandwidth)."
    )
    finish(args, ctx, title, summary)


# -- command line -------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("model and device")
    g.add_argument("--model", default="synthetic:small", help="synthetic:<name> or a checkpoint folder")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--dtype", default="auto", help="auto, float32, float16, bfloat16")
    g.add_argument("--model-seed", type=int, default=None, help="seed of synthetic weights")
    g.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    e = common.add_argument_group("engine settings (default: the engine's)")
    e.add_argument("--block-size", type=int)
    e.add_argument("--kv-cache-memory", help="KV pool size, e.g. 2GiB (default: the engine's)")
    e.add_argument("--max-num-batched-tokens", type=int)
    e.add_argument("--max-num-seqs", type=int)
    e.add_argument("--tiers", default="none", help="KV tiers below the pool (default none: measure compute)")
    e.add_argument("--set", action="append", metavar="NAME=VALUE", help="any other engine setting")
    o = common.add_argument_group("output")
    o.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    o.add_argument("--no-ceilings", action="store_true", help="skip measuring copy bandwidth and matmul rate")
    o.add_argument("--seed", type=int, default=0, help="seed of the workload (lengths, token ids)")

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("decode", parents=[common], help="batch-1 decode tokens/s and weight bandwidth")
    d.add_argument("--prompt-len", type=int, default=128)
    d.add_argument("--output-len", type=int, default=128)
    d.add_argument("--repeats", type=int, default=3)
    t = sub.add_parser("throughput", parents=[common], help="offline throughput of many requests")
    t.add_argument(
        "--num-requests", type=int, default=None, help="default: 256 on CUDA, 16 on CPU (see bench/README.md)"
    )
    t.add_argument("--min-len", type=int, default=100, help="shortest input and output")
    t.add_argument(
        "--max-len",
        type=int,
        default=None,
        help="longest input and output (default 1024 on CUDA, 256 on CPU)",
    )
    t.add_argument("--warmup-requests", type=int, default=4)
    p = sub.add_parser("prefix-ttft", parents=[common], help="TTFT with a cached prefix vs cold")
    p.add_argument("--prefix-len", type=int, default=2048)
    p.add_argument("--min-suffix", type=int, default=16)
    p.add_argument("--max-suffix", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--cold-mode",
        choices=["reset", "off"],
        default="reset",
        help="reset: drop the pool's cached blocks before each cold prompt; "
        "off: a second engine with prefix caching off",
    )
    args = parser.parse_args(argv)
    if args.command == "throughput":
        cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
        if args.num_requests is None:
            args.num_requests = 256 if cuda else 16
        if args.max_len is None:
            args.max_len = 1024 if cuda else 256
        if not 1 <= args.min_len <= args.max_len:
            parser.error("need 1 <= --min-len <= --max-len")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    {"decode": bench_decode, "throughput": bench_throughput, "prefix-ttft": bench_prefix_ttft}[args.command](
        args
    )


if __name__ == "__main__":
    main()
