"""`kvtier bench decode`: batch-1 decode."""

from __future__ import annotations

import argparse
import random
import statistics

from kvtier.bench.engine_common import decode_weight_bytes, finish, make_engine, random_tokens, run_one, start
from kvtier.bench.report import GB, fraction, print_table, progress
from kvtier.engine.request import SamplingParams


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
    for i in progress(range(args.repeats), "decode runs"):
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
