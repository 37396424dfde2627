"""`kvtier bench throughput`: offline throughput."""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
from typing import Any

from kvtier.bench.engine_common import FlopModel, finish, make_engine, random_tokens, start
from kvtier.bench.report import fraction, print_table, sync
from kvtier.engine.engine import Engine
from kvtier.engine.request import SamplingParams


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
    loop0 = _loop_times(engine)
    engine.stats.step_trace = []

    sync(engine.device)
    t0 = time.perf_counter()
    for p, sp in zip(prompts, params, strict=True):
        engine.add_request(p, sp, stream=False)  # as LLM.generate: outputs at the end only
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
        "overlap_steps": engine.config.scheduler.overlap_steps,
        **{k: v - loop0[k] for k, v in _loop_times(engine).items()},
        "step_kinds": _step_kinds(engine.stats.step_trace),
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
    print(loop_summary(results))
    for kind, k in results["step_kinds"].items():
        print(
            f"  {kind:>14}: {k['steps']:5d} steps, {k['rows']:6.1f} rows, {k['tokens']:7.1f} tokens; "
            f"launch {k['launch_ms']:.2f} ms, wait {k['wait_ms']:.2f} ms, device {k['busy_ms']:.2f} ms, "
            f"idle before {k['idle_ms']:.2f} ms"
        )
    if ttfts:
        print(
            f"\nTTFT median {results['ttft_median_s']:.2f} s, p90 {results['ttft_p90_s']:.2f} s "
            "(every request queued at the start)"
        )
    if args.hf_peer:
        from kvtier.bench.hf_batch import hf_copy_on_host, hf_peer

        device = engine.device
        try:
            model = hf_copy_on_host(engine)
        except Exception as e:  # a peer that cannot start is reported, not fatal
            results["hf_peer"] = {"error": f"{type(e).__name__}: {e}"}
        else:
            engine.close()
            del engine, final  # the pool and the graphs go: the peer gets the device's memory
            gc.collect()
            results["hf_peer"] = hf_peer(model, device, prompts, [o for _, o in lens])
        _print_peer(results)
    finish(args, ctx, title, results)


def _print_peer(results: dict[str, Any]) -> None:
    peer = results["hf_peer"]
    if "error" in peer:
        print(f"\nHF peer failed: {peer['error']}")
        return
    peer["kvtier_over_hf"] = results["output_tokens_per_s"] / peer["output_tokens_per_s"]
    print(
        f"\nHF continuous batching (same weights, prompts and output lengths, same run): "
        f"{peer['output_tokens_per_s']:.1f} output tok/s ({peer['output_tokens']} tokens in "
        f"{peer['elapsed_s']:.1f} s); kvtier is {peer['kvtier_over_hf']:.1f}x"
    )


def _loop_times(engine: Engine) -> dict[str, float]:
    st = engine.stats
    return {
        "step_s": st.step_seconds,
        "wait_s": st.wait_seconds,
        "device_busy_s": st.device_busy_seconds,
        "device_idle_s": st.device_idle_seconds,
    }


def loop_summary(results: dict[str, Any]) -> str:
    """The step loop's costs per step: host work (step() less its waits for the device), and on
    CUDA the device's time per step and the share of it the device sat idle waiting for the host."""
    steps = max(1, int(results["steps"]))
    host = (results["step_s"] - results["wait_s"]) / steps
    line = f"\nstep loop (overlap_steps={results['overlap_steps']}): host {host * 1e3:.2f} ms/step"
    busy, idle = results["device_busy_s"], results["device_idle_s"]
    if busy > 0:
        line += (
            f", device {busy / steps * 1e3:.2f} ms/step, device idle between steps "
            f"{idle / steps * 1e3:.2f} ms/step = {idle / (busy + idle):.1%} of device time"
        )
    return line


def _step_kinds(trace: list[tuple[int, int, float, float, float, float]] | None) -> dict[str, Any]:
    """Mean per-step costs of decode-only steps (one token a row) and of steps with prefill."""
    kinds: dict[str, list[tuple[int, int, float, float, float, float]]] = {
        "decode-only": [],
        "with prefill": [],
    }
    for row in trace or []:
        kinds["decode-only" if row[0] == row[1] else "with prefill"].append(row)
    out: dict[str, Any] = {}
    for name, rows in kinds.items():
        if rows:
            n = len(rows)
            mean = [sum(r[i] for r in rows) / n for i in range(6)]
            out[name] = {
                "steps": n,
                "rows": mean[0],
                "tokens": mean[1],
                "launch_ms": mean[2] * 1e3,
                "wait_ms": mean[3] * 1e3,
                "busy_ms": mean[4] * 1e3,
                "idle_ms": mean[5] * 1e3,
            }
    return out
