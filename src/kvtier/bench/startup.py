"""`kvtier bench startup`: how long a fresh process takes to be ready, and to answer a short
`kvtier run` (was bench/bench_startup.py, which now calls this).

For each source tree (``--src``, default the one this kvtier was imported from; give an older
checkout's too to compare, e.g. a ``git worktree`` of an earlier commit), in fresh interpreters: the
seconds to ``import kvtier``, to ``LLM(model)`` ready (import included), and the wall time of
``kvtier run --prompt ... --max-tokens 8`` (a fresh disk cache folder each run, so every run is
cold) with its CPU time (user + system, all threads: it moves less than wall time when the machine
is shared). Medians of ``--runs`` runs, and the machine's load average, since on a shared 2-core
machine it moves every wall figure. Never asserts on time.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import kvtier
from kvtier.bench.report import finish, machine_info, print_machine, print_table

SRC = Path(kvtier.__file__).resolve().parents[1]
READY = """
import time
t0 = time.perf_counter()
import kvtier
t1 = time.perf_counter()
llm = kvtier.LLM({model!r})
t2 = time.perf_counter()
print(t1 - t0, t2 - t0)
"""
PROMPT = ["--prompt", "The quick brown fox jumps over the lazy dog."]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="synthetic:small")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--src", type=Path, action="append", help="a source tree (default: this kvtier's)")


def _env(src: Path, cache: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(src), "KVTIER_DISK_PATH": cache}


def _ready(src: Path, model: str) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as cache:
        out = subprocess.run(
            [sys.executable, "-c", READY.format(model=model)],
            env=_env(src, cache),
            capture_output=True,
            text=True,
            check=True,
        )
    imp, ready = (float(x) for x in out.stdout.split())
    return imp, ready


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(src: Path, model: str) -> tuple[float, float]:
    """(wall, CPU seconds) of one ``kvtier run``: on a shared machine the CPU time moves less."""
    with tempfile.TemporaryDirectory() as cache:
        cpu = _children_cpu()
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "kvtier.cli", "run", "--model", model, "--max-tokens", "8", *PROMPT],
            env=_env(src, cache),
            capture_output=True,
            check=True,
        )
        return time.perf_counter() - start, _children_cpu() - cpu


def bench_startup(args: argparse.Namespace) -> None:
    title = f"startup: {args.model}, median of {args.runs} fresh processes"
    machine = machine_info(torch.device("cpu"))
    print_machine(title, machine)
    rows, results = [], {}
    for src in args.src or [SRC]:
        ready = [_ready(src, args.model) for _ in range(args.runs)]
        runs = [_run(src, args.model) for _ in range(args.runs)]
        figures = {
            "import_s": statistics.median(r[0] for r in ready),
            "ready_s": statistics.median(r[1] for r in ready),
            "run_s": statistics.median(r[0] for r in runs),
            "run_cpu_s": statistics.median(r[1] for r in runs),
        }
        results[str(src)] = figures
        rows.append([str(src), *(f"{v:.2f}" for v in figures.values())])
    print_table(["source", "import s", "LLM ready s", "kvtier run s", "run CPU s"], rows)
    finish(args, title, machine, results)
