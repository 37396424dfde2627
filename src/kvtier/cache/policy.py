"""Eviction policies shared by the device block pool and the local tiers (host, disk).

Kept in one file (over 450 lines) because the six policies are one contract read side by side:
each class is short, and comparing them is how the file is read.

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

Sizing: ``capacity`` (entries) sizes the bounded history of the policies that keep one (lfu's
frequency history, s3fifo's queues and ghost, arc's target and ghost lists). When it is ``None``
the policy uses the largest number of candidates it has held so far, and at least
``MIN_CAPACITY``: in a tier the owner evicts once it is full, so that peak is the tier's capacity.
"""

from __future__ import annotations

import heapq
import random
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


MIN_CAPACITY = 16
"""Smallest size assumed by the sized policies when no capacity is given."""


class _Size:
    """The capacity a sized policy works with: the given one, or the peak number of candidates."""

    def __init__(self, capacity: int | None) -> None:
        if capacity is not None and capacity < 1:
            raise ValueError(f"policy capacity must be at least 1 entry, got {capacity}")
        self._fixed = capacity
        self._peak = 0

    def observe(self, candidates: int) -> None:
        if candidates > self._peak:
            self._peak = candidates

    @property
    def value(self) -> int:
        if self._fixed is not None:
            return self._fixed
        return max(MIN_CAPACITY, self._peak)


class FIFOPolicy(LRUPolicy):
    """First in, first out: candidates leave in insertion order; accesses change nothing.

    LRU's queue without its move-to-back on access. A key removed and inserted again joins at
    the back. All operations O(1).
    """

    def insert(self, key: Hashable) -> None:
        if key not in self._order:
            self._order[key] = None

    def access(self, key: Hashable) -> None:
        pass


class RandomPolicy:
    """Uniformly random victim from a seeded generator (reproducible for a seed).

    Candidates live in a list with a key -> index dict; removal swaps the last element into the
    hole, so insert, remove and evict are all O(1).
    """

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)
        self._keys: list[Hashable] = []
        self._index: dict[Hashable, int] = {}

    def insert(self, key: Hashable) -> None:
        if key not in self._index:
            self._index[key] = len(self._keys)
            self._keys.append(key)

    def access(self, key: Hashable) -> None:
        pass

    def _take(self, i: int) -> Hashable:
        key = self._keys[i]
        last = self._keys.pop()
        if i < len(self._keys):
            self._keys[i] = last
            self._index[last] = i
        del self._index[key]
        return key

    def remove(self, key: Hashable) -> None:
        i = self._index.get(key)
        if i is not None:
            self._take(i)

    def evict(self) -> Hashable | None:
        if not self._keys:
            return None
        return self._take(self._rng.randrange(len(self._keys)))

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._index


class LFUPolicy:
    """Least frequently used; among equal counts the least recently referenced goes first.

    A key's count is its number of references: insert of a new key is 1, each access (or
    insert of a present key) adds 1. Counts of *removed* keys are kept in a bounded history
    (``capacity`` entries, oldest forgotten first), so a key pinned and released again resumes
    its count + 1; an access to a non-candidate (a pinned block hit again) also counts there.
    Evicted keys are forgotten: LFU with in-cache counts, so old popularity does not pin a tier.

    Structure: one insertion-ordered bucket per count (order = recency within the count) and a
    min-heap of the counts that have buckets, cleaned lazily. Access, remove and history are
    O(1); a reference that lands on a count no candidate has yet pushes it on the heap,
    O(log D) with D the distinct counts (small in practice); evict is amortised O(1) + that.
    """

    def __init__(self, capacity: int | None = None) -> None:
        self._size = _Size(capacity)
        self._count: dict[Hashable, int] = {}
        self._buckets: dict[int, OrderedDict[Hashable, None]] = {}
        self._heap: list[int] = []
        self._in_heap: set[int] = set()
        self._history: OrderedDict[Hashable, int] = OrderedDict()

    def _place(self, key: Hashable, count: int) -> None:
        bucket = self._buckets.get(count)
        if bucket is None:
            bucket = self._buckets[count] = OrderedDict()
            if count not in self._in_heap:
                self._push(count)
        bucket[key] = None
        self._count[key] = count

    def _push(self, count: int) -> None:
        # Stale heap entries (counts whose bucket emptied) are dropped lazily by evict; rebuild
        # when they outnumber the live ones, so the heap stays O(D) (amortised over the pushes).
        if len(self._heap) > 2 * len(self._buckets) + 8:
            self._heap = list(self._buckets)
            heapq.heapify(self._heap)
            self._in_heap = set(self._heap)
            if count in self._in_heap:
                return
        heapq.heappush(self._heap, count)
        self._in_heap.add(count)

    def _unlink(self, key: Hashable) -> int:
        count = self._count.pop(key)
        bucket = self._buckets[count]
        del bucket[key]
        if not bucket:
            del self._buckets[count]
        return count

    def _remember(self, key: Hashable, count: int) -> None:
        self._history[key] = count
        self._history.move_to_end(key)
        limit = self._size.value
        while len(self._history) > limit:
            self._history.popitem(last=False)

    def insert(self, key: Hashable) -> None:
        if key in self._count:
            self.access(key)
            return
        self._place(key, self._history.pop(key, 0) + 1)
        self._size.observe(len(self._count))

    def access(self, key: Hashable) -> None:
        if key in self._count:
            self._place(key, self._unlink(key) + 1)
        else:
            self._remember(key, self._history.get(key, 0) + 1)

    def remove(self, key: Hashable) -> None:
        if key in self._count:
            self._remember(key, self._unlink(key))

    def evict(self) -> Hashable | None:
        while self._heap:
            count = self._heap[0]
            bucket = self._buckets.get(count)
            if bucket:
                key, _ = bucket.popitem(last=False)
                if not bucket:
                    del self._buckets[count]
                del self._count[key]
                return key
            heapq.heappop(self._heap)
            self._in_heap.discard(count)
        return None

    def __len__(self) -> int:
        return len(self._count)

    def __contains__(self, key: object) -> bool:
        return key in self._count


class S3FIFOPolicy:
    """S3-FIFO (Yang et al., SOSP'23): three FIFO queues, no reordering on hits.

    New keys enter the small queue S (~10% of capacity); keys in the ghost queue G (keys only,
    sized like the main queue, ~90%) enter the main queue M instead. Each candidate has a 2-bit
    frequency (0..3), bumped by accesses. Eviction takes from S while S holds at least its
    share (or M is empty): S's head moves to M with its bits cleared if it was accessed at least
    ``move_threshold`` times (2, as in the reference implementation), otherwise it is the victim
    and its key goes to G - one-hit wonders leave through S without disturbing M. Otherwise M's
    head is reinserted with frequency - 1 while non-zero (2-bit CLOCK), or is the victim.

    ``remove`` puts the key in G, so a pinned-then-released key (remove + insert) returns to M
    as a re-reference. Accesses to non-candidates are ignored. All operations O(1); evict is
    amortised O(1) (each key moves S -> M once per insert, each M reinsertion spends a bit
    that an access paid for).
    """

    SMALL_RATIO = 0.1
    MAX_FREQ = 3

    def __init__(self, capacity: int | None = None, move_threshold: int = 2) -> None:
        self._size = _Size(capacity)
        self._move_threshold = move_threshold
        self._small: OrderedDict[Hashable, None] = OrderedDict()
        self._main: OrderedDict[Hashable, None] = OrderedDict()
        self._ghost: OrderedDict[Hashable, None] = OrderedDict()
        self._freq: dict[Hashable, int] = {}

    def _small_target(self) -> int:
        return max(1, int(self._size.value * self.SMALL_RATIO))

    def _to_ghost(self, key: Hashable) -> None:
        self._ghost[key] = None
        self._ghost.move_to_end(key)
        limit = max(1, self._size.value - self._small_target())
        while len(self._ghost) > limit:
            self._ghost.popitem(last=False)

    def insert(self, key: Hashable) -> None:
        if key in self._freq:
            self.access(key)
            return
        if key in self._ghost:
            del self._ghost[key]
            self._main[key] = None
        else:
            self._small[key] = None
        self._freq[key] = 0
        self._size.observe(len(self._freq))

    def access(self, key: Hashable) -> None:
        freq = self._freq.get(key)
        if freq is not None and freq < self.MAX_FREQ:
            self._freq[key] = freq + 1

    def remove(self, key: Hashable) -> None:
        if self._freq.pop(key, None) is None:
            return
        if key in self._small:
            del self._small[key]
        else:
            del self._main[key]
        self._to_ghost(key)

    def evict(self) -> Hashable | None:
        if not self._freq:
            return None
        if self._small and (len(self._small) >= self._small_target() or not self._main):
            while self._small:
                key, _ = self._small.popitem(last=False)
                if self._freq[key] >= self._move_threshold:
                    self._main[key] = None
                    self._freq[key] = 0
                else:
                    del self._freq[key]
                    self._to_ghost(key)
                    return key
        while True:  # M is non-empty here: there are candidates and S is empty or not chosen
            key, _ = self._main.popitem(last=False)
            freq = self._freq[key]
            if freq == 0:
                del self._freq[key]
                return key
            self._freq[key] = freq - 1
            self._main[key] = None

    def __len__(self) -> int:
        return len(self._freq)

    def __contains__(self, key: object) -> bool:
        return key in self._freq


class ARCPolicy:
    """ARC (Megiddo & Modha, FAST'03): balances recency and frequency with an adaptive target.

    T1 holds candidates referenced once, T2 those referenced at least twice (both LRU order);
    the ghost lists B1, B2 remember keys evicted from T1, T2. Inserting a key found in B1 means
    T1 was too small: the target p for |T1| grows by max(1, |B2|/|B1|); found in B2, p shrinks
    by max(1, |B1|/|B2|); either way the key enters T2. Eviction takes T1's LRU into B1 when
    |T1| > p (or = p after a B2 hit), else T2's LRU into B2. Ghosts are trimmed to
    |T1|+|B1| <= c and |T1|+|T2|+|B1|+|B2| <= 2c, c the capacity.

    The owner, not the policy, decides when to evict, so REPLACE runs in ``evict``. A removed
    (pinned) key is kept in a separate bounded list (c keys): when inserted again it is a
    re-reference and enters T2, without adapting p (it was not a bad eviction). Accesses to
    non-candidates are ignored. All operations O(1) amortised.
    """

    def __init__(self, capacity: int | None = None) -> None:
        self._size = _Size(capacity)
        self._t1: OrderedDict[Hashable, None] = OrderedDict()
        self._t2: OrderedDict[Hashable, None] = OrderedDict()
        self._b1: OrderedDict[Hashable, None] = OrderedDict()
        self._b2: OrderedDict[Hashable, None] = OrderedDict()
        self._removed: OrderedDict[Hashable, None] = OrderedDict()
        self._p = 0.0
        self._last_hit_b2 = False

    @property
    def target_t1(self) -> float:
        """The adaptive target size p of T1 (exposed for tests and metrics)."""
        return self._p

    def insert(self, key: Hashable) -> None:
        if key in self._t1 or key in self._t2:
            self.access(key)
            return
        c = self._size.value
        self._last_hit_b2 = False
        if key in self._b1:
            self._p = min(float(c), self._p + max(1.0, len(self._b2) / len(self._b1)))
            del self._b1[key]
            self._t2[key] = None
        elif key in self._b2:
            self._p = max(0.0, self._p - max(1.0, len(self._b1) / len(self._b2)))
            del self._b2[key]
            self._t2[key] = None
            self._last_hit_b2 = True
        elif key in self._removed:
            del self._removed[key]
            self._t2[key] = None
        else:
            self._t1[key] = None
        self._size.observe(len(self))
        self._trim_ghosts()

    def access(self, key: Hashable) -> None:
        if key in self._t1:
            del self._t1[key]
            self._t2[key] = None
        elif key in self._t2:
            self._t2.move_to_end(key)

    def remove(self, key: Hashable) -> None:
        if key in self._t1:
            del self._t1[key]
        elif key in self._t2:
            del self._t2[key]
        else:
            return
        self._removed[key] = None
        while len(self._removed) > self._size.value:
            self._removed.popitem(last=False)

    def evict(self) -> Hashable | None:
        t1 = len(self._t1)
        if t1 and (not self._t2 or t1 > self._p or (self._last_hit_b2 and t1 == self._p)):
            key, _ = self._t1.popitem(last=False)
            self._b1[key] = None
        elif self._t2:
            key, _ = self._t2.popitem(last=False)
            self._b2[key] = None
        else:
            return None
        self._trim_ghosts()
        return key

    def _trim_ghosts(self) -> None:
        c = self._size.value
        if self._p > c:  # c is fixed or grows, but keep p in range for a given capacity too
            self._p = float(c)
        while self._b1 and len(self._t1) + len(self._b1) > c:
            self._b1.popitem(last=False)
        while len(self) + len(self._b1) + len(self._b2) > 2 * c and (self._b2 or self._b1):
            (self._b2 or self._b1).popitem(last=False)

    def __len__(self) -> int:
        return len(self._t1) + len(self._t2)

    def __contains__(self, key: object) -> bool:
        return key in self._t1 or key in self._t2


def make_policy(name: str, capacity: int | None = None, seed: int = 0) -> EvictionPolicy:
    """Build a policy by name. ``capacity`` (in entries) sizes ghost lists and queues of the
    adaptive policies (s3fifo, arc) and lfu's frequency history; ``None`` lets them size
    themselves by the peak number of candidates (see the module docstring). ``seed`` makes
    ``random`` reproducible."""
    if capacity is not None and capacity < 1:
        raise ValueError(f"policy capacity must be at least 1 entry, got {capacity}")
    if name == "lru":
        return LRUPolicy()
    if name == "lfu":
        return LFUPolicy(capacity)
    if name == "fifo":
        return FIFOPolicy()
    if name == "random":
        return RandomPolicy(seed)
    if name == "s3fifo":
        return S3FIFOPolicy(capacity)
    if name == "arc":
        return ARCPolicy(capacity)
    raise ValueError(f"unknown eviction policy {name!r}; supported: {', '.join(POLICIES)}")
