"""What the memcached tier puts on the wire: URLs, the ring, key names, the chunked object format, and
the commands it sends on one server's connection. No tier state here (see ``memcached.py``).

Names (ASCII, well under memcached's 250 bytes):
- ``kvt:<ns id>:<epoch>.<generation>:<block key hex>``: an object's head; ``<head>:<i>``: its chunk i.
- ``kvt:gen:<ns id>``: the namespace's generation; ``kvt:epoch``: the epoch of everything on the ring;
  ``kvt:namespaces``: the namespaces that ever wrote (space separated), for ``gc``.

Object: the head is ``magic "KVM1" | version (8 random bytes) | chunk count u32 | total length u64 |
chunk size u32 | chunk 0``; chunk i (i >= 1) is ``version | chunk i``. Every chunk but the last holds
exactly ``chunk size`` bytes. The version is new for every write, so chunks of two writes of one key
can never be taken for one object.
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

from pymemcache.client.base import PooledClient
from pymemcache.client.rendezvous import RendezvousHash
from pymemcache.exceptions import MemcacheUnexpectedCloseError

T = TypeVar("T")
SCHEME = "memcached"
DEFAULT_PORT = 11211
HEAD = struct.Struct("<4s8sIQI")  # magic, version, chunk count, total length, chunk size
MAGIC = b"KVM1"
VERSION_LEN = 8
MAX_CHUNKS = 1 << 16  # 64k chunks: 64 GiB objects at the default 1 MiB item size
EPOCH_KEY = b"kvt:epoch"
REGISTRY_KEY = b"kvt:namespaces"
# What a call on a pooled connection that died while idle raises: closed by the peer, or reset.
STALE_ERRORS = (MemcacheUnexpectedCloseError, BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


# ---------------------------------------------------------------------- URLs and the ring


def parse_url(url: str) -> list[tuple[str, int]]:
    """``memcached://h[:p][,h[:p]...]`` -> ``[(host, port), ...]``; ValueError naming what is wrong."""
    parts = urlsplit(url)
    if parts.scheme.lower() != SCHEME:
        raise ValueError(f"unsupported memcached URL scheme {parts.scheme!r} in {url!r}; use memcached://")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"memcached URL {url!r}: only memcached://host[:port][,host[:port]...] is supported")
    servers = [_host_port(spec.strip(), url) for spec in parts.netloc.split(",")]
    if len(set(servers)) != len(servers):
        raise ValueError(f"memcached URL {url!r} names a server twice")
    return servers


def _host_port(spec: str, url: str) -> tuple[str, int]:
    if not spec or "@" in spec:
        raise ValueError(f"memcached URL {url!r}: bad server {spec!r} (host[:port], no credentials)")
    if spec.startswith("["):  # [IPv6]:port
        host, _, rest = spec[1:].partition("]")
        port_text = rest.removeprefix(":")
    else:
        host, _, port_text = spec.partition(":")
    try:
        port = int(port_text) if port_text else DEFAULT_PORT
    except ValueError:
        raise ValueError(f"memcached URL {url!r}: port {port_text!r} is not a number") from None
    if not host or not 0 < port < 65536:
        raise ValueError(f"memcached URL {url!r}: bad server {spec!r} (port must be 1-65535)")
    return host, port


def _hrw_score(text: str, seed: int) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8, person=b"kvt%d" % seed).digest())


class RingHash(RendezvousHash):
    """HashClient's rendezvous hashing with blake2b (C) for the score: pymemcache's default is a pure
    Python murmur3, 70 us a key on two servers, more than a loopback round trip."""

    def __init__(self) -> None:
        super().__init__(hash_function=_hrw_score)


def route(name: bytes) -> bytes:
    """What places a name on the ring: a chunk ``kvt:ns:gen:key:i`` goes with its head
    ``kvt:ns:gen:key``, so one object lives on one server and its chunks precede its head there."""
    return name.rsplit(b":", 1)[0] if name.count(b":") == 4 else name


# ---------------------------------------------------------------------- names and counters


def namespace_id(namespace: str) -> bytes:
    """The namespace as names carry it: a short digest (a fingerprint may have 128 characters)."""
    return hashlib.blake2b(namespace.encode(), digest_size=8).hexdigest().encode()


def generation_key(ns_id: bytes) -> bytes:
    return b"kvt:gen:" + ns_id


def head_prefix(ns_id: bytes, generation: bytes) -> bytes:
    return b"kvt:" + ns_id + b":" + generation + b":"


def chunk_name(head: bytes, index: int) -> bytes:
    return head + b":%d" % index


def seed() -> bytes:
    """A fresh counter value: the clock in microseconds, past anything an evicted counter reached by
    bumps (one per clear), so a re-seeded namespace never sees its old objects again."""
    return b"%d" % (time.time_ns() // 1000)


# ---------------------------------------------------------------------- objects


def split(name: bytes, data: memoryview, limit: int) -> tuple[bytes, dict[bytes, bytes]]:
    """The head (manifest + first chunk) and the other chunks by name, all with one new version."""
    version = os.urandom(VERSION_LEN)
    count = max(1, -(-len(data) // limit))
    head = HEAD.pack(MAGIC, version, count, len(data), limit) + data[:limit]
    chunks = {chunk_name(name, i): version + data[i * limit : (i + 1) * limit] for i in range(1, count)}
    return head, chunks


def parse_head(head: bytes | None) -> tuple[bytes, int, int, int] | None:
    """(version, chunk count, total length, chunk size) of a well-formed head; None for anything else
    (the count must follow from the lengths, so a damaged head cannot ask for millions of chunks)."""
    if head is None or len(head) < HEAD.size or head[:4] != MAGIC:
        return None
    _, version, count, total, size = HEAD.unpack_from(head)
    if size <= 0 or count != max(1, -(-total // size)) or count > MAX_CHUNKS:
        return None
    return version, count, total, size


def chunk_count(head: bytes | None) -> int:
    parsed = parse_head(head)
    return 0 if parsed is None else parsed[1]


def assemble(head_name: bytes, items: dict[bytes, bytes]) -> bytes | None:
    """The object under ``head_name`` from fetched ``items``; None unless every chunk is there, of
    this write (version) and of the right length."""
    head = items.get(head_name)
    parsed = parse_head(head)
    if head is None or parsed is None:
        return None
    version, count, total, size = parsed
    parts = [memoryview(head)[HEAD.size :]]
    for i in range(1, count):
        chunk = items.get(chunk_name(head_name, i))
        if chunk is None or chunk[:VERSION_LEN] != version:
            return None
        parts.append(memoryview(chunk)[VERSION_LEN:])
    if any(len(p) != size for p in parts[:-1]) or sum(len(p) for p in parts) != total:
        return None
    return bytes(parts[0]) if count == 1 else b"".join(parts)


# ---------------------------------------------------------------------- commands on one server


def call(op: Callable[[PooledClient, list[bytes]], T], names: list[bytes], client: PooledClient) -> T:
    """``op(client, names)``, arguments in the order ``functools.partial`` fills them."""
    return op(client, names)


def set_many(values: dict[bytes, bytes], expire: int, client: PooledClient) -> list[bytes]:
    """Store ``values`` in one pipelined batch; the names the server did not store."""
    return list(client.set_many(values, expire=expire))


def get_many(client: PooledClient, names: list[bytes]) -> dict[bytes, bytes]:
    return dict(client.get_many(names))


def probe(client: PooledClient, names: list[bytes]) -> dict[bytes, bool]:
    """The names held, by meta get without flags (``HD`` hit, ``EN`` miss): no value is sent back.
    One pipelined batch, ended by a meta no-op whose ``MN`` says every reply is in."""
    command = b"".join(b"mg " + n + b"\r\n" for n in names) + b"mn"
    replies = client.raw_command(command, b"MN\r\n").split(b"\r\n")
    return {n: True for n, r in zip(names, replies, strict=False) if r.startswith(b"HD")}


def delete_many(client: PooledClient, names: list[bytes]) -> dict[bytes, bool]:
    """Delete ``names`` in one pipelined batch and wait for the replies. Not ``noreply``: a block
    deleted (rejected, partial) is recomputed and written again at once, often on another pooled
    connection, and memcached serves connections on several threads in no common order, so an
    unacknowledged delete could be applied after that write and remove it."""
    client.delete_many(names, noreply=False)
    return {}


def run(
    client: PooledClient, op: Callable[[PooledClient], T], probe: bool, restarted: Callable[[], None]
) -> T:
    """``op(client)``; ``probe``: after a ``version`` call (a server back from an outage says so
    cheaply, first). A pooled connection that had died idle (the server restarted) raises no
    failure: ``restarted()`` is told, the pool's idle connections, all from before that restart,
    are closed and ``op`` runs once more on a new one."""
    try:
        return _run_once(client, op, probe)
    except STALE_ERRORS:
        restarted()
        drop_idle_connections(client)
        return _run_once(client, op, probe)


def _run_once(client: PooledClient, op: Callable[[PooledClient], T], probe: bool) -> T:
    if probe:
        client.version()
    return op(client)


def drop_idle_connections(client: PooledClient) -> None:
    """Close the connections idle in ``client``'s pool (those in use stay with their callers)."""
    pool = client.client_pool
    for _ in range(len(pool.free)):
        pool.destroy(pool.get())  # get() hands out the idle ones first; destroy() closes


def add_many(client: PooledClient, values: dict[bytes, bytes]) -> dict[bytes, bool]:
    """``add`` each (stores only where the name is absent); returns what was stored."""
    return {name: bool(client.add(name, value)) for name, value in values.items()}


def add_seeds(client: PooledClient, names: list[bytes]) -> dict[bytes, bool]:
    """Seed missing counters; ``add`` stores only where absent, so a concurrent seeder's value wins."""
    return add_many(client, {name: seed() for name in names})


def bump(client: PooledClient, counter: bytes) -> bool:
    """Add one to a counter; a missing (evicted) one is seeded afresh, which is past every old value."""
    if client.incr(counter, 1) is None:
        client.add(counter, seed())
    return True


def read_stats(client: PooledClient) -> dict[str, Any]:
    """The server's ``stats`` (numbers as numbers) and its ``item_size_max``."""
    stats = {k.decode(): _number(v) for k, v in client.stats().items()}
    stats["item_size_max"] = int(client.stats("settings").get(b"item_size_max", 0))
    return stats


def _number(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
    return value


def merge_breakers(snapshots: list[dict[str, float]]) -> dict[str, float]:
    """One set of breaker numbers for the ring: states and backoffs the worst server's, counts summed."""
    merged: dict[str, float] = {}
    for snap in snapshots:
        for name, value in snap.items():
            worst = name in ("breaker_state", "breaker_open", "breaker_backoff_seconds")
            merged[name] = max(merged.get(name, value), value) if worst else merged.get(name, 0.0) + value
    merged["breaker_open_servers"] = float(sum(s.get("breaker_open", 0.0) for s in snapshots))
    return merged
