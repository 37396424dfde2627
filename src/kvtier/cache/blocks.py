"""The device block pool: allocation, ref counts, key -> block, and the evictable set.

Only bookkeeping lives here; the KV tensor itself belongs to the runner. A block is in exactly one
of three states:
- *free*: no key, ref count 0, in the free queue;
- *in use*: ref count > 0 (a running request holds it); it may carry a key when full;
- *evictable*: ref count 0 but it keeps its key and contents, so a later prompt can hit it; the
  eviction policy orders these, and allocation takes free blocks first, then evicts.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvtier.cache.keys import BlockKey
from kvtier.cache.policy import make_policy


class NoFreeBlocksError(RuntimeError):
    pass


@dataclass
class CachedBlock:
    key: BlockKey
    tokens: tuple[int, ...]  # compared on every hit: a digest collision can never serve wrong KV


# Called with (block_id, key, tokens) just before an evictable block is reused for other data:
# the hierarchy copies it down the tiers (write-back) from here.
EvictCallback = Callable[[int, BlockKey, tuple[int, ...]], None]


class BlockPool:
    def __init__(
        self, num_blocks: int, block_size: int, policy: str = "lru", enable_caching: bool = True
    ) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least 1 block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable = make_policy(policy, capacity=num_blocks)
        self._by_key: dict[BlockKey, int] = {}
        self._cached: dict[int, CachedBlock] = {}
        self.on_evict: EvictCallback | None = None
        self.evictions = 0

    # -- queries -------------------------------------------------------------------------------
    @property
    def num_available(self) -> int:
        """Blocks an allocation can get now: free plus evictable."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def key_of(self, block_id: int) -> BlockKey | None:
        cached = self._cached.get(block_id)
        return cached.key if cached else None

    def cached(self, block_id: int) -> CachedBlock | None:
        return self._cached.get(block_id)

    def match_prefix(self, keys: Sequence[BlockKey], block_tokens: Sequence[Sequence[int]]) -> list[int]:
        """Block ids of the longest run of ``keys`` held here (not pinned: call ``pin``)."""
        if not self.enable_caching:
            return []
        hits: list[int] = []
        for key, tokens in zip(keys, block_tokens, strict=False):
            block = self._by_key.get(key)
            if block is None or self._cached[block].tokens != tuple(tokens):
                break
            hits.append(block)
        return hits

    # -- ref counting --------------------------------------------------------------------------
    def pin(self, blocks: Sequence[int]) -> None:
        for b in blocks:
            if self.ref_counts[b] == 0:
                cached = self._cached.get(b)
                if cached is None:
                    raise RuntimeError(f"pin of block {b}, which is neither cached nor in use")
                self._evictable.access(b)
                self._evictable.remove(b)
            self.ref_counts[b] += 1

    def allocate(self, n: int) -> list[int]:
        """n blocks with ref count 1: free ones first, then the policy's victims. All or nothing."""
        if n > self.num_available:
            raise NoFreeBlocksError(f"need {n} KV blocks, {self.num_available} available")
        out: list[int] = []
        for _ in range(n):
            block = self._free.popleft() if self._free else self._evict_one()
            self.ref_counts[block] = 1
            out.append(block)
        return out

    def _evict_one(self) -> int:
        block = self._evictable.evict()
        if block is None:  # cannot happen while num_available counted it
            raise NoFreeBlocksError("no evictable block")
        assert isinstance(block, int)
        cached = self._cached.pop(block)
        del self._by_key[cached.key]
        self.evictions += 1
        if self.on_evict is not None:
            self.on_evict(block, cached.key, cached.tokens)
        return block

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference from each block; at zero a keyed block becomes evictable, others free.

        Blocks are released last-first so that, under LRU, a request's tail is evicted before its
        head: the head is the part other prompts share.
        """
        for b in reversed(blocks):
            if self.ref_counts[b] <= 0:
                raise RuntimeError(f"release of block {b} with ref count {self.ref_counts[b]}")
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                if b in self._cached:
                    self._evictable.insert(b)
                else:
                    self._free.append(b)

    # -- caching ------------------------------------------------------------------------------
    def commit(self, block_id: int, key: BlockKey, tokens: Sequence[int]) -> bool:
        """Give a full, computed, in-use block its key; True when it became shareable. A key already
        held elsewhere stays with the first block (this one then stays private and is freed, not
        cached, at release)."""
        if not self.enable_caching or key in self._by_key or block_id in self._cached:
            return False
        self._by_key[key] = block_id
        self._cached[block_id] = CachedBlock(key, tuple(tokens))
        return True

    def cached_blocks(self) -> list[tuple[int, CachedBlock]]:
        return list(self._cached.items())

    def contains(self, key: BlockKey) -> bool:
        return key in self._by_key

    def evict_all(self) -> int:
        """Evict every evictable block the way allocation pressure would, through ``on_evict`` (so
        write-back tiers receive them); the blocks become free. Returns how many."""
        dropped = 0
        while len(self._evictable):
            self._free.append(self._evict_one())
            dropped += 1
        return dropped

    def reset_cache(self) -> int:
        """Forget every evictable block's key (they become free). Returns how many."""
        dropped = 0
        while (block := self._evictable.evict()) is not None:
            assert isinstance(block, int)
            cached = self._cached.pop(block)
            del self._by_key[cached.key]
            self._free.append(block)
            dropped += 1
        return dropped

    def check_invariants(self) -> None:
        """Every block is exactly one of free / in use / evictable, and the maps agree."""
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError("a block is in the free queue twice")
        for b in range(self.num_blocks):
            states = [b in free, self.ref_counts[b] > 0, b in self._evictable]
            if sum(states) != 1:
                raise AssertionError(f"block {b} states free/in-use/evictable = {states}")
            if b in self._evictable and b not in self._cached:
                raise AssertionError(f"evictable block {b} has no key")
            if b in free and b in self._cached:
                raise AssertionError(f"free block {b} still has a key")
        for key, b in self._by_key.items():
            if self._cached[b].key != key:
                raise AssertionError(f"key map disagrees for block {b}")

    def assert_idle(self) -> None:
        """After all requests finished: every ref count is zero."""
        self.check_invariants()
        busy = [b for b, r in enumerate(self.ref_counts) if r]
        if busy:
            raise AssertionError(f"blocks still referenced after all requests finished: {busy[:10]}")
