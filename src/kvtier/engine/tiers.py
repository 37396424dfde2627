"""Builds the tier hierarchy an engine uses from its settings (host, disk, Redis, memcached)."""

from __future__ import annotations

import logging
import time

import torch

from kvtier.cache.codec import header_length, secret_from_env
from kvtier.cache.codec.quantization import raw_length
from kvtier.cache.hierarchy import KVHierarchy
from kvtier.cache.keys import KVLayout, tier_namespace
from kvtier.cache.tiers import open_tier
from kvtier.cache.tiers.base import Tier
from kvtier.config import SHARED_TIERS, ConfigError, EngineConfig, TierSettings, parse_codec

log = logging.getLogger(__name__)

__all__ = ["build_hierarchy", "make_tier", "open_for_maintenance", "parse_codec"]

# Seeds for the recompute side of the cost model until real prefills are measured.
SEED_PREFILL_SECONDS_PER_TOKEN = {"cpu": 1e-3, "cuda": 2e-5}


def make_tier(
    name: str, settings: TierSettings, namespace: str, layout: KVLayout, *, pin_memory: bool = False
) -> Tier:
    """One tier from the settings; ``pin_memory`` page-locks the host tier's slab (on CUDA)."""
    if name == "host":
        capacity, policy = settings.host_capacity, settings.tier_policy
        return open_tier("host", layout, namespace, capacity, policy, pin_memory=pin_memory)
    if name == "disk":
        max_entries = settings.disk_max_entries or disk_max_entries(settings, namespace, layout)
        return open_tier(
            "disk",
            settings.resolved_disk_path(),
            namespace,
            settings.disk_capacity,
            settings.tier_policy,
            fsync=settings.disk_fsync,
            expected_entries=max(1, min(max_entries, settings.disk_capacity // layout.bytes_per_block)),
            max_entries=max_entries,
        )
    if name in ("redis", "memcached"):
        url, ttl, timeout = (getattr(settings, f"{name}_{part}") for part in ("url", "ttl", "timeout"))
        assert url  # TierSettings.enabled checked it
        return open_tier(name, url, namespace, ttl_seconds=ttl, timeout_seconds=timeout)
    raise ConfigError(f"unknown tier {name!r}")


# KV blocks compress by less than this (random-looking mantissas); a folder of better-compressing
# objects reaches the entry bound before its capacity, and evicts by it.
_COMPRESSION_ALLOWANCE = 4
_MIN_MAX_ENTRIES = 1024  # as DiskTier's own default (engine/ imports no tier module)


def disk_max_entries(settings: TierSettings, namespace: str, layout: KVLayout) -> int:
    """How many objects the disk index may hold: the capacity over the smallest object the disk
    codec makes (header + quantized payload, over the compression allowance), so that a folder of this
    model's blocks meets its capacity first (the namespace stands in for the header's fingerprint:
    a few bytes longer with a secret, which that object's HMAC outweighs)."""
    codec = parse_codec(settings.disk_codec)
    payload = raw_length(layout, codec.quantization)
    if codec.compression != "none":
        payload //= _COMPRESSION_ALLOWANCE
    smallest = header_length(namespace, layout, has_hmac=False) + max(1, payload)
    return max(_MIN_MAX_ENTRIES, settings.disk_capacity // smallest)


def build_hierarchy(
    config: EngineConfig, layout: KVLayout, fingerprint: str, device: torch.device
) -> KVHierarchy | None:
    settings = config.tiers
    names = settings.enabled(cuda=device.type == "cuda")
    if not names:
        return None
    secret = secret_from_env()
    for shared in (n for n in names if n in SHARED_TIERS):
        if secret is None:
            log.warning(
                "the %s tier is shared and KVTIER_CACHE_SECRET is not set: objects carry no HMAC, "
                "so anyone who can write to that server can feed this engine KV",
                shared,
            )
    cuda = device.type == "cuda"
    codec_text = {
        "disk": settings.disk_codec,
        "redis": settings.redis_codec,
        "memcached": settings.memcached_codec,
    }
    namespace = tier_namespace(fingerprint, secret)  # another secret: another namespace, never a fight
    tiers = [make_tier(n, settings, namespace, layout, pin_memory=cuda) for n in names]
    codecs = [parse_codec(codec_text[n]) if n in codec_text else None for n in names]
    hierarchy = KVHierarchy(
        tiers,
        codecs,
        layout,
        fingerprint,
        settings.write_policy,
        settings.selective_hits,
        secret,
        SEED_PREFILL_SECONDS_PER_TOKEN.get(device.type, 1e-3),
        device=device,
        step_tokens=config.scheduler.max_num_batched_tokens,
        always_load=settings.load_policy == "always",
        write_queue_bytes=settings.write_queue_bytes,
        load_at_once_s=settings.load_at_once_s,
        file_writer=settings.disk_write_process,
        direct_host_writes=settings.host_write_direct,
        device_loads=settings.device_loads,
        layered_loads=settings.layered_loads,
    )
    if "host" in names:
        hierarchy.seed_bandwidth(host_copy_bandwidth(device))
    return hierarchy


HOST_COPY_PROBE_BYTES = 64 << 20  # long enough to reach the copy's rate, ~1 ms on a GPU


def host_copy_bandwidth(device: torch.device, nbytes: int = HOST_COPY_PROBE_BYTES) -> float:
    """Bytes per second of a copy of ``nbytes`` from host memory to ``device`` (page-locked on CUDA,
    as the host tier's slab is), best of three: what a load from the host tier can reach."""
    cuda = device.type == "cuda"
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
    dst = torch.empty_like(src, device=device)
    best = float("inf")
    for _ in range(3):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        dst.copy_(src, non_blocking=cuda)
        if cuda:
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return nbytes / best


MAINTENANCE_NAMESPACE = "kvtier-maintenance"  # never written: maintenance works across namespaces
MAINTENANCE_REDIS_TIMEOUT_S = (
    2.0  # (memcached too) a command can wait longer than the engine's per-request timeout
)
_NO_CAPACITY_LIMIT = 1 << 62  # opening a disk tier must not trim what it finds to some capacity


def open_for_maintenance(name: str, settings: TierSettings) -> Tier:
    """A tier to inspect or clean (``kvtier cache``): no capacity to enforce, nothing written,
    nothing read until asked (``scan``, ``read_prefixes``, ``drop_namespaces``)."""
    if name == "disk":
        root = settings.resolved_disk_path()
        return open_tier(
            "disk", root, MAINTENANCE_NAMESPACE, _NO_CAPACITY_LIMIT, read_threads=0, create=False
        )
    if name == "redis":
        if not settings.redis_url:
            raise ConfigError("the redis tier needs a URL: --redis-url, KVTIER_REDIS_URL or redis_url")
        timeout = max(settings.redis_timeout, MAINTENANCE_REDIS_TIMEOUT_S)
        return open_tier(
            "redis",
            settings.redis_url,
            MAINTENANCE_NAMESPACE,
            timeout_seconds=timeout,
            connect_timeout_seconds=timeout,
        )
    if name == "memcached":
        if not settings.memcached_url:
            raise ConfigError(
                "the memcached tier needs a URL: --memcached-url, KVTIER_MEMCACHED_URL or memcached_url"
            )
        timeout = max(settings.memcached_timeout, MAINTENANCE_REDIS_TIMEOUT_S)
        return open_tier(
            "memcached",
            settings.memcached_url,
            MAINTENANCE_NAMESPACE,  # never registered: it only reads stats and bumps counters
            timeout_seconds=timeout,
            connect_timeout_seconds=timeout,
        )
    raise ConfigError(f"no maintenance for tier {name!r}; supported: disk, redis, memcached")
