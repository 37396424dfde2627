"""`kvtier bench gpu-decode`: GPU decode at the memory-bandwidth limit, measured in ONE run beside
its ceiling and peers (was bench/bench_gpu_decode.py, which now calls this).

    kvtier bench gpu-decode --json docs/results/h200-gpu-decode.json

Parts (``--parts`` picks some; all by default):
  ceiling    device-to-device copy bandwidth (bytes read + written per second)
  attention  the paged decode kernel alone: Triton at each split count, the torch reference
             (gather + SDPA), PyTorch FlexAttention over the paged pool; achieved KV bytes/s (CUDA)
  batch1     batch-1 decode of each model (default synthetic:llama-3.2-1b and synthetic:llama-3.1-8b):
             torch reference (first model), Triton eager, Triton + CUDA graphs (decode_gemv auto,
             on, off: the small-M projection kernel on the measured shapes, everywhere, nowhere);
             tok/s and weight bytes / step time / bandwidth
  hf         Hugging Face static-cache ``generate`` (compiled) on the first model, same weights
  batch64    64 sequences with 1k-token contexts: step time against (weights + KV) / bandwidth
  agree      greedy agreement and logit error over 64 prompts: Triton + graphs vs the torch
             reference on the same device (bf16), and an fp8 pool vs bf16
  profile    kernel time by name for one eager batch-1 step (what a graph replays) (CUDA)
  gemv       every projection shape of each model at M = 1..64 rows: F.linear (default BLAS,
             cuBLASLt) and the small-M Triton kernel's configs, checked against float32, per call
             under CUDA-graph replay; fraction of bandwidth; per-step sums (CUDA)

Never asserts on time; prints a line per measurement and a table per part, and writes everything
to --json (or DIR/gpu-decode.json with --out DIR). One broken part does not lose the others' figures.
``--device cpu --models synthetic:tiny --kv-cache-memory 64MiB --parts ceiling,batch1,agree`` checks
the CPU path.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvtier.bench.engine_common import copy_seconds, decode_weight_bytes, run_one
from kvtier.bench.report import machine_info, print_table, sync
from kvtier.config import parse_bytes
from kvtier.engine.engine import Engine
from kvtier.engine.llm import LLM
from kvtier.engine.request import SamplingParams

MODELS = ("synthetic:llama-3.2-1b", "synthetic:llama-3.1-8b")
PART_NAMES = ("ceiling", "batch1", "batch64", "agree", "attention", "profile", "hf", "gemv")
CUDA_ONLY = ("attention", "profile", "gemv")


@dataclass
class GpuDecodeRun:
    """What the parts share: the device, the models, the engine settings and every figure so far."""

    dev: torch.device
    models: tuple[str, ...] = MODELS
    dtype: str = "bfloat16"
    kv_cache_memory: int | None = None  # replaces each part's own pool size (small devices, CPU checks)
    results: dict[str, Any] = field(default_factory=dict)
    json_path: str | None = None  # where save() writes the figures so far

    def save(self) -> None:
        """Write every figure so far (after each part; long parts also call it as they go, so a
        run cut by a time limit keeps what it measured)."""
        if self.json_path:
            Path(self.json_path).write_text(json.dumps(self.results, indent=1, default=str))

    def log(self, *a: Any) -> None:
        print(*a, flush=True)

    def free(self) -> None:
        gc.collect()  # engines hold reference cycles (pool callbacks): collect before the next one
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()

    def sync(self) -> None:
        sync(self.dev)

    def bw(self) -> float:
        return float(self.results.get("copy_bandwidth") or 4.3e12)

    def engine(self, model: str, **kw: Any) -> Engine:
        return self.llm(model, **kw).engine

    def llm(self, model: str, **kw: Any) -> LLM:
        return LLM(**self.settings(model, **kw))

    def gemv_engine(self, model: str, **kw: Any) -> Engine:
        """An engine whose fused path runs the small-M projection kernel (decode_gemv=on), set on
        the model before the engine captures its graphs (works whether or not the engine passes
        the setting on itself)."""
        from kvtier.config import EngineConfig
        from kvtier.model.loader import load_model

        cfg = EngineConfig.load(self.settings(model, decode_gemv="on", **kw))
        loaded = load_model(model, self.dev, getattr(torch, self.dtype), cfg.model.seed)
        loaded.model.use_fused_kernels(gemv="on", gemv_max_m=cfg.model.decode_gemv_max_m)
        return Engine(cfg, loaded)

    def settings(self, model: str, **kw: Any) -> dict[str, Any]:
        settings: dict[str, Any] = dict(
            model=model,
            device=str(self.dev),
            dtype=self.dtype,
            tiers="none",
            kv_cache_memory=12 << 30,
            max_num_seqs=64,
        )
        settings.update(kw)
        if self.kv_cache_memory is not None:
            settings["kv_cache_memory"] = self.kv_cache_memory
        return settings


# -- ceiling -----------------------------------------------------------------------------------------
def part_ceiling(run: GpuDecodeRun) -> None:
    nbytes = 2 << 30 if run.dev.type == "cuda" else 512 << 20
    s = min(copy_seconds(run.dev, nbytes) for _ in range(3))
    run.results["copy_bandwidth"] = 2 * nbytes / s
    run.log(
        f"copy bandwidth: {run.results['copy_bandwidth'] / 1e12:.3f} TB/s "
        f"({nbytes >> 20} MiB copy, read + write)"
    )


# -- batch-1 decode ----------------------------------------------------------------------------------
def decode_tps(
    run: GpuDecodeRun, eng: Engine, prompt_len: int = 512, new: int = 128, runs: int = 3
) -> dict[str, Any]:
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
    return {"step_ms": step * 1e3, "tok_s": 1 / step, "weight_bytes": wb, "fraction": wb / step / run.bw()}


def part_batch1(run: GpuDecodeRun) -> None:
    out: dict[str, Any] = {}
    for model in run.models:
        res: dict[str, Any] = {}
        variants: list[tuple[str, dict[str, Any]]] = [
            ("triton+graphs", {}),
            ("triton eager", {"cuda_graph_max_batch": 0}),
        ]
        if run.dev.type == "cuda":  # the fused path (pre-fused for the kernel) needs Triton attention
            # default (decode_gemv=auto: the measured shapes), every projection on the kernel, none
            variants.insert(1, ("triton+graphs+gemv", {"gemv": True}))
            variants.insert(2, ("triton+graphs gemv off", {"decode_gemv": "off"}))
        if model == run.models[0]:  # the reference is slow: the smaller model only
            variants.append(("torch reference", {"attention_backend": "torch"}))
        for name, kw in variants:
            t0 = time.perf_counter()
            eng = run.gemv_engine(model) if kw.pop("gemv", False) else run.engine(model, **kw)
            start_s = time.perf_counter() - t0
            r = decode_tps(run, eng, runs=3 if "graphs" in name else 1)
            r["engine_start_s"] = start_s
            r["gemv"] = list(getattr(eng.model, "gemv", (0, False)))
            if eng.runner.graphs is not None:
                r["graph_capture_s"] = eng.runner.graphs.capture_seconds
                r["graph_buckets"] = eng.runner.graphs.buckets
            res[name] = r
            run.log(
                f"batch-1 {model} {name}: {r['tok_s']:.0f} tok/s, step {r['step_ms']:.3f} ms, "
                f"{r['fraction']:.1%} of weight-bytes/bandwidth (start {start_s:.1f} s, "
                f"graphs {r.get('graph_capture_s', 0):.1f} s)"
            )
            del eng
            run.free()
        out[model] = res
    run.results["batch1"] = out
    rows = [
        [model, name, f"{r['tok_s']:.0f}", f"{r['step_ms']:.3f}", f"{100 * r['fraction']:.1f}%"]
        for model, res in out.items()
        for name, r in res.items()
    ]
    print_table(["model", "path", "tok/s", "step ms", "of weights/bw"], rows)


# -- HF peer -----------------------------------------------------------------------------------------
def transformers_config(config: Any) -> Any:
    """A synthetic model's config is a plain namespace (its start skips transformers' config
    modules); transformers' model classes want their own config class, made from the same fields."""
    if hasattr(config, "to_dict"):
        return config
    from transformers import AutoConfig

    fields = {k: v for k, v in vars(config).items() if not k.startswith("rope_") and k != "dtype"}
    hf = AutoConfig.for_model(fields.pop("model_type"), **fields)
    hf.rope_parameters = dict(config.rope_parameters)
    return hf


def part_hf(run: GpuDecodeRun) -> None:
    from transformers import AutoModelForCausalLM

    eng = run.engine(run.models[0], attention_backend="torch", kv_cache_memory=1 << 30)
    cfg = transformers_config(eng.loaded.hf_config)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, run.dtype)).to(run.dev).eval()
    missing = hf.load_state_dict(eng.model.state_dict(), strict=False)
    del eng
    run.free()
    rng = random.Random(1)
    ids = torch.tensor([[rng.randrange(cfg.vocab_size) for _ in range(512)]], device=run.dev)

    def gen(n: int) -> float:
        run.sync()
        t = time.perf_counter()
        hf.generate(
            ids,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            cache_implementation="static",
            pad_token_id=0,
        )
        run.sync()
        return time.perf_counter() - t

    t0 = time.perf_counter()
    gen(129)  # compiles
    warm = time.perf_counter() - t0
    full = statistics.median(gen(129) for _ in range(3))
    one = statistics.median(gen(1) for _ in range(3))
    step = (full - one) / 128
    run.results["hf"] = {
        "step_ms": step * 1e3,
        "tok_s": 1 / step,
        "first_call_s": warm,
        "missing_keys": len(missing.missing_keys),
        "how": "generate(cache_implementation='static'), decode rate = 128 / (t(129 new) - t(1 new))",
    }
    run.log(
        f"HF static-cache generate {run.models[0]}: {1 / step:.0f} tok/s ({step * 1e3:.3f} ms/step; "
        f"first call {warm:.1f} s)"
    )


# -- batch 64 ----------------------------------------------------------------------------------------
def part_batch64(run: GpuDecodeRun) -> None:
    from kvtier.bench.gpu_timing import cuda_time

    out: dict[str, Any] = {}
    for model in run.models:
        eng = run.engine(model, kv_cache_memory=24 << 30, max_num_batched_tokens=16384)
        rng = random.Random(2)
        vocab = eng.loaded.config.vocab_size
        params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
        for _ in range(64):
            eng.add_request([rng.randrange(vocab) for _ in range(1000)], params)
        while any(not r.output_token_ids for r in eng.requests.values()):
            eng.step()
        for _ in range(3):
            eng.step()
        run.sync()
        n = 32
        t = time.perf_counter()
        for _ in range(n):
            eng.step()
        run.sync()
        step = (time.perf_counter() - t) / n
        gpu_step = None
        if eng.runner.graphs is not None and 64 in eng.runner.graphs.graphs:
            gpu_step = cuda_time(eng.runner.graphs.graphs[64].replay, run.dev, 20)  # replays the last inputs
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
            "fraction": (wb + kv) / step / run.bw(),
            "graphs": eng.runner.graphs is not None,
            "gpu_step_ms": None if gpu_step is None else gpu_step * 1e3,
            "gpu_fraction": None if gpu_step is None else (wb + kv) / gpu_step / run.bw(),
            "host_profile": text.getvalue()[-3000:],
        }
        out[model] = r
        run.log(
            f"batch-64 {model} ctx~{ctx:.0f}: step {step * 1e3:.3f} ms, {64 / step:.0f} tok/s, "
            f"{r['fraction']:.1%} of (weights + KV)/bandwidth; graph replay alone "
            f"{(gpu_step or 0) * 1e3:.3f} ms ({r['gpu_fraction'] or 0:.1%})"
        )
        run.log(text.getvalue()[-1800:])
        del eng
        run.free()
    run.results["batch64"] = out
    rows = [
        [m, f"{r['step_ms']:.3f}", f"{r['tok_s']:.0f}", f"{100 * r['fraction']:.1f}%"] for m, r in out.items()
    ]
    print_table(["model", "step ms", "tok/s", "of (weights+KV)/bw"], rows)


# -- agreement ---------------------------------------------------------------------------------------
def generate_all(llm: LLM, prompts: list[list[int]], new: int) -> list[Any]:
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True, return_logits=True)
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


def part_agree(run: GpuDecodeRun) -> None:
    out: dict[str, Any] = {}
    rng = random.Random(3)
    for model in run.models:
        ref_llm = run.llm(model, attention_backend="torch", kv_cache_memory=4 << 30)
        vocab = ref_llm.engine.loaded.config.vocab_size
        prompts = [[rng.randrange(vocab) for _ in range(rng.randint(16, 512))] for _ in range(64)]
        new = 32
        ref = generate_all(ref_llm, prompts, new)
        del ref_llm
        run.free()
        oracle = generate_all(
            run.llm(model, attention_backend="torch", kv_cache_memory=4 << 30, dtype="float32"), prompts, new
        )
        run.free()
        fast = generate_all(run.llm(model, kv_cache_memory=4 << 30), prompts, new)
        run.free()
        fp8 = generate_all(run.llm(model, kv_cache_memory=4 << 30, kv_cache_dtype="fp8"), prompts, new)
        out[model] = {
            "triton_vs_torch": compare(ref, fast),
            "fp8_vs_bf16": compare(fast, fp8),
            "torch_bf16_vs_fp32": compare(oracle, ref),
            "triton_bf16_vs_fp32": compare(oracle, fast),
            "triton_fp8_vs_fp32": compare(oracle, fp8),
        }
        run.log(f"agreement {model}: {json.dumps(out[model])}")
        run.free()
    run.results["agree"] = out
    rows = [
        [m, pair, f"{c['token_agreement']:.4f}", f"{c['first_logits_rel_err_median']:.2e}"]
        for m, res in out.items()
        for pair, c in res.items()
    ]
    print_table(["model", "pair", "token agreement", "logits rel err (median)"], rows)


def parts() -> dict[str, Callable[[GpuDecodeRun], None]]:
    from kvtier.bench import gpu_timing

    return {
        "ceiling": part_ceiling,
        "attention": gpu_timing.part_attention,
        "batch1": part_batch1,
        "hf": part_hf,
        "batch64": part_batch64,
        "agree": part_agree,
        "profile": gpu_timing.part_profile,
        "gemv": gpu_timing.part_gemv,
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--parts", default=",".join(PART_NAMES), help=f"some of {','.join(PART_NAMES)}")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N (cpu checks the code path)")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated; the first is the small one")
    p.add_argument("--dtype", default="bfloat16", help="the engines' dtype (agree adds a float32 oracle)")
    p.add_argument("--kv-cache-memory", help="use this pool size in every part (default: each part's own)")


def check_parts(names: list[str], parser: argparse.ArgumentParser) -> None:
    unknown = [n for n in names if n not in PART_NAMES]
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; parts: {', '.join(PART_NAMES)}")


def bench_gpu_decode(args: argparse.Namespace) -> None:
    dev = torch.device(args.device)
    run = GpuDecodeRun(
        dev,
        tuple(args.models.split(",")),
        args.dtype,
        parse_bytes(args.kv_cache_memory) if args.kv_cache_memory else None,
    )
    run.results["machine"] = machine_info(dev)
    run.json_path = args.json
    table = parts()
    for name in args.parts.split(","):
        t = time.perf_counter()
        if name in CUDA_ONLY and dev.type != "cuda":
            run.log(f"{name}: skipped (needs CUDA)")
            run.results[f"{name}_skipped"] = "needs CUDA"
        else:
            try:
                table[name](run)
            except Exception as e:  # one broken part must not lose the others' figures
                traceback.print_exc()
                run.results[f"{name}_error"] = repr(e)[:500]
        run.results.setdefault("part_seconds", {})[name] = time.perf_counter() - t
        run.save()
    run.log(json.dumps(run.results.get("part_seconds")))
