"""``kvtier cache``: inspect and manage the disk and Redis tiers without running an engine.

The tiers come from the settings (``--disk-path``, ``--redis-url``, ``--config`` YAML, ``KVTIER_*``;
see ``kvtier.config``): by default those of ``tiers`` (``auto``: disk, plus Redis when a URL is set),
plus any tier whose location is given by a flag; ``--tier`` picks one. The host tier lives only inside
a running engine, so there is nothing here to look at: its numbers are in that engine's metrics.

Reading (``stats``, ``ls``) scans every namespace (model fingerprint) read-only: the disk folders
``root/<namespace>/<2 hex>/<key hex>.kvt`` and the Redis keys ``kvtier:<namespace>:<key hex>``, with the
tiers' own name parsers, and reads only object headers (``codec.read_header`` on a prefix). Deleting
(``clear``, ``gc``) goes through the tiers' own ``drop_other_namespaces``, so the CLI removes exactly
what a tier would and nothing else that shares the folder or the server.

Errors (bad settings, an unreachable Redis, an unreadable folder) print one line naming the cause and
exit with code 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Annotated, Any, Protocol

import redis
import redis.cluster
import typer
from rich.console import Console
from rich.table import Table

from kvtier.cache.codec import BlockHeader, CorruptObjectError, read_header
from kvtier.cache.tiers.disk import SUFFIX, DiskTier, _parse_key, valid_namespace
from kvtier.cache.tiers.redis import KEY_PREFIX, RedisTier, _connect, _parse_name, _redact, parse_url, ping
from kvtier.config import ConfigError, EngineConfig, TierSettings

cache_app = typer.Typer(
    no_args_is_help=True,
    help="Inspect and manage the disk and Redis KV tiers (stats, ls, clear, gc).",
)

HOST_NOTE = "lives only inside a running engine (see its metrics); nothing to inspect here"
HEADER_READ_BYTES = 1 << 16  # a header is ~100 bytes + 4 per token: 64 KiB covers 16k-token blocks
DEFAULT_SAMPLE = 200
CLI_REDIS_TIMEOUT_S = 2.0  # a command can wait longer than the engine's per-request timeout
_REDIS_BATCH = 500
_NO_CAPACITY_LIMIT = 1 << 62  # gc must not trim the kept namespace to some capacity: only drop others


class CacheCliError(Exception):
    """A user-facing failure: printed as one line, exit code 2."""


class TierName(str, Enum):
    host = "host"
    disk = "disk"
    redis = "redis"


# ------------------------------------------------------------------------------------------ options

TierOpt = Annotated[
    TierName | None, typer.Option("--tier", help="only this tier (default: the configured ones)")
]
DiskPathOpt = Annotated[
    str | None, typer.Option("--disk-path", help="disk tier folder (default: settings, ~/.cache/kvtier)")
]
RedisUrlOpt = Annotated[
    str | None, typer.Option("--redis-url", help="redis://, rediss://, redis+cluster:// (default: settings)")
]
ConfigOpt = Annotated[str | None, typer.Option("--config", help="YAML settings file (or KVTIER_CONFIG)")]


# ------------------------------------------------------------------------------------------ stores


@dataclass(frozen=True)
class StoredObject:
    namespace: str
    key: bytes
    size: int
    ref: str | bytes  # disk: the file path; Redis: the key name


class Store(Protocol):
    """One tier's backing store, seen across every namespace."""

    name: str
    where: str  # a folder, a URL without its password
    note: str  # "" or what the user should know (a folder that does not exist)

    def scan(self) -> list[StoredObject]: ...

    def read_headers(self, objects: Sequence[StoredObject]) -> list[BlockHeader | None]: ...

    def drop_all(self) -> int: ...

    def keep_only(self, namespace: str) -> int: ...

    def close(self) -> None: ...


class DiskStore:
    name = "disk"

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(os.path.expanduser(root))
        self.where = self.root
        self.note = "" if os.path.exists(self.root) else "folder does not exist"
        if os.path.exists(self.root) and not os.path.isdir(self.root):
            raise CacheCliError(f"disk path {self.root} is not a folder")

    @property
    def exists(self) -> bool:
        return os.path.isdir(self.root)

    def scan(self) -> list[StoredObject]:
        if not self.exists:
            return []
        found: list[StoredObject] = []
        try:
            for ns in _subdirs(self.root, valid_namespace):
                for sub in _subdirs(ns.path, _is_hex2):
                    with os.scandir(sub.path) as it:
                        for e in it:
                            key = _parse_key(e.name, sub.name) if e.name.endswith(SUFFIX) else None
                            if key is None:
                                continue
                            with contextlib.suppress(FileNotFoundError):  # removed meanwhile
                                st = e.stat(follow_symlinks=False)
                                found.append(StoredObject(ns.name, key, st.st_size, e.path))
        except OSError as e:
            raise CacheCliError(f"cannot read the disk tier at {self.root}: {e}") from None
        return found

    def read_headers(self, objects: Sequence[StoredObject]) -> list[BlockHeader | None]:
        out: list[BlockHeader | None] = []
        for obj in objects:
            try:
                with open(obj.ref, "rb") as f:
                    out.append(read_header(f.read(HEADER_READ_BYTES)))
            except (OSError, CorruptObjectError):
                out.append(None)
        return out

    def drop_all(self) -> int:
        """Every namespace's objects: all but those of a fresh, empty namespace of our own."""
        if not self.exists:
            return 0
        sentinel = f"kvtier-cli-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            return self._drop_other_namespaces(sentinel)
        finally:
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(self.root, sentinel))

    def keep_only(self, namespace: str) -> int:
        if not self.exists:
            return 0
        kept_dir = os.path.join(self.root, namespace)
        existed = os.path.isdir(kept_dir)
        try:
            return self._drop_other_namespaces(namespace)
        finally:
            if not existed:  # the tier made the folder of the kept namespace; leave no trace
                with contextlib.suppress(OSError):
                    os.rmdir(kept_dir)

    def _drop_other_namespaces(self, namespace: str) -> int:
        tier = DiskTier(self.root, namespace, _NO_CAPACITY_LIMIT)
        dropped = tier.drop_other_namespaces()
        if tier.stats().errors:
            raise CacheCliError(
                f"disk tier at {self.root}: {tier.stats().errors} file operation(s) failed "
                f"(permissions?); {dropped} objects were removed"
            )
        return dropped

    def close(self) -> None:
        pass


class RedisStore:
    name = "redis"

    def __init__(self, url: str, timeout_s: float) -> None:
        self.url = url
        self.where = _redact(url)
        self.note = ""
        self.timeout_s = timeout_s
        try:
            _, self.cluster = parse_url(url)
        except ValueError as e:
            raise CacheCliError(str(e)) from None
        if not ping(url, timeout_s):
            raise CacheCliError(
                f"cannot reach Redis at {self.where} (no answer to PING within {timeout_s:g}s)"
            )
        self._client = _connect(url, timeout_s, timeout_s)

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except (redis.RedisError, OSError) as e:
            raise CacheCliError(f"Redis at {self.where} failed: {e}") from None

    def scan(self) -> list[StoredObject]:
        pattern = f"{KEY_PREFIX}:*".encode()
        with self._errors():
            if self.cluster:
                names = self._client.scan_iter(
                    match=pattern, count=1000, target_nodes=redis.cluster.RedisCluster.PRIMARIES
                )
            else:
                names = self._client.scan_iter(match=pattern, count=1000)
            parsed = [(n, p) for n in names if (p := _parse_name(n)) is not None]
            found: list[StoredObject] = []
            for batch in _batches(parsed, _REDIS_BATCH):
                pipe = self._client.pipeline(transaction=False)
                for name, _ in batch:
                    pipe.strlen(name)
                for (name, (ns, key)), size in zip(batch, pipe.execute(), strict=True):
                    if size:  # 0: deleted (or expired) since the scan
                        found.append(StoredObject(ns, key, int(size), name))
        return found

    def read_headers(self, objects: Sequence[StoredObject]) -> list[BlockHeader | None]:
        out: list[BlockHeader | None] = []
        with self._errors():
            for batch in _batches(list(objects), _REDIS_BATCH):
                pipe = self._client.pipeline(transaction=False)
                for obj in batch:
                    pipe.getrange(obj.ref, 0, HEADER_READ_BYTES - 1)
                for prefix in pipe.execute():
                    try:
                        out.append(read_header(prefix) if prefix else None)
                    except CorruptObjectError:
                        out.append(None)
        return out

    def drop_all(self) -> int:
        return self._drop_other_namespaces(f"kvtier-cli-{os.getpid()}-{secrets.token_hex(4)}")

    def keep_only(self, namespace: str) -> int:
        return self._drop_other_namespaces(namespace)

    def _drop_other_namespaces(self, namespace: str) -> int:
        tier = RedisTier(
            self.url, namespace, timeout_seconds=self.timeout_s, connect_timeout_seconds=self.timeout_s
        )
        try:
            dropped = tier.drop_other_namespaces()
            if tier.stats().errors:
                raise CacheCliError(f"Redis at {self.where} failed midway; {dropped} objects were deleted")
            return dropped
        finally:
            tier.close()

    def close(self) -> None:
        with contextlib.suppress(redis.RedisError, OSError):
            self._client.close()


def _subdirs(path: str, accept: Any) -> list[os.DirEntry[str]]:
    with os.scandir(path) as it:
        return [e for e in it if accept(e.name) and e.is_dir(follow_symlinks=False)]


def _is_hex2(name: str) -> bool:
    return len(name) == 2 and all(c in "0123456789abcdef" for c in name)


def _batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# ------------------------------------------------------------------------------------------ set-up


@dataclass
class Selection:
    settings: TierSettings
    names: list[str]  # in hierarchy order; may include "host" (reported, never opened)


def _select(
    tier: TierName | None, config: str | None, disk_path: str | None, redis_url: str | None
) -> Selection:
    cfg = EngineConfig.load({"disk_path": disk_path, "redis_url": redis_url}, yaml_path=config)
    settings = cfg.tiers
    if tier is not None:
        names = [tier.value]
    else:
        names = settings.enabled(cuda=False)  # host (never opened here) only when listed by name
        if disk_path is not None and "disk" not in names:
            names.append("disk")
        if redis_url is not None and "redis" not in names:
            names.append("redis")
    if "redis" in names and not settings.redis_url:
        raise CacheCliError(
            "the redis tier needs a URL: --redis-url, KVTIER_REDIS_URL or redis_url in --config"
        )
    if not names:
        raise CacheCliError(
            f"no tiers configured (tiers={settings.tiers!r}): "
            "pass --tier disk|redis, --disk-path or --redis-url"
        )
    return Selection(settings, names)


def _open(name: str, settings: TierSettings) -> Store:
    if name == "disk":
        return DiskStore(settings.resolved_disk_path())
    assert settings.redis_url  # _select checked it
    return RedisStore(settings.redis_url, max(settings.redis_timeout, CLI_REDIS_TIMEOUT_S))


@contextlib.contextmanager
def _stores(selection: Selection) -> Iterator[list[Store]]:
    """Open every selected store first, so that an unreachable Redis fails before anything changes."""
    stores: list[Store] = []
    try:
        for name in selection.names:
            if name != "host":
                stores.append(_open(name, selection.settings))
        yield stores
    finally:
        for s in stores:
            s.close()


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Known failures become one line on stderr and exit code 2."""
    try:
        yield
    except (CacheCliError, ConfigError, ValueError, OSError, redis.RedisError) as e:
        typer.echo(f"error: {e}", err=True)  # plain: a long URL or path must not be wrapped
        raise typer.Exit(2) from None


def _console() -> Console:
    # Not a terminal (a pipe, a test): wide enough that fingerprints never wrap.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)


# ------------------------------------------------------------------------------------------ summaries


@dataclass
class NamespaceSummary:
    namespace: str
    entries: int = 0
    bytes: int = 0


@dataclass
class TierSummary:
    tier: str
    where: str
    note: str = ""
    entries: int = 0
    bytes: int = 0
    namespaces: dict[str, NamespaceSummary] = field(default_factory=dict)
    sampled: int = 0
    unreadable: int = 0  # sampled objects whose header did not parse
    raw_bytes: int = 0  # sum of raw_length over the readable sample (after quantization)
    payload_bytes: int = 0  # sum of payload_length over the same objects
    dense_bytes: int = 0  # what those blocks take unquantized and uncompressed
    codecs: Counter[str] = field(default_factory=Counter)

    @property
    def compression_ratio(self) -> float | None:
        return self.raw_bytes / self.payload_bytes if self.payload_bytes else None

    @property
    def dense_ratio(self) -> float | None:
        """Quantization and compression together: unquantized block bytes per stored payload byte."""
        return self.dense_bytes / self.payload_bytes if self.payload_bytes else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "tier": self.tier,
            "where": self.where,
            "note": self.note,
            "entries": self.entries,
            "bytes": self.bytes,
            "namespaces": [
                {"namespace": n.namespace, "entries": n.entries, "bytes": n.bytes}
                for n in sorted(self.namespaces.values(), key=lambda n: n.namespace)
            ],
            "sampled": self.sampled,
            "unreadable": self.unreadable,
            "raw_bytes": self.raw_bytes,
            "payload_bytes": self.payload_bytes,
            "compression_ratio": self.compression_ratio,
            "dense_ratio": self.dense_ratio,
            "codecs": dict(sorted(self.codecs.items())),
        }


def codec_name(header: BlockHeader) -> str:
    """The codec as settings spell it: ``none``, ``lz4``, ``int8+zstd``..."""
    parts = [p for p in (header.quantization, header.compression) if p != "none"]
    return "+".join(parts) or "none"


def summarize(store: Store, sample: int, seed: int = 0) -> TierSummary:
    objects = store.scan()
    summary = TierSummary(store.name, store.where, store.note)
    for obj in objects:
        ns = summary.namespaces.setdefault(obj.namespace, NamespaceSummary(obj.namespace))
        ns.entries += 1
        ns.bytes += obj.size
        summary.entries += 1
        summary.bytes += obj.size
    picked = random.Random(seed).sample(objects, min(sample, len(objects)))
    for header in store.read_headers(picked):
        summary.sampled += 1
        if header is None:
            summary.unreadable += 1
            continue
        summary.codecs[codec_name(header)] += 1
        summary.raw_bytes += header.raw_length
        summary.payload_bytes += header.payload_length
        with contextlib.suppress(ValueError, KeyError):  # an unknown dtype name: not in the dense ratio
            summary.dense_bytes += header.layout.bytes_per_block
    return summary


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


# ------------------------------------------------------------------------------------------ commands


@cache_app.command()
def stats(
    tier: TierOpt = None,
    disk_path: DiskPathOpt = None,
    redis_url: RedisUrlOpt = None,
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    sample: Annotated[
        int, typer.Option(min=0, help="objects whose header is read for the ratios")
    ] = DEFAULT_SAMPLE,
) -> None:
    """Objects and bytes per tier and per namespace (model fingerprint); compression from a sample."""
    with _user_errors():
        selection = _select(tier, config, disk_path, redis_url)
        with _stores(selection) as stores:
            summaries = {s.name: summarize(s, sample) for s in stores}
    if as_json:
        tiers: list[dict[str, Any]] = [
            {"tier": "host", "note": HOST_NOTE} if name == "host" else summaries[name].as_dict()
            for name in selection.names
        ]
        typer.echo(json.dumps({"tiers": tiers}, indent=2))
        return
    table = Table(title="kvtier cache", title_justify="left")
    table.add_column("tier")
    table.add_column("where / namespace (model fingerprint)", no_wrap=True)
    table.add_column("objects", justify="right")
    table.add_column("bytes", justify="right")
    table.add_column("compression", justify="right")
    table.add_column("vs dense", justify="right")
    table.add_column("codecs (sampled)")
    for name in selection.names:
        if name == "host":
            table.add_row("host", HOST_NOTE, "", "", "", "", "")
            continue
        s = summaries[name]
        codecs = ", ".join(f"{c} {n}" for c, n in sorted(s.codecs.items()))
        if s.unreadable:
            codecs += f"{', ' if codecs else ''}unreadable {s.unreadable}"
        table.add_row(
            name,
            f"{s.where} ({s.note})" if s.note else s.where,
            str(s.entries),
            _human(s.bytes),
            _ratio(s.compression_ratio),
            _ratio(s.dense_ratio),
            codecs or "-",
            style="bold",
        )
        for ns in sorted(s.namespaces.values(), key=lambda n: -n.bytes):
            table.add_row("", f"  {ns.namespace}", str(ns.entries), _human(ns.bytes), "", "", "")
    out = _console()
    out.print(table)
    if "host" not in selection.names:
        out.print(f"[dim]host tier: {HOST_NOTE}[/dim]")
    out.print(
        "[dim]compression = raw / stored payload over the sampled objects; vs dense = unquantized, "
        "uncompressed block bytes / stored payload[/dim]"
    )


@cache_app.command("ls")
def list_objects(
    tier: TierOpt = None,
    disk_path: DiskPathOpt = None,
    redis_url: RedisUrlOpt = None,
    config: ConfigOpt = None,
    limit: Annotated[int, typer.Option(min=0, help="at most this many objects per tier; 0: all")] = 100,
    namespace: Annotated[str | None, typer.Option(help="only this namespace (model fingerprint)")] = None,
) -> None:
    """One line per stored object: tier, namespace, key (short hex), bytes, codec, tokens."""
    with _user_errors():
        selection = _select(tier, config, disk_path, redis_url)
        with _stores(selection) as stores:
            typer.echo(
                f"{'tier':<5}  {'namespace':<32}  {'key':<16}  {'bytes':>10}  {'codec':<10}  {'tokens':>6}"
            )
            for store in stores:
                objects = sorted(
                    (o for o in store.scan() if namespace is None or o.namespace == namespace),
                    key=lambda o: (o.namespace, o.key),
                )
                shown = objects if limit == 0 else objects[:limit]
                for obj, header in zip(shown, store.read_headers(shown), strict=True):
                    codec = "corrupt" if header is None else codec_name(header)
                    tokens = "-" if header is None else str(len(header.tokens))
                    if header is not None and header.object_length != obj.size:
                        codec += " (truncated)" if obj.size < header.object_length else " (extra bytes)"
                    typer.echo(
                        f"{store.name:<5}  {obj.namespace:<32}  {obj.key.hex()[:16]:<16}  "
                        f"{obj.size:>10}  {codec:<10}  {tokens:>6}"
                    )
                if len(shown) < len(objects):
                    typer.echo(
                        f"{store.name}: {len(objects) - len(shown)} more objects (--limit 0 lists all)",
                        err=True,
                    )
        if "host" in selection.names:
            typer.echo(f"host: {HOST_NOTE}", err=True)


@cache_app.command()
def clear(
    tier: TierOpt = None,
    disk_path: DiskPathOpt = None,
    redis_url: RedisUrlOpt = None,
    config: ConfigOpt = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")] = False,
) -> None:
    """Delete every stored KV object (all namespaces) of the selected tiers. No model is loaded."""
    with _user_errors():
        selection = _select(tier, config, disk_path, redis_url)
        if selection.names == ["host"]:
            raise CacheCliError(f"the host tier {HOST_NOTE}")
        if "host" in selection.names:
            typer.echo(f"host: {HOST_NOTE}", err=True)
        with _stores(selection) as stores:
            counts = {s.name: len(s.scan()) for s in stores}
            what = ", ".join(f"{counts[s.name]} objects from {s.name} {s.where}" for s in stores)
            if not yes:
                typer.confirm(f"Delete {what} (all namespaces)?", abort=True)
            for store in stores:
                removed = store.drop_all()
                typer.echo(f"{store.name} {store.where}: removed {removed} objects")


@cache_app.command()
def gc(
    model: Annotated[
        str | None,
        typer.Option(
            help="keep this model's objects (folder or synthetic:<name>); it is loaded on the CPU "
            "to compute its fingerprint"
        ),
    ] = None,
    fingerprint: Annotated[
        str | None, typer.Option(help="keep this namespace instead of loading --model to compute it")
    ] = None,
    dtype: Annotated[
        str | None, typer.Option(help="the model's dtype as the engine runs it (default: settings)")
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="the engine's device, for dtype auto (default: settings)")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="synthetic weights seed (default: settings)")] = None,
    tier: TierOpt = None,
    disk_path: DiskPathOpt = None,
    redis_url: RedisUrlOpt = None,
    config: ConfigOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="only say what would be dropped")] = False,
) -> None:
    """Drop the objects of every model fingerprint (namespace) but the given model's."""
    with _user_errors():
        if (model is None) == (fingerprint is None):
            raise CacheCliError("give exactly one of --model and --fingerprint")
        selection = _select(tier, config, disk_path, redis_url)
        if selection.names == ["host"]:
            raise CacheCliError(f"the host tier {HOST_NOTE}")
        if fingerprint is None:
            assert model is not None
            fingerprint, described = model_fingerprint(model, config, dtype, device, seed)
            typer.echo(f"keeping model fingerprint {fingerprint} ({described})")
        else:
            typer.echo(f"keeping namespace {fingerprint}")
        if not valid_namespace(fingerprint):
            raise CacheCliError(f"invalid fingerprint {fingerprint!r}")
        with _stores(selection) as stores:
            for store in stores:
                per_ns = Counter(o.namespace for o in store.scan())
                kept = per_ns.pop(fingerprint, 0)
                others = f"{sum(per_ns.values())} objects of {len(per_ns)} other namespace(s)"
                if dry_run:
                    typer.echo(f"{store.name} {store.where}: would keep {kept} objects, drop {others}")
                    continue
                dropped = store.keep_only(fingerprint)
                typer.echo(
                    f"{store.name} {store.where}: kept {kept} objects, dropped {dropped} ({others} found)"
                )


def model_fingerprint(
    model: str, config: str | None, dtype: str | None, device: str | None, seed: int | None
) -> tuple[str, str]:
    """The fingerprint an engine would compute for ``model`` with these settings, loaded on the CPU.

    The fingerprint covers the dtype, and ``dtype: auto`` means bf16 on CUDA and float32 on the CPU for
    synthetic models: the device only decides that (the weights are loaded on the CPU either way).
    """
    import torch

    from kvtier.model.loader import SYNTHETIC_PREFIX, load_model

    cfg = EngineConfig.load(
        {"model": model, "dtype": dtype, "device": device, "seed": seed}, yaml_path=config
    )
    ms = cfg.model
    torch_dtype: torch.dtype | None = None
    if ms.dtype != "auto":
        if ms.dtype not in ("float32", "float16", "bfloat16"):
            raise CacheCliError(f"unsupported dtype {ms.dtype!r}; use auto, float32, float16, bfloat16")
        torch_dtype = getattr(torch, ms.dtype)
    elif ms.model.startswith(SYNTHETIC_PREFIX):
        kind = ms.device.split(":")[0]
        cuda = torch.cuda.is_available() if kind == "auto" else kind == "cuda"
        torch_dtype = torch.bfloat16 if cuda else torch.float32
    loaded = load_model(ms.model, torch.device("cpu"), torch_dtype, ms.seed)
    dtype_name = str(loaded.config.dtype).removeprefix("torch.")
    return loaded.fingerprint, f"{ms.model}, {dtype_name}, seed {ms.seed}"
