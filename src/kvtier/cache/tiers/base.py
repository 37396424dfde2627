"""The Tier protocol: one contract for host memory, local disk, Redis (and memcached).

A tier stores opaque, self-describing objects (the bytes made by ``cache.codec``) under block keys.
It never interprets them on the ordinary path: verification is the hierarchy's job (``BlockIO``
decodes and checks header, checksum, HMAC), which then calls ``delete`` on anything that fails.
A tier never raises on a backend failure during ``lookup``/``get``/``put``/``delete``/``load_into``/
``put_block``: it reports a miss (or drops the write), counts the error in its stats, and lets the
engine recompute. Programming errors (wrong types) still raise.

The maintenance operations (what ``kvtier cache`` runs) see every namespace. ``scan`` and
``read_prefixes`` raise ``TierError`` on a backend failure: an empty listing must not pass for an
empty tier. ``drop_namespaces`` keeps the no-raise rule (an engine may call it) and counts failures in
``stats().errors``; ``cache.inventory.drop_namespaces`` turns them into a ``TierError`` for tools.

Tiers subclass ``Tier`` explicitly, so they inherit the plain defaults of ``load_into`` and
``put_block``; a tier with a faster road (the host tier's raw slots, the disk tier's reads into
place) overrides them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Protocol, runtime_checkable

import torch

from kvtier.cache.keys import BlockKey, check_namespace
from kvtier.cache.tiers.loading import BlockIO, load_objects


class PendingDeviceCopy(Protocol):
    """Blocks on their way from a tier to the GPU, queued on a stream (``start_load_to_device``)."""

    count: int  # blocks whose copy was queued (the leading held ones)

    def finish(self, io: BlockIO) -> int:
        """After the stream has passed the copy: release what it held, reject blocks that failed
        their check (``io.reject``); returns how many leading blocks arrived intact."""
        ...


class TierError(Exception):
    """A maintenance operation failed on the backend; the message names the tier and the cause."""


@dataclass(frozen=True)
class StoredObject:
    """One object as ``scan`` finds it: its namespace (model fingerprint), key and stored size."""

    namespace: str
    key: BlockKey
    size: int


@dataclass
class TierStats:
    """Counters every tier keeps; the metrics and ``kvtier cache stats`` read them."""

    lookups: int = 0  # keys asked about (lookup and get)
    hits: int = 0  # keys found by get
    misses: int = 0  # keys not found by get
    bytes_read: int = 0
    bytes_written: int = 0
    puts: int = 0
    evictions: int = 0
    errors: int = 0  # backend failures turned into misses
    corrupt: int = 0  # objects the hierarchy rejected and deleted (reported by record_corrupt)
    read_seconds: float = 0.0  # total wall time spent in get
    write_seconds: float = 0.0  # total wall time spent in put
    extra: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    @property
    def hit_rate(self) -> float:
        asked = self.hits + self.misses
        return self.hits / asked if asked else 0.0


class LiveStats:
    """``stats`` and ``record_corrupt`` for tiers that keep one live ``TierStats`` (``_stats``)
    guarded by their ``_lock``: the counters are read in place, never copied."""

    _stats: TierStats
    _lock: threading.Lock | threading.RLock

    def stats(self) -> TierStats:
        """The live counters (not a copy); callers only read them."""
        return self._stats

    def record_corrupt(self, count: int = 1) -> None:
        with self._lock:
            self._stats.corrupt += count


class CopiedStats(LiveStats):
    """``stats`` as a copy, for the network tiers: the counters (under ``_lock``), the tier's own
    ``_extra`` counters, and its circuit breakers' state (``_breaker_stats``, read outside the lock)."""

    _extra: dict[str, float]

    def _breaker_stats(self) -> dict[str, float]:
        raise NotImplementedError

    def stats(self) -> TierStats:
        with self._lock:
            snapshot = replace(self._stats, extra=dict(self._stats.extra))
            snapshot.extra.update(self._extra)
        snapshot.extra.update(self._breaker_stats())
        return snapshot


def check_server_options(
    namespace: str,
    ttl_seconds: int | None,
    max_ttl: int | None,
    timeouts: tuple[float, ...],
    capacity_bytes: int,
) -> None:
    """The arguments every tier on a server (Redis, memcached) takes, checked the same way."""
    check_namespace(namespace)
    if ttl_seconds is not None and not (ttl_seconds > 0 and (max_ttl is None or ttl_seconds <= max_ttl)):
        limit = "positive" if max_ttl is None else f"1..{max_ttl} seconds ({max_ttl / 86400:g} days)"
        raise ValueError(f"ttl_seconds must be {limit} or None, got {ttl_seconds}")
    if any(t <= 0 for t in timeouts):
        raise ValueError("timeout_seconds and connect_timeout_seconds must be positive")
    if capacity_bytes < 0:
        raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")


@runtime_checkable
class Tier(Protocol):
    """A store of encoded KV blocks below the device pool.

    Contract:
    - ``lookup(keys)`` returns how many *leading* keys are held (the longest consecutive run from
      ``keys[0]``); it is a hint, a later ``get`` may still miss (eviction, another process).
    - ``get(keys)`` returns one entry per key, ``None`` for a miss; it counts as an access for the
      eviction policy of tiers that have one.
    - ``put(items)`` stores ``(key, data)`` pairs, evicting by the tier's policy to stay within
      ``capacity_bytes``; an object larger than the capacity is dropped. Writing an existing key
      replaces it atomically: a reader sees the old or the new object, never a mix.
    - ``delete(keys)`` removes keys that exist and ignores the rest.
    - ``keys()`` lists every held key of the tier's namespace; may be slow.
    - ``load_into`` / ``put_block``: the hierarchy's roads in and out (defaults below).
    - ``scan`` / ``read_prefixes`` / ``drop_namespaces``: maintenance across every namespace.
    """

    name: str
    raw_blocks: bool = False  # True: keeps raw KV (no codec), wants integrity sums with each block

    @property
    def where(self) -> str:
        """Where the objects live, for people: a folder, a URL without its password."""
        ...

    @property
    def capacity_bytes(self) -> int: ...

    @property
    def used_bytes(self) -> int: ...

    def lookup(self, keys: Sequence[BlockKey]) -> int: ...

    def get(self, keys: Sequence[BlockKey]) -> list[bytes | None]: ...

    def put(self, items: Sequence[tuple[BlockKey, bytes]]) -> None: ...

    def delete(self, keys: Sequence[BlockKey]) -> None: ...

    def keys(self) -> list[BlockKey]: ...

    def __len__(self) -> int: ...

    def stats(self) -> TierStats:
        """The counters; may be a snapshot, so callers read it and never write to it."""
        ...

    def record_corrupt(self, count: int = 1) -> None:
        """The hierarchy rejected ``count`` objects read from this tier (and deleted them)."""
        ...

    def clear(self) -> None:
        """Remove every object of this tier's namespace."""
        ...

    def close(self) -> None: ...

    # -- the hierarchy's roads (plain defaults) ---------------------------------------------------

    def load_into(
        self, keys: Sequence[BlockKey], tokens: Sequence[Sequence[int]], out: torch.Tensor, io: BlockIO
    ) -> int:
        """Load the leading held blocks of ``keys`` (with these ``tokens``) into ``out[:n]``
        (``[len(keys), *block_shape]`` on any device), verified; returns n. A block that fails
        verification is handed to ``io.reject`` (counted, deleted) and ends the run.
        Default: ``get``, then ``io`` decodes into page-locked staging and one copy to ``out``."""
        return load_objects(self, keys, tokens, out, io)

    def holds(self, key: BlockKey) -> bool:
        """Whether this tier surely holds ``key`` already, known without I/O or waiting on a lock
        (the engine thread asks, before staging a write): the hierarchy then skips writing it
        again. May count as an access for the tier's eviction policy. Default: unknown, False."""
        return False

    def put_block(
        self,
        key: BlockKey,
        tokens: Sequence[int],
        kv: torch.Tensor,
        sums: torch.Tensor | None,
        encode: Callable[[], bytes],
    ) -> None:
        """Store one block: ``kv`` (CPU, ``block_shape``), its ``integrity_sums`` when the writer
        has them, and ``encode()``, its stored object in this tier's codec (made once, shared by
        the tiers with the same codec). Default: ``put`` the object."""
        self.put([(key, encode())])

    @property
    def takes_device_blocks(self) -> bool:
        """Whether ``store_from_device`` can take blocks straight from the GPU (the page-locked
        host tier); False (the default): blocks reach the tier through the write queue."""
        return False

    def store_from_device(
        self,
        keys: Sequence[BlockKey],
        tokens: Sequence[Sequence[int]],
        blocks: torch.Tensor,
        sums: torch.Tensor,
        stream: torch.cuda.Stream,
    ) -> int:
        """Keep blocks copied straight from the device on ``stream`` (``takes_device_blocks``)."""
        raise TypeError(f"the {self.name} tier takes no blocks from the device ({len(keys)} given)")

    @property
    def takes_layered_loads(self) -> bool:
        """Whether the tier can copy its blocks into the device pool layer by layer, under the
        model's compute (``HostTier.start_layered_loads``); False (the default): whole blocks."""
        return False

    def acquire(self, keys: Sequence[BlockKey], tokens: Sequence[Sequence[int]]) -> list[int]:
        """Slots of the leading held ``keys``, pinned against reuse until ``release`` (tiers that
        ``takes_layered_loads``)."""
        raise TypeError(f"the {self.name} tier has no slots to acquire ({len(keys)} asked)")

    def release(self, slots: Sequence[int]) -> None:
        """Let go of acquired slots."""
        raise TypeError(f"the {self.name} tier has no slots to release ({len(slots)} given)")

    def warm_layered_loads(self, pool: torch.Tensor) -> None:
        """Compile what ``start_layered_loads`` runs, before the first load needs it."""
        raise TypeError(f"the {self.name} tier has no layered loads to warm")

    def start_layered_loads(
        self,
        loads: Sequence[tuple[list[BlockKey], list[int], list[int]]],
        pool: torch.Tensor,
        layer_done: Sequence[torch.cuda.Event],
        started: torch.cuda.Event | None = None,
    ) -> Sequence[PendingDeviceCopy]:
        """Queue the layer-by-layer copies of acquired slots into the device pool (tiers that
        ``takes_layered_loads``; see ``HostTier.start_layered_loads``)."""
        raise TypeError(f"the {self.name} tier has no layered loads ({len(loads)} asked)")

    def start_load_to_device(
        self, keys: Sequence[BlockKey], tokens: Sequence[Sequence[int]], out: torch.Tensor
    ) -> PendingDeviceCopy | None:
        """``load_into`` queued on the current CUDA stream, nothing waited for: only tiers that
        ``takes_device_blocks`` (their memory is page-locked) have it. None: nothing held."""
        raise TypeError(f"the {self.name} tier has no loads queued on the device ({len(keys)} asked)")

    @property
    def file_target(self) -> tuple[str, str, bool] | None:
        """(folder, usage ledger, fsync) when this tier's objects are files that a writer in another
        process may put in place (``cache/file_writer.py``), for ``commit_written`` to index;
        None (the default): the tier's writes run in this process."""
        return None

    def commit_written(self, written: Sequence[tuple[BlockKey, int, float]]) -> None:
        """Index the objects another process put in place for this tier (``file_target``)."""
        raise TypeError(f"the {self.name} tier takes no files written elsewhere ({len(written)} given)")

    # -- maintenance, across every namespace ------------------------------------------------------

    def scan(self, namespace: str | None = None) -> list[StoredObject]:
        """Every stored object (of ``namespace`` only, when given); read-only. Raises ``TierError``."""
        ...

    def read_prefixes(self, objects: Sequence[StoredObject], nbytes: int) -> list[bytes | None]:
        """The first ``nbytes`` of each object (its header), None for one gone since the scan.
        Raises ``TierError``."""
        ...

    def drop_namespaces(self, keep: str | None) -> int:
        """Delete the objects of every namespace but ``keep`` (None: of every namespace, this
        tier's own included); returns how many. Only objects this kind of tier writes are removed,
        nothing else that shares the folder or the server. Never raises on a backend failure: it
        is counted in ``stats().errors`` and the count returned is of what was removed."""
        ...
