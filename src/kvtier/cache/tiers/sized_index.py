"""SizedIndex: the bookkeeping of a tier bounded by bytes (disk, memory)."""

from __future__ import annotations

from typing import cast

from kvtier.cache.keys import BlockKey
from kvtier.cache.policy import make_policy


class SizedIndex:
    """The keys a tier holds, the bytes of each and their total, in an eviction policy's order.

    The policy and the sizes always hold the same keys. Not thread-safe on its own: the tier's
    lock guards it. ``sizes`` and ``used`` are read in place by the tiers' hot loops.
    """

    def __init__(self, policy: str, expected_entries: int | None = None, seed: int = 0) -> None:
        self._spec = (policy, expected_entries, seed)
        self.sizes: dict[BlockKey, int] = {}
        self.used = 0
        self.policy = make_policy(policy, expected_entries, seed)

    def __contains__(self, key: object) -> bool:
        return key in self.sizes

    def __len__(self) -> int:
        return len(self.sizes)

    def keys(self) -> list[BlockKey]:
        return list(self.sizes)

    def add(self, key: BlockKey, size: int) -> None:
        """Index a key it does not hold."""
        self.sizes[key] = size
        self.used += size
        self.policy.insert(key)

    def touch(self, key: BlockKey, size: int) -> None:
        """A hit on a held key, whose object now has ``size`` bytes (another process may have
        replaced it)."""
        self.used += size - self.sizes[key]
        self.sizes[key] = size
        self.policy.access(key)

    def remove(self, key: BlockKey) -> int | None:
        """Forget a key; its size, or None when it was not held."""
        size = self.sizes.pop(key, None)
        if size is not None:
            self.used -= size
            self.policy.remove(key)
        return size

    def evict(self) -> tuple[BlockKey, int | None] | None:
        """The policy's next victim, forgotten, with its size; None when the policy has none."""
        victim = self.policy.evict()
        if victim is None:
            return None
        key = cast(BlockKey, victim)  # the policy only ever sees keys added here
        size = self.sizes.pop(key, None)
        if size is not None:
            self.used -= size
        return key, size

    def clear(self) -> None:
        self.sizes.clear()
        self.used = 0
        self.policy = make_policy(*self._spec)
