"""GPU decode at the memory-bandwidth limit, measured in ONE run beside its ceiling and peers.

    PYTHONPATH=src python3 bench/bench_gpu_decode.py --json docs/results/h200-gpu-decode.json

Parts (``--parts`` picks some; all by default):
  ceiling    device-to-device copy bandwidth (bytes read + written per second)
  attention  the paged decode kernel alone: Triton at each split count, the torch reference
             (gather + SDPA), PyTorch FlexAttention over the paged pool; achieved KV bytes/s
  batch1     batch-1 decode of synthetic:llama-3.2-1b and synthetic:llama-3.1-8b: torch reference,
             Triton eager, Triton + CUDA graphs; tok/s and weight bytes / step time / bandwidth
  hf         Hugging Face static-cache ``generate`` (compiled) on the 1B, same weights
  batch64    64 sequences with 1k-token contexts: step time against (weights + KV) / bandwidth
  agree      greedy agreement and logit error over 64 prompts: Triton + graphs vs the torch
             reference on the same GPU (bf16), and an fp8 pool vs bf16
  profile    kernel time by name for one eager batch-1 step (what a graph replays)

Never asserts on time; prints a table per part and writes everything to --json.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kvtier import LLM, SamplingParams
from kvtier.bench.engine_common import copy_seconds, decode_weight_bytes, run_one
from kvtier.bench.report import machine_info
from kvtier.engine.engine import Engine

MODELS = ("synthetic:llama-3.2-1b", "synthetic:llama-3.1-8b")
DEV = torch.device("cuda")
RESULTS: dict[str, Any] = {}


def log(*a: Any) -> None:
    print(*a, flush=True)


def free() -> None:
    gc.collect()  # engines hold reference cycles (pool callbacks): collect before the next one
    torch.cuda.empty_cache()


def sync() -> None:
    torch.cuda.synchronize(DEV)


def cuda_time(fn: Any, reps: int = 50) -> float:
    """Median seconds of ``fn`` by CUDA events, after warm-up."""
    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def graph_time(fn: Any, reps: int = 20) -> float:
    """Median device seconds of ``fn`` replayed from a CUDA graph: the kernel's own time, with no
    Python launch cost (which is what a decode graph pays)."""
    fn()
    sync()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return cuda_time(g.replay, reps)


def engine(model: str, **kw: Any) -> Engine:
    settings: dict[str, Any] = dict(
        model=model, device="cuda", dtype="bfloat16", tiers="none", kv_cache_memory=12 << 30, max_num_seqs=64
    )
    settings.update(kw)
    return LLM(**settings).engine


# -- ceiling -----------------------------------------------------------------------------------------
def part_ceiling() -> None:
    nbytes = 2 << 30
    s = min(copy_seconds(DEV, nbytes) for _ in range(3))
    RESULTS["copy_bandwidth"] = 2 * nbytes / s
    log(f"copy bandwidth: {RESULTS['copy_bandwidth'] / 1e12:.3f} TB/s (2 GiB copy, read + write)")


def bw() -> float:
    return float(RESULTS.get("copy_bandwidth") or 4.3e12)


# -- attention kernel --------------------------------------------------------------------------------
def paged_problem(rows: int, ctx: int, kv_heads: int, heads: int, dim: int, page: int = 16) -> dict[str, Any]:
    nb_row = -(-ctx // page)
    num_blocks = rows * nb_row + 8
    pool = torch.randn((2, num_blocks, page, kv_heads, dim), device=DEV, dtype=torch.bfloat16)
    perm = torch.randperm(num_blocks, device=DEV)[: rows * nb_row].int()
    table = perm.view(rows, nb_row).contiguous()
    q = torch.randn((rows, heads, dim), device=DEV, dtype=torch.bfloat16)
    lens = torch.full((rows,), ctx, dtype=torch.int32, device=DEV)
    return dict(pool=pool, table=table, q=q, lens=lens, ctx=ctx, page=page)


def flex_decode(p: dict[str, Any]) -> Any:
    """FlexAttention over the whole pool with a mask mapping each physical key to its row."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    pool, table, q = p["pool"], p["table"], p["q"]
    rows, _, dim = q.shape
    _, nb, page, kvh, _ = pool.shape
    owner = torch.full((nb,), -1, dtype=torch.int32, device=DEV)
    logical = torch.zeros((nb,), dtype=torch.int32, device=DEV)
    owner[table.flatten().long()] = torch.arange(rows, device=DEV, dtype=torch.int32).repeat_interleave(
        table.shape[1]
    )
    logical[table.flatten().long()] = torch.arange(table.shape[1], device=DEV, dtype=torch.int32).repeat(rows)
    lens = p["lens"]
    k = pool[0].reshape(1, nb * page, kvh, dim).transpose(1, 2)
    v = pool[1].reshape(1, nb * page, kvh, dim).transpose(1, 2)
    qq = q.transpose(0, 1).unsqueeze(0)  # [1, H, rows, D]: row r is query r

    def mask(b: Any, h: Any, qi: Any, ki: Any) -> Any:
        blk = ki // page
        return (owner[blk] == qi) & (logical[blk] * page + ki % page < lens[qi])

    bm = create_block_mask(mask, None, None, rows, nb * page, device=DEV, BLOCK_SIZE=(16, 128))
    fn = torch.compile(flex_attention)
    return lambda: fn(qq, k, v, block_mask=bm, enable_gqa=True)


def part_attention() -> None:
    from kvtier.model.attention import AttentionMetadata, TorchReferenceAttention
    from kvtier.model.kernels.paged_decode import choose_splits, paged_decode

    out: list[dict[str, Any]] = []
    shapes = [(1, 512), (1, 4096), (1, 32768), (8, 4096), (64, 1024), (64, 4096)]
    for rows, ctx in shapes:
        p = paged_problem(rows, ctx, 8, 32, 128)
        kv_bytes = rows * ctx * 2 * 8 * 128 * 2
        row: dict[str, Any] = {"rows": rows, "ctx": ctx, "kv_bytes": kv_bytes}
        auto = choose_splits(rows, 8, ctx, 64, DEV)
        row["auto_splits"] = auto
        for splits in (1, 2, 4, 8, 16, 32, 64):
            if splits > max(1, ctx // 64):
                continue
            for bn in (32, 64, 128):
                t = graph_time(
                    lambda s=splits, b=bn, p=p: paged_decode(
                        p["q"], p["pool"], p["table"], p["lens"], 0.088, None, s, block_n=b
                    )
                )
                row[f"triton_s{splits}_b{bn}_us"] = t * 1e6
        meta = AttentionMetadata(
            slot_mapping=torch.zeros(0, dtype=torch.int64, device=DEV),
            query_start_loc=torch.arange(rows + 1, dtype=torch.int32, device=DEV),
            context_lens=p["lens"],
            block_tables=p["table"],
            query_lens_host=[1] * rows,
            context_lens_host=[ctx] * rows,
            num_decodes=rows,
        )
        ref = TorchReferenceAttention()

        def reference(p: dict[str, Any] = p, m: Any = meta, ref: Any = ref) -> Any:
            return ref._decode(p["q"], p["pool"], m, 0.088, None, 16, None)

        row["torch_reference_us"] = cuda_time(reference, reps=10) * 1e6
        try:
            if (rows, ctx) in ((1, 4096), (64, 1024)):
                row["flex_us"] = cuda_time(flex_decode(p), reps=20) * 1e6
        except Exception as e:  # FlexAttention is experimental: record why it did not run
            row["flex_error"] = repr(e)[:300]
        best = min((v, k) for k, v in row.items() if k.startswith("triton_"))
        row["best"] = best[1]
        row["best_us"] = best[0]
        row["best_fraction_of_bw"] = kv_bytes / (best[0] / 1e6) / bw()
        row["auto_us"] = row[f"triton_s{auto}_b64_us"]
        out.append(row)
        log(
            f"attention rows={rows} ctx={ctx}: auto(s={auto}) {row['auto_us']:.1f} us, best {best[1]} "
            f"{best[0]:.1f} us ({row['best_fraction_of_bw']:.0%} of bw), reference "
            f"{row['torch_reference_us']:.1f} us, flex {row.get('flex_us', row.get('flex_error', '-'))}"
        )
    RESULTS["attention"] = out


# -- batch-1 decode ----------------------------------------------------------------------------------
def decode_tps(eng: Engine, prompt_len: int = 512, new: int = 128, runs: int = 3) -> dict[str, float]:
    rng = random.Random(0)
    vocab = eng.loaded.config.vocab_size
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    run_one(
        eng, [rng.randrange(vocab) for _ in range(prompt_len)], SamplingParams(max_tokens=8, ignore_eos=True)
    )
    steps = []
    for _ in range(runs):
        tl = run_one(eng, [rng.randrange(vocab) for _ in range(prompt_len)], params)
        steps.append((tl.token_times[-1] - tl.token_times[0]) / (len(tl.token_times) - 1))
    step = statistics.median(steps)
    wb = decode_weight_bytes(eng)
    return {"step_ms": step * 1e3, "tok_s": 1 / step, "weight_bytes": wb, "fraction": wb / step / bw()}


def part_batch1() -> None:
    out: dict[str, Any] = {}
    for model in MODELS:
        res: dict[str, Any] = {}
        variants = [("triton+graphs", {}), ("triton eager", {"cuda_graph_max_batch": 0})]
        if "1b" in model:
            variants.append(("torch reference", {"attention_backend": "torch"}))
        for name, kw in variants:
            t0 = time.perf_counter()
            eng = engine(model, **kw)
            start_s = time.perf_counter() - t0
            r = decode_tps(eng, runs=3 if "graphs" in name else 1)
            r["engine_start_s"] = start_s
            if eng.runner.graphs is not None:
                r["graph_capture_s"] = eng.runner.graphs.capture_seconds
                r["graph_buckets"] = eng.runner.graphs.buckets
            res[name] = r
            log(
                f"batch-1 {model} {name}: {r['tok_s']:.0f} tok/s, step {r['step_ms']:.3f} ms, "
                f"{r['fraction']:.1%} of weight-bytes/bandwidth (start {start_s:.1f} s, "
                f"graphs {r.get('graph_capture_s', 0):.1f} s)"
            )
            del eng
            free()
        out[model] = res
    RESULTS["batch1"] = out


# -- HF peer -----------------------------------------------------------------------------------------
def part_hf() -> None:
    from transformers import AutoModelForCausalLM

    eng = engine(MODELS[0], attention_backend="torch", kv_cache_memory=1 << 30)
    cfg = eng.loaded.hf_config
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).to(DEV).eval()
    missing = hf.load_state_dict(eng.model.state_dict(), strict=False)
    del eng
    free()
    rng = random.Random(1)
    ids = torch.tensor([[rng.randrange(cfg.vocab_size) for _ in range(512)]], device=DEV)

    def gen(n: int) -> float:
        sync()
        t = time.perf_counter()
        hf.generate(
            ids,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            cache_implementation="static",
            pad_token_id=0,
        )
        sync()
        return time.perf_counter() - t

    t0 = time.perf_counter()
    gen(129)  # compiles
    warm = time.perf_counter() - t0
    full = statistics.median(gen(129) for _ in range(3))
    one = statistics.median(gen(1) for _ in range(3))
    step = (full - one) / 128
    RESULTS["hf"] = {
        "step_ms": step * 1e3,
        "tok_s": 1 / step,
        "first_call_s": warm,
        "missing_keys": len(missing.missing_keys),
        "how": "generate(cache_implementation='static'), decode rate = 128 / (t(129 new) - t(1 new))",
    }
    log(
        f"HF static-cache generate 1B: {1 / step:.0f} tok/s ({step * 1e3:.3f} ms/step; "
        f"first call {warm:.1f} s)"
    )


# -- batch 64 ----------------------------------------------------------------------------------------
def part_batch64() -> None:
    out: dict[str, Any] = {}
    for model in MODELS:
        eng = engine(model, kv_cache_memory=24 << 30, max_num_batched_tokens=16384)
        rng = random.Random(2)
        vocab = eng.loaded.config.vocab_size
        params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
        for _ in range(64):
            eng.add_request([rng.randrange(vocab) for _ in range(1000)], params)
        while any(not r.output_token_ids for r in eng.requests.values()):
            eng.step()
        for _ in range(3):
            eng.step()
        sync()
        n = 32
        t = time.perf_counter()
        for _ in range(n):
            eng.step()
        sync()
        step = (time.perf_counter() - t) / n
        gpu_step = None
        if eng.runner.graphs is not None and 64 in eng.runner.graphs.graphs:
            gpu_step = cuda_time(eng.runner.graphs.graphs[64].replay, 20)  # replays the last inputs
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        for _ in range(8):
            eng.step()
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(12)
        ctx = statistics.mean(r.num_computed_tokens for r in eng.requests.values())
        kv = 64 * ctx * eng.layout.bytes_per_token
        wb = decode_weight_bytes(eng)
        r = {
            "step_ms": step * 1e3,
            "tok_s": 64 / step,
            "mean_context": ctx,
            "kv_bytes": kv,
            "weight_bytes": wb,
            "fraction": (wb + kv) / step / bw(),
            "graphs": eng.runner.graphs is not None,
            "gpu_step_ms": None if gpu_step is None else gpu_step * 1e3,
            "gpu_fraction": None if gpu_step is None else (wb + kv) / gpu_step / bw(),
            "host_profile": text.getvalue()[-3000:],
        }
        out[model] = r
        log(
            f"batch-64 {model} ctx~{ctx:.0f}: step {step * 1e3:.3f} ms, {64 / step:.0f} tok/s, "
            f"{r['fraction']:.1%} of (weights + KV)/bandwidth; graph replay alone "
            f"{(gpu_step or 0) * 1e3:.3f} ms ({r['gpu_fraction'] or 0:.1%})"
        )
        log(text.getvalue()[-1800:])
        del eng
        free()
    RESULTS["batch64"] = out


# -- agreement ---------------------------------------------------------------------------------------
def generate_all(eng: Engine, prompts: list[list[int]], new: int) -> list[Any]:
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True, return_logits=True)
    llm = LLM.__new__(LLM)
    llm.engine = eng
    return [o.outputs[0] for o in llm.generate(prompts, params)]


def compare(ref: list[Any], got: list[Any]) -> dict[str, float]:
    same = total = prefix = 0
    errs = []
    for r, g in zip(ref, got, strict=True):
        total += len(r.token_ids)
        same += sum(a == b for a, b in zip(r.token_ids, g.token_ids, strict=True))
        prefix += next(
            (i for i, (a, b) in enumerate(zip(r.token_ids, g.token_ids, strict=True)) if a != b),
            len(r.token_ids),
        )
        errs.append(((g.logits[0] - r.logits[0]).norm() / r.logits[0].norm()).item())
    return {
        "token_agreement": same / total,
        "prefix_agreement": prefix / total,
        "first_logits_rel_err_median": statistics.median(errs),
        "first_logits_rel_err_max": max(errs),
    }


def part_agree() -> None:
    out: dict[str, Any] = {}
    rng = random.Random(3)
    for model in MODELS:
        ref_eng = engine(model, attention_backend="torch", kv_cache_memory=4 << 30)
        vocab = ref_eng.loaded.config.vocab_size
        prompts = [[rng.randrange(vocab) for _ in range(rng.randint(16, 512))] for _ in range(64)]
        new = 32
        ref = generate_all(ref_eng, prompts, new)
        del ref_eng
        free()
        oracle = generate_all(
            engine(model, attention_backend="torch", kv_cache_memory=4 << 30, dtype="float32"), prompts, new
        )
        free()
        fast = generate_all(engine(model, kv_cache_memory=4 << 30), prompts, new)
        free()
        fp8 = generate_all(engine(model, kv_cache_memory=4 << 30, kv_cache_dtype="fp8"), prompts, new)
        out[model] = {
            "triton_vs_torch": compare(ref, fast),
            "fp8_vs_bf16": compare(fast, fp8),
            "torch_bf16_vs_fp32": compare(oracle, ref),
            "triton_bf16_vs_fp32": compare(oracle, fast),
            "triton_fp8_vs_fp32": compare(oracle, fp8),
        }
        log(f"agreement {model}: {json.dumps(out[model])}")
        free()
    RESULTS["agree"] = out


# -- profile -----------------------------------------------------------------------------------------
def part_profile() -> None:
    from torch.profiler import ProfilerActivity, profile

    out: dict[str, Any] = {}
    for model in MODELS:
        eng = engine(model, cuda_graph_max_batch=0, kv_cache_memory=2 << 30)
        decode_tps(eng, new=16, runs=1)  # warm
        rng = random.Random(4)
        (rid,) = eng.add_request(
            [rng.randrange(100) for _ in range(512)], SamplingParams(max_tokens=40, ignore_eos=True)
        )
        for _ in range(8):
            eng.step()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                eng.step()
        rows = []
        for e in prof.key_averages():
            dev_us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
            if dev_us > 0:
                rows.append((dev_us / 10, e.count / 10, e.key[:90]))
        rows.sort(reverse=True)
        total = sum(r[0] for r in rows)
        out[model] = {
            "kernel_us_per_step": total,
            "kernels_per_step": sum(r[1] for r in rows),
            "top": rows[:15],
        }
        log(f"profile {model}: {total:.0f} us of kernels per step, {sum(r[1] for r in rows):.0f} kernels")
        for us, cnt, name in rows[:12]:
            log(f"   {us:8.1f} us  x{cnt:5.0f}  {name}")
        eng.abort(rid)
        del eng
        free()
    RESULTS["profile"] = out


PARTS = {
    "ceiling": part_ceiling,
    "attention": part_attention,
    "batch1": part_batch1,
    "hf": part_hf,
    "batch64": part_batch64,
    "agree": part_agree,
    "profile": part_profile,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="ceiling,batch1,batch64,agree,attention,profile,hf")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    RESULTS["machine"] = machine_info(DEV)
    for name in args.parts.split(","):
        t = time.perf_counter()
        try:
            PARTS[name]()
        except Exception as e:  # one broken part must not lose the others' figures
            import traceback

            traceback.print_exc()
            RESULTS[f"{name}_error"] = repr(e)[:500]
        RESULTS.setdefault("part_seconds", {})[name] = time.perf_counter() - t
        if args.json:
            Path(args.json).write_text(json.dumps(RESULTS, indent=1, default=str))
    log(json.dumps(RESULTS.get("part_seconds")))


if __name__ == "__main__":
    main()
