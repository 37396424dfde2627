"""``kvtier bench decode | throughput | prefix | tiers | memcached | chat | policies | codec |
gpu-decode | persist | startup | embed | hf``: the command line of the benchmarks (``kvtier bench
serve`` is a typer command of its own, in ``kvtier.cli``).

Every run prints the machine, its settings, the ceilings measured in the same run and a markdown
table; ``--out DIR`` also writes ``DIR/<bench>.json`` (every raw figure), ``DIR/<bench>.md`` (what
was printed) and ``DIR/<bench>-<n>.png`` (one bar chart per table; needs the ``bench`` extra,
matplotlib). ``--json PATH`` writes the JSON alone. Benchmarks never assert on time.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

import torch

from kvtier.bench import embed, hf, persist, startup
from kvtier.bench.gpu_decode import add_arguments as gpu_decode_arguments
from kvtier.bench.gpu_decode import check_parts
from kvtier.bench.report import Report
from kvtier.cache.codec import KV_DTYPES

# command -> (module of kvtier.bench, function). Imported when run: the tier benchmarks import
# redis and pymemcache, which a machine that runs only the engine benchmarks (the GPU image) lacks.
RUNS = {
    "decode": ("decode", "bench_decode"),
    "throughput": ("throughput", "bench_throughput"),
    "prefix": ("prefix", "bench_prefix_ttft"),
    "tiers": ("tiers", "bench_ceilings"),
    "memcached": ("memcached", "bench_memcached"),
    "chat": ("chat", "bench_chat"),
    "policies": ("policies", "bench_policies"),
    "codec": ("codec", "bench_codec"),
    "gpu-decode": ("gpu_decode", "bench_gpu_decode"),
    "persist": ("persist", "bench_persist"),
    "startup": ("startup", "bench_startup"),
    "embed": ("embed", "bench_embed"),
    "hf": ("hf", "bench_hf"),
}


def runner(command: str) -> Callable[[argparse.Namespace], None]:
    module, function = RUNS[command]
    found = importlib.import_module(f"kvtier.bench.{module}")
    run: Callable[[argparse.Namespace], None] = getattr(found, function)
    return run


def _output(p: argparse.ArgumentParser) -> None:
    o = p.add_argument_group("output")
    o.add_argument("--out", metavar="DIR", help="write <bench>.json, <bench>.md and PNG plots here")
    o.add_argument("--json", metavar="PATH", help="write the results as JSON here")


def _engine_options() -> argparse.ArgumentParser:
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
    _output(common)
    common.add_argument("--no-ceilings", action="store_true", help="skip measuring copy bandwidth and matmul")
    common.add_argument("--seed", type=int, default=0, help="seed of the workload (lengths, token ids)")
    return common


def _tier_options() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    common = argparse.ArgumentParser(add_help=False)
    _output(common)
    common.add_argument("--seed", type=int, default=0, help="seed of the data and the workload")
    common.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    common.add_argument("--block-size", type=int, default=16)
    red = argparse.ArgumentParser(add_help=False)
    red.add_argument("--redis-url", help="use this Redis (its kvtier namespace only) instead of starting one")
    red.add_argument("--disk-path", help="folder for the disk tier's temp folder (default: the system temp)")
    return common, red


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvtier bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    engine = _engine_options()
    d = sub.add_parser("decode", parents=[engine], help="batch-1 decode tokens/s and weight bandwidth")
    d.add_argument("--prompt-len", type=int, default=128)
    d.add_argument("--output-len", type=int, default=128)
    d.add_argument("--repeats", type=int, default=3)
    t = sub.add_parser("throughput", parents=[engine], help="offline throughput of many requests")
    t.add_argument("--num-requests", type=int, default=None, help="default: 256 on CUDA, 16 on CPU")
    t.add_argument("--min-len", type=int, default=100, help="shortest input and output")
    t.add_argument("--max-len", type=int, default=None, help="longest input and output (1024 CUDA, 256 CPU)")
    t.add_argument("--warmup-requests", type=int, default=4)
    t.add_argument(
        "--hf-peer",
        action="store_true",
        help="then run Hugging Face's continuous batching on the same weights and workload",
    )
    p = sub.add_parser("prefix", parents=[engine], help="TTFT with a cached prefix vs cold")
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
    common, red = _tier_options()
    c = sub.add_parser("tiers", parents=[common, red], help="tier bandwidth vs the ceiling of its medium")
    c.add_argument(
        "--model", default="synthetic:small", help="synthetic:<name> or a checkpoint (layout only)"
    )
    c.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    c.add_argument("--dtype", default="auto", help="KV dtype: auto (bfloat16 on CUDA, float32 on CPU)")
    c.add_argument("--total", default="256MiB", help="KV bytes stored in each tier")
    c.add_argument("--batch-blocks", type=int, default=64, help="blocks per get / put call (a segment)")
    c.add_argument("--repeats", type=int, default=5)
    c.add_argument("--only", type=lambda v: v.split(","), default=["host", "disk", "redis"], help="tiers")
    c.add_argument("--disk-codec", help="default: the engine's (TierSettings.disk_codec)")
    c.add_argument("--redis-codec", help="default: the engine's (TierSettings.redis_codec)")
    m = sub.add_parser("memcached", parents=[common], help="the memcached tier vs plain pymemcache")
    m.add_argument("--total", default="128MiB", help="KV bytes per layout")
    m.add_argument("--batch-blocks", type=int, default=16, help="blocks per get / put call")
    m.add_argument("--repeats", type=int, default=5)
    m.add_argument("--item-size", default="1MiB", help="memcached -I of the server started here")
    m.add_argument("--memory-mb", type=int, default=2048, help="memcached -m of the server started here")
    m.add_argument("--memcached-url", help="use this memcached instead of starting one")
    h = sub.add_parser(
        "chat", parents=[common, red], help="multi-round chat: tiers vs pool only vs no caching"
    )
    h.add_argument("--model", default="synthetic:small")
    h.add_argument("--model-seed", type=int, default=0)
    h.add_argument("--device", default="auto")
    h.add_argument("--dtype", default="auto")
    h.add_argument("--conversations", type=int, default=16)
    h.add_argument("--turns", type=int, default=4)
    h.add_argument("--clients", type=int, default=4, help="closed-loop clients sending requests")
    h.add_argument("--system-tokens", type=int, default=256)
    h.add_argument("--user-words", type=int, default=12, help="words per user message")
    h.add_argument("--max-tokens", type=int, default=32, help="tokens generated per answer")
    h.add_argument("--pool-ratio", type=float, default=4.0, help="reusable blocks / device pool blocks")
    h.add_argument("--max-num-batched-tokens", type=int, default=None)
    h.add_argument("--redis", action="store_true", help="add a Redis tier (a redis-server of its own)")
    h.add_argument("--tiers", help="tiers of the tiers run (default: disk, plus redis with --redis)")
    h.add_argument("--rounds", type=int, default=3, help="runs of each configuration, the order rotating")
    h.add_argument("--set", action="append", metavar="NAME=VALUE", help="an engine setting of every run")
    h.add_argument(
        "--variant",
        action="append",
        metavar="LABEL:NAME=VALUE[,NAME=VALUE]",
        help="one more tiers run in every round, with these settings (A/B in the same rounds)",
    )
    h.add_argument("--skip-no-caching", action="store_true", help="leave out the no-caching run")
    q = sub.add_parser("policies", parents=[common], help="hit ratio of each eviction policy on a chat trace")
    q.add_argument("--requests", type=int, default=3000)
    q.add_argument("--apps", type=int, default=4, help="distinct system prompts")
    q.add_argument("--system-tokens", type=int, default=512)
    q.add_argument("--active", type=int, default=32, help="conversations active at a time")
    q.add_argument("--max-turns", type=int, default=10)
    q.add_argument("--scan-fraction", type=float, default=0.1, help="share of one-off long requests")
    q.add_argument("--scan-min", type=int, default=1024)
    q.add_argument("--scan-max", type=int, default=4096)
    q.add_argument("--in-flight", type=int, default=4, help="requests holding their blocks at once")
    q.add_argument(
        "--capacities",
        default="0.02,0.04,0.08",
        help="pool sizes: fractions of the working set (<= 1) or blocks",
    )
    k = sub.add_parser("codec", parents=[common], help="size, speed and error of every stored-object codec")
    k.add_argument("--layers", type=int, default=16)
    k.add_argument("--kv-heads", type=int, default=8)
    k.add_argument("--head-dim", type=int, default=64)
    k.add_argument("--dtype", default="bfloat16", choices=KV_DTYPES)
    k.add_argument("--data", default="normal", choices=("normal", "outlier"))
    k.add_argument("--budget", type=float, default=0.4, help="seconds spent timing each figure")
    k.add_argument("--stream-mib", type=int, default=256, help="size of the many-blocks (DRAM) test")
    g = sub.add_parser(
        "gpu-decode", help="GPU decode vs the copy ceiling, HF and the torch reference: parts of one run"
    )
    _output(g)
    gpu_decode_arguments(g)
    for name, summary, add in (
        (
            "persist",
            "what storing KV below the device costs a prefill, and the write lag",
            persist.add_arguments,
        ),
        (
            "startup",
            "seconds to import kvtier, to LLM ready, and of a short kvtier run",
            startup.add_arguments,
        ),
        (
            "embed",
            "a corpus embedded cold, then partly changed: vs sentence-transformers",
            embed.add_arguments,
        ),
        ("hf", "Hugging Face generate with and without KVTierStore on a shared prefix", hf.add_arguments),
    ):
        one = sub.add_parser(name, help=summary, description=summary)
        _output(one)
        one.add_argument("--seed", type=int, default=0, help="seed of the workload")
        one.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
        add(one)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "throughput":
        cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
        if args.num_requests is None:
            args.num_requests = 256 if cuda else 16
        if args.max_len is None:
            args.max_len = 1024 if cuda else 256
        if not 1 <= args.min_len <= args.max_len:
            parser.error("need 1 <= --min-len <= --max-len")
    if args.command == "gpu-decode":
        check_parts(args.parts.split(","), parser)
    if args.command == "chat":
        args.redis = args.redis or bool(args.redis_url)
        if args.rounds < 1:
            parser.error("--rounds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    with Report(args.command, args.out) as report:
        if report.json_path and not args.json:
            args.json = str(report.json_path)
        runner(args.command)(args)
