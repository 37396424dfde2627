"""A process that encodes staged blocks and writes them as the disk tier's temp files.

Why a process: the disk's write-through is most of the tiers' write work (on the H200's chat run,
2.4 s of writer CPU for 1,857 blocks, most of it the disk's; 17.8 s for 14,230 blocks on the longer
chat), and on writer threads every step of it (the codec's checksum, ``open``, ``writev``,
``close``, the rename) gives up and retakes the interpreter lock that the engine thread needs to
launch the step: ~25 handoffs a block, and the engine's launches took 10.5 s instead of 5.4-6.3.
Here the engine process keeps the staging and the disk tier's index, ledger and eviction policy;
the child only reads a block from the shared staging slot, encodes it and writes its temp file.
The child renames the file into place under the folder's ledger lock and adds its bytes to the
ledger, as ``DiskTier._commit`` does; the engine's side costs one message a block out, one a batch
back, and indexing the batch in memory (``DiskTier.commit_written``, which also evicts what the
folder's capacity no longer holds, one ledger lock a batch).

Shared staging: the write queue's slots live in one memory file (``memfd_create``) that both
processes map; on CUDA the engine page-locks its mapping (``cudaHostRegister``), so the copy out of
the pool is still one DMA a run of slots. A slot stays reserved until the child's answer for it
arrives.

Failure: a child that dies (or cannot start) ends its jobs as dropped writes, and the queue writes
the disk tier on its own threads again, as without the process. The child exits when the engine
closes the channel, or when the engine process goes away (the channel's end of file).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from kvtier.cache.codec import CodecConfig, encode_parts
from kvtier.cache.keys import BlockKey, KVLayout
from kvtier.cache.tiers import disk_files as files
from kvtier.cache.tiers.disk_ledger import UsageLedger

log = logging.getLogger(__name__)

# (slot, key, tokens): one staged block for the child
FileJob = tuple[int, BlockKey, tuple[int, ...]]
# (slot, key, object size or 0 when its write failed, seconds): the child's answer for one job; the
# object is in place under its final name (renamed under the folder's ledger lock, total updated)
FileResult = tuple[int, BlockKey, int, float]

# (not ``-m``: the package imports this module before runpy would run it as __main__)
_CHILD = "import sys; from kvtier.cache.file_writer import main; main(sys.argv[1:])"
MAX_RESULTS = 64  # jobs answered together at most: their slots wait for the answer


@dataclass(frozen=True)
class WriterSetup:
    """What the child needs: how to encode (the disk tier's codec) and where to write."""

    layout: KVLayout
    fingerprint: str
    codec: CodecConfig
    secret: bytes | None
    folder: str  # the disk tier's namespace folder
    ledger: str  # its usage ledger (disk_ledger.py)
    fsync: bool
    slots: int  # the shared staging memory holds this many blocks, back to back


class SharedSlots:
    """``slots`` block-sized slots in one memory file, mapped here and by the child."""

    def __init__(self, layout: KVLayout, slots: int) -> None:
        self.nbytes = slots * layout.bytes_per_block
        self.fd = os.memfd_create("kvtier-staging", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.nbytes)  # sparse: pages cost nothing until first written
        self.mapping = mmap.mmap(self.fd, self.nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.registered = 0  # the address page-locked with cudaHostRegister (the engine's side), if any

    def pin(self) -> bool:
        """Page-lock this process's mapping in place (``cudaHostRegister``), so a copy into it from
        the GPU is one DMA; False (logged) if it cannot be."""
        ptr = torch.frombuffer(self.mapping, dtype=torch.uint8).data_ptr()
        err = torch.cuda.cudart().cudaHostRegister(ptr, self.nbytes, 0)
        if int(err) != 0:
            log.warning("could not page-lock the shared staging memory (%s): staging in-process", err)
            consume_cuda_error()
            return False
        self.registered = ptr
        return True

    def close(self) -> None:
        """Unregister the page-locked mapping (the caller has waited for every copy into it) and
        close the file. Why unregister: the mapping goes when its last view does, and a later
        mapping at the same address (the next engine's) failed to register ("resource already
        mapped"), an error that the next kernel launch then raised."""
        if self.registered:
            err = torch.cuda.cudart().cudaHostUnregister(self.registered)
            self.registered = 0
            if int(err) != 0:
                log.warning("could not unregister the shared staging memory (%s)", err)
                consume_cuda_error()
        os.close(self.fd)


def consume_cuda_error() -> None:
    """A failed runtime call leaves its error as the thread's last one, which the next kernel
    launch's check raises as if the kernel had failed; one launch here takes it (torch binds no
    ``cudaGetLastError``)."""
    with contextlib.suppress(RuntimeError):
        torch.zeros(1, device="cuda").add_(1)


class FileWriterProcess:
    """The engine's end: ``submit`` jobs, get ``on_done(results)`` on a thread of its own, and
    ``on_exit()`` once if the child goes away before ``close``."""

    def __init__(
        self,
        setup: WriterSetup,
        slots: SharedSlots,
        on_done: Callable[[list[FileResult]], None],
        on_exit: Callable[[], None],
    ) -> None:
        self._on_done, self._on_exit = on_done, on_exit
        ours, theirs = socket.socketpair()
        package_root = str(Path(__file__).resolve().parents[2])  # the folder that holds kvtier/
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [env.get("PYTHONPATH")])])
        # One thread of torch's: the child's work is checksums and system calls on 16 cores at most.
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(theirs.fileno()), str(slots.fd)],
            pass_fds=(theirs.fileno(), slots.fd),
            env=env,
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        self._conn = Connection(ours.detach())
        self._send_lock = threading.Lock()
        self._closing = False
        self._ready = threading.Event()
        self._conn.send(setup)
        self._thread = threading.Thread(target=self._receive, name="kvtier-file-acks", daemon=True)
        self._thread.start()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def submit(self, jobs: list[FileJob]) -> bool:
        """Send jobs to the child; False if it is gone (the caller writes them itself)."""
        try:
            with self._send_lock:
                self._conn.send(jobs)
            return True
        except (OSError, ValueError):  # ValueError: the channel is closed
            return False

    @property
    def ready(self) -> bool:
        """Whether the child has started (imported what it needs: ~3 s on a 2-core machine). Until
        then the queue writes the files itself, so that a block is on disk a moment after it
        was staged, as without the process."""
        return self._ready.is_set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait (at most ``timeout`` seconds) until the child has started; False if it has not."""
        return self._ready.wait(timeout)

    def _receive(self) -> None:
        try:
            self._conn.recv()  # the child's "ready"
            self._ready.set()
        except (EOFError, OSError):
            pass
        while self._ready.is_set():
            try:
                results = self._conn.recv()
            except (EOFError, OSError):
                break
            try:
                self._on_done(results)
            except Exception:  # the queue's bookkeeping must go on whatever a tier raised
                log.exception("committing the file writer's results failed")
        if not self._closing:
            log.error("the disk's file writer (pid %d) exited; writing on threads again", self._proc.pid)
        self._on_exit()

    def close(self, timeout: float = 10.0) -> None:
        """Ask the child to finish its queued jobs and exit; kill it after ``timeout``."""
        self._closing = True
        try:
            with self._send_lock:
                self._conn.send(None)
        except (OSError, ValueError):
            pass
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._thread.join(timeout)
        self._conn.close()


# -- the child ----------------------------------------------------------------------------------


def _write_job(setup: WriterSetup, slab: memoryview, ledger: UsageLedger, job: FileJob) -> FileResult:
    slot, key, tokens = job
    t0 = time.perf_counter()
    nbytes = setup.layout.bytes_per_block
    raw = torch.frombuffer(slab, dtype=torch.uint8, count=nbytes, offset=slot * nbytes)
    kv = raw.view(getattr(torch, setup.layout.dtype)).view(setup.layout.block_shape)
    parts = encode_parts(key, setup.fingerprint, setup.layout, tokens, kv, setup.codec, setup.secret)
    size = len(parts[0]) + parts[1].nbytes
    path = files.object_path(setup.folder, key)
    try:
        tmp = files.write_temp(path, parts, size, setup.fsync)
    except OSError as e:
        log.warning("file writer: %s: %s", key.hex()[:16], e)
        return slot, key, 0, time.perf_counter() - t0
    try:
        with ledger.locked() as entry:  # as DiskTier._commit: every rename under the folder's lock
            old = files.size_or_zero(path)
            os.replace(tmp, path)
            entry.total += size - old
    except OSError as e:
        log.warning("file writer: %s: %s", key.hex()[:16], e)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return slot, key, 0, time.perf_counter() - t0
    return slot, key, size, time.perf_counter() - t0


def _serve(conn: Connection, memfd: int) -> None:
    setup: WriterSetup = conn.recv()
    mapping = mmap.mmap(memfd, setup.slots * setup.layout.bytes_per_block, mmap.MAP_SHARED)
    slab = memoryview(mapping)
    ledger = UsageLedger(setup.ledger)
    conn.send("ready")
    while True:
        jobs: list[FileJob] | None = conn.recv()
        if jobs is None:
            return
        results = [_write_job(setup, slab, ledger, job) for job in jobs]
        # What else has arrived meanwhile goes into the same answer: fewer wake-ups of the engine.
        while conn.poll(0) and len(results) < MAX_RESULTS:
            more = conn.recv()
            if more is None:
                conn.send(results)
                return
            results += [_write_job(setup, slab, ledger, job) for job in more]
        conn.send(results)


def main(argv: Sequence[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    # A Ctrl-C or a SIGTERM to the process group is the engine's to handle: it flushes, then closes
    # the channel, and the end of file ends this process (also when the engine was killed).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    conn = Connection(int(args[0]))
    try:
        _serve(conn, int(args[1]))
    except (EOFError, OSError):  # the engine went away: nothing to answer to
        pass
    finally:
        conn.close()
