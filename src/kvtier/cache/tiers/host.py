"""HostTier: encoded KV blocks in process memory, bounded in bytes by an eviction policy.

A dict from ``(namespace, key)`` to bytes, a policy that orders those entries and a byte counter,
all behind one lock (the hierarchy writes from its I/O thread while the engine thread looks up).

Namespaces: the tier serves only its current namespace (the model fingerprint). After a model
update the owner calls ``set_namespace``; objects of the old model stay resident (counted in
``used_bytes``, evictable by the policy) but are never returned, until evicted or dropped with
``drop_other_namespaces``. ``len``, ``keys`` and ``clear`` see only the current namespace;
``used_bytes`` is the memory of all of them, since that is what the capacity bounds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import cast

from kvtier.cache.keys import DIGEST_SIZE, BlockKey
from kvtier.cache.policy import make_policy
from kvtier.cache.tiers.base import TierStats

_Entry = tuple[str, BlockKey]


def check_key(key: object) -> BlockKey:
    """A block key is exactly ``DIGEST_SIZE`` bytes; anything else is a programming error."""
    if not isinstance(key, bytes):
        raise TypeError(f"block key must be bytes, got {type(key).__name__}")
    if len(key) != DIGEST_SIZE:
        raise ValueError(f"block key must be {DIGEST_SIZE} bytes, got {len(key)}")
    return key


class HostTier:
    """Tier in host memory. ``get`` returns the stored bytes object itself (no copy)."""

    name = "host"

    def __init__(
        self,
        namespace: str,
        capacity_bytes: int,
        policy: str = "lru",
        *,
        expected_entries: int | None = None,
        seed: int = 0,
    ) -> None:
        """``expected_entries`` sizes the ghost lists / queues of adaptive policies (s3fifo, arc);
        None lets the policy choose."""
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self._namespace = namespace
        self._capacity = int(capacity_bytes)
        self._data: dict[_Entry, bytes] = {}
        self._policy = make_policy(policy, expected_entries, seed)
        self._used = 0
        self._lock = threading.Lock()
        self._stats = TierStats()
        self._stats.extra["dropped"] = 0.0  # puts larger than the whole capacity

    # -- properties -----------------------------------------------------------------------------

    @property
    def namespace(self) -> str:
        return self._namespace

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def used_bytes(self) -> int:
        return self._used

    def set_namespace(self, namespace: str) -> None:
        """Serve ``namespace`` from now on; objects of the previous one are kept but never served."""
        with self._lock:
            self._namespace = namespace

    # -- Tier protocol --------------------------------------------------------------------------

    def lookup(self, keys: Sequence[BlockKey]) -> int:
        with self._lock:
            self._stats.lookups += len(keys)
            ns = self._namespace
            n = 0
            for key in keys:
                if (ns, key) not in self._data:
                    break
                n += 1
            return n

    def get(self, keys: Sequence[BlockKey]) -> list[bytes | None]:
        t0 = time.perf_counter()
        out: list[bytes | None] = []
        with self._lock:
            ns = self._namespace
            stats = self._stats
            stats.lookups += len(keys)
            for key in keys:
                entry = (ns, key)
                data = self._data.get(entry)
                if data is None:
                    stats.misses += 1
                else:
                    stats.hits += 1
                    stats.bytes_read += len(data)
                    self._policy.access(entry)
                out.append(data)
            stats.read_seconds += time.perf_counter() - t0
        return out

    def put(self, items: Sequence[tuple[BlockKey, bytes]]) -> None:
        t0 = time.perf_counter()
        with self._lock:
            ns = self._namespace
            stats = self._stats
            for key, data in items:
                check_key(key)
                if not isinstance(data, bytes):
                    data = bytes(data)  # a bytearray / memoryview the caller may reuse
                size = len(data)
                stats.puts += 1
                if size > self._capacity:
                    stats.extra["dropped"] += 1
                    continue
                entry = (ns, key)
                old = self._data.pop(entry, None)
                if old is not None:
                    # Take the old copy out first so that the loop below cannot pick it as a victim.
                    self._used -= len(old)
                    self._policy.remove(entry)
                self._make_room(size)
                self._data[entry] = data
                self._used += size
                self._policy.insert(entry)
                stats.bytes_written += size
            stats.write_seconds += time.perf_counter() - t0

    def delete(self, keys: Sequence[BlockKey]) -> None:
        with self._lock:
            ns = self._namespace
            for key in keys:
                self._remove((ns, key))

    def keys(self) -> list[BlockKey]:
        with self._lock:
            ns = self._namespace
            return [key for (n, key) in self._data if n == ns]

    def __len__(self) -> int:
        with self._lock:
            ns = self._namespace
            return sum(1 for (n, _) in self._data if n == ns)

    def stats(self) -> TierStats:
        """The live counters (not a copy); callers only read them."""
        return self._stats

    def record_corrupt(self, count: int = 1) -> None:
        with self._lock:
            self._stats.corrupt += count

    def clear(self) -> None:
        """Remove every object of the current namespace."""
        with self._lock:
            ns = self._namespace
            for entry in [e for e in self._data if e[0] == ns]:
                self._remove(entry)

    def close(self) -> None:
        with self._lock:
            self._data.clear()
            while self._policy.evict() is not None:
                pass
            self._used = 0

    # -- maintenance ----------------------------------------------------------------------------

    def drop_other_namespaces(self) -> int:
        """Remove the objects of every namespace but the current one; returns how many."""
        with self._lock:
            ns = self._namespace
            others = [e for e in self._data if e[0] != ns]
            for entry in others:
                self._remove(entry)
            return len(others)

    # -- internals (called with the lock held) --------------------------------------------------

    def _remove(self, entry: _Entry) -> None:
        data = self._data.pop(entry, None)
        if data is not None:
            self._used -= len(data)
            self._policy.remove(entry)

    def _make_room(self, size: int) -> None:
        """Evict in policy order until ``size`` more bytes fit."""
        while self._used + size > self._capacity:
            victim = self._policy.evict()
            if victim is None:  # nothing left to evict; the counter says otherwise: trust the dict
                self._used = sum(len(d) for d in self._data.values())
                break
            data = self._data.pop(cast(_Entry, victim), None)
            if data is not None:
                self._used -= len(data)
                self._stats.evictions += 1
