"""`kvtier bench policies`: the block hit ratio of every eviction policy on a chat trace, next to an
unbounded pool (the best any policy can do: only first references miss). No model is loaded."""

from __future__ import annotations

import argparse
import random
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from kvtier.bench.report import finish, machine_info, print_machine, print_table, progress
from kvtier.bench.tier_data import FINGERPRINT
from kvtier.cache.blocks import BlockPool
from kvtier.cache.keys import BlockKey, KVLayout, chain_keys, root_key
from kvtier.cache.policy import POLICIES


@dataclass
class TraceRequest:
    tokens: list[int]  # prompt + output
    prompt_len: int
    scan: bool


def policy_trace(args: argparse.Namespace) -> list[TraceRequest]:
    """A chat service's requests: conversations on a few hot system prompts (apps, Zipf-popular),
    each turn resending the whole history, users of skewed activity, and one-off long prompts."""
    rng = random.Random(args.seed)
    vocab = 256
    apps = [[rng.randrange(vocab) for _ in range(args.system_tokens)] for _ in range(args.apps)]
    app_weights = [1 / (i + 1) for i in range(args.apps)]

    def new_conversation() -> dict[str, Any]:
        app = rng.choices(range(args.apps), app_weights)[0]
        return {
            "history": list(apps[app]),
            "turns_left": rng.randint(2, args.max_turns),
            "weight": rng.paretovariate(1.5),
            "app": app,
        }

    active = [new_conversation() for _ in range(args.active)]
    trace: list[TraceRequest] = []
    while len(trace) < args.requests:
        if rng.random() < args.scan_fraction:
            app = rng.choices(range(args.apps), app_weights)[0]
            doc = [rng.randrange(vocab) for _ in range(rng.randint(args.scan_min, args.scan_max))]
            prompt = apps[app] + doc
            trace.append(TraceRequest(prompt + [rng.randrange(vocab) for _ in range(16)], len(prompt), True))
            continue
        i = rng.choices(range(len(active)), [c["weight"] for c in active])[0]
        conv = active[i]
        prompt = conv["history"] + [rng.randrange(vocab) for _ in range(rng.randint(16, 128))]
        output = [rng.randrange(vocab) for _ in range(rng.randint(16, 256))]
        trace.append(TraceRequest(prompt + output, len(prompt), False))
        conv["history"] = prompt + output
        conv["turns_left"] -= 1
        if conv["turns_left"] == 0:
            active[i] = new_conversation()
    return trace


@dataclass
class KeyedRequest:
    keys: list[BlockKey]
    block_tokens: list[tuple[int, ...]]
    lookup_blocks: int  # full prompt blocks a match may cover (the last prompt token is always computed)
    alloc_blocks: int  # blocks the request holds at its end
    commit_blocks: int  # full blocks of computed tokens
    scan: bool


def key_trace(trace: list[TraceRequest], block_size: int) -> list[KeyedRequest]:
    layout = KVLayout(12, 4, 64, block_size, "float32")
    root = root_key(FINGERPRINT, layout)
    out = []
    for r in trace:
        keys = chain_keys(root, r.tokens, block_size)
        computed = len(r.tokens) - 1  # the last sampled token is never run through the model
        bt = [tuple(r.tokens[i * block_size : (i + 1) * block_size]) for i in range(len(keys))]
        out.append(
            KeyedRequest(
                keys,
                bt,
                (r.prompt_len - 1) // block_size,
                -(-computed // block_size),
                computed // block_size,
                r.scan,
            )
        )
    return out


@dataclass
class ReplayResult:
    hits: int = 0
    lookups: int = 0
    scan_hits: int = 0
    scan_lookups: int = 0
    evictions: int = 0
    seconds: float = 0.0

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    @property
    def chat_hit_ratio(self) -> float:
        n = self.lookups - self.scan_lookups
        return (self.hits - self.scan_hits) / n if n else 0.0


def replay(
    trace: list[KeyedRequest], num_blocks: int, block_size: int, policy: str, in_flight: int
) -> ReplayResult:
    """Drive a BlockPool as the scheduler does: match, pin the hits, allocate the rest, commit the
    full blocks, and release when the request finishes (``in_flight`` requests overlap)."""
    pool = BlockPool(num_blocks, block_size, policy)
    result = ReplayResult()
    running: deque[list[int]] = deque()
    t0 = time.perf_counter()
    for r in trace:
        hits = pool.match_prefix(r.keys[: r.lookup_blocks], r.block_tokens[: r.lookup_blocks])
        need = r.alloc_blocks - len(hits)
        while running and need + sum(1 for b in hits if pool.ref_counts[b] == 0) > pool.num_available:
            pool.release(running.popleft())
        pool.pin(hits)
        table = hits + pool.allocate(need)
        for i in range(len(hits), r.commit_blocks):
            pool.commit(table[i], r.keys[i], r.block_tokens[i])
        running.append(table)
        if len(running) > in_flight:
            pool.release(running.popleft())
        result.hits += len(hits)
        result.lookups += r.lookup_blocks
        if r.scan:
            result.scan_hits += len(hits)
            result.scan_lookups += r.lookup_blocks
    while running:
        pool.release(running.popleft())
    pool.assert_idle()
    result.evictions = pool.evictions
    result.seconds = time.perf_counter() - t0
    return result


def bench_policies(args: argparse.Namespace) -> None:
    bs = args.block_size
    trace = key_trace(policy_trace(args), bs)
    unique = len({k for r in trace for k in r.keys[: r.lookup_blocks]})
    committed = len({k for r in trace for k in r.keys[: r.commit_blocks]})
    biggest = max(r.alloc_blocks for r in trace)
    floor_blocks = biggest * (args.in_flight + 1)
    capacities = []
    for text in args.capacities.split(","):
        value = float(text)
        n = int(value * committed) if value <= 1 else int(value)
        capacities.append(max(n, floor_blocks))
    capacities = sorted(set(capacities))
    title = (
        f"policies: block hit ratio of the device pool, {len(trace)} requests "
        f"({sum(r.scan for r in trace)} one-off scans), {bs}-token blocks"
    )
    machine = machine_info(torch.device("cpu"))
    print_machine(title, machine)
    lookups = sum(r.lookup_blocks for r in trace)
    print(
        f"trace:    {args.apps} system prompts of {args.system_tokens} tokens (Zipf popularity), "
        f"{args.active} active conversations (Pareto activity, 2-{args.max_turns} turns, user 16-128 and "
        f"answer 16-256 tokens), scans {args.scan_fraction:.0%} of requests ({args.scan_min}-{args.scan_max} "
        f"tokens after a system prompt); seed {args.seed}"
    )
    print(
        f"blocks:   {lookups} looked up, {unique} distinct; {committed} distinct blocks committed (the "
        f"working set); capacities {', '.join(f'{c} ({c / committed:.0%})' for c in capacities)}; "
        f"{args.in_flight} requests in flight"
    )
    if any(c == floor_blocks for c in capacities):
        print(
            f"note: capacities were raised to {floor_blocks} blocks so that {args.in_flight + 1} of the "
            "largest requests fit"
        )
    print()
    infinite = replay(trace, committed + floor_blocks, bs, "lru", args.in_flight)
    results: dict[str, Any] = {"capacities": capacities, "working_set_blocks": committed, "policies": {}}
    rows = []
    for policy in progress(POLICIES, "policies"):
        cells, chat_cells = [], []
        results["policies"][policy] = {}
        for cap in capacities:
            r = replay(trace, cap, bs, policy, args.in_flight)
            results["policies"][policy][cap] = vars(r) | {
                "hit_ratio": r.hit_ratio,
                "chat_hit_ratio": r.chat_hit_ratio,
            }
            cells.append(f"{100 * r.hit_ratio:.1f}%")
            chat_cells.append(f"{100 * r.chat_hit_ratio:.1f}%")
        rows.append([policy, *cells, *chat_cells])
    rows.append(
        [
            "unbounded",
            *[f"{100 * infinite.hit_ratio:.1f}%"] * len(capacities),
            *[f"{100 * infinite.chat_hit_ratio:.1f}%"] * len(capacities),
        ]
    )
    results["unbounded"] = vars(infinite) | {
        "hit_ratio": infinite.hit_ratio,
        "chat_hit_ratio": infinite.chat_hit_ratio,
    }
    headers = ["policy", *[f"all @ {c}" for c in capacities], *[f"chat @ {c}" for c in capacities]]
    print_table(headers, rows)
    print(
        "\nblock hit ratio = prompt blocks found in the pool / prompt blocks looked up (all requests, "
        "then chat requests only: what the scans cost them). unbounded = a pool that never evicts: "
        "only first references miss."
    )
    finish(args, title, machine, results)
