"""DiskTier: encoded KV blocks as files in a local folder, shared safely between processes.

Kept in one file (over 450 lines) because crash safety, the in-memory index and the read path are
one set of invariants under one lock: every method below leans on the same rules, stated here.
What holds no state (object names, whole-file reads, sizes, folders) is in disk_files.py.

Layout: ``root/<namespace>/<first 2 hex chars of the key>/<key hex>.kvt``, one file per object.
The namespace is the model fingerprint, so objects of different models never mix; ``kvtier cache
gc`` calls ``drop_namespaces`` to reclaim the space of old models.

Crash safety. ``put`` writes a temp file in the object's own folder
(``.<key hex>.<pid>.<random>.tmp``) and renames it onto the final name with ``os.replace``,
which is atomic on POSIX: every reader - this process, another engine on the same folder, or a
restart after a crash - sees the old object, the new one, or none, never a mix. Temp files left by a
crash are never served; start-up removes those older than ``temp_max_age_s`` (younger ones may belong
to a process that is writing right now).

``fsync``: with the default ``False`` an object is whole-or-absent across any *process* crash (the
page cache outlives the process) but not across a power loss or kernel crash, after which a final
name may hold an empty or partial file; the codec's checksum then turns it into a counted miss that
the hierarchy deletes. ``True`` fsyncs each file before the rename, extending whole-or-absent to
power loss at the cost of one device flush per object (about a millisecond on a local NVMe drive,
far more on network disks). For a cache whose contents can always be recomputed, ``False`` is the
right default.

Several processes. Each process keeps its own in-memory index (key -> size, in policy order),
rebuilt at start-up by one ``os.scandir`` pass (policy order = file modification time, oldest first).
The files are the truth and the index a hint: a ``get`` whose file another process evicted is a miss
and drops the key from the index; ``lookup`` and ``get`` of a key that is not indexed check the
file, and adopt it when another process wrote it. Capacity holds for the folder, across processes
(``disk_ledger.py``); evictions unlink files.

Index memory. The index holds at most ``max_entries`` objects (about ``ENTRY_BYTES`` of memory each),
as nginx's ``keys_zone`` bounds its cache's keys: a new entry beyond it (a write, an adopted object,
a start-up scan of a fuller folder) evicts the policy's victim, file included, exactly as capacity
does. Without the bound, capacity alone bounded it, and a codec that makes small objects (or a
folder of tiny ones) could make the index cost more memory than the KV it describes. The default is
``capacity // 4096`` (a file smaller than a 4 KiB filesystem block still uses one), at least 1,024;
the engine passes ``capacity // its smallest object`` (``engine/tiers.py``).

Reads. Each object is one ``open``, ``fstat``, one ``read`` straight into a new ``bytes`` of the
file's size, ``close``. ``get`` opens a batch's files in order on the calling thread and asks the
kernel, with a one-byte ``preadv2(RWF_NOWAIT)``, whether each is in the page cache. It reads the
cached ones itself, at once; the others go to a thread pool the tier owns (``read_threads``, default
8; at most 4 files open per thread), so that their requests overlap at the device. Measured on a
2-CPU VM (128 MiB of 384 KiB objects): cold reads went from 0.6-0.9 GB/s on one thread to 1.5-1.7
with 4 threads and 1.8-2.0 with 8 (the threads wait on the device, not on a CPU, hence a fixed
default); warm reads lost up to half their speed when spread over threads (GIL and cache hand-offs
for a plain copy), so the calling thread keeps them. ``posix_fadvise(WILLNEED)`` on the batch first
was tried and dropped: 6-12 us per object with a warm page cache (a third of a warm read), no cold
gain above noise.

Errors. Disk full, permissions, a missing or non-directory root: ``get``/``put``/``lookup``/
``delete`` never raise on them; they count ``stats.errors`` and miss or drop the write. A tier whose
root cannot be created at start-up is still usable, it just misses.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from operator import itemgetter
from typing import cast

import torch

from kvtier.cache.keys import DIGEST_SIZE, BlockKey, check_key, check_namespace, valid_namespace
from kvtier.cache.tiers import disk_files as files
from kvtier.cache.tiers.base import LiveStats, StoredObject, Tier, TierError, TierStats
from kvtier.cache.tiers.disk_ledger import LEDGER_NAME, UsageLedger
from kvtier.cache.tiers.loading import BlockIO, EncodedBlock, load_in_place, load_objects
from kvtier.cache.tiers.sized_index import SizedIndex

_SCAN_THREADS = 8
_RESYNC_MIN_S = 1.0  # a full rescan at most this often, when the folder is full of others' objects
_READ_THREADS = 8
# Memory per index entry, measured on CPython 3.11 with LRU (key bytes, dict slots, size int, the
# policy's ordered-dict node), about 290 B: tests/test_disk_index_bound.py measures it.
ENTRY_BYTES = 300
MIN_MAX_ENTRIES = 1024
_DEFAULT_OBJECT_BYTES = 4096  # without a hint: one filesystem block per object
_OPEN_PER_THREAD = 4  # files a get holds open (queued or being read) per read thread, at most
_RWF_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)  # Linux >= 4.14; 0: not available


class DiskTier(LiveStats, Tier):
    """Tier in a local folder; see the module docstring for layout, crash safety and sharing."""

    name = "disk"

    def __init__(
        self,
        root: str | os.PathLike[str],
        namespace: str,
        capacity_bytes: int,
        policy: str = "lru",
        *,
        fsync: bool = False,
        expected_entries: int | None = None,
        seed: int = 0,
        temp_max_age_s: float = 60.0,
        read_threads: int | None = None,
        create: bool = True,
        max_entries: int | None = None,
    ) -> None:
        """``expected_entries`` sizes the ghost lists / queues of adaptive policies (s3fifo, arc);
        None lets the policy choose. ``temp_max_age_s``: temp files older than this are debris of a
        crash and removed at start-up. ``read_threads``: the threads that read objects not in the
        page cache (None: 8); 0 reads everything on the calling thread. ``create``: make the namespace
        folder now (False: only when the first object is written, so that a tier opened to look at
        a cache, as ``kvtier cache`` does, leaves no trace). ``max_entries``: the most objects the
        in-memory index holds (None: ``capacity // 4096``, at least 1,024; see the module docstring)."""
        check_namespace(namespace)  # one safe folder name: no separators, no leading dot
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        if read_threads is None:
            read_threads = _READ_THREADS
        if read_threads < 0:
            raise ValueError(f"read_threads must be >= 0, got {read_threads}")
        if max_entries is None:
            max_entries = max(MIN_MAX_ENTRIES, capacity_bytes // _DEFAULT_OBJECT_BYTES)
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries must be an int >= 1, got {max_entries!r}")
        self._max_entries = max_entries  # (a policy's history sized by its peak stays under it too)
        self._root = os.fspath(root)
        self._namespace = namespace
        self._dir = os.path.join(self._root, namespace)
        self._capacity = int(capacity_bytes)
        self._fsync = fsync
        self._temp_max_age_s = temp_max_age_s
        self._read_threads = read_threads
        self._pool: ThreadPoolExecutor | None = None  # made by the first get that needs it
        self._pool_pid = 0  # the process that made it: a forked child makes its own
        self._probe_cache = _RWF_NOWAIT != 0
        self._probe_buf = bytearray(1)  # only ever written by the probe; its content is never read
        self._index = SizedIndex(policy, expected_entries, seed)
        self._ledger = UsageLedger(os.path.join(self._dir, LEDGER_NAME))  # the folder's bytes, all writers
        self._resynced_at = -_RESYNC_MIN_S
        # Re-entrant: clear() and _make_room() unlink under the lock, and unlink counts errors under it.
        self._lock = threading.RLock()
        self._stats = TierStats()
        for name in ("dropped", "adopted", "temp_cleaned", "scan_entries", "scan_seconds", "resyncs",
                     "entry_evictions"):  # fmt: skip
            self._stats.extra[name] = 0.0
        if create:
            try:
                os.makedirs(self._dir, exist_ok=True)
            except OSError:
                self._stats.errors += 1
        self._rebuild_index()

    # -- properties -----------------------------------------------------------------------------

    @property
    def root(self) -> str:
        return self._root

    @property
    def namespace(self) -> str:
        return self._namespace

    @property
    def where(self) -> str:
        return self._root

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def used_bytes(self) -> int:
        return self._index.used

    @property
    def max_entries(self) -> int:
        return self._max_entries

    def path_of(self, key: BlockKey) -> str:
        """The file that holds ``key`` (whether or not it exists)."""
        return files.object_path(self._dir, check_key(key))

    # -- Tier protocol --------------------------------------------------------------------------

    def lookup(self, keys: Sequence[BlockKey]) -> int:
        i, total = 0, len(keys)
        while True:
            with self._lock:
                index = self._index.sizes
                while i < total and keys[i] in index:
                    i += 1
            if i == total:
                break
            # Not indexed: another process may have written it.
            try:
                size = os.stat(self.path_of(keys[i])).st_size
            except FileNotFoundError:
                break
            except OSError:
                self._count_error()
                break
            with self._lock:
                self._adopt(keys[i], size)
            i += 1
        with self._lock:
            self._stats.lookups += total
        return i

    def get(self, keys: Sequence[BlockKey]) -> list[bytes | None]:
        t0 = time.perf_counter()
        paths = [self.path_of(key) for key in keys]  # checks every key before any I/O
        results = self._read_files(paths)
        sizes = [len(r) if isinstance(r, bytes) else r for r in results]
        self._account_reads(keys, sizes, [isinstance(r, bytes) for r in results], t0)
        return [r if isinstance(r, bytes) else None for r in results]

    def read_into(
        self, keys: Sequence[BlockKey], buffers: Sequence[Sequence[memoryview]]
    ) -> list[bool | None]:
        """Read each object straight into its buffers (writable, together exactly the expected
        object's size, filled in order: a loader's header row and the block's place in its KV
        buffer), without the ``bytes`` that ``get`` allocates (and faults in) per object. Per key:
        True when the whole object is in its buffers, False when the file holds an object of
        another size (another codec: use ``get``), None for a miss."""
        t0 = time.perf_counter()
        paths = [self.path_of(key) for key in keys]
        results = self._read_files(paths, buffers)
        sizes = [
            sum(len(p) for p in b) if r == files.READ else cast(int, r)
            for r, b in zip(results, buffers, strict=True)
        ]
        self._account_reads(keys, sizes, [r == files.READ for r in results], t0)
        return [True if r == files.READ else False if r == files.OTHER_SIZE else None for r in results]

    def _account_reads(
        self, keys: Sequence[BlockKey], sizes: list[int], found: list[bool], t0: float
    ) -> None:
        """Stats and index after a batch read: ``sizes[i]`` is the bytes read where ``found[i]``,
        else the read's outcome code."""
        with self._lock:
            stats, index = self._stats, self._index.sizes
            for key, size, hit in zip(keys, sizes, found, strict=True):
                if hit:
                    stats.hits += 1
                    stats.bytes_read += size
                    if key in index:
                        self._index.touch(key, size)
                    else:
                        self._adopt(key, size)
                    continue
                if size == files.OTHER_SIZE:  # not read: the caller reads it with get, which counts it
                    stats.lookups -= 1
                    continue
                if size == files.GONE:  # evicted (maybe by another process) or never written
                    self._forget(key)
                elif size == files.FAILED:
                    stats.errors += 1
                stats.misses += 1
            stats.lookups += len(keys)
            stats.read_seconds += time.perf_counter() - t0

    def put(self, items: Sequence[tuple[BlockKey, bytes]]) -> None:
        for key, data in items:
            self._put_parts(key, (data,))

    def put_block(
        self,
        key: BlockKey,
        tokens: Sequence[int],
        kv: torch.Tensor,
        sums: torch.Tensor | None,
        encode: Callable[[], bytes],
    ) -> None:
        """The hierarchy's write: the object's header and payload go to the file by one ``writev``,
        the payload straight from the writer's slot (``EncodedBlock.parts``), not joined first."""
        self._put_parts(key, encode.parts() if isinstance(encode, EncodedBlock) else (encode(),))

    def _put_parts(self, key: BlockKey, parts: Sequence[bytes | memoryview]) -> None:
        t0 = time.perf_counter()
        path = self.path_of(key)
        size = sum(memoryview(p).nbytes for p in parts)
        ok = False
        if size <= self._capacity:
            # The write itself runs outside the lock: readers (the engine thread) never wait on I/O.
            ok = self._write_file(path, key, parts, size)  # indexes it (in _commit)
        self._count_put(size, ok, time.perf_counter() - t0)

    def _count_put(self, size: int, ok: bool, seconds: float) -> None:
        with self._lock:
            self._stats.puts += 1
            if size > self._capacity:
                self._stats.extra["dropped"] += 1
            elif ok:
                self._stats.bytes_written += size
            self._stats.write_seconds += seconds

    def delete(self, keys: Sequence[BlockKey]) -> None:
        for key in keys:
            path = self.path_of(key)
            with self._lock:  # unlink under the lock so that a concurrent put of the key stays ordered
                self._forget(key)
                try:
                    with self._ledger.locked() as entry:
                        size = files.size_or_zero(path)
                        if self._unlink(path):
                            entry.total -= size
                except OSError:
                    self._count_error()
                    self._unlink(path)

    def keys(self) -> list[BlockKey]:
        with self._lock:
            return self._index.keys()

    def __len__(self) -> int:
        return len(self._index)

    def clear(self) -> None:
        """Remove every object of this namespace, including ones this process has not indexed."""
        with self._lock:
            self._index.clear()
            try:
                with self._ledger.locked() as entry:  # no rename meanwhile: the total stays exact
                    self._purge_dir(self._dir, remove_dirs=False)
                    entry.total = files.size_of_objects(self._dir)
            except OSError:
                self._count_error()
                self._purge_dir(self._dir, remove_dirs=False)

    def close(self) -> None:
        """Stop the read threads (no file stays open between calls); a later ``get`` starts them again."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def load_into(
        self, keys: Sequence[BlockKey], tokens: Sequence[Sequence[int]], out: torch.Tensor, io: BlockIO
    ) -> int:
        """Uncompressed objects are read straight into place (``read_into``), others decoded."""
        if io.plain:
            return load_in_place(self, self.read_into, keys, tokens, out, io)
        return load_objects(self, keys, tokens, out, io)

    # -- maintenance, across namespaces --------------------------------------------------------

    def scan(self, namespace: str | None = None) -> list[StoredObject]:
        found: list[StoredObject] = []
        try:
            for ns in self._namespace_dirs():
                if namespace is not None and ns.name != namespace:
                    continue
                for sub in files.subdirs(ns.path, files.HEX2_RE.fullmatch):
                    with os.scandir(sub.path) as it:
                        for e in it:
                            key = files.parse_key(e.name, sub.name) if e.name.endswith(files.SUFFIX) else None
                            if key is None:
                                continue
                            with contextlib.suppress(FileNotFoundError):  # removed meanwhile
                                found.append(
                                    StoredObject(ns.name, key, e.stat(follow_symlinks=False).st_size)
                                )
        except OSError as e:
            raise TierError(f"cannot read the disk tier at {self._root}: {e}") from None
        return found

    def read_prefixes(self, objects: Sequence[StoredObject], nbytes: int) -> list[bytes | None]:
        out: list[bytes | None] = []
        for obj in objects:
            h = obj.key.hex()
            try:
                with open(os.path.join(self._root, obj.namespace, h[:2], h + files.SUFFIX), "rb") as f:
                    out.append(f.read(nbytes))
            except OSError:  # gone since the scan, or unreadable: no header either way
                out.append(None)
        return out

    def drop_namespaces(self, keep: str | None) -> int:
        """Only files this tier would have written (``<2 hex>/<key hex>.kvt`` and old temp files)
        are removed, and then the folders left empty: a root pointed at the wrong folder loses
        nothing else."""
        try:
            doomed = [e.path for e in self._namespace_dirs() if e.name != keep]
        except (OSError, TierError):
            self._count_error()
            return 0
        if keep != self._namespace:  # our own namespace goes too: forget what we indexed
            with self._lock:
                self._index.clear()
                self._ledger.close()
        return sum(self._purge_dir(path, remove_dirs=True, proven_only=True) for path in doomed)

    def _namespace_dirs(self) -> list[os.DirEntry[str]]:
        """The namespace folders under the root; none when the root does not exist."""
        if os.path.exists(self._root) and not os.path.isdir(self._root):
            raise TierError(f"disk path {self._root} is not a folder")
        try:
            return files.subdirs(self._root, valid_namespace)
        except (FileNotFoundError, NotADirectoryError):
            return []

    # -- internals ------------------------------------------------------------------------------

    def _read_files(
        self, paths: list[str], into: Sequence[Sequence[memoryview]] | None = None
    ) -> list[bytes | int]:
        """Each file's whole content, or ``files.GONE`` / ``files.FAILED``; with ``into``, each file read into
        its buffer: ``files.READ`` or ``files.OTHER_SIZE`` instead of the content.

        The calling thread opens the files in order and reads at once those whose first page is in
        the page cache (a warm copy gains nothing from threads on a small machine and pays their
        hand-offs); the others go to the read pool, so that their requests overlap at the device
        while the caller goes on with the rest of the batch.
        """
        results: list[bytes | int] = [files.FAILED] * len(paths)
        if len(paths) <= 1 or self._read_threads == 0:
            for i, path in enumerate(paths):
                results[i] = files.read_file(path, None if into is None else into[i])
            return results
        pool: ThreadPoolExecutor | None = None
        pending: list[tuple[int, Future[bytes | int]]] = []
        done = 0  # pending[:done] are collected
        max_open = _OPEN_PER_THREAD * self._read_threads  # a long segment must not run out of fds
        for i, path in enumerate(paths):
            while len(pending) - done >= max_open:
                j, future = pending[done]
                results[j] = future.result()
                done += 1
            try:
                fd = os.open(path, files.OPEN_FLAGS)
            except FileNotFoundError:
                results[i] = files.GONE
                continue
            except OSError:  # permissions, a path component that is not a folder, too many open files
                results[i] = files.FAILED
                continue
            buffer = None if into is None else into[i]
            if self._probe_cache and self._cached(fd):
                results[i] = files.read_fd(fd, buffer)
                continue
            if pool is None:
                pool = self._read_pool()
            try:
                pending.append((i, pool.submit(files.read_fd, fd, buffer)))  # the task owns (closes) the fd
            except RuntimeError:  # close() shut the pool down meanwhile, or the interpreter is exiting
                results[i] = files.read_fd(fd, buffer)
        for j, future in pending[done:]:
            results[j] = future.result()
        return results

    def _cached(self, fd: int) -> bool:
        """Whether the file's first byte can be read without waiting on the device (or it is empty).

        ``preadv2(RWF_NOWAIT)`` of one byte; a filesystem without it (tmpfs, some network ones)
        turns the probe off for good, and every read goes to the pool.
        """
        try:
            os.preadv(fd, [self._probe_buf], 0, _RWF_NOWAIT)
            return True
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # no RWF_NOWAIT here
                self._probe_cache = False
            return False  # anything else (EIO): the real read meets it again and counts it

    def _read_pool(self) -> ThreadPoolExecutor:
        with self._lock:
            pid = os.getpid()
            if self._pool is None or self._pool_pid != pid:  # after a fork the parent's threads are gone
                self._pool = ThreadPoolExecutor(self._read_threads, thread_name_prefix="kvtier-disk-read")
                self._pool_pid = pid
            return self._pool

    def _write_file(self, path: str, key: BlockKey, parts: Sequence[bytes | memoryview], size: int) -> bool:
        """Write ``parts`` (``size`` bytes in all) to ``path`` atomically (a temp file, renamed by
        ``_commit`` under the folder's ledger lock); False on any OSError or when it cannot fit."""
        try:
            tmp = files.write_temp(path, parts, size, self._fsync)
        except OSError:
            self._count_error()
            return False
        try:
            if self._commit(tmp, path, key, size):
                return True
            os.unlink(tmp)
        except OSError:
            self._count_error()
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        return False

    # -- writes made by another process (cache/file_writer.py) ----------------------------------

    @property
    def file_target(self) -> tuple[str, str, bool] | None:
        """(namespace folder, its usage ledger, fsync): what a file writer in another process needs
        to put this tier's objects in place (``cache/file_writer.py``) for ``commit_written``."""
        return self._dir, self._ledger.path, self._fsync

    def commit_written(self, written: Sequence[tuple[BlockKey, int, float]]) -> None:
        """Index objects another process put in place for this tier (renamed under the ledger's
        lock, their bytes added to it): ``(key, object size or 0 when its write failed, seconds
        the write took)``. The index and its eviction policy stay this process's, so one policy
        sees every access; what the folder's capacity no longer holds is evicted here, one ledger
        lock for the batch."""
        with self._lock:
            for key, size, seconds in written:
                if size:
                    self._forget(key)  # a replaced object: its old size is no longer ours
                    self._index.add(key, size)
                else:
                    self._stats.errors += 1
                self._count_put(size, bool(size), seconds)
            try:
                with self._ledger.locked() as entry:
                    entry.total = self._evict_until(entry.total, 0)
            except OSError:  # no ledger (unwritable folder?): bound what this process indexed
                self._stats.errors += 1
                self._index.used = self._evict_until(self._index.used, 0)

    def _rebuild_index(self) -> None:
        """The index, and the ledger set to the folder's true total: the scan runs under the ledger's
        lock, so no object is renamed or removed meanwhile (the one time a writer waits on a scan)."""
        if not os.path.isdir(self._dir):
            self._scan_index()
            return
        try:
            with self._ledger.locked() as entry:
                entry.total = self._scan_index()
        except OSError:
            self._count_error()
            self._scan_index()
        with self._lock:
            self._reserve(0)  # the capacity may have shrunk since the last run

    def _scan_index(self) -> int:
        """Scan the namespace folder: index objects oldest-first by mtime, remove old temp files.

        One ``os.scandir`` per key folder plus one ``stat`` per object (its size and age): about
        0.55-0.75 s per 100k objects on a warm cache on a busy 2-CPU VM. The 256 folders are spread
        over a few threads because ``stat`` releases the GIL: with a warm cache that changed nothing
        measurable there; it is meant for a cold cache after a reboot or a network filesystem, where
        each ``stat`` waits on the device and parallel requests overlap (not measured yet).
        """
        t0 = time.perf_counter()
        try:
            with os.scandir(self._dir) as top:
                subdirs = [
                    e.path for e in top if files.HEX2_RE.fullmatch(e.name) and e.is_dir(follow_symlinks=False)
                ]
        except FileNotFoundError:
            subdirs = []
        except OSError:
            self._count_error()
            subdirs = []
        cutoff_ns = time.time_ns() - int(self._temp_max_age_s * 1e9)
        found: list[tuple[int, BlockKey, int]] = []  # (mtime_ns, key, size)
        workers = min(_SCAN_THREADS, os.cpu_count() or 1, max(1, len(subdirs) // 16))
        if workers > 1:
            with ThreadPoolExecutor(workers, thread_name_prefix="kvtier-disk-scan") as pool:
                for part in pool.map(lambda sub: self._scan_folder(sub, cutoff_ns), subdirs):
                    found += part
        else:
            for sub in subdirs:
                found += self._scan_folder(sub, cutoff_ns)
        found.sort(key=itemgetter(0))
        with self._lock:
            add = self._index.add
            for _, key, size in found:
                add(key, size)
            self._stats.extra["scan_entries"] = float(len(found))
            self._stats.extra["scan_seconds"] = time.perf_counter() - t0
        return sum(size for _, _, size in found)

    def _scan_folder(self, folder: str, cutoff_ns: int) -> list[tuple[int, BlockKey, int]]:
        """The objects of one key folder as ``(mtime_ns, key, size)``; removes its old temp files."""
        found: list[tuple[int, BlockKey, int]] = []
        prefix = os.path.basename(folder)
        name_len = files.HEX_LEN + len(files.SUFFIX)
        fromhex = bytes.fromhex
        try:
            with os.scandir(folder) as it:
                for e in it:
                    name = e.name
                    if len(name) == name_len and name.endswith(files.SUFFIX) and name.startswith(prefix):
                        h = name[: files.HEX_LEN]
                        try:
                            key = fromhex(h)
                            st = e.stat(follow_symlinks=False)
                        except (ValueError, FileNotFoundError):  # not hex; removed by another process
                            continue
                        # fromhex takes upper case and spaces: only the exact form put writes counts.
                        if len(key) == DIGEST_SIZE and h == h.lower() and stat.S_ISREG(st.st_mode):
                            found.append((st.st_mtime_ns, key, st.st_size))
                    elif name.startswith(".") and name.endswith(files.TEMP_SUFFIX):
                        self._remove_temp_if_old(e.path, cutoff_ns)
        except OSError:  # the folder removed under us by another process, permissions
            self._count_error()
        return found

    def _remove_temp_if_old(self, path: str, cutoff_ns: int) -> bool:
        try:
            if os.stat(path, follow_symlinks=False).st_mtime_ns < cutoff_ns:
                os.unlink(path)
                with self._lock:
                    self._stats.extra["temp_cleaned"] += 1
                return True
        except FileNotFoundError:
            pass  # its writer finished (renamed it) or another process cleaned it
        except OSError:
            self._count_error()
        return False

    def _purge_dir(self, ns_dir: str, remove_dirs: bool, proven_only: bool = False) -> int:
        """Unlink the objects (and old temp files) of one namespace folder; returns objects removed.

        ``proven_only`` (``kvtier cache gc`` and ``clear``, which may point at the wrong folder):
        a file goes only if its header proves it a kvtier object, its own key matching its name; a
        file that merely looks like an object name is kept."""
        removed = 0
        cutoff_ns = time.time_ns() - int(self._temp_max_age_s * 1e9)
        try:
            with os.scandir(ns_dir) as top:
                subdirs = [
                    e.path for e in top if files.HEX2_RE.fullmatch(e.name) and e.is_dir(follow_symlinks=False)
                ]
        except FileNotFoundError:
            return 0
        except OSError:
            self._count_error()
            return 0
        for sub in subdirs:
            prefix = os.path.basename(sub)
            try:
                with os.scandir(sub) as it:
                    entries = [(e.name, e.path) for e in it]
            except OSError:
                self._count_error()
                continue
            for name, path in entries:
                key = files.parse_key(name, prefix) if name.endswith(files.SUFFIX) else None
                if key is not None and (not proven_only or files.is_object(path, key)):
                    removed += self._unlink(path)
                elif name.startswith(".") and name.endswith(files.TEMP_SUFFIX):
                    self._remove_temp_if_old(path, cutoff_ns)
            if remove_dirs:
                files.rmdir_if_empty(sub)
        if remove_dirs:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(ns_dir, LEDGER_NAME))
            files.rmdir_if_empty(ns_dir)
        return removed

    def _unlink(self, path: str) -> int:
        """Unlink one object file; 1 if it was there, 0 if not (or on error, counted)."""
        try:
            os.unlink(path)
            return 1
        except FileNotFoundError:
            return 0
        except OSError:
            self._count_error()
            return 0

    def _count_error(self) -> None:
        with self._lock:
            self._stats.errors += 1

    # Called with the lock held.

    def _forget(self, key: BlockKey) -> None:
        self._index.remove(key)

    def _adopt(self, key: BlockKey, size: int) -> None:
        """Index a file another process wrote; a full index first evicts its victim (as a write
        would: the adopted object is the one in use now)."""
        if key in self._index or size > self._capacity:
            return
        if len(self._index) >= self._max_entries:
            try:
                with self._ledger.locked() as entry:  # the victim's unlink happens under it
                    entry.total = self._evict_until(entry.total, 0, entries=1)
            except OSError:
                self._count_error()
                self._index.used = self._evict_until(self._index.used, 0, entries=1)
        self._index.add(key, size)
        self._stats.extra["adopted"] += 1

    def _commit(self, tmp: str, path: str, key: BlockKey, size: int) -> bool:
        """Rename a written temp file onto ``path`` once the folder has room for it. Every rename
        and unlink of an object happens under the ledger's lock, so its total is exactly what the
        folder's objects hold (a crash inside this section misses one object, until a restart)."""
        with self._lock:
            self._forget(key)  # a replaced object: out of the index so it cannot be its own victim
            try:
                with self._ledger.locked() as entry:
                    old = files.size_or_zero(path)
                    entry.total = self._evict_until(entry.total, size - old, entries=1)
                    if entry.total + size - old > self._capacity:
                        self._stats.extra["dropped"] += 1
                        return False
                    os.replace(tmp, path)
                    entry.total += size - old
            except OSError:  # no ledger (unwritable folder?): bound what this process indexed
                self._count_error()
                self._index.used = self._evict_until(self._index.used, size, entries=1)
                os.replace(tmp, path)
            self._index.add(key, size)
            return True

    def _reserve(self, size: int) -> bool:
        """Make the folder's total (the ledger, all processes) hold ``size`` more bytes, evicting in
        policy order (our own objects; when those run out, a rescan indexes the other processes'
        too), and add them. False when it cannot (a rescan ran less than a second ago)."""
        try:
            with self._ledger.locked() as entry:
                entry.total = self._evict_until(entry.total, size)
                if entry.total + size > self._capacity:
                    return False
                entry.total += size
                return True
        except OSError:  # no ledger (unwritable folder): bound what this process indexed
            self._count_error()
            self._index.used = self._evict_until(self._index.used, size)
            return self._index.used + size <= self._capacity

    def _evict_until(self, total: int, size: int, entries: int = 0) -> int:
        """Evict in policy order until ``size`` more bytes fit ``total`` (the folder's, or this
        process's) and ``entries`` more index entries fit ``max_entries``; returns the new total."""
        while total + size > self._capacity or len(self._index) + entries > self._max_entries:
            victim = self._index.evict()
            if victim is None:
                if time.monotonic() - self._resynced_at < _RESYNC_MIN_S:
                    break
                total = self._resync()
                if not self._index:
                    break
                continue  # the loop's test again: it may fit now, or evict what the rescan indexed
            key, old = victim
            if old is not None:
                self._stats.evictions += 1
                if total + size <= self._capacity:  # the bytes fit: this one went for its index entry
                    self._stats.extra["entry_evictions"] += 1
                if self._unlink(self.path_of(key)):  # gone already: whoever removed it gave it back
                    total -= old
        return total

    def _resync(self) -> int:
        """Index every object of the folder (those of other processes too) and return their bytes."""
        self._resynced_at = time.monotonic()
        self._stats.extra["resyncs"] += 1
        found: list[tuple[int, BlockKey, int]] = []
        with contextlib.suppress(OSError):
            for sub in files.subdirs(self._dir, files.HEX2_RE.fullmatch):
                found += self._scan_folder(sub.path, 0)
        found.sort(key=itemgetter(0))
        for _, key, size in found:
            if key not in self._index:
                self._index.add(key, size)
        return sum(size for _, _, size in found)
