"""Where the chat workload's time goes, per configuration: model steps, the hierarchy's work on the
engine thread (write-back copies, load installs, planning) and on the I/O threads (CPU seconds).

    python3 bench/profile_chat.py [--switch-interval S] chat [kvtier bench chat arguments]

Runs the chat workload of `kvtier bench chat` (its three configurations) with timers around the
engine's steps, model launches and read-backs, write-back copies, load installs and planning, and CPU-time
counters on the I/O
threads' writes and loads; prints one PROFILE line per engine (the probe and warm-ups included).

Kept as a script, not a `kvtier bench` command: it wraps private methods of the engine,
runner and hierarchy at run time, a developer's tool rather than a product benchmark.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import pstats
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from kvtier.bench.cli import main as bench_main
from kvtier.cache import hierarchy as hmod
from kvtier.engine import engine as emod
from kvtier.engine import kv_transfer as kmod
from kvtier.engine import runner as rmod

ACC: dict[str, float] = collections.defaultdict(float)
LOCK = threading.Lock()
SYNCS: collections.Counter[str] = collections.Counter()


def timed(cls: Any, name: str, label: str, cpu: bool = False) -> None:
    original: Callable[..., Any] = getattr(cls, name)

    def wrapper(*a: Any, **k: Any) -> Any:
        t, c = time.perf_counter(), time.thread_time()
        try:
            return original(*a, **k)
        finally:
            with LOCK:
                ACC[label + " wall"] += time.perf_counter() - t
                ACC[label + " n"] += 1
                if cpu:
                    ACC[label + " cpu"] += time.thread_time() - c

    static = isinstance(cls.__dict__.get(name), staticmethod)
    setattr(cls, name, staticmethod(wrapper) if static else wrapper)


started: dict[str, float] = {}  # the current engine's start: wall and process CPU seconds


def log_triton_compiles(since: dict[str, float]) -> None:
    """Print every Triton kernel variant compiled (or loaded from the disk cache) while an engine
    runs: a compile inside a timed run is a cost that a warmed-up server would not pay."""
    from triton.runtime import jit

    original = jit.JITFunction._do_compile

    def wrapper(self: Any, key: Any, signature: Any, device: Any, constexprs: Any, *a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        try:
            return original(self, key, signature, device, constexprs, *a, **k)
        finally:
            at = t - since.get("wall", t)
            took = time.perf_counter() - t
            print(
                f"COMPILE {self.__name__} at +{at:.2f}s took {took:.3f}s: {constexprs} key {str(key)[:400]}"
            )

    jit.JITFunction._do_compile = wrapper  # type: ignore[method-assign]


def print_step_kinds(trace: list[tuple[int, int, float, float, float, float]]) -> None:
    """Per kind of step (decode-only: as many tokens as rows; with prefill: more), the device's busy
    time, its idle time before the step (the host was late), and the host's launch and wait times:
    whether a configuration is bound by the device or by the engine thread, and in which steps."""
    kinds: dict[str, list[tuple[int, int, float, float, float, float]]] = {"decode": [], "prefill": []}
    for row in trace:
        kinds["decode" if row[1] == row[0] else "prefill"].append(row)
    for kind, rows in kinds.items():
        if rows:
            launch, wait, busy, idle = (sum(r[i] for r in rows) for i in (2, 3, 4, 5))
            print(
                f"  STEPS {kind}: n={len(rows)} device busy {busy:.3f}s idle before {idle:.3f}s "
                f"launch {launch:.3f}s wait {wait:.3f}s; per step busy {busy / len(rows) * 1e3:.2f} ms "
                f"launch {launch / len(rows) * 1e3:.2f} ms"
            )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--switch-interval", type=float, default=None, help="sys.setswitchinterval, seconds")
    p.add_argument("--cprofile", type=int, default=0, help="print the engine thread's N costliest functions")
    p.add_argument("--sync-debug", action="store_true", help="count CUDA host syncs per call site")
    p.add_argument("--log-compiles", action="store_true", help="print each Triton compile in a run")
    args, rest = p.parse_known_args()
    if args.log_compiles:
        log_triton_compiles(started)
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    timed(rmod.ModelRunner, "launch", "launch")
    timed(rmod.ModelRunner, "collect", "collect")
    timed(emod.Engine, "step", "step", cpu=True)
    timed(kmod.KVTransfer, "flush", "flush_writes")
    timed(kmod.KVTransfer, "install_loads", "install")
    timed(hmod.KVHierarchy, "plan", "plan")
    timed(hmod.KVHierarchy, "_write", "io write", cpu=True)
    timed(hmod.KVHierarchy, "_load", "io load", cpu=True)
    timed(hmod.KVHierarchy, "load_on_device", "queue device load")
    init, close = emod.Engine.__init__, emod.Engine.close

    def traced_init(self: emod.Engine, *a: Any, **k: Any) -> None:
        init(self, *a, **k)
        self.stats.step_trace = []
        ACC.clear()
        if args.cprofile:
            profiler.disable()  # an engine that was never closed (the workload's probe)
            profiler.clear()
            profiler.enable()
        started.update(wall=time.perf_counter(), cpu=time.process_time())

    def traced_close(self: emod.Engine) -> None:
        wall, cpu = time.perf_counter() - started["wall"], time.process_time() - started["cpu"]
        label = f"tiers={self.config.tiers.tiers} caching={self.config.pool.enable_prefix_caching}"
        runner = self.runner
        replays = " ".join(
            f"{name} graph replays {g.replays}"
            for name, g in (("extend", runner.extend_graphs), ("mixed", runner.mixed_graphs))
            if g is not None
        )
        print(
            f"PROFILE {label}: wall {wall:.2f}s process cpu {cpu:.2f}s {replays} "
            + " ".join(f"{k}={v:.3f}" for k, v in sorted(ACC.items())),
            flush=True,
        )
        print_step_kinds(self.stats.step_trace or [])
        if args.sync_debug:
            for where, n in SYNCS.most_common(12):
                print(f"  sync x{n}: {where}")
            SYNCS.clear()
        if args.cprofile:
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(args.cprofile)
            profiler.clear()
        close(self)

    profiler = cProfile.Profile()
    if args.sync_debug:
        import traceback
        import warnings

        import torch

        torch.cuda.set_sync_debug_mode("warn")

        def count(message: Any, *rest: Any, **k: Any) -> None:
            frames = [f for f in traceback.extract_stack()[:-1] if "kvtier" in f.filename]
            SYNCS[" < ".join(f"{f.name}:{f.lineno}" for f in reversed(frames[-3:]))] += 1

        warnings.showwarning = count
        warnings.simplefilter("always")
    emod.Engine.__init__ = traced_init  # type: ignore[method-assign]
    emod.Engine.close = traced_close  # type: ignore[method-assign]
    bench_main(rest)


if __name__ == "__main__":
    main()
