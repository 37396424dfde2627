"""``kvtier cache``: inspect and manage the disk, Redis and memcached tiers without running an engine.

The tiers come from the settings (``--disk-path``, ``--redis-url``, ``--memcached-url``, ``--config``
YAML, ``KVTIER_*``; see ``kvtier.config``): by default those of ``tiers`` (``auto``: disk, plus Redis
and memcached when their URL is set), plus any tier whose location is given by a flag; ``--tier``
picks one. The host tier lives only inside a running engine, so there is nothing here to look at:
its numbers are in that engine's metrics.

Everything goes through the tiers' own maintenance operations (``Tier.scan``, ``read_prefixes``,
``drop_namespaces``) and ``cache.inventory``: this module only formats, so it removes exactly what a
tier would and nothing else that shares the folder or the server.

memcached cannot list its objects: ``stats`` shows its servers' own numbers (items, bytes, evictions,
hit ratio, item size) and the namespaces registered there, ``ls`` says it cannot list, and ``clear``
/ ``gc`` invalidate namespaces by bumping the generations that object names carry.

Errors (bad settings, an unreachable Redis, an unreadable folder) print one line naming the cause and
exit with code 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from kvtier.cache.codec import secret_from_env
from kvtier.cache.inventory import (
    NO_LISTING,
    codec_name,
    drop_namespaces,
    read_headers,
    server_summary,
    summarize,
)
from kvtier.cache.inventory import (
    lists_objects as _lists,
)
from kvtier.cache.keys import tier_namespace, valid_namespace
from kvtier.cache.tiers.base import Tier, TierError
from kvtier.config import ConfigError, EngineConfig, TierSettings
from kvtier.engine.tiers import open_for_maintenance

cache_app = typer.Typer(
    no_args_is_help=True,
    help="Inspect and manage the disk, Redis and memcached KV tiers (stats, ls, clear, gc).",
)

HOST_NOTE = "lives only inside a running engine (see its metrics); nothing to inspect here"
DEFAULT_SAMPLE = 200


class CacheCliError(Exception):
    """A user-facing failure: printed as one line, exit code 2."""


class TierName(str, Enum):
    host = "host"
    disk = "disk"
    redis = "redis"
    memcached = "memcached"


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
MemcachedUrlOpt = Annotated[
    str | None,
    typer.Option("--memcached-url", help="memcached://host:port[,host:port...] (default: settings)"),
]
ConfigOpt = Annotated[str | None, typer.Option("--config", help="YAML settings file (or KVTIER_CONFIG)")]


# ------------------------------------------------------------------------------------------ set-up


@dataclass
class Selection:
    settings: TierSettings
    names: list[str]  # in hierarchy order; may include "host" (reported, never opened)


def _select(
    tier: TierName | None,
    config: str | None,
    disk_path: str | None,
    redis_url: str | None,
    memcached_url: str | None = None,
) -> Selection:
    overrides = {"disk_path": disk_path, "redis_url": redis_url, "memcached_url": memcached_url}
    cfg = EngineConfig.load(overrides, yaml_path=config)
    settings = cfg.tiers
    if tier is not None:
        names = [tier.value]
    else:
        names = settings.enabled(cuda=False)  # host (never opened here) only when listed by name
        if disk_path is not None and "disk" not in names:
            names.append("disk")
        if redis_url is not None and "redis" not in names:
            names.append("redis")
        if memcached_url is not None and "memcached" not in names:
            names.append("memcached")
    for shared in ("redis", "memcached"):
        if shared in names and not getattr(settings, f"{shared}_url"):
            raise CacheCliError(
                f"the {shared} tier needs a URL: --{shared}-url, KVTIER_{shared.upper()}_URL "
                f"or {shared}_url in --config"
            )
    if not names:
        raise CacheCliError(
            f"no tiers configured (tiers={settings.tiers!r}): "
            "pass --tier disk|redis|memcached, --disk-path, --redis-url or --memcached-url"
        )
    return Selection(settings, names)


@contextlib.contextmanager
def _stores(selection: Selection) -> Iterator[list[Tier]]:
    """The selected tiers (the host tier excepted), opened for maintenance, closed at the end."""
    stores: list[Tier] = []
    try:
        for name in selection.names:
            if name != "host":
                stores.append(open_for_maintenance(name, selection.settings))
        yield stores
    finally:
        for s in stores:
            s.close()


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Known failures become one line on stderr and exit code 2."""
    try:
        yield
    except (CacheCliError, TierError, ConfigError, ValueError, OSError) as e:
        typer.echo(f"error: {e}", err=True)  # plain: a long URL or path must not be wrapped
        raise typer.Exit(2) from None


def _console() -> Console:
    # Not a terminal (a pipe, a test): wide enough that fingerprints never wrap.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)


# ------------------------------------------------------------------------------------------ summaries


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
    memcached_url: MemcachedUrlOpt = None,
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    sample: Annotated[
        int, typer.Option(min=0, help="objects whose header is read for the ratios")
    ] = DEFAULT_SAMPLE,
) -> None:
    """Objects and bytes per tier and per namespace (model fingerprint); compression from a sample."""
    with _user_errors():
        selection = _select(tier, config, disk_path, redis_url, memcached_url)
        with _stores(selection) as stores:
            summaries = {s.name: summarize(s, sample) for s in stores if _lists(s)}
            servers = {s.name: server_summary(s) for s in stores if not _lists(s)}
    if as_json:
        tiers: list[dict[str, Any]] = [
            {"tier": "host", "note": HOST_NOTE}
            if name == "host"
            else servers[name]
            if name in servers
            else summaries[name].as_dict()
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
        if name in servers:
            _server_rows(table, servers[name])
            continue
        s = summaries[name]
        codecs = ", ".join(f"{c} {n}" for c, n in sorted(s.codecs.items()))
        if s.unreadable:
            codecs += f"{', ' if codecs else ''}unreadable {s.unreadable}"
        table.add_row(
            name,
            s.where,
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
    memcached_url: MemcachedUrlOpt = None,
    config: ConfigOpt = None,
    limit: Annotated[int, typer.Option(min=0, help="at most this many objects per tier; 0: all")] = 100,
    namespace: Annotated[str | None, typer.Option(help="only this namespace (model fingerprint)")] = None,
) -> None:
    """One line per stored object: tier, namespace, key (short hex), bytes, codec, tokens."""
    with _user_errors():
        selection = _select(tier, config, disk_path, redis_url, memcached_url)
        with _stores(selection) as stores:
            typer.echo(
                f"{'tier':<5}  {'namespace':<32}  {'key':<16}  {'bytes':>10}  {'codec':<10}  {'tokens':>6}"
            )
            for store in stores:
                if not _lists(store):
                    typer.echo(f"{store.name}: {NO_LISTING} (kvtier cache stats shows its numbers)", err=True)
                    continue
                objects = sorted(store.scan(namespace), key=lambda o: (o.namespace, o.key))
                shown = objects if limit == 0 else objects[:limit]
                for obj, header in zip(shown, read_headers(store, shown), strict=True):
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
    memcached_url: MemcachedUrlOpt = None,
    config: ConfigOpt = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")] = False,
) -> None:
    """Delete every stored KV object (all namespaces) of the selected tiers. No model is loaded."""
    with _user_errors():
        selection = _select(tier, config, disk_path, redis_url, memcached_url)
        if selection.names == ["host"]:
            raise CacheCliError(f"the host tier {HOST_NOTE}")
        if "host" in selection.names:
            typer.echo(f"host: {HOST_NOTE}", err=True)
        with _stores(selection) as stores:
            counts = {s.name: f"{len(s.scan())} objects" if _lists(s) else "every object" for s in stores}
            what = ", ".join(f"{counts[s.name]} from {s.name} {s.where}" for s in stores)
            if not yes:
                typer.confirm(f"Delete {what} (all namespaces)?", abort=True)
            for store in stores:
                removed = drop_namespaces(store, keep=None)
                if _lists(store):
                    typer.echo(f"{store.name} {store.where}: removed {removed} objects")
                else:
                    typer.echo(
                        f"{store.name} {store.where}: every namespace invalidated ({removed} registered); "
                        "memcached reclaims the memory as it needs it"
                    )


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
    memcached_url: MemcachedUrlOpt = None,
    config: ConfigOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="only say what would be dropped")] = False,
) -> None:
    """Drop the objects of every model fingerprint (namespace) but the given model's."""
    with _user_errors():
        if (model is None) == (fingerprint is None):
            raise CacheCliError("give exactly one of --model and --fingerprint")
        selection = _select(tier, config, disk_path, redis_url, memcached_url)
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
            scans = [store.scan() if _lists(store) else None for store in stores]  # all answer first
            for store, found in zip(stores, scans, strict=True):
                if found is None:
                    _gc_unlisted(store, fingerprint, dry_run)
                    continue
                per_ns = Counter(o.namespace for o in found)
                kept = per_ns.pop(fingerprint, 0)
                others = f"{sum(per_ns.values())} objects of {len(per_ns)} other namespace(s)"
                if dry_run:
                    typer.echo(f"{store.name} {store.where}: would keep {kept} objects, drop {others}")
                    continue
                dropped = drop_namespaces(store, keep=fingerprint)
                typer.echo(
                    f"{store.name} {store.where}: kept {kept} objects, dropped {dropped} ({others} found)"
                )


# ------------------------------------------------------------------------------------------ unlisted


def _server_rows(table: Table, summary: dict[str, Any]) -> None:
    """A tier that cannot count its objects: the bytes its servers hold, then each server's numbers."""
    servers = summary["servers"]
    used = sum(s["bytes"] for s in servers.values())
    table.add_row(summary["tier"], summary["where"], "-", _human(used), "", "", "-", style="bold")
    for address, s in servers.items():
        ratio = "-" if s["hit_ratio"] is None else f"{100 * s['hit_ratio']:.1f}%"
        table.add_row("", f"  {address}: {s['items']} items, hit ratio {ratio}, {s['evictions']} evictions",
                      "", _human(s["bytes"]), "", "", "")  # fmt: skip
        table.add_row("", f"    item size {_human(s['item_size_max'])}, memory {_human(s['limit_bytes'])}",
                      "", "", "", "", "")  # fmt: skip
    for ns in summary["namespaces"]:
        table.add_row("", f"  {ns} (registered; its objects cannot be counted)", "", "", "", "", "")


def _gc_unlisted(store: Tier, fingerprint: str, dry_run: bool) -> None:
    others = [ns for ns in store.registered_namespaces() if ns != fingerprint]  # type: ignore[attr-defined]
    if dry_run:
        typer.echo(f"{store.name} {store.where}: would invalidate {len(others)} other namespace(s)")
        return
    dropped = drop_namespaces(store, keep=fingerprint)
    typer.echo(f"{store.name} {store.where}: kept {fingerprint}, invalidated {dropped} other namespace(s)")


def model_fingerprint(
    model: str, config: str | None, dtype: str | None, device: str | None, seed: int | None
) -> tuple[str, str]:
    """The namespace an engine would use for ``model`` with these settings: its fingerprint (computed
    without building the model) plus the key id of ``KVTIER_CACHE_SECRET`` when that is set.

    The fingerprint covers the dtype (``auto``: bf16 on CUDA, float32 on the CPU for synthetic
    models) and, for synthetic weights, the device that drew them.
    """
    import torch

    from kvtier.engine.engine import resolve_device
    from kvtier.model.loader import SYNTHETIC_PREFIX, fingerprint_of

    cfg = EngineConfig.load(
        {"model": model, "dtype": dtype, "device": device, "seed": seed}, yaml_path=config
    )
    ms = cfg.model
    torch_dtype: torch.dtype | None = None
    engine_device = resolve_device(ms.device)
    if ms.dtype != "auto":
        if ms.dtype not in ("float32", "float16", "bfloat16"):
            raise CacheCliError(f"unsupported dtype {ms.dtype!r}; use auto, float32, float16, bfloat16")
        torch_dtype = getattr(torch, ms.dtype)
    elif ms.model.startswith(SYNTHETIC_PREFIX):
        torch_dtype = torch.bfloat16 if engine_device.type == "cuda" else torch.float32
    fingerprint = fingerprint_of(ms.model, engine_device, torch_dtype, ms.seed)
    dtype_name = "auto" if torch_dtype is None else str(torch_dtype).removeprefix("torch.")
    secret = secret_from_env()
    keyed = ", signed by the cache secret" if secret is not None else ""
    return tier_namespace(fingerprint, secret), f"{ms.model}, {dtype_name}, seed {ms.seed}{keyed}"
