"""DiskTier: the Tier contract on real files, restarts, crash debris, threads, processes, failures."""

from __future__ import annotations

import errno
import hashlib
import multiprocessing as mp
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from kvtier.cache.policy import POLICIES
from kvtier.cache.tiers import disk as disk_module
from kvtier.cache.tiers import disk_files
from kvtier.cache.tiers.base import Tier
from kvtier.cache.tiers.disk import DiskTier


def key(i: int) -> bytes:
    return hashlib.blake2b(i.to_bytes(8, "little"), digest_size=32).digest()


def payload(i: int, version: int, size: int = 256) -> bytes:
    """A payload whose every byte says which key and version wrote it: a torn object shows."""
    head = f"{i}:{version}:".encode()
    return head + bytes([(i * 31 + version) % 251]) * (size - len(head))


def test_protocol_conformance(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, "model-a", 1 << 20)
    assert isinstance(tier, Tier)
    assert tier.name == "disk"
    assert tier.capacity_bytes == 1 << 20 and tier.used_bytes == 0


def test_put_get_lookup_delete_layout(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, "m", 1 << 20)
    a, b, c = key(1), key(2), key(3)
    tier.put([(a, b"aaa"), (c, b"ccccc")])
    path = tmp_path / "m" / a.hex()[:2] / (a.hex() + ".kvt")
    assert path.read_bytes() == b"aaa" and tier.path_of(a) == str(path)
    assert tier.get([a, b, c]) == [b"aaa", None, b"ccccc"]
    assert tier.lookup([a, b, c]) == 1  # longest leading run, b missing
    assert tier.lookup([b]) == 0
    assert len(tier) == 2 and tier.used_bytes == 8
    tier.put([(b, b"bb")])
    assert tier.lookup([a, b, c]) == 3
    tier.delete([a, key(99)])
    assert not path.exists() and tier.get([a]) == [None]
    tier.put([(c, b"C")])
    assert tier.get([c]) == [b"C"] and tier.used_bytes == 3
    assert sorted(tier.keys()) == sorted([b, c])
    with pytest.raises(ValueError):
        tier.put([(b"short", b"x")])
    with pytest.raises(ValueError):
        DiskTier(tmp_path, "../escape", 100)


def test_lru_eviction_unlinks_in_policy_order(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, "m", 100, policy="lru")
    for i in range(4):
        tier.put([(key(i), bytes(25))])
    tier.get([key(0)])
    tier.put([(key(4), bytes(30))])  # evicts 1 and 2, the least recently used
    assert not os.path.exists(tier.path_of(key(1))) and not os.path.exists(tier.path_of(key(2)))
    assert tier.get([key(0), key(3), key(4)]) == [bytes(25), bytes(25), bytes(30)]
    assert tier.used_bytes == 80 and tier.stats().evictions == 2


def test_oversize_object_dropped(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, "m", 100)
    tier.put([(key(1), bytes(60)), (key(2), bytes(101))])
    assert tier.get([key(2)]) == [None] and not os.path.exists(tier.path_of(key(2)))
    assert tier.lookup([key(1)]) == 1
    assert tier.stats().extra["dropped"] == 1 and tier.stats().evictions == 0


def block_object(i: int, namespace: str) -> bytes:
    """A real kvtier object for key(i): drop_namespaces removes only files whose header proves it."""
    import torch

    from kvtier.cache.codec import encode_block
    from kvtier.cache.keys import KVLayout

    layout = KVLayout(num_layers=1, num_kv_heads=1, head_dim=4, block_size=2, dtype="float32")
    kv = torch.full(layout.block_shape, float(i))
    return encode_block(key(i), namespace, layout, [i, i + 1], kv)


def test_namespaces_and_drop_other_namespaces(tmp_path: Path) -> None:
    old = DiskTier(tmp_path, "old-model", 10000)
    new = DiskTier(tmp_path, "new-model", 10000)
    old1, old2, new1, new3 = (
        block_object(1, "o"),
        block_object(2, "o"),
        block_object(1, "n"),
        block_object(3, "n"),
    )
    old.put([(key(1), old1), (key(2), old2)])
    new.put([(key(1), new1), (key(3), new3)])
    assert new.get([key(1), key(2)]) == [new1, None]
    assert old.get([key(1), key(3)]) == [old1, None]
    new.clear()  # only its own namespace
    assert new.get([key(1)]) == [None] and len(new) == 0 and new.used_bytes == 0
    assert old.get([key(1)]) == [old1]
    new.put([(key(3), new3)])
    (tmp_path / "unrelated.txt").write_text("keep me")
    (tmp_path / "old-model" / "notes.txt").write_text("keep me too")
    # named exactly like an object, but its content is no kvtier object: gc must keep it
    look_alike = Path(old.path_of(key(7)))
    look_alike.parent.mkdir(parents=True, exist_ok=True)
    look_alike.write_bytes(b"my thesis, final version")
    forged = Path(old.path_of(key(8)))  # a real object stored under another key's name
    forged.parent.mkdir(parents=True, exist_ok=True)
    forged.write_bytes(block_object(9, "o"))
    assert new.drop_namespaces(keep=new.namespace) == 2
    assert look_alike.read_bytes() == b"my thesis, final version" and forged.exists()
    assert old.get([key(1), key(2)]) == [None, None]
    assert new.get([key(3)]) == [new3]
    assert (tmp_path / "unrelated.txt").exists() and (tmp_path / "old-model" / "notes.txt").exists()
    # the emptied key folders are gone; those holding the kept files stay
    assert {p.name for p in (tmp_path / "old-model").glob("??")} == {
        look_alike.parent.name,
        forged.parent.name,
    }


def test_restart_rebuilds_index(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, "m", 10_000)
    for i in range(50):
        tier.put([(key(i), payload(i, 0, 100 + i))])
    used, n = tier.used_bytes, len(tier)
    tier.close()
    again = DiskTier(tmp_path, "m", 10_000)
    assert len(again) == n == 50 and again.used_bytes == used == sum(100 + i for i in range(50))
    assert set(again.keys()) == {key(i) for i in range(50)}
    assert again.get([key(7)]) == [payload(7, 0, 107)]
    assert again.stats().extra["scan_entries"] == 50
    # A smaller capacity at restart evicts down to it, oldest (by mtime) first.
    for i in range(50):
        os.utime(tier.path_of(key(i)), ns=(i * 10**9, i * 10**9))
    small = DiskTier(tmp_path, "m", 1000)
    assert small.used_bytes <= 1000
    assert small.lookup([key(49)]) == 1 and small.lookup([key(0)]) == 0
    assert not os.path.exists(small.path_of(key(0)))


def test_scan_many_entries(tmp_path: Path) -> None:
    n = 10_000
    tier = DiskTier(tmp_path, "m", 1 << 30)
    base = tmp_path / "m"
    for d in range(256):
        (base / f"{d:02x}").mkdir(exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    for i in range(n):  # made directly: tier.put per file would time the writer, not the scan
        h = key(i).hex()
        fd = os.open(base / h[:2] / (h + ".kvt"), flags, 0o644)
        os.write(fd, b"x")
        os.close(fd)
    t0 = time.perf_counter()
    again = DiskTier(tmp_path, "m", 1 << 30)
    elapsed = time.perf_counter() - t0
    assert len(again) == n and again.used_bytes == n
    assert again.get([key(n - 1)]) == [b"x"]
    print(f"index rebuild: {n} entries in {elapsed * 1e3:.1f} ms ({n / elapsed:,.0f} entries/s)")
    assert len(tier) == 0  # the first tier saw none of them: it never scanned again


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_stays_within_capacity(tmp_path: Path, policy: str) -> None:
    tier = DiskTier(tmp_path, "m", 10 * 100, policy=policy)
    for r in range(300):
        i = (r * 13) % 40
        tier.put([(key(i), payload(i, 0, 100))])
        if r % 3 == 0:
            tier.get([key((i + 5) % 40)])
        assert tier.used_bytes <= tier.capacity_bytes
    files = list((tmp_path / "m").glob("*/*.kvt"))
    assert len(files) == len(tier) == 10 and tier.used_bytes == 1000
    assert sorted(tier.keys()) == sorted(bytes.fromhex(f.name[:64]) for f in files)
    assert tier.stats().evictions > 0
    again = DiskTier(tmp_path, "m", 10 * 100, policy=policy)  # the restart agrees with the files
    assert len(again) == 10 and again.used_bytes == 1000


def test_temp_files_never_served_and_cleaned_when_old(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, "m", 1000)
    k = key(5)
    h = k.hex()
    folder = tmp_path / "m" / h[:2]
    folder.mkdir(parents=True)
    young = folder / f".{h}.12345.abcdef.tmp"
    old = folder / f".{h}.12346.fedcba.tmp"
    young.write_bytes(b"half-writ")
    old.write_bytes(b"half-writ")
    past = time.time() - 3600
    os.utime(old, (past, past))
    assert tier.lookup([k]) == 0 and tier.get([k]) == [None]
    again = DiskTier(tmp_path, "m", 1000)
    assert again.get([k]) == [None] and len(again) == 0
    assert young.exists() and not old.exists()  # a young one may belong to a live writer
    assert again.stats().extra["temp_cleaned"] == 1
    # Foreign files in the folder are neither objects nor removed.
    (folder / "README").write_text("x")
    (folder / (h.upper() + ".kvt")).write_bytes(b"x")
    assert len(DiskTier(tmp_path, "m", 1000)) == 0 and (folder / "README").exists()


def test_concurrent_replace_never_tears(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, "m", 1 << 24)
    k = key(1)
    versions = [payload(1, v, 64 * 1024 + 1000 * v) for v in range(8)]
    valid = set(versions)
    stop = threading.Event()
    bad: list[object] = []

    def writer(v: int) -> None:
        for _ in range(40):
            tier.put([(k, versions[v])])

    def reader() -> None:
        while not stop.is_set():
            got = tier.get([k])[0]
            if got is not None and got not in valid:
                bad.append(len(got))

    readers = [threading.Thread(target=reader) for _ in range(3)]
    writers = [threading.Thread(target=writer, args=(v,)) for v in range(8)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert not bad
    assert tier.get([k])[0] in valid
    assert len(tier) == 1 and tier.stats().errors == 0
    assert not list((tmp_path / "m").glob("*/.*.tmp"))  # every temp file was renamed


def _process_worker(root: str, seed: int, rounds: int, start: Any, queue: Any) -> None:
    """Writes, reads, deletes and evicts in a folder another process uses at the same time."""
    try:
        tier = DiskTier(root, "shared", 40 * 2048)  # small: both processes evict all the time
        start.wait(timeout=60)  # start together (process start-up takes longer than the work)
        bad = 0
        for r in range(rounds):
            i = (r * 7 + seed) % 64
            tier.put([(key(i), payload(i, seed, 1024 + i * 16))])
            keys = [key((i + j) % 64) for j in range(4)]
            tier.lookup(keys)
            for j, got in zip(range(4), tier.get(keys), strict=True):
                n = (i + j) % 64
                if got is not None and got not in (
                    payload(n, 1, 1024 + n * 16),
                    payload(n, 2, 1024 + n * 16),
                ):
                    bad += 1
            if r % 25 == 0:
                tier.delete([key((i + 3) % 64)])
        queue.put(("ok", bad, tier.stats().errors))
    except BaseException as e:  # reported to the parent
        queue.put(("exception", repr(e), 0))


def test_two_processes_share_a_folder(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=_process_worker, args=(str(tmp_path), s, 1000, start, queue)) for s in (1, 2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert results == [("ok", 0, 0), ("ok", 0, 0)]
    # Whatever is left is whole: a fresh tier serves only exact payloads.
    tier = DiskTier(tmp_path, "shared", 1 << 20)
    held = tier.keys()
    for k in held:
        got = tier.get([k])[0]
        assert got is not None
        i = next(n for n in range(64) if key(n) == k)
        assert got in (payload(i, 1, 1024 + i * 16), payload(i, 2, 1024 + i * 16))


def test_other_process_writes_and_evictions(tmp_path: Path) -> None:
    a = DiskTier(tmp_path, "m", 1000)
    b = DiskTier(tmp_path, "m", 1000)
    a.put([(key(1), b"one"), (key(2), b"two")])
    assert len(b) == 0
    assert b.lookup([key(1), key(2), key(3)]) == 2  # found on disk, adopted into b's index
    assert len(b) == 2 and b.stats().extra["adopted"] == 2
    a.delete([key(1)])  # like an eviction by another process
    assert b.get([key(1), key(2)]) == [None, b"two"]  # a miss, not an error
    assert len(b) == 1 and b.stats().errors == 0


def test_unusable_root_misses_without_raising(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    tier = DiskTier(blocker / "cache", "m", 1000)  # mkdir fails: NotADirectoryError
    tier.put([(key(1), b"data")])
    assert tier.get([key(1)]) == [None]
    assert tier.lookup([key(1)]) == 0
    tier.delete([key(1)])
    assert tier.drop_namespaces(keep=tier.namespace) == 0
    tier.clear()
    s = tier.stats()
    assert s.errors > 0 and s.misses == 1 and s.bytes_written == 0
    assert len(tier) == 0 and tier.used_bytes == 0


def test_readonly_folder_drops_writes(tmp_path: Path) -> None:
    root = tmp_path / "ro"
    tier = DiskTier(root, "m", 1000)
    tier.put([(key(1), b"before")])
    folder = root / "m"
    os.chmod(folder, 0o500)
    for sub in folder.iterdir():
        os.chmod(sub, 0o500)
    try:
        probe = folder / "probe"
        try:
            probe.write_bytes(b"x")
            probe.unlink()
            pytest.skip("running with privileges that ignore directory permissions (root)")
        except PermissionError:
            pass
        tier.put([(key(2), b"after"), (key(1), b"replaced")])
        assert tier.stats().errors >= 2
        assert tier.get([key(1), key(2)]) == [b"before", None]
    finally:
        for sub in folder.iterdir():
            os.chmod(sub, 0o700)
        os.chmod(folder, 0o700)


def test_stats_counters(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, "m", 1000)
    tier.put([(key(1), b"12345"), (key(2), b"678")])
    tier.get([key(1), key(2), key(3)])
    tier.lookup([key(1), key(3)])
    s = tier.stats()
    assert (s.puts, s.bytes_written) == (2, 8)
    assert (s.hits, s.misses, s.bytes_read) == (2, 1, 8)
    assert s.lookups == 5 and s.errors == 0
    assert s.read_seconds > 0 and s.write_seconds > 0


def test_fsync_option(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, "m", 1000, fsync=True)
    tier.put([(key(1), b"durable")])
    assert DiskTier(tmp_path, "m", 1000).get([key(1)]) == [b"durable"]


# -- parallel reads ------------------------------------------------------------------------------


def _cold(tier: DiskTier, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every object counts as not in the page cache: all reads go to the tier's read pool."""
    monkeypatch.setattr(tier, "_cached", lambda fd: False)


def _record_read_threads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The name of the thread that reads each object."""
    names: list[str] = []
    real = disk_files.read_fd

    def read_fd(fd: int, into: Sequence[memoryview] | None = None) -> bytes | int:
        names.append(threading.current_thread().name)
        return real(fd, into)

    monkeypatch.setattr(disk_files, "read_fd", read_fd)
    return names


@pytest.mark.parametrize("mode", ["pool", "probe", "inline"])
def test_get_returns_each_key_in_order_with_misses_between(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    tier = DiskTier(tmp_path, "m", 1 << 24, read_threads=0 if mode == "inline" else 3)
    if mode == "pool":
        _cold(tier, monkeypatch)
    held = {i: payload(i, 1, 1000 + 97 * i) for i in range(0, 60) if i % 5 != 2}  # every 5th: never written
    tier.put(list((key(i), data) for i, data in held.items()))
    gone = [3, 4, 31, 59]  # indexed, then removed behind the tier's back (another process evicted them)
    for i in gone:
        os.unlink(tier.path_of(key(i)))
        del held[i]
    used = tier.used_bytes
    names = _record_read_threads(monkeypatch)
    order = [*range(59, -1, -1), 8, 8]  # reversed, and a key twice
    got = tier.get([key(i) for i in order])
    assert got == [held.get(i) for i in order]
    s = tier.stats()
    n_hits = sum(i in held for i in order)
    assert (s.hits, s.misses, s.errors) == (n_hits, len(order) - n_hits, 0)
    assert s.bytes_read == sum(len(held[i]) for i in order if i in held)
    assert s.lookups == len(order) and s.read_seconds > 0
    assert tier.used_bytes == used - sum(1000 + 97 * i for i in gone)  # the removed ones are forgotten
    assert len(tier) == len(held) and sorted(tier.keys()) == sorted(key(i) for i in held)
    assert n_hits == len(order) - 12 - len(gone) and len(names) == n_hits  # a miss fails at open
    pool_reads = sum(n.startswith("kvtier-disk-read") for n in names)
    if mode == "pool":
        assert pool_reads == len(names)
    elif mode == "inline" or tier._probe_cache:  # objects just written are in the page cache
        assert pool_reads == 0


def test_removed_between_lookup_and_get_is_a_miss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tier = DiskTier(tmp_path, "m", 1 << 20, read_threads=2)
    _cold(tier, monkeypatch)
    keys = [key(i) for i in range(6)]
    tier.put([(k, payload(i, 1)) for i, k in enumerate(keys)])
    assert tier.lookup(keys) == 6
    os.unlink(tier.path_of(keys[2]))
    got = tier.get(keys)
    assert got[2] is None and got[:2] + got[3:] == [payload(i, 1) for i in (0, 1, 3, 4, 5)]
    assert tier.lookup(keys) == 2 and tier.stats().errors == 0 and tier.used_bytes == 5 * 256


def test_truncated_object_comes_back_short_and_the_codec_rejects_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tier never interprets objects: a file cut short (a power loss with fsync off) is returned
    as it is, its new size is what the index counts, and decoding turns it into a counted miss."""
    import torch

    from kvtier.cache.codec import CodecConfig, CorruptObjectError, decode_block, encode_block
    from kvtier.cache.keys import KVLayout

    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype="float32")
    tokens = [1, 2, 3, 4]
    kv = torch.randn(layout.block_shape)
    tier = DiskTier(tmp_path, "m", 1 << 20, read_threads=2)
    _cold(tier, monkeypatch)
    objects = [encode_block(key(i), "fp", layout, tokens, kv, CodecConfig()) for i in range(3)]
    tier.put([(key(i), o) for i, o in enumerate(objects)])
    os.truncate(tier.path_of(key(1)), len(objects[1]) // 2)
    got = tier.get([key(i) for i in range(3)])
    assert got[0] == objects[0] and got[2] == objects[2] and got[1] == objects[1][: len(objects[1]) // 2]
    assert tier.used_bytes == len(objects[0]) + len(objects[2]) + len(objects[1]) // 2
    with pytest.raises(CorruptObjectError, match="truncated"):
        decode_block(got[1] or b"", key=key(1), fingerprint="fp", layout=layout, tokens=tokens)
    assert torch.equal(
        decode_block(got[2] or b"", key=key(2), fingerprint="fp", layout=layout, tokens=tokens), kv
    )


def test_read_errors_are_counted_misses_in_both_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for threads in (0, 2):
        tier = DiskTier(tmp_path / str(threads), "m", 1 << 20, read_threads=threads)
        _cold(tier, monkeypatch)
        tier.put([(key(1), b"one"), (key(3), b"three")])
        os.makedirs(tier.path_of(key(2)))  # a folder at an object's name: open works, read fails
        assert tier.get([key(1), key(2), key(3)]) == [b"one", None, b"three"]
        s = tier.stats()
        assert (s.hits, s.misses, s.errors) == (2, 1, 1), threads


def test_long_segment_holds_few_files_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd")
    tier = DiskTier(tmp_path, "m", 1 << 24, read_threads=2)
    _cold(tier, monkeypatch)
    n = 300  # more than disk._OPEN_PER_THREAD * 2 files
    tier.put([(key(i), payload(i, 1, 300 + i)) for i in range(n)])
    base = len(os.listdir("/proc/self/fd"))
    most = 0
    real = disk_files.read_fd

    def read_fd(fd: int, into: Sequence[memoryview] | None = None) -> bytes | int:
        nonlocal most
        most = max(most, len(os.listdir("/proc/self/fd")))
        return real(fd, into)

    monkeypatch.setattr(disk_files, "read_fd", read_fd)
    assert tier.get([key(i) for i in range(n)]) == [payload(i, 1, 300 + i) for i in range(n)]
    limit = disk_module._OPEN_PER_THREAD * 2
    assert 0 < most - base <= limit + 2  # + the caller's file being probed, + listdir's own fd


def test_concurrent_gets_share_the_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tier = DiskTier(tmp_path, "m", 1 << 24, read_threads=3)
    _cold(tier, monkeypatch)
    tier.put([(key(i), payload(i, 1, 500 + i)) for i in range(40)])
    bad: list[int] = []

    def reader(seed: int) -> None:
        for r in range(20):
            idx = [(seed * 7 + r + j * 3) % 45 for j in range(12)]  # 40..44 were never written
            got = tier.get([key(i) for i in idx])
            if got != [payload(i, 1, 500 + i) if i < 40 else None for i in idx]:
                bad.append(seed)

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad
    s = tier.stats()
    assert s.hits + s.misses == 4 * 20 * 12 and s.errors == 0


def test_no_rwf_nowait_turns_the_probe_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tier = DiskTier(tmp_path, "m", 1 << 20, read_threads=2)
    tier.put([(key(i), payload(i, 1)) for i in range(4)])

    def preadv(*args: Any) -> int:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(disk_module.os, "preadv", preadv)
    names = _record_read_threads(monkeypatch)
    assert tier.get([key(i) for i in range(4)]) == [payload(i, 1) for i in range(4)]
    assert not tier._probe_cache and len(names) == 4
    assert sum(n.startswith("kvtier-disk-read") for n in names) >= 3  # the first read decided it
    assert tier.stats().errors == 0


def test_close_stops_the_read_threads_and_get_still_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = set(threading.enumerate())  # other tests' tiers may hold read threads too

    def ours() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t not in before and t.name.startswith("kvtier-disk-read")]

    tier = DiskTier(tmp_path, "m", 1 << 20, read_threads=2)
    _cold(tier, monkeypatch)
    tier.put([(key(i), payload(i, 1)) for i in range(4)])
    assert tier.get([key(i) for i in range(4)]) == [payload(i, 1) for i in range(4)]
    assert ours()
    tier.close()
    assert not ours()
    assert tier.get([key(i) for i in range(4)]) == [payload(i, 1) for i in range(4)]
    tier.close()
    assert not ours()
    with pytest.raises(ValueError, match="read_threads"):
        DiskTier(tmp_path, "m", 100, read_threads=-1)


def _get_in_child(tier: DiskTier, queue: Any) -> None:
    tier._cached = lambda fd: False  # type: ignore[method-assign]
    queue.put(tier.get([key(i) for i in range(4)]))


def test_forked_child_makes_its_own_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if "fork" not in mp.get_all_start_methods():
        pytest.skip("no fork here")
    tier = DiskTier(tmp_path, "m", 1 << 20, read_threads=2)
    _cold(tier, monkeypatch)
    tier.put([(key(i), payload(i, 1)) for i in range(4)])
    assert tier.get([key(i) for i in range(4)]) == [payload(i, 1) for i in range(4)]  # the parent's pool
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_get_in_child, args=(tier, queue))
    child.start()
    try:
        # the parent's read threads do not exist in the child: with the parent's pool it would hang
        assert queue.get(timeout=30) == [payload(i, 1) for i in range(4)]
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
    tier.close()


@pytest.mark.parametrize("mode", ["pool", "probe", "inline"])
def test_read_into_fills_buffers_and_reports_other_sizes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """read_into lands each object in its own buffer; a file of another size is reported (the
    caller reads it with get), a missing one is a miss; stats count like get."""
    threads = 0 if mode == "inline" else 4
    tier = DiskTier(tmp_path, "ns", 1 << 30, read_threads=threads)
    if mode == "pool":
        monkeypatch.setattr(tier, "_probe_cache", False)
    objects = {i: bytes([i]) * 4096 for i in range(6)}
    objects[3] = b"x" * 100  # another size
    tier.put([(key(i), o) for i, o in objects.items() if i != 4])  # 4 is missing
    buffers = [bytearray(4096) for _ in range(6)]
    heads = [bytearray(100) for _ in range(6)]  # an object read into two buffers: 100 + 3996 bytes
    views = [[memoryview(h), memoryview(b)[100:]] for h, b in zip(heads, buffers, strict=True)]
    got = tier.read_into([key(i) for i in range(6)], views)
    for h, b in zip(heads, buffers, strict=True):
        b[:100] = h
    assert got == [True, True, True, False, None, True]
    for i in (0, 1, 2, 5):
        assert bytes(buffers[i]) == objects[i]
    assert bytes(buffers[3]) == bytes(4096)  # untouched
    s = tier.stats()  # the object of another size is left to get, which counts it
    assert s.hits == 4 and s.misses == 1 and s.lookups == 5 and s.bytes_read == 4 * 4096
    assert tier.get([key(3)]) == [objects[3]]
    assert s.hits == 5 and s.lookups == 6
    tier.close()
