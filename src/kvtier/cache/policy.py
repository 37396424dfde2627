"""Eviction policies shared by the device block pool and the local tiers (host, disk).

Contract (``EvictionPolicy``): the policy tracks a set of *candidates*: keys that are resident and
may be evicted. The owner calls
- ``insert(key)`` when a key becomes resident and evictable (stored in a tier, or a device block
  released with ref count zero); inserting a present key counts as an access;
- ``access(key)`` on a hit of a resident key (present or not as a candidate: a pinned device block
  that is hit again calls it before ``remove``) - recency and frequency policies learn from it;
- ``remove(key)`` when a key stops being a candidate (deleted, or pinned by a running request).
  A policy may keep bounded history (frequency counts, ghost lists) of removed keys, so that a
  later ``insert`` of the same key is treated as a re-reference;
- ``evict()`` to choose a victim: it is removed from the candidates and returned; ``None`` when
  there is no candidate.
Policies never touch the data; they only order keys. Keys are any hashable values.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Protocol

POLICIES = ("lru", "lfu", "fifo", "random", "s3fifo", "arc")


class EvictionPolicy(Protocol):
    def insert(self, key: Hashable) -> None: ...

    def access(self, key: Hashable) -> None: ...

    def remove(self, key: Hashable) -> None: ...

    def evict(self) -> Hashable | None: ...

    def __len__(self) -> int: ...

    def __contains__(self, key: object) -> bool: ...


class LRUPolicy:
    """Least recently used: the candidate inserted or accessed longest ago goes first."""

    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def insert(self, key: Hashable) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def access(self, key: Hashable) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: Hashable) -> None:
        self._order.pop(key, None)

    def evict(self) -> Hashable | None:
        if not self._order:
            return None
        key, _ = self._order.popitem(last=False)
        return key

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: object) -> bool:
        return key in self._order


def make_policy(name: str, capacity: int | None = None, seed: int = 0) -> EvictionPolicy:
    """Build a policy by name. ``capacity`` (in entries) sizes ghost lists and queues of the
    adaptive policies (s3fifo, arc); ``seed`` makes ``random`` reproducible."""
    if name == "lru":
        return LRUPolicy()
    raise ValueError(f"unknown eviction policy {name!r}; supported: {', '.join(POLICIES)}")
