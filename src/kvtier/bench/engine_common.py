"""The engine benchmarks' set-up: an engine from the options, what a model must move and compute,
the device ceilings (a large copy, a square matmul), timed requests, and the header every run prints."""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvtier.bench.report import GB, load_average, machine_info, print_machine, sync
from kvtier.config import parse_bytes
from kvtier.engine.engine import Engine
from kvtier.engine.llm import LLM
from kvtier.engine.request import RequestOutput, SamplingParams


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
        # the benches measure the model and the KV cache: a repeated prompt answered whole from
        # the result cache would time a dictionary lookup (--set result_cache=true to measure it)
        "result_cache": False,
    }
    settings.update(set_options(args.set))
    settings.update(extra)
    return {k: v for k, v in settings.items() if v is not None}


def set_options(items: list[str] | None) -> dict[str, str]:
    """``--set NAME=VALUE`` options as engine settings (the values are parsed by the config)."""
    settings = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set wants NAME=VALUE, got {item!r}")
        settings[name.strip()] = value.strip()
    return settings


def make_engine(args: argparse.Namespace, **extra: Any) -> Engine:
    return LLM(**engine_settings(args, **extra)).engine


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
    out: list[torch.Tensor] = []
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


def print_header(
    title: str, machine: dict[str, Any], settings: dict[str, Any], ceilings: dict[str, float]
) -> None:
    print_machine(title, machine)
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
