"""The tiers below the device pool, behind one protocol (``base.Tier``), opened by kind name.

``open_tier`` is the one place that knows which class serves which kind, so nothing above the cache
(the engine, the CLI, benchmarks) imports a tier class. Classes are imported when first opened:
redis-py and pymemcache cost a third of a second each to import, for engines that never use them.
"""

from __future__ import annotations

import importlib
from typing import Any

from kvtier.cache.tiers.base import Tier

# kind -> (module, class); the order is the hierarchy's, cheapest first
TIER_CLASSES = {
    "host": ("kvtier.cache.tiers.host", "HostTier"),
    "disk": ("kvtier.cache.tiers.disk", "DiskTier"),
    "redis": ("kvtier.cache.tiers.redis", "RedisTier"),
    "memcached": ("kvtier.cache.tiers.memcached", "MemcachedTier"),
}
TIER_KINDS = tuple(TIER_CLASSES)


def open_tier(kind: str, *args: Any, **options: Any) -> Tier:
    """``kind``'s tier, made with the class's own arguments (see each class)."""
    if kind not in TIER_CLASSES:
        raise ValueError(f"unknown tier {kind!r}; supported: {', '.join(TIER_KINDS)}")
    module, name = TIER_CLASSES[kind]
    tier: Tier = getattr(importlib.import_module(module), name)(*args, **options)
    return tier
