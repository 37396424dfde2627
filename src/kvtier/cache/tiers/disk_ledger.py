"""The bytes a disk tier's namespace folder holds, shared by every process that writes to it.

Each process used to bound only what it had indexed itself, so three processes on one folder with a
2 MiB capacity grew it to 4.6 MiB. The ledger is one 8-byte file in the namespace folder
(``.kvtier-usage``, little-endian total) that every writer updates under an exclusive ``flock``:
a write reserves its bytes (evicting first, if need be) before the file exists, an unlink gives them
back. Crash safety: a process killed between a reservation and its write leaves the total too high,
never too low, so the folder stays under its capacity; a start-up scan (and a rescan when a
process has nothing left to evict) sets the total to what the folder really holds.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
from collections.abc import Iterator

LEDGER_NAME = ".kvtier-usage"
_TOTAL = struct.Struct("<q")


class UsageLedger:
    """``with ledger.locked() as entry: entry.total += n`` (read on entry, written on exit).

    Callers serialise their own threads (``flock`` is per open file, shared by the threads of one
    process); every failure raises OSError, and the tier then falls back to its own index."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._pid = 0

    @contextlib.contextmanager
    def locked(self) -> Iterator[_Entry]:
        fd = self._open()
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            data = os.pread(fd, _TOTAL.size, 0)
            entry = _Entry(max(0, _TOTAL.unpack(data)[0]) if len(data) == _TOTAL.size else 0)
            yield entry
            os.pwrite(fd, _TOTAL.pack(max(0, entry.total)), 0)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def read(self) -> int:
        data = os.pread(self._open(), _TOTAL.size, 0)
        return max(0, _TOTAL.unpack(data)[0]) if len(data) == _TOTAL.size else 0

    def add(self, delta: int) -> None:
        with self.locked() as entry:
            entry.total += delta

    def set(self, total: int) -> None:
        with self.locked() as entry:
            entry.total = total

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def _open(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # a forked child opens its own (own flock)
            flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
            try:
                self._fd = os.open(self.path, flags, 0o644)
            except FileNotFoundError:  # the namespace folder is made by the first write
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
                self._fd = os.open(self.path, flags, 0o644)
            self._pid = os.getpid()
        return self._fd


class _Entry:
    __slots__ = ("total",)

    def __init__(self, total: int) -> None:
        self.total = total
