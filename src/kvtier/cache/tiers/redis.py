"""The Redis tier: KV blocks shared by every kvtier instance that can reach one Redis (or Redis Cluster).

Kept in one file (over 450 lines) because the serving path and the maintenance operations share
one client, its lazy connection and its error handling (``_run`` under the breaker, ``_maintain``).

Objects live under ``kvtier:<namespace>:<key hex>`` as plain strings, optionally with a TTL. The
namespace separates deployments (or model generations) sharing one server; ``clear`` touches only its
own namespace, ``drop_namespaces`` removes the block objects of the others (or of all).

URLs: ``redis://`` and ``rediss://`` (TLS) go to redis-py's ``Redis.from_url``; ``redis+cluster://`` and
``rediss+cluster://`` go to ``RedisCluster.from_url`` with the plain scheme (one startup node is enough,
the client discovers the rest).

Every batch is one round trip per node: ``lookup`` pipelines TYPE (a key of another Redis type is a
miss and is unlinked), ``get`` is one MGET on a single
node (a pipeline of GETs on a cluster, where MGET cannot span slots), ``put`` pipelines SET (with EX when
a TTL is set), ``delete`` is one UNLINK (a pipeline of UNLINKs on a cluster).

Failures never reach the caller (see ``base.Tier``): a backend error becomes a miss, a dropped write or
an empty listing, and is counted in ``stats().errors`` (the maintenance operations ``scan``,
``read_prefixes`` and ``drop_namespaces`` raise ``TierError`` instead, as the protocol says).
A circuit breaker keeps a dead server from
costing every request a timeout: after ``breaker_failures`` consecutive failures it opens, and for the
backoff period every call returns a miss at once without touching the network; then one call is let
through as a probe (half-open): success closes the breaker, failure reopens it with the backoff doubled
(up to ``breaker_max_backoff_seconds``). A server that answers with an error reply (say OOM under
``maxmemory`` with ``noeviction``) is alive: that error is counted but does not count toward opening.

``capacity_bytes`` (0 = unbounded) is not enforced by eviction here: the server's ``maxmemory`` policy
and the TTL bound the space. A positive capacity only drops objects larger than it, as the contract
asks. ``used_bytes`` is best effort: the server's ``used_memory`` from INFO (summed over the primaries
of a cluster), which counts every namespace and Redis's own overhead; it is cached for a second and is
0 while the server cannot be reached.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import redis
import redis.cluster
from redis.backoff import NoBackoff
from redis.exceptions import ClusterError, RedisClusterException, RedisError, ResponseError
from redis.retry import Retry

from kvtier.cache.keys import DIGEST_SIZE, BlockKey, check_key, valid_namespace
from kvtier.cache.tiers.base import (
    CopiedStats,
    StoredObject,
    Tier,
    TierError,
    TierStats,
    check_server_options,
)
from kvtier.cache.tiers.breaker import MAX_BACKOFF_S, CircuitBreaker

log = logging.getLogger(__name__)

T = TypeVar("T")
Client = redis.Redis | redis.cluster.RedisCluster

KEY_PREFIX = "kvtier"
_PLAIN_SCHEMES = ("redis", "rediss")
_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
_HEX_LEN = 2 * DIGEST_SIZE
_BACKEND_ERRORS: tuple[type[BaseException], ...] = (RedisError, RedisClusterException, OSError, TimeoutError)
_SCAN_COUNT = 1000
_BATCH = 500  # names per pipeline or UNLINK in the maintenance operations
_USED_BYTES_TTL_S = 1.0


def parse_url(url: str) -> tuple[str, bool]:
    """``(url for redis-py, is_cluster)``; raises ValueError for a scheme kvtier does not support."""
    scheme = urlsplit(url).scheme.lower()
    if scheme in _PLAIN_SCHEMES:
        return url, False
    if scheme in _CLUSTER_SCHEMES:
        return _CLUSTER_SCHEMES[scheme] + url[len(scheme) :], True
    supported = [f"{s}://" for s in (*_PLAIN_SCHEMES, *_CLUSTER_SCHEMES)]
    raise ValueError(f"unsupported Redis URL scheme {scheme!r} in {url!r}; supported: {supported}")


def _connect(url: str, timeout_seconds: float, connect_timeout_seconds: float) -> Client:
    """A client whose every call fails within about the timeouts: no client-side retries.

    The single-node client connects lazily; the cluster client contacts its startup node here.
    """
    plain, cluster = parse_url(url)
    options: dict[str, Any] = {
        "socket_timeout": timeout_seconds,
        "socket_connect_timeout": connect_timeout_seconds,
        "retry": Retry(NoBackoff(), 0),
    }
    if cluster:
        return redis.cluster.RedisCluster.from_url(plain, **options)
    return redis.Redis.from_url(plain, **options)


def ping(url: str, timeout_seconds: float = 0.5) -> bool:
    """True if the server (every node of a cluster) answers PING within the timeout; never raises
    for an unreachable server (a malformed URL still raises ValueError)."""
    parse_url(url)
    client: Client | None = None
    try:
        client = _connect(url, timeout_seconds, timeout_seconds)
        return bool(client.ping())
    except _BACKEND_ERRORS:
        return False
    finally:
        if client is not None:
            client.close()


class RedisTier(CopiedStats, Tier):
    """Blocks in Redis or Redis Cluster, behind the ``Tier`` protocol; safe to share between threads."""

    name = "redis"

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
        # the namespace has no ':' (one would be a prefix of another in SCAN MATCH), no glob characters
        timeouts = (timeout_seconds, connect_timeout_seconds)
        check_server_options(namespace, ttl_seconds, None, timeouts, capacity_bytes)
        self.url = url
        self._plain_url, self.cluster = parse_url(url)
        self.namespace = namespace
        self.ttl_seconds = ttl_seconds
        self.timeout_seconds = timeout_seconds
        self.connect_timeout_seconds = connect_timeout_seconds
        self._capacity = capacity_bytes
        self._prefix = f"{KEY_PREFIX}:{namespace}:".encode()
        self._breaker = CircuitBreaker(breaker_failures, breaker_backoff_seconds, breaker_max_backoff_seconds)
        self._stats = TierStats()
        self._lock = threading.Lock()
        self._extra = {"response_errors": 0.0, "dropped_too_large": 0.0, "wrong_type_removed": 0.0}
        self._client_lock = threading.Lock()
        self._client: Client | None = None
        self._connect_failed_at = -1.0
        self._closed = False
        self._used_bytes = (0, -_USED_BYTES_TTL_S)  # (value, monotonic time it was read)
        if not self.cluster:  # lazy: no I/O until the first call
            self._client = _connect(url, timeout_seconds, connect_timeout_seconds)

    # ------------------------------------------------------------------ Tier protocol

    @property
    def where(self) -> str:
        return _redact(self.url)

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def used_bytes(self) -> int:
        value, when = self._used_bytes
        now = time.monotonic()
        if now - when < _USED_BYTES_TTL_S:
            return value
        value = self._run(self._server_used_memory, 0)
        self._used_bytes = (value, now)
        return value

    def lookup(self, keys: Sequence[BlockKey]) -> int:
        names = [self._name(k) for k in keys]
        with self._lock:
            self._stats.lookups += len(names)
        if not names:
            return 0

        def op(client: Client) -> int:
            # TYPE, not EXISTS: a key of another Redis type (a list someone LPUSHed under our name)
            # exists, but GET can never read it. It is a miss, and it is removed so that it is not
            # reported held forever.
            pipe = client.pipeline(transaction=False)
            for name in names:
                pipe.type(name)
            held, wrong = 0, list[bytes]()
            for name, kind in zip(names, pipe.execute(), strict=True):
                if kind in (b"string", "string"):
                    if not wrong:
                        held += 1
                    continue
                if kind in (b"none", "none"):
                    break
                wrong.append(name)
            if wrong:
                with self._lock:
                    self._stats.corrupt += len(wrong)
                    self._extra["wrong_type_removed"] += len(wrong)
                self._unlink(client, wrong)
                log.warning("redis tier %s: removed %d key(s) of another type", self._where(), len(wrong))
            return held

        return self._run(op, 0)

    def get(self, keys: Sequence[BlockKey]) -> list[bytes | None]:
        names = [self._name(k) for k in keys]
        if not names:
            return []
        start = time.perf_counter()

        def op(client: Client) -> list[bytes | None]:
            if self.cluster:
                pipe = client.pipeline(transaction=False)
                for name in names:
                    pipe.get(name)
                return list(pipe.execute())
            return cast(list[bytes | None], client.mget(names))  # decode_responses is off

        values = self._run(op, None)
        if values is None:
            values = [None] * len(names)
        hits = sum(v is not None for v in values)
        with self._lock:
            s = self._stats
            s.lookups += len(names)
            s.hits += hits
            s.misses += len(names) - hits
            s.bytes_read += sum(len(v) for v in values if v is not None)
            s.read_seconds += time.perf_counter() - start
        return values

    def put(self, items: Sequence[tuple[BlockKey, bytes]]) -> None:
        batch: list[tuple[bytes, bytes]] = []
        for key, data in items:
            if not isinstance(data, bytes | bytearray | memoryview):
                raise TypeError(f"RedisTier.put: data must be bytes, got {type(data).__name__}")
            if self._capacity and len(data) > self._capacity:
                with self._lock:
                    self._extra["dropped_too_large"] += 1
                continue
            batch.append((self._name(key), bytes(data)))
        if not batch:
            return
        start = time.perf_counter()

        def op(client: Client) -> bool:
            pipe = client.pipeline(transaction=False)
            for name, data in batch:
                pipe.set(name, data, ex=self.ttl_seconds)
            pipe.execute()
            return True

        stored = self._run(op, False)
        with self._lock:
            if stored:
                self._stats.puts += len(batch)
                self._stats.bytes_written += sum(len(d) for _, d in batch)
            self._stats.write_seconds += time.perf_counter() - start

    def delete(self, keys: Sequence[BlockKey]) -> None:
        names = [self._name(k) for k in keys]
        if names:
            self._run(lambda client: self._unlink(client, names), 0)

    def keys(self) -> list[BlockKey]:
        """Every block key of this namespace (SCAN over every primary); [] if the server is unreachable."""

        def op(client: Client) -> list[BlockKey]:
            found: list[BlockKey] = []
            for name in self._scan(client, self._prefix + b"*"):
                parsed = _parse_name(name)
                if parsed is not None and parsed[0] == self.namespace:
                    found.append(parsed[1])
            return found

        return self._run(op, [])

    def __len__(self) -> int:
        return len(self.keys())

    def _breaker_stats(self) -> dict[str, float]:
        return self._breaker.snapshot()

    def clear(self) -> None:
        """Delete this namespace's objects (nothing else on the server); a no-op if unreachable."""
        self._run(lambda client: self._unlink_matching(client, self._prefix + b"*", None, [0]), 0)

    # ------------------------------------------------------------------ maintenance

    def scan(self, namespace: str | None = None) -> list[StoredObject]:
        pattern = f"{KEY_PREFIX}:{namespace if namespace is not None else '*'}:*".encode()

        def op(client: Client) -> list[StoredObject]:
            parsed = [p for n in self._scan(client, pattern) if (p := _parse_name(n)) is not None]
            found: list[StoredObject] = []
            for batch in _batched(parsed, _BATCH):
                pipe = client.pipeline(transaction=False)
                for ns, key in batch:
                    pipe.strlen(self._name(key, ns))
                for (ns, key), size in zip(batch, pipe.execute(), strict=True):
                    if size:  # 0: deleted (or expired) since the scan
                        found.append(StoredObject(ns, key, int(size)))
            return found

        return self._maintain(op)

    def read_prefixes(self, objects: Sequence[StoredObject], nbytes: int) -> list[bytes | None]:
        def op(client: Client) -> list[bytes | None]:
            out: list[bytes | None] = []
            for batch in _batched(objects, _BATCH):
                pipe = client.pipeline(transaction=False)
                for obj in batch:
                    pipe.getrange(self._name(obj.key, obj.namespace), 0, nbytes - 1)
                out += [prefix or None for prefix in pipe.execute()]
            return out

        return self._maintain(op)

    def drop_namespaces(self, keep: str | None) -> int:
        """Only block objects (``kvtier:<ns>:<64 hex>``) go: other keys, under ``kvtier:`` or not,
        are left alone. Returns how many were deleted (before a failure, if the server fails midway)."""
        deleted = [0]
        pattern = f"{KEY_PREFIX}:*".encode()
        self._run(lambda client: self._unlink_matching(client, pattern, keep, deleted), 0)
        return deleted[0]

    def close(self) -> None:
        with self._client_lock:
            client, self._client = self._client, None
            self._closed = True
        if client is not None:
            with contextlib.suppress(*_BACKEND_ERRORS):
                client.close()

    # ------------------------------------------------------------------ internals

    def _name(self, key: BlockKey, namespace: str | None = None) -> bytes:
        prefix = self._prefix if namespace is None else f"{KEY_PREFIX}:{namespace}:".encode()
        return prefix + check_key(key).hex().encode()

    def _maintain(self, op: Callable[[Client], T]) -> T:
        """Run a maintenance ``op``: no breaker, and a failure raises ``TierError`` naming the server."""
        try:
            return op(self._get_client())
        except ResponseError as e:
            raise TierError(f"Redis at {self.where} failed: {e}") from None
        except _BACKEND_ERRORS as e:
            raise TierError(f"cannot reach Redis at {self.where}: {e}") from None

    def _get_client(self) -> Client:
        asked = time.monotonic()
        with self._client_lock:
            if self._closed:
                raise RuntimeError("RedisTier is closed")
            if self._client is None:  # cluster: discovering the nodes is I/O, done under the breaker
                if self._connect_failed_at >= asked:  # failed while we waited: don't queue another timeout
                    raise redis.ConnectionError(f"cannot reach the Redis cluster at {_redact(self.url)}")
                try:
                    self._client = _connect(self.url, self.timeout_seconds, self.connect_timeout_seconds)
                except BaseException:
                    self._connect_failed_at = time.monotonic()
                    raise
            return self._client

    def _run(self, op: Callable[[Client], T], default: T) -> T:
        """Run ``op`` under the breaker; a backend failure returns ``default`` and is counted."""
        if not self._breaker.allow():
            return default
        try:
            client = self._get_client()
            if self._breaker.probing:  # back from an outage? a PING says so cheaply, before the real op
                client.ping()
                if self._breaker.record_success():
                    log.info("redis tier %s: reachable again, breaker closed", self._where())
            result = op(client)
        except ResponseError as e:
            if isinstance(e, ClusterError):  # cluster down / master down: the backend is unusable
                self._failed(e)
            else:  # the server answered (OOM, wrong type...): it is alive, don't open the breaker
                with self._lock:
                    self._stats.errors += 1
                    self._extra["response_errors"] += 1
                if self._breaker.record_success():
                    log.info("redis tier %s: reachable again, breaker closed", self._where())
                log.warning("redis tier %s: error reply: %s", self._where(), e)
            return default
        except _BACKEND_ERRORS as e:
            self._failed(e)
            return default
        except BaseException:
            self._breaker.release_probe()
            raise
        if self._breaker.record_success():
            log.info("redis tier %s: reachable again, breaker closed", self._where())
        return result

    def _failed(self, error: BaseException) -> None:
        with self._lock:
            self._stats.errors += 1
        if self._breaker.record_failure():
            log.warning(
                "redis tier %s: %s; breaker open for %.2fs (misses meanwhile)",
                self._where(),
                error,
                self._breaker.backoff,
            )
        else:
            log.debug("redis tier %s: %s", self._where(), error)

    def _where(self) -> str:
        return f"{_redact(self.url)} ns={self.namespace}"

    def _unlink(self, client: Client, names: Sequence[bytes]) -> int:
        if not self.cluster:
            return int(client.unlink(*names))
        pipe = client.pipeline(transaction=False)
        for name in names:
            pipe.unlink(name)
        return sum(int(n) for n in pipe.execute())

    def _scan(self, client: Client, pattern: bytes) -> Iterator[bytes]:
        if self.cluster:
            return client.scan_iter(
                match=pattern, count=_SCAN_COUNT, target_nodes=redis.cluster.RedisCluster.PRIMARIES
            )
        return client.scan_iter(match=pattern, count=_SCAN_COUNT)

    def _unlink_matching(self, client: Client, pattern: bytes, keep: str | None, deleted: list[int]) -> int:
        """Unlink the block objects matching ``pattern`` but those of namespace ``keep``; counts
        into ``deleted[0]`` as it goes (the count stands when the server fails midway)."""
        for batch in _batched(self._scan(client, pattern), _BATCH):
            doomed = [n for n in batch if (p := _parse_name(n)) is not None and p[0] != keep]
            if doomed:
                deleted[0] += self._unlink(client, doomed)
        return deleted[0]

    def _server_used_memory(self, client: Client) -> int:
        if self.cluster:
            info = client.info("memory", target_nodes=redis.cluster.RedisCluster.PRIMARIES)
            per_node = info.values() if isinstance(info, dict) and "used_memory" not in info else [info]
            return sum(int(i.get("used_memory", 0)) for i in per_node)
        return int(client.info("memory").get("used_memory", 0))


def _parse_name(name: bytes) -> tuple[str, BlockKey] | None:
    """``kvtier:<namespace>:<64 hex>`` -> (namespace, key); None for anything else."""
    head, sep, hexpart = name.rpartition(b":")
    prefix = KEY_PREFIX.encode() + b":"
    if not sep or len(hexpart) != _HEX_LEN or not head.startswith(prefix):
        return None
    try:
        namespace = head[len(prefix) :].decode("ascii")
        key = bytes.fromhex(hexpart.decode("ascii"))
    except ValueError:  # UnicodeDecodeError is a ValueError
        return None
    if not valid_namespace(namespace):
        return None
    return namespace, key


def _batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _redact(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return parts._replace(netloc=user + netloc).geturl()
