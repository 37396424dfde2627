"""MemoryTier: encoded objects as ``bytes`` in this process's memory, bounded by bytes and a policy.

The result and embedding caches keep small self-describing objects (a few hundred bytes to a few
KiB); the host tier's fixed-size KV slots do not fit them. This tier is the plain version of the
same contract: a dict of ``bytes`` under block-sized keys, eviction by any ``cache.policy`` policy
to stay within ``capacity_bytes``. Thread-safe (one lock); it never raises on a miss.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from kvtier.cache.keys import BlockKey
from kvtier.cache.tiers.base import LiveStats, StoredObject, Tier, TierStats
from kvtier.cache.tiers.host import check_key
from kvtier.cache.tiers.sized_index import SizedIndex


class MemoryTier(LiveStats, Tier):
    name = "memory"

    def __init__(self, capacity_bytes: int, policy: str = "lru", seed: int = 0) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self._capacity = int(capacity_bytes)
        self._index = SizedIndex(policy, None, seed)
        self._data: dict[BlockKey, bytes] = {}
        self._lock = threading.Lock()
        self._stats = TierStats()
        self._stats.extra["dropped"] = 0.0

    @property
    def where(self) -> str:
        return "process memory"

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def used_bytes(self) -> int:
        return self._index.used

    def lookup(self, keys: Sequence[BlockKey]) -> int:
        with self._lock:
            self._stats.lookups += len(keys)
            n = 0
            while n < len(keys) and check_key(keys[n]) in self._data:
                n += 1
            return n

    def get(self, keys: Sequence[BlockKey]) -> list[bytes | None]:
        t0 = time.perf_counter()
        out: list[bytes | None] = []
        with self._lock:
            for key in keys:
                data = self._data.get(check_key(key))
                out.append(data)
                if data is None:
                    self._stats.misses += 1
                    continue
                self._stats.hits += 1
                self._stats.bytes_read += len(data)
                self._index.policy.access(key)
            self._stats.lookups += len(keys)
            self._stats.read_seconds += time.perf_counter() - t0
        return out

    def put(self, items: Sequence[tuple[BlockKey, bytes]]) -> None:
        with self._lock:
            for key, data in items:
                data = bytes(data)
                self._stats.puts += 1
                self._remove(check_key(key))
                if len(data) > self._capacity:
                    self._stats.extra["dropped"] += 1
                    continue
                while self._index.used + len(data) > self._capacity:
                    victim = self._index.evict()
                    if victim is None:
                        break
                    del self._data[victim[0]]
                    self._stats.evictions += 1
                self._data[key] = data
                self._index.add(key, len(data))
                self._stats.bytes_written += len(data)

    def delete(self, keys: Sequence[BlockKey]) -> None:
        with self._lock:
            for key in keys:
                self._remove(check_key(key))

    def keys(self) -> list[BlockKey]:
        with self._lock:
            return list(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._index.clear()

    def close(self) -> None:
        pass

    # one process's memory holds one namespace: the store that owns the tier
    def scan(self, namespace: str | None = None) -> list[StoredObject]:
        with self._lock:
            return [StoredObject(namespace or "", k, len(v)) for k, v in self._data.items()]

    def read_prefixes(self, objects: Sequence[StoredObject], nbytes: int) -> list[bytes | None]:
        with self._lock:
            return [None if (d := self._data.get(o.key)) is None else d[:nbytes] for o in objects]

    def drop_namespaces(self, keep: str | None) -> int:
        if keep is not None:
            return 0
        n = len(self._data)
        self.clear()
        return n

    def _remove(self, key: BlockKey) -> None:
        self._data.pop(key, None)
        self._index.remove(key)
