"""Disk capacity holds for the folder, not per process: three writers on one folder stay under it.

Before the shared ledger each process bounded only what it had indexed, and three processes with a
2 MiB capacity grew their folder to 4.6 MiB. Here three processes write 3x the capacity into one
namespace folder while the parent measures the folder's real size many times.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing as mp
import time
from pathlib import Path

from kvtier.cache.tiers.disk import DiskTier
from kvtier.cache.tiers.disk_ledger import LEDGER_NAME, UsageLedger

CAPACITY = 2 << 20
OBJECT = 4096
PER_PROCESS = CAPACITY // OBJECT + 200  # each alone more than fills the folder


def _key(proc: int, i: int) -> bytes:
    return hashlib.blake2b(f"{proc}/{i}".encode(), digest_size=32).digest()


def _writer(root: str, proc: int, start: mp.synchronize.Event) -> None:
    tier = DiskTier(root, "shared", CAPACITY)
    start.wait(30)
    for i in range(PER_PROCESS):
        tier.put([(_key(proc, i), bytes([proc]) * OBJECT)])
        if i % 50 == 0:  # reads too: adopt what the others wrote, as engines do
            tier.lookup([_key((proc + 1) % 3, i)])
    tier.close()


def _folder_bytes(folder: Path) -> int:
    total = 0
    for path in folder.glob("*/*.kvt"):
        with contextlib.suppress(FileNotFoundError):  # evicted between the listing and the stat
            total += path.stat().st_size
    return total


def test_three_processes_on_one_folder_stay_under_its_capacity(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), p, start)) for p in range(3)]
    for p in procs:
        p.start()
    start.set()
    peak = samples = 0
    deadline = time.monotonic() + 240
    ledger = UsageLedger(str(tmp_path / "shared" / LEDGER_NAME))
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        # Under the ledger's lock no object is renamed into place or removed: a true snapshot (a
        # listing without it counts files evicted and written while it runs).
        with ledger.locked():
            peak = max(peak, _folder_bytes(tmp_path / "shared"))
        samples += 1
        time.sleep(0.01)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    final = _folder_bytes(tmp_path / "shared")
    assert samples > 10
    assert peak <= CAPACITY and final <= CAPACITY, (peak, final)
    assert final >= CAPACITY - 3 * OBJECT  # and the folder is used, not emptied
    # the ledger agrees with the folder (no crash: no over-count either)
    assert ledger.read() == final
    kinds = {p.read_bytes()[0] for p in (tmp_path / "shared").glob("*/*.kvt")}
    assert kinds <= {0, 1, 2}


def test_a_restart_sets_the_ledger_to_what_the_folder_holds(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, "ns", CAPACITY)
    tier.put([(_key(0, i), b"x" * OBJECT) for i in range(10)])
    UsageLedger(str(tmp_path / "ns" / LEDGER_NAME)).set(CAPACITY * 5)  # drift (say a crashed writer)
    again = DiskTier(tmp_path, "ns", CAPACITY)
    assert UsageLedger(str(tmp_path / "ns" / LEDGER_NAME)).read() == 10 * OBJECT
    assert again.lookup([_key(0, i) for i in range(10)]) == 10  # nothing was evicted for it
