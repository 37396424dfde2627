"""The memcached tier: KV blocks shared by every kvtier instance that can reach the same memcached servers.

URL: ``memcached://host[:port][,host[:port]...]`` (port 11211 by default). Objects are spread over the
servers by pymemcache's ``HashClient`` ring (rendezvous hashing: adding or losing a server moves only
that server's share). The ring is fixed: a dead server's objects are misses until it is back, they
are not re-mapped onto the others (``HashClient``'s own failover silently drops a failing server's
calls for its retry period and then moves its keys, and with them a namespace's generation). So each
server has its own pooled (thread-safe) client and its own ``CircuitBreaker``, the Redis tier's: after
``breaker_failures`` failures in a row the server is skipped, without I/O, for a backoff that doubles
up to ``breaker_max_backoff_seconds``, then probed. A server that answers with an error ("object too
large") is alive: counted, it does not trip the breaker. A connection found dead (the server restarted)
is no failure: the pool's idle connections, all from before the restart, are closed and the call is
retried once on a new one (a server back up used to fail one call per pooled connection, enough to trip
its breaker). Every batch is one round trip per server.

Object sizes: memcached refuses items above its item size (``-I``, 1 MiB by default), and a KV block of
an 8B model is 2 MiB in bf16. The limit is read from the servers (``stats settings``: the smallest
item_size_max of the ring) and a larger object is split into chunks behind a small manifest (format in
``memcached_wire``). A reader that finds a head without all its chunks of the same write and length (a
chunk evicted, a writer replacing the object meanwhile) gets a miss, counted in
``extra["partial_objects"]``, and the broken head is deleted: never a mixed or short object. ``get``
fetches the heads and as many chunks as the last object seen had; more chunks cost a second batch.

Namespaces without SCAN: a name carries the namespace (model fingerprint) and ``<epoch>.<generation>``,
two counters stored on the ring, read at most once a second (a clear elsewhere is seen within that).
``clear()`` bumps this namespace's generation, ``drop_namespaces(keep)`` those of the other namespaces
in the registry (``keep`` None: the epoch): old objects become unreachable at once and memcached's LRU
(or the TTL) reclaims their memory. An evicted counter is re-seeded from the clock: its namespace's old
objects are missed, never confused with new ones.

Failures never reach the caller (see ``base.Tier``); ``capacity_bytes`` only drops larger objects (the
servers' ``-m`` bounds the space); ``used_bytes`` is the servers' ``bytes`` stat, cached for a second.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any, TypeVar

from pymemcache.client.base import PooledClient
from pymemcache.client.hash import HashClient
from pymemcache.exceptions import (
    MemcacheClientError,
    MemcacheError,
    MemcacheIllegalInputError,
    MemcacheServerError,
    MemcacheUnexpectedCloseError,
    MemcacheUnknownError,
)

from kvtier.cache.keys import BlockKey, check_key, valid_namespace
from kvtier.cache.tiers import memcached_wire as wire
from kvtier.cache.tiers.base import (
    CopiedStats,
    StoredObject,
    Tier,
    TierError,
    TierStats,
    check_server_options,
)
from kvtier.cache.tiers.breaker import MAX_BACKOFF_S, CircuitBreaker
from kvtier.cache.tiers.memcached_wire import parse_url

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_TTL_SECONDS = 30 * 24 * 3600  # memcached reads a larger expiry as an absolute Unix time
_ITEM_ROOM = 256  # of each item: memcached's own ~60 bytes and our name (< 130), not for data
_GENERATION_TTL_S = 1.0
_STATS_TTL_S = 1.0
_ALIVE_ERRORS = (MemcacheServerError, MemcacheClientError, MemcacheUnknownError)
_DOWN_ERRORS = (OSError, TimeoutError, MemcacheError)

__all__ = ["MAX_TTL_SECONDS", "MemcachedTier", "parse_url"]


@dataclasses.dataclass(eq=False)
class _Server:
    address: str
    client: PooledClient
    breaker: CircuitBreaker


class MemcachedTier(CopiedStats, Tier):
    """Blocks on one or more memcached servers, behind the ``Tier`` protocol; safe to share by threads."""

    name = "memcached"
    lists_objects = False  # scan / read_prefixes raise TierError: memcached cannot list keys

    def __init__(
        self,
        url: str,
        namespace: str,
        ttl_seconds: int | None = None,
        timeout_seconds: float = 0.5,
        connect_timeout_seconds: float = 0.5,
        breaker_failures: int = 3,
        breaker_backoff_seconds: float = 0.5,
        breaker_max_backoff_seconds: float = MAX_BACKOFF_S,
        capacity_bytes: int = 0,
    ) -> None:
        timeouts = (timeout_seconds, connect_timeout_seconds)
        check_server_options(namespace, ttl_seconds, MAX_TTL_SECONDS, timeouts, capacity_bytes)
        self.url = url
        self.namespace = namespace
        self.ttl_seconds = ttl_seconds
        self._expire = ttl_seconds or 0
        self._capacity = capacity_bytes
        self._ns_id = wire.namespace_id(namespace)
        self._ring = HashClient(  # its ring and per-server pooled clients; no I/O until the first call
            parse_url(url),
            hasher=wire.RingHash,
            use_pooling=True,
            timeout=timeout_seconds,
            connect_timeout=connect_timeout_seconds,
            default_noreply=False,
            no_delay=True,
        )
        breakers = (breaker_failures, breaker_backoff_seconds, breaker_max_backoff_seconds)
        self._servers = {
            node: _Server(node, client, CircuitBreaker(*breakers))
            for node, client in self._ring.clients.items()
        }
        self._stats = TierStats()
        self._lock = threading.Lock()
        self._extra = {"response_errors": 0.0, "dropped_too_large": 0.0, "partial_objects": 0.0}
        self._generation: tuple[bytes, float] | None = None  # (b"<epoch>.<gen>", monotonic time read)
        self._registered = False
        self._chunk_guess = 1  # chunks per object, from the last one read or written
        self._item_limit = 0  # the ring's smallest item_size_max; 0 until read
        self._server_stats: tuple[dict[str, dict[str, Any]], float] = ({}, -_STATS_TTL_S)

    # ------------------------------------------------------------------ Tier protocol

    @property
    def where(self) -> str:
        return self.url  # memcached URLs carry no credentials

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def used_bytes(self) -> int:
        return sum(int(s.get("bytes", 0)) for s in self.server_stats().values())

    def lookup(self, keys: Sequence[BlockKey]) -> int:
        """Leading keys whose head is on its server (meta ``mg``: no value crosses the network)."""
        heads = self._head_names(keys)
        with self._lock:
            self._stats.lookups += len(keys)
        found = self._batched(heads, wire.probe)
        held = 0
        while held < len(heads) and heads[held] in found:
            held += 1
        return held

    def get(self, keys: Sequence[BlockKey]) -> list[bytes | None]:
        start = time.perf_counter()
        heads = self._head_names(keys)
        values: list[bytes | None] = [None] * len(keys)
        if heads:  # else no keys, or the generation is unknown (its server down): all misses
            guess = self._chunk_guess
            items = self._batched(self._with_chunks(heads, guess), wire.get_many)
            counts = [wire.chunk_count(items.get(h)) for h in heads]
            more = [
                wire.chunk_name(h, i) for h, n in zip(heads, counts, strict=True) for i in range(guess, n)
            ]
            if more:
                items.update(self._batched(more, wire.get_many))
            if any(counts):
                self._chunk_guess = max(counts)
            values = [wire.assemble(h, items) for h in heads]
            self._drop_partial([h for h, v in zip(heads, values, strict=True) if v is None and h in items])
        hits = sum(v is not None for v in values)
        with self._lock:
            s = self._stats
            s.lookups += len(keys)
            s.hits += hits
            s.misses += len(keys) - hits
            s.bytes_read += sum(len(v) for v in values if v is not None)
            s.read_seconds += time.perf_counter() - start
        return values

    def put(self, items: Sequence[tuple[BlockKey, bytes]]) -> None:
        for _, data in items:
            if not isinstance(data, bytes | bytearray | memoryview):
                raise TypeError(f"MemcachedTier.put: data must be bytes, got {type(data).__name__}")
        heads = self._head_names([k for k, _ in items])
        limit = self.chunk_bytes if heads else 0
        if not limit:  # nothing to store, or no server tells its item size: dropped
            return
        start = time.perf_counter()
        values: dict[bytes, bytes] = {}
        sizes: dict[bytes, int] = {}
        for name, (_, data) in zip(heads, items, strict=True):
            if (self._capacity and len(data) > self._capacity) or len(data) > wire.MAX_CHUNKS * limit:
                with self._lock:
                    self._extra["dropped_too_large"] += 1
                continue
            head, chunks = wire.split(name, memoryview(data).cast("B"), limit)
            # Chunks before their head, on the head's server and connection: memcached applies them
            # in order, so a head never stands there before its chunks.
            values.update(chunks)
            values[name] = head
            sizes[name] = len(data)
            self._chunk_guess = len(chunks) + 1
        failed = self._set_many(values)
        stored = [
            n
            for n, size in sizes.items()
            if not failed.intersection(self._with_chunks([n], -(-size // limit)))
        ]
        with self._lock:
            self._stats.puts += len(stored)
            self._stats.bytes_written += sum(sizes[n] for n in stored)
            self._stats.write_seconds += time.perf_counter() - start

    def delete(self, keys: Sequence[BlockKey]) -> None:
        """Applied by the servers when it returns: a write that follows, on any connection, stays."""
        heads = self._head_names(keys)
        self._batched(self._with_chunks(heads, self._chunk_guess), wire.delete_many)

    def keys(self) -> list[BlockKey]:
        """Always []: memcached cannot list keys (``lru_crawler metadump`` skips items while its
        crawler is busy, so a listing would be silently partial). Clearing needs no listing
        (generations); ``kvtier cache stats`` shows the servers' own counts."""
        return []

    def __len__(self) -> int:
        return 0  # unknown: see keys()

    def _breaker_stats(self) -> dict[str, float]:
        return wire.merge_breakers([s.breaker.snapshot() for s in self._servers.values()])

    def clear(self) -> None:
        """Make this namespace's objects unreachable (bump its generation); a no-op if unreachable."""
        self._bump(wire.generation_key(self._ns_id))

    # ------------------------------------------------------------------ maintenance

    def scan(self, namespace: str | None = None) -> list[StoredObject]:
        raise TierError(f"memcached at {self.where} cannot list its objects (see server_stats)")

    def read_prefixes(self, objects: Sequence[StoredObject], nbytes: int) -> list[bytes | None]:
        raise TierError(f"memcached at {self.where} cannot list its objects (see server_stats)")

    def drop_namespaces(self, keep: str | None) -> int:
        """Make the objects of every namespace but ``keep`` unreachable by bumping generations (of the
        registered namespaces), or, for None, the ring's epoch (every namespace, registered or not).
        Returns how many registered namespaces were invalidated: memcached cannot count objects."""
        known = self.registered_namespaces()
        if keep is None:
            return len(known) if self._bump(wire.EPOCH_KEY) else 0
        others = [ns for ns in known if ns != keep]
        return sum(self._bump(wire.generation_key(wire.namespace_id(ns))) for ns in others)

    def registered_namespaces(self) -> list[str]:
        """The namespaces that wrote to this ring (as long as the registry item was not evicted)."""
        raw = self._batched([wire.REGISTRY_KEY], wire.get_many).get(wire.REGISTRY_KEY, b"")
        names = {n.decode("ascii", "replace") for n in raw.split()}
        return sorted(n for n in names if valid_namespace(n))

    def server_stats(self, max_age: float = _STATS_TTL_S) -> dict[str, dict[str, Any]]:
        """Each reachable server's own ``stats`` and ``item_size_max``, by address; read again when
        older than ``max_age`` seconds."""
        cached, when = self._server_stats
        if time.monotonic() - when < max_age:
            return cached
        out: dict[str, dict[str, Any]] = {}
        for address, server in self._servers.items():
            found = self._guarded(server, wire.read_stats, None)
            if found is not None:
                out[address] = found
        self._server_stats = (out, time.monotonic())
        return out

    def close(self) -> None:
        for server in self._servers.values():
            with contextlib.suppress(*_DOWN_ERRORS):
                server.client.close()

    # ------------------------------------------------------------------ names and generations

    def _head_names(self, keys: Sequence[BlockKey]) -> list[bytes]:
        for key in keys:
            check_key(key)
        gen = self._current_generation() if keys else None
        if gen is None:
            return []
        prefix = wire.head_prefix(self._ns_id, gen)
        return [prefix + key.hex().encode() for key in keys]

    @staticmethod
    def _with_chunks(heads: list[bytes], count: int) -> list[bytes]:
        """The heads and the names of their chunks 1..count-1."""
        return [*heads, *(wire.chunk_name(h, i) for h in heads for i in range(1, count))]

    def _current_generation(self) -> bytes | None:
        """``<epoch>.<generation>``, re-read after a second; the last one known while its server is down."""
        known = self._generation
        if known is not None and time.monotonic() - known[1] < _GENERATION_TTL_S:
            return known[0]
        counters = [wire.EPOCH_KEY, wire.generation_key(self._ns_id)]
        values = self._batched([*counters, wire.REGISTRY_KEY], wire.get_many)
        missing = [c for c in counters if c not in values]
        if missing:  # first use, or evicted: seed from the clock; add() lets a concurrent seeder win
            self._batched(missing, wire.add_seeds)
            values.update(self._batched(missing, wire.get_many))
        if not all(c in values for c in counters):
            return known[0] if known is not None else None
        gen = values[counters[0]].strip() + b"." + values[counters[1]].strip()
        self._generation = (gen, time.monotonic())
        if not self._registered:  # once per tier: a registry grown too large for one item stays so
            self._registered = True
            if self.namespace.encode() not in values.get(wire.REGISTRY_KEY, b"").split():
                self._register()
        return gen

    def _register(self) -> None:
        entry = b" " + self.namespace.encode()
        server = self._owner(wire.REGISTRY_KEY)
        if not self._guarded(server, lambda c: bool(c.append(wire.REGISTRY_KEY, entry)), False):
            self._guarded(server, lambda c: c.add(wire.REGISTRY_KEY, entry), False)

    def _bump(self, counter: bytes) -> bool:
        done = self._guarded(self._owner(counter), lambda c: wire.bump(c, counter), False)
        self._generation = None  # re-read at the next call
        return done

    # ------------------------------------------------------------------ objects

    @property
    def item_size(self) -> int:
        """The ring's smallest ``item_size_max`` (memcached's ``-I``), read from the servers; 0 while
        some server cannot tell."""
        if not self._item_limit:
            limits = [int(s.get("item_size_max", 0)) for s in self.server_stats().values()]
            if len(limits) == len(self._servers) and all(limits):
                self._item_limit = min(limits)
        return self._item_limit

    @property
    def chunk_bytes(self) -> int:
        """Object bytes per item: the item size less room for the name, memcached's and our header."""
        return max(0, self.item_size - _ITEM_ROOM - wire.HEAD.size) if self.item_size else 0

    def _drop_partial(self, heads: list[bytes]) -> None:
        """Heads without all their chunks: counted, and deleted so lookup stops offering them."""
        if heads:
            with self._lock:
                self._extra["partial_objects"] += len(heads)
            log.info("memcached tier: %d partial object(s) (a chunk evicted or replaced): misses", len(heads))
            self._batched(heads, wire.delete_many)

    def _set_many(self, values: dict[bytes, bytes]) -> set[bytes]:
        """Store ``values``; returns the names that were not stored (server down or refusing)."""
        failed: set[bytes] = set()
        for server, names in self._group(values).items():
            batch = {n: values[n] for n in names}
            refused = self._guarded(server, partial(wire.set_many, batch, self._expire), None)
            failed.update(names if refused is None else refused)
        return failed

    # ------------------------------------------------------------------ servers

    def _owner(self, name: bytes) -> _Server:
        if len(self._servers) == 1:
            return next(iter(self._servers.values()))
        return self._servers[self._ring.hasher.get_node(wire.route(name))]

    def _group(self, names: Iterable[bytes]) -> dict[_Server, list[bytes]]:
        groups: dict[_Server, list[bytes]] = defaultdict(list)
        for name in names:
            groups[self._owner(name)].append(name)
        return groups

    def _batched(
        self, names: Iterable[bytes], op: Callable[[PooledClient, list[bytes]], dict[bytes, T]]
    ) -> dict[bytes, T]:
        """``op(client, its names)`` on every server holding some of ``names``; the results merged."""
        merged: dict[bytes, T] = {}
        for server, group in self._group(names).items():
            empty: dict[bytes, T] = {}
            merged.update(self._guarded(server, partial(wire.call, op, group), empty))
        return merged

    def _guarded(self, server: _Server, op: Callable[[PooledClient], T], default: T) -> T:
        """``op`` under the server's breaker; a backend failure returns ``default`` and is counted."""
        if not server.breaker.allow():
            return default
        try:
            result = wire.run(server.client, op, server.breaker.probing, self._forget_generation)
        except MemcacheIllegalInputError:  # our bug, not the server's
            server.breaker.release_probe()
            raise
        except MemcacheUnexpectedCloseError as e:  # (a MemcacheServerError): the connection died
            self._failed(server, e)
            return default
        except _ALIVE_ERRORS as e:
            self._answered_error(server, e)
            return default
        except _DOWN_ERRORS as e:
            self._failed(server, e)
            return default
        except BaseException:
            server.breaker.release_probe()
            raise
        if server.breaker.record_success():
            log.info("memcached tier %s: reachable again, breaker closed", server.address)
        return result

    def _answered_error(self, server: _Server, error: BaseException) -> None:
        """The server is alive and said no: counted, and it does not open the breaker."""
        with self._lock:
            self._stats.errors += 1
            self._extra["response_errors"] += 1
        if "too large" in str(error):  # restarted with a smaller -I: read the limit again
            self._item_limit = 0
            self._server_stats = ({}, -_STATS_TTL_S)
        if server.breaker.record_success():
            log.info("memcached tier %s: reachable again, breaker closed", server.address)
        log.warning("memcached tier %s: error reply: %s", server.address, error)

    def _forget_generation(self) -> None:
        """A server that comes back (or restarted) has lost its counters: the next call re-reads them."""
        known = self._generation
        if known is not None:
            self._generation = (known[0], -_GENERATION_TTL_S)

    def _failed(self, server: _Server, error: BaseException) -> None:
        with self._lock:
            self._stats.errors += 1
        self._forget_generation()
        if server.breaker.record_failure():
            log.warning(
                "memcached tier %s: %s; breaker open for %.2fs (misses meanwhile)",
                server.address,
                error,
                server.breaker.backoff,
            )
        else:
            log.debug("memcached tier %s: %s", server.address, error)
