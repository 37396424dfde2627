"""How much the write queue's writer threads slow the engine thread, on the CPU (no GPU needed).

    PYTHONPATH=src python3 bench/writes_gil.py [--blocks 128] [--threads 2] [--repeats 5]

A stand-in for the engine thread runs "steps" (64 tiny torch ops, each of which releases the
interpreter lock as every torch call and kernel launch does, between a little Python) in a loop.
Each repeat times it twice: idle, then while the write queue's threads drain a backlog of
``--blocks`` staged blocks of the 8B layout (2 MiB, bfloat16) into a DiskTier (write-through, the
default codec) and, for ``--host-fraction`` of them, a HostTier (write-back). Printed per repeat
and as medians:

- ``lost``: the stand-in's time lost while the writers ran, per block written: the busy window
  minus its steps at the idle step time;
- split by ``/proc/thread-self/schedstat`` into waiting for a core (run queue: the box's CPU
  contention, which a 16-core GPU host does not have) and the rest, which is waiting for the
  interpreter lock (the writers' Python and the copies they make under it), plus extra CPU;
- the writers' CPU per block and their throughput.

Kept as a script: it times private parts (the queue, the tiers) the way profile_chat.py does, a
developer's tool for issue 12, not a product benchmark. Run it against two source trees (e.g.
``PYTHONPATH=/work/main/src`` and this checkout's) alternately to compare before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

import kvtier
from kvtier.cache.codec import CodecConfig
from kvtier.cache.hierarchy import KVHierarchy
from kvtier.cache.keys import KVLayout
from kvtier.cache.tiers.disk import DiskTier
from kvtier.cache.tiers.host import HostTier

LAYOUT_8B = KVLayout(32, 8, 128, 16, "bfloat16")  # synthetic:llama-3.1-8b: 2 MiB a block


def schedstat() -> tuple[float, float]:
    """(seconds on a CPU, seconds waiting on a run queue) of the calling thread."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            on_cpu, waiting, _ = f.read().split()
        return int(on_cpu) / 1e9, int(waiting) / 1e9
    except OSError:
        return time.thread_time(), 0.0


def voluntary_switches() -> int:
    """Times the calling thread blocked (here: waiting for the interpreter lock, the one thing the
    stand-in waits on), independent of how busy the cores are."""
    try:
        with open("/proc/thread-self/status") as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def step(scratch: torch.Tensor, items: list[int]) -> int:
    """One engine-like step: tiny torch calls (each releases the lock) between a little Python."""
    total = 0
    for i in range(64):
        scratch.add_(1.0)
        total += sum(x for x in items[i : i + 8])
    return total


def run_steps(until: threading.Event | None, seconds: float) -> tuple[int, float, float, float, int]:
    """Steps until ``until`` is set (or ``seconds`` pass): (steps, wall, cpu, run-queue wait,
    lock waits)."""
    scratch, items = torch.zeros(64), list(range(128))
    n = 0
    sw0 = voluntary_switches()
    cpu0, rq0 = schedstat()
    t0 = time.perf_counter()
    while True:
        step(scratch, items)
        n += 1
        if until is not None and until.is_set():
            break
        if time.perf_counter() - t0 > seconds:
            break
    wall = time.perf_counter() - t0
    cpu1, rq1 = schedstat()
    return n, wall, cpu1 - cpu0, rq1 - rq0, voluntary_switches() - sw0


def make_hierarchy(args: argparse.Namespace, folder: str) -> KVHierarchy:
    """Host + disk tiers as the chat bench runs them; the disk holds 2 repeats (then evicts)."""
    bpb, n = LAYOUT_8B.bytes_per_block, args.blocks
    disk = DiskTier(folder, "bench", capacity_bytes=2 * n * bpb, read_threads=0)
    host = HostTier(LAYOUT_8B, "bench", capacity_bytes=(n + 8) * bpb)
    return KVHierarchy(
        [host, disk],
        [None, CodecConfig()],
        LAYOUT_8B,
        "bench-fingerprint",
        io_threads=args.threads,
        write_queue_bytes=(n + 1) * bpb,
    )


def one_repeat(args: argparse.Namespace, hierarchy: KVHierarchy, pool: torch.Tensor) -> dict[str, float]:
    layout, n = LAYOUT_8B, args.blocks
    host_every = round(1 / args.host_fraction) if args.host_fraction > 0 else 0
    ids = list(range(n))
    entries = [
        (
            os.urandom(32),
            tuple(range(b, b + layout.block_size)),
            (0, 1) if host_every and b % host_every == 0 else (1,),
        )
        for b in ids
    ]
    idle = run_steps(None, args.idle_seconds)
    done = threading.Event()
    proc0, cpu_eng0 = time.process_time(), time.thread_time()
    hierarchy.stage_writes(pool, ids, entries)  # the CPU copies into the slots: not timed below

    def waiter() -> None:
        hierarchy.flush(600)
        done.set()

    t0 = time.perf_counter()
    threading.Thread(target=waiter, daemon=True).start()
    busy = run_steps(done, 600)
    window = time.perf_counter() - t0
    writers_cpu = time.process_time() - proc0 - (time.thread_time() - cpu_eng0)

    idle_step = idle[1] / idle[0]
    lost = busy[1] - busy[0] * idle_step
    lost_cpu = busy[2] - busy[0] * (idle[2] / idle[0])  # extra CPU the stand-in burned
    runq = busy[3] - busy[0] * (idle[3] / idle[0])
    return {
        "idle_step_us": idle_step * 1e6,
        "busy_step_us": busy[1] / busy[0] * 1e6,
        "lost_us_per_block": lost / n * 1e6,
        "runq_us_per_block": runq / n * 1e6,
        "lock_us_per_block": (lost - runq - lost_cpu) / n * 1e6,
        "lock_waits_per_block": (busy[4] - busy[0] * (idle[4] / idle[0])) / n,
        "writer_cpu_us_per_block": writers_cpu / n * 1e6,
        "blocks_per_s": n / window,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=128, help="blocks written per repeat (2 MiB each)")
    p.add_argument("--threads", type=int, default=2, help="writer threads (io_threads; the engine's 2)")
    p.add_argument("--host-fraction", type=float, default=0.5, help="share of blocks also to the host tier")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--idle-seconds", type=float, default=0.3)
    p.add_argument("--disk-path", default=None, help="folder for the disk tier (default: temp)")
    args = p.parse_args()
    torch.set_num_threads(1)
    src = Path(kvtier.__file__).resolve().parents[1]
    load = os.getloadavg()
    print(
        f"writes_gil: kvtier from {src}; {os.cpu_count()} CPUs, load {load[0]:.2f}; torch "
        f"{torch.__version__}; {args.blocks} blocks of {LAYOUT_8B.bytes_per_block >> 20} MiB, "
        f"{args.threads} writer threads, host fraction {args.host_fraction}"
    )
    rows = []
    with tempfile.TemporaryDirectory(dir=args.disk_path, prefix="kvtier-writes-gil-") as folder:
        hierarchy = make_hierarchy(args, folder)
        shape = (LAYOUT_8B.num_layers, 2, args.blocks, *LAYOUT_8B.block_shape[2:])
        pool = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
        for r in range(args.repeats + 2):  # two warm the slots, the slab and the page cache: not kept
            row = one_repeat(args, hierarchy, pool)
            if r >= 2:
                rows.append(row)
                print("  " + "  ".join(f"{k} {v:.1f}" for k, v in row.items()), flush=True)
        hierarchy.close(60)
    med = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
    print(
        f"median: engine stand-in lost {med['lost_us_per_block']:.0f} us per block written "
        f"(run queue {med['runq_us_per_block']:.0f}, interpreter lock {med['lock_us_per_block']:.0f} in "
        f"{med['lock_waits_per_block']:.1f} waits); "
        f"step {med['idle_step_us']:.0f} us idle -> {med['busy_step_us']:.0f} us busy; "
        f"writers {med['writer_cpu_us_per_block']:.0f} us CPU per block, {med['blocks_per_s']:.0f} blocks/s; "
        f"load {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
