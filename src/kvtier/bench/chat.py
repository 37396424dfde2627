"""`kvtier bench chat`: a multi-round chat workload on the tiers, the device pool alone, and no caching."""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import shutil
import statistics
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from kvtier.bench.engine_common import set_options
from kvtier.bench.report import (
    GB,
    MiB,
    finish,
    machine_info,
    percentile,
    print_machine,
    print_table,
    progress,
)
from kvtier.bench.tier_data import redis_for
from kvtier.config import EngineConfig
from kvtier.engine.engine import Engine, resolve_device
from kvtier.engine.request import RequestOutput, SamplingParams
from kvtier.model.loader import load_model

WORDS = [
    "cache", "prefix", "token", "block", "layer", "memory", "tier", "disk", "host", "redis", "model",
    "answer", "question", "context", "system", "user", "assistant", "prompt", "policy", "evict", "load",
    "compute", "attention", "key", "value", "page", "batch", "schedule", "decode",
]  # fmt: skip


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@dataclass
class ChatWorkload:
    """Token ids of each conversation's first prompt, and of the user turn added before each later one."""

    first: list[list[int]]
    later: list[list[list[int]]]  # [conversation][turn - 1]: end-of-turn + the next user message
    max_tokens: int

    def final_lengths(self) -> list[int]:
        return [
            len(f) + sum(self.max_tokens + len(u) for u in later)
            for f, later in zip(self.first, self.later, strict=True)
        ]

    def reusable_blocks(self, block_size: int) -> tuple[int, int]:
        """(blocks any prompt can reuse: the union of every prompt's full blocks, shared ones)."""
        common = self.first[0]
        for p in self.first[1:]:
            n = 0
            while n < min(len(common), len(p)) and common[n] == p[n]:
                n += 1
            common = common[:n]
        shared = len(common) // block_size
        own = sum(length // block_size - shared for length in self.final_lengths())
        return shared + own, shared


def chat_workload(engine: Engine, args: argparse.Namespace) -> ChatWorkload:
    rng = random.Random(args.seed)
    tok = engine.tokenizer
    system = tok.decode(tok.encode(words(rng, args.system_tokens))[: args.system_tokens])
    vocab = tok.get_vocab() if hasattr(tok, "get_vocab") else {}  # the byte tokenizer's eos is <|end|>
    end = tok.convert_tokens_to_ids(["<|end|>"]) if "<|end|>" in vocab else [tok.eos_token_id]
    first, later = [], []
    for c in range(args.conversations):
        user = f"{c}: {words(rng, args.user_words)}"
        first.append(
            engine.apply_chat_template(
                [{"role": "system", "content": system}, {"role": "user", "content": user}]
            )
        )
        later.append(
            [
                end + engine.apply_chat_template([{"role": "user", "content": words(rng, args.user_words)}])
                for _ in range(args.turns - 1)
            ]
        )
    return ChatWorkload(first, later, args.max_tokens)


@dataclass
class ChatRun:
    label: str
    tiers: str
    wall_s: float = 0.0
    ttft: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    loaded_tokens: int = 0
    output_tokens: int = 0
    model_tokens: int = 0  # every token run through the model: prefill, decode, recompute
    preemptions: int = 0
    evictions: int = 0
    steps: int = 0
    outputs: list[list[int]] = field(default_factory=list)  # per (conversation, turn), in that order
    hierarchy: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def computed_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens

    @property
    def device_hit_tokens(self) -> int:
        return self.cached_tokens - self.loaded_tokens


def run_chat(label: str, engine: Engine, work: ChatWorkload, clients: int) -> ChatRun:
    """Closed loop: each client owns every clients-th conversation and sends, round by round, one
    request at a time: turn t of its next conversation, once its previous request has finished."""
    run = ChatRun(label, engine.config.tiers.tiers if engine.hierarchy is not None else "none")
    n_conv, turns = len(work.first), len(work.later[0]) + 1
    queues = [deque((c, t) for t in range(turns) for c in range(k, n_conv, clients)) for k in range(clients)]
    prompts = [list(p) for p in work.first]
    outputs: dict[tuple[int, int], list[int]] = {}
    in_flight: dict[str, tuple[int, int, int]] = {}  # request id -> (client, conversation, turn)
    params = SamplingParams(max_tokens=work.max_tokens, temperature=0.0, ignore_eos=True)
    steps0, computed0 = engine.stats.steps, engine.stats.computed_tokens
    preempt0, evict0 = engine.scheduler.num_preemptions, engine.pool.evictions
    start = time.perf_counter()

    def submit(k: int) -> None:
        if queues[k]:
            c, t = queues[k].popleft()
            (rid,) = engine.add_request(prompts[c], params)
            in_flight[rid] = (k, c, t)

    for k in range(clients):
        submit(k)
    while in_flight:
        for out in engine.step():
            if not out.finished or out.request_id not in in_flight:
                continue
            k, c, t = in_flight.pop(out.request_id)
            record(run, out)
            generated = out.outputs[0].token_ids
            outputs[c, t] = generated
            if t + 1 < turns:  # the client resends the whole history: prompt + answer + next user turn
                prompts[c] = prompts[c] + generated + work.later[c][t]
            submit(k)
    run.wall_s = time.perf_counter() - start
    run.model_tokens = engine.stats.computed_tokens - computed0
    run.preemptions = engine.scheduler.num_preemptions - preempt0
    run.evictions = engine.pool.evictions - evict0
    run.outputs = [outputs[c, t] for c in range(n_conv) for t in range(turns)]
    run.steps = engine.stats.steps - steps0
    if engine.hierarchy is not None:
        s = engine.hierarchy.stats
        run.hierarchy = {
            "load_decisions": s.load_decisions,
            "recompute_decisions": s.recompute_decisions,
            "blocks_loaded": s.blocks_loaded,
            "loads_on_device": s.loads_on_device,
            "per_tier_loaded": dict(s.per_tier_loaded),
            "blocks_written": s.blocks_written,
            "corrupt": s.corrupt,
            "write_errors": s.write_errors,
            "writes_dropped": engine.hierarchy.writes.dropped,
            "file_writes_skipped": engine.hierarchy.writes.files_skipped,
            "predicted_load_s": s.predicted_load_s,
            "actual_load_s": s.actual_load_s,
            "prefill_s_per_token": engine.hierarchy.prefill_seconds_per_token,
            "tier_bandwidth": {
                t.name: c.bandwidth_bps
                for t, c in zip(engine.hierarchy.tiers, engine.hierarchy.costs, strict=True)
            },
        }
    return run


def record(run: ChatRun, out: RequestOutput) -> None:
    if out.error:
        run.errors.append(out.error)
    if "ttft" in out.metrics:
        run.ttft.append(float(out.metrics["ttft"]))
    run.prompt_tokens += len(out.prompt_token_ids)
    run.cached_tokens += out.num_cached_tokens
    run.loaded_tokens += int(out.metrics.get("num_loaded_tokens", 0))
    run.output_tokens += len(out.outputs[0].token_ids)


def variants(items: list[str] | None) -> list[tuple[str, dict[str, str]]]:
    """``--variant LABEL:NAME=VALUE[,NAME=VALUE]`` options: (label, settings) of each."""
    out: list[tuple[str, dict[str, str]]] = []
    for item in items or []:
        label, sep, settings = item.partition(":")
        if not sep or not label.strip():
            raise SystemExit(f"--variant wants LABEL:NAME=VALUE[,NAME=VALUE], got {item!r}")
        if any(label.strip() == seen for seen, _ in out):
            raise SystemExit(f"--variant labels must differ: {label.strip()!r} given twice")
        out.append((label.strip(), set_options(settings.split(","))))
    return out


def warm_up(engine: Engine, rng: random.Random) -> None:
    """A few requests of their own (not the workload's tokens), then drop what they cached, in the
    pool and in the tiers: the disk and Redis tiers outlive an engine, and a closed engine writes its
    pool down, so without this a tiers run would start from the blocks of the round before."""
    vocab = min(256, engine.loaded.config.vocab_size)
    for n in (200, 60):
        engine.add_request(
            [rng.randrange(vocab) for _ in range(n)], SamplingParams(max_tokens=4, ignore_eos=True)
        )
    for _ in engine.run_until_done():
        pass
    engine.pool.reset_cache()
    if engine.hierarchy is not None:
        # a server starts its file writers long before its load: their ~3 s start is not the run's
        engine.hierarchy.writes.wait_for_file_writers()
        engine.hierarchy.flush()
        for tier in engine.hierarchy.tiers:
            tier.clear()


@dataclass
class ChatRounds:
    """One configuration's run in every round, in round order."""

    label: str
    runs: list[ChatRun] = field(default_factory=list)

    @property
    def reported_index(self) -> int:
        """The round whose run has the median wall time (the lower middle one for an even count)."""
        order = sorted(range(len(self.runs)), key=lambda i: self.runs[i].wall_s)
        return order[(len(order) - 1) // 2]

    @property
    def reported(self) -> ChatRun:
        return self.runs[self.reported_index]


def round_order(n_configs: int, r: int) -> list[int]:
    """Round r starts at configuration r mod n (ABC, BCA, CAB): on a machine whose later passes run
    faster, no configuration always goes first."""
    return [(r + j) % n_configs for j in range(n_configs)]


def bench_chat(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    loaded = load_model(args.model, device, dtype, args.model_seed)
    with contextlib.ExitStack() as stack:
        disk_root = tempfile.mkdtemp(prefix="kvtier-bench-chat-", dir=args.disk_path)
        stack.callback(shutil.rmtree, disk_root, True)
        url = stack.enter_context(redis_for(args)) if args.redis else None
        tiers = args.tiers or ("disk,redis" if url else "disk")
        if "redis" in tiers and url is None:
            raise SystemExit("--tiers names redis: pass --redis (and have redis-server) or --redis-url")
        base: dict[str, Any] = {
            "model": args.model,
            "device": args.device,
            "dtype": args.dtype,
            "seed": args.model_seed,
            "block_size": args.block_size,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "disk_path": disk_root,
            "redis_url": url,
        } | set_options(args.set)
        probe = Engine(EngineConfig.load(base | {"tiers": "none", "kv_cache_memory": 64 << 20}), loaded)
        layout = probe.layout
        work = chat_workload(probe, args)
        del probe
        reusable, shared = work.reusable_blocks(args.block_size)
        longest = max(work.final_lengths()) + args.max_tokens
        need = -(-longest // args.block_size)
        pool_blocks = max(math.ceil(reusable / args.pool_ratio), need)
        kv_bytes = pool_blocks * layout.bytes_per_block
        title = (
            f"chat: {args.conversations} conversations x {args.turns} rounds, {args.clients} clients, "
            f"{args.system_tokens}-token shared system prompt, {args.max_tokens} output tokens, greedy"
        )
        machine = machine_info(device)
        print_machine(title, machine)
        params = sum(p.numel() for p in loaded.model.parameters())
        print(
            f"model:    {loaded.name} ({params / 1e6:.1f}M params, "
            f"{layout.dtype}); KV {layout.bytes_per_block / 1024:.0f} KiB per {args.block_size}-token block"
        )
        print(
            f"workload: {len(work.first) * args.turns} requests, prompts {min(len(p) for p in work.first)}-"
            f"{max(work.final_lengths())} tokens; {reusable} reusable blocks ({shared} shared by all, "
            f"{reusable * layout.bytes_per_block / MiB:.1f} MiB) = {reusable / pool_blocks:.2f}x the pool"
        )
        print(
            f"pool:     {pool_blocks} blocks ({kv_bytes / MiB:.1f} MiB; the longest request needs {need}); "
            f"tiers run: {tiers} ("
            + ", ".join(
                ([f"disk in {disk_root}"] if "disk" in tiers else [])
                + ([f"redis {url}"] if "redis" in tiers else [])
            )
            + ")"
        )
        if pool_blocks > math.ceil(reusable / args.pool_ratio):
            print(
                f"note: the pool was raised to {pool_blocks} blocks so that the longest request fits; "
                f"the working set is only {reusable / pool_blocks:.1f}x the pool"
            )
        print()
        pool_only: tuple[str, dict[str, Any]] = (
            "device pool only",
            {"tiers": "none", "enable_prefix_caching": True},
        )
        configs = [("tiers", {"tiers": tiers, "enable_prefix_caching": True})]
        configs += [(f"tiers, {label}", configs[0][1] | extra) for label, extra in variants(args.variant)]
        configs.append(pool_only)
        if not args.skip_no_caching:
            configs.append(("no caching", {"tiers": "none", "enable_prefix_caching": False}))
        rng = random.Random(args.seed + 1)

        def engine_for(extra: dict[str, Any]) -> Engine:
            engine = Engine(EngineConfig.load(base | extra | {"kv_cache_memory": kv_bytes}), loaded)
            warm_up(engine, rng)
            return engine

        # The first pass over the workload after the model loads ran ~1.4x slower than the next on
        # an H200, warm-up requests or not: one untimed pass on an engine thrown away.
        print("untimed pass (device pool only) ...", flush=True)
        engine = engine_for(pool_only[1])
        run_chat(pool_only[0], engine, work, args.clients)
        engine.close()
        rounds = [ChatRounds(label) for label, _ in configs]
        orders = [round_order(len(configs), r) for r in range(args.rounds)]
        for r, order in enumerate(progress(orders, "chat rounds")):
            for i in order:
                label, extra = configs[i]
                engine = engine_for(extra)
                print(f"round {r + 1}/{args.rounds}: {label} ...", end=" ", flush=True)
                rounds[i].runs.append(run_chat(label, engine, work, args.clients))
                print(f"{rounds[i].runs[-1].wall_s:.1f} s", flush=True)
                engine.close()
    print()
    print_chat(rounds)
    results = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("command", "json")},
        "pool_blocks": pool_blocks,
        "reusable_blocks": reusable,
        "shared_blocks": shared,
        "bytes_per_block": layout.bytes_per_block,
        "tiers": tiers,
        "round_orders": [[configs[i][0] for i in order] for order in orders],
        "runs": [
            {"label": c.label, "reported_index": c.reported_index, "rounds": [run_summary(r) for r in c.runs]}
            for c in rounds
        ],
        "identical_outputs": all(r.outputs == rounds[0].runs[0].outputs for c in rounds for r in c.runs),
    }
    finish(args, title, machine, results)


def run_summary(r: ChatRun) -> dict[str, Any]:
    return {
        "label": r.label,
        "tiers": r.tiers,
        "wall_s": r.wall_s,
        "ttft_s": r.ttft,
        "ttft_p50_s": statistics.median(r.ttft),
        "ttft_p95_s": percentile(r.ttft, 0.95),
        "output_tokens": r.output_tokens,
        "output_tokens_per_s": r.output_tokens / r.wall_s,
        "prompt_tokens": r.prompt_tokens,
        "computed_prompt_tokens": r.computed_tokens,
        "loaded_tokens": r.loaded_tokens,
        "device_hit_tokens": r.device_hit_tokens,
        "model_tokens": r.model_tokens,
        "preemptions": r.preemptions,
        "pool_evictions": r.evictions,
        "steps": r.steps,
        "hierarchy": r.hierarchy,
        "errors": r.errors,
    }


def print_chat(rounds: list[ChatRounds]) -> None:
    runs = [c.reported for c in rounds]
    headers = [
        "run", "TTFT p50 ms", "TTFT p95 ms", "out tok/s", "prompt tokens", "computed", "loaded",
        "device hit", "model tokens", "preempted", "wall s",
    ]  # fmt: skip
    rows = []
    for r in runs:
        rows.append(
            [
                r.label,
                f"{1e3 * statistics.median(r.ttft):.0f}",
                f"{1e3 * percentile(r.ttft, 0.95):.0f}",
                f"{r.output_tokens / r.wall_s:.1f}",
                str(r.prompt_tokens),
                str(r.computed_tokens),
                str(r.loaded_tokens),
                str(r.device_hit_tokens),
                str(r.model_tokens),
                str(r.preemptions),
                f"{r.wall_s:.1f}",
            ]
        )
    print_table(headers, rows)
    off = runs[-1]
    print()
    for r in runs[:-1]:
        print(
            f"{r.label} vs {off.label}: TTFT p50 "
            f"{statistics.median(off.ttft) / statistics.median(r.ttft):.2f}x "
            f"shorter, wall {off.wall_s / r.wall_s:.2f}x shorter, "
            f"{off.computed_tokens / max(1, r.computed_tokens):.2f}x fewer prompt tokens computed"
        )
    for r in runs:
        if r.hierarchy:
            h = r.hierarchy
            per_tier = ", ".join(f"{k} {v}" for k, v in h["per_tier_loaded"].items()) or "none"
            print(
                f"{r.label}: {h['blocks_written']} blocks written down, {h['blocks_loaded']} loaded "
                f"({per_tier}; {h['loads_on_device']} loads queued on the device); "
                f"{h['load_decisions']} load / {h['recompute_decisions']} recompute decisions; load time "
                f"predicted {h['predicted_load_s']:.2f} s, actual {h['actual_load_s']:.2f} s (learned "
                + ", ".join(f"{k} {v / GB:.1f} GB/s" for k, v in h["tier_bandwidth"].items())
                + f", prefill {1e3 * h['prefill_s_per_token']:.2f} ms/token); "
                f"corrupt {h['corrupt']}, write errors {h['write_errors']}, writes dropped "
                f"{h['writes_dropped']} (queue full) + {h['file_writes_skipped']} (disk behind)"
            )
    every = [(k + 1, r) for c in rounds for k, r in enumerate(c.runs)]  # (round, run)
    for k, r in every:
        if r.errors:
            print(f"{r.label}, round {k}: {len(r.errors)} requests failed, e.g. {r.errors[0]}")
    ref = rounds[0].runs[0]
    n = len(ref.outputs)
    if all(r.outputs == ref.outputs for _, r in every):
        print(f"identical greedy output in all {len(every)} runs ({n} completions each)")
    for k, r in every:
        if r.outputs != ref.outputs:
            diff = sum(a != b for a, b in zip(r.outputs, ref.outputs, strict=True))
            print(f"OUTPUTS DIFFER: {r.label}, round {k} vs {ref.label}, round 1: {diff} of {n} completions")
    n_rounds = len(rounds[0].runs)
    print(
        (
            f"\nEach row: the run with the median wall time of the configuration's {n_rounds} rounds "
            "(the order rotates each round; every run's wall time is printed above); the ratios "
            "compare those runs. "
            if n_rounds > 1
            else "\nOne round: each configuration ran once, in this order. "
        )
        + "TTFT: engine metric, arrival to first token (queueing behind the other clients included). "
        "computed = prompt tokens prefilled; loaded = from a tier below the pool; device hit = found in "
        "the pool; model tokens = every token the model ran (prefill, decode, recompute after preemption)."
    )
