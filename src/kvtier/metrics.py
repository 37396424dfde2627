"""Prometheus metrics of one engine, on a registry the caller owns (no global state).

    registry = CollectorRegistry()
    metrics = EngineMetrics(registry)
    ...
    metrics.update(engine)  # on the thread that runs the engine, e.g. after each step or before a scrape
    body = render(registry)  # text exposition format, served with CONTENT_TYPE_LATEST

Why a custom collector and not Gauges set from the engine's counters: the engine's numbers are
already cumulative counters (EngineStats, BlockPool.evictions, TierStats, HierarchyStats), so they are
exposed as what they are, Prometheus *counters* (``_total``, usable with ``rate()``), which a Gauge set
from them could not be; and the set of tiers (a label) follows the engine at each update with no stale
label values left behind. ``update`` reads the engine once into an immutable snapshot of metric families;
``collect`` (the scrape, on the HTTP server's thread) only hands that snapshot out. So a scrape never
reads the engine while its thread mutates it, and costs no engine time. What a scrape shows is as fresh
as the last ``update``.

Metric names (all prefixed ``kvtier:``, vLLM's style):

- engine: ``prompt_tokens_total``, ``cached_prompt_tokens_total``, ``computed_tokens_total``,
  ``generated_tokens_total``, ``engine_steps_total``, ``requests_finished_total``,
  ``prefix_cache_hit_ratio``, ``num_preemptions_total``; vLLM's ``prefix_cache_queries_total`` (prompt
  tokens looked up) and ``prefix_cache_hits_total{tier}`` (of those, served by the device pool or
  loaded from a tier); ``num_requests_running`` / ``_waiting`` / ``_loading``; histograms
  ``time_to_first_token_seconds``, ``time_per_output_token_seconds``, ``e2e_request_latency_seconds``.
- device pool: ``kv_cache_usage_perc`` (fraction of blocks held by requests), ``pool_blocks``,
  ``pool_blocks_available``, ``pool_blocks_cached``, ``pool_blocks_in_use``, ``pool_evictions_total``.
- each tier below the device (label ``tier``: host, disk, redis, memcached): ``tier_lookups_total``,
  ``tier_hits_total``, ``tier_misses_total``, ``tier_puts_total``, ``tier_read_bytes_total``,
  ``tier_written_bytes_total``, ``tier_read_seconds_total``, ``tier_write_seconds_total``,
  ``tier_evictions_total``, ``tier_corrupt_total``, ``tier_errors_total``, ``tier_blocks_loaded_total``,
  ``tier_dropped_writes_total`` (stores a tier refused: no room, too large),
  the cost model's ``tier_cost_latency_seconds`` and ``tier_cost_bandwidth_bytes_per_second``, and
  ``tier_extra{tier,name}``: each tier's own extra numbers (the Redis and memcached circuit breakers,
  dropped writes, memcached's partial objects...).
- the hierarchy: ``hierarchy_decisions_total{decision="load"|"recompute"}``,
  ``hierarchy_blocks_loaded_total``, ``hierarchy_blocks_written_total``,
  ``hierarchy_predicted_load_seconds_total``, ``hierarchy_actual_load_seconds_total``,
  ``hierarchy_corrupt_total``, ``hierarchy_write_errors_total``, ``hierarchy_writes_dropped_total``,
  ``hierarchy_file_writes_skipped_total``,
  ``hierarchy_write_queue_bytes``, ``prefill_seconds_per_token`` and
  ``step_fixed_seconds`` (the recompute side of the load-or-recompute decision: a step costs the
  fixed time plus the per-token time for each token).

Tier and hierarchy metrics are present only while the engine has a hierarchy (``engine.hierarchy``).
Given a ``model_name`` (the server passes the name it serves), every sample carries it as the label
``model_name``, as vLLM's do: dashboards and alerts written for a fleet of servers tell them apart.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from kvtier.engine.engine import Engine
    from kvtier.engine.output import LatencyLog

__all__ = ["CONTENT_TYPE_LATEST", "E2E_BUCKETS", "TPOT_BUCKETS", "TTFT_BUCKETS", "EngineMetrics", "render"]

PREFIX = "kvtier:"
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0)
# a tier's TierStats.extra entries that count stores it refused
_DROPPED_EXTRAS = ("dropped", "dropped_too_large")

Kind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True)
class _Spec:
    kind: Kind
    doc: str
    labels: tuple[str, ...] = ()


# name (without the prefix, and without _total for counters) -> what it is
SPECS: dict[str, _Spec] = {
    # engine
    "prompt_tokens": _Spec("counter", "Prompt tokens of finished requests."),
    "cached_prompt_tokens": _Spec("counter", "Prompt tokens of finished requests served from the KV cache."),
    "computed_tokens": _Spec(
        "counter", "Tokens run through the model: prefill chunks, decodes and recomputed blocks."
    ),
    "generated_tokens": _Spec("counter", "Tokens generated."),
    "engine_steps": _Spec("counter", "Engine steps run."),
    "requests_finished": _Spec("counter", "Requests finished."),
    "prefix_cache_hit_ratio": _Spec(
        "gauge", "cached_prompt_tokens / prompt_tokens since the engine started."
    ),
    "num_preemptions": _Spec("counter", "Requests preempted (blocks released, recomputed later)."),
    "prefix_cache_queries": _Spec("counter", "Prompt tokens of finished requests looked up in the cache."),
    "prefix_cache_hits": _Spec(
        "counter", "Prompt tokens served from the cache, by where they were found.", ("tier",)
    ),
    "num_requests_running": _Spec("gauge", "Requests in the running batch."),
    "num_requests_waiting": _Spec("gauge", "Requests waiting for admission."),
    "num_requests_loading": _Spec("gauge", "Requests waiting for KV loads from a tier."),
    "time_to_first_token_seconds": _Spec("histogram", "Time from arrival to first token, finished requests."),
    "time_per_output_token_seconds": _Spec(
        "histogram", "Mean time per output token after the first, finished requests."
    ),
    "e2e_request_latency_seconds": _Spec("histogram", "Time from arrival to finish, finished requests."),
    # device pool
    "kv_cache_usage_perc": _Spec("gauge", "Fraction of device KV blocks held by requests (1 = full)."),
    "pool_blocks": _Spec("gauge", "KV blocks in the device pool."),
    "pool_blocks_available": _Spec("gauge", "Device blocks an allocation can take now: free plus evictable."),
    "pool_blocks_cached": _Spec("gauge", "Device blocks holding a keyed, shareable KV block."),
    "pool_blocks_in_use": _Spec("gauge", "Device blocks referenced by running requests."),
    "pool_evictions": _Spec("counter", "Cached device blocks evicted to make room."),
    # tiers
    "tier_lookups": _Spec("counter", "Keys asked about (lookup and get).", ("tier",)),
    "tier_hits": _Spec("counter", "Keys found by get.", ("tier",)),
    "tier_misses": _Spec("counter", "Keys not found by get.", ("tier",)),
    "tier_puts": _Spec("counter", "Objects written.", ("tier",)),
    "tier_read_bytes": _Spec("counter", "Bytes read.", ("tier",)),
    "tier_written_bytes": _Spec("counter", "Bytes written.", ("tier",)),
    "tier_read_seconds": _Spec("counter", "Wall time spent in get.", ("tier",)),
    "tier_write_seconds": _Spec("counter", "Wall time spent in put.", ("tier",)),
    "tier_evictions": _Spec("counter", "Objects evicted by the tier's policy.", ("tier",)),
    "tier_corrupt": _Spec(
        "counter", "Objects that failed verification (counted as misses, deleted).", ("tier",)
    ),
    "tier_errors": _Spec("counter", "Backend failures turned into misses or dropped writes.", ("tier",)),
    "tier_dropped_writes": _Spec("counter", "Stores the tier refused (no room, too large).", ("tier",)),
    "tier_blocks_loaded": _Spec("counter", "Blocks loaded from this tier into the device.", ("tier",)),
    "tier_cost_latency_seconds": _Spec("gauge", "Cost model: fixed latency of a read.", ("tier",)),
    "tier_cost_bandwidth_bytes_per_second": _Spec("gauge", "Cost model: measured read bandwidth.", ("tier",)),
    "tier_extra": _Spec(
        "gauge", "Tier-specific numbers (breaker state, dropped writes...).", ("tier", "name")
    ),
    # hierarchy
    "hierarchy_decisions": _Spec("counter", "Load-or-recompute decisions taken.", ("decision",)),
    "hierarchy_blocks_loaded": _Spec("counter", "Blocks loaded from the tiers into the device."),
    "hierarchy_blocks_written": _Spec("counter", "Blocks written down to the tiers."),
    "hierarchy_predicted_load_seconds": _Spec("counter", "Load time the cost model predicted for the loads."),
    "hierarchy_actual_load_seconds": _Spec("counter", "Load time the loads took."),
    "hierarchy_corrupt": _Spec("counter", "Loaded objects that failed verification."),
    "hierarchy_write_errors": _Spec("counter", "Writes to a tier that failed."),
    "hierarchy_writes_dropped": _Spec(
        "counter", "Block writes dropped: the write queue was full (oldest first), or an exit timed out."
    ),
    "hierarchy_file_writes_skipped": _Spec(
        "counter", "Disk writes skipped because the file writer processes were behind the engine."
    ),
    "hierarchy_write_queue_bytes": _Spec("gauge", "Bytes of blocks queued or being written to the tiers."),
    "prefill_seconds_per_token": _Spec(
        "gauge", "Cost model: fitted model-step time per token (recompute side)."
    ),
    "step_fixed_seconds": _Spec(
        "gauge", "Cost model: fitted fixed time of a model step (weights read, launches)."
    ),
}

# TierStats field -> metric name
_TIER_COUNTERS = {
    "lookups": "tier_lookups",
    "hits": "tier_hits",
    "misses": "tier_misses",
    "puts": "tier_puts",
    "bytes_read": "tier_read_bytes",
    "bytes_written": "tier_written_bytes",
    "read_seconds": "tier_read_seconds",
    "write_seconds": "tier_write_seconds",
    "evictions": "tier_evictions",
    "corrupt": "tier_corrupt",
    "errors": "tier_errors",
}


MODEL_LABEL = "model_name"


def _family(name: str, model_name: str | None = None) -> Metric:
    spec = SPECS[name]
    full = PREFIX + name
    labels = [*([MODEL_LABEL] if model_name is not None else []), *spec.labels]
    if spec.kind == "counter":
        return CounterMetricFamily(full, spec.doc, labels=labels)
    if spec.kind == "gauge":
        return GaugeMetricFamily(full, spec.doc, labels=labels)
    return HistogramMetricFamily(full, spec.doc, labels=labels)


class _Builder:
    """Families of one snapshot, made on first use, in SPECS order; each sample labelled with
    ``model_name`` first when one is given."""

    def __init__(self, model_name: str | None) -> None:
        self.model_name = model_name
        self.leading = [model_name] if model_name is not None else []
        self.families: dict[str, Metric] = {}

    def add(self, name: str, value: float, labels: Sequence[str] = ()) -> None:
        family = self.families.get(name)
        if family is None:
            family = self.families[name] = _family(name, self.model_name)
        assert isinstance(family, CounterMetricFamily | GaugeMetricFamily)
        family.add_metric([*self.leading, *labels], float(value))

    def add_histogram(self, hist: _ListHistogram) -> None:
        family = self.families[hist.name] = _family(hist.name, self.model_name)
        assert isinstance(family, HistogramMetricFamily)
        family.add_metric(self.leading, hist.buckets(), hist.total)

    def done(self) -> tuple[Metric, ...]:
        return tuple(self.families[n] for n in SPECS if n in self.families)


class _ListHistogram:
    """Cumulative buckets fed by the new entries of one of ``EngineStats``'s latency logs."""

    def __init__(self, name: str, bounds: Sequence[float]) -> None:
        if list(bounds) != sorted(set(bounds)) or not bounds:
            raise ValueError(f"{name} buckets must be increasing and non-empty, got {bounds!r}")
        self.name = name
        self.bounds = tuple(bounds)
        self.reset(None)

    def reset(self, source: LatencyLog | None) -> None:
        self.source = source  # the list itself, held so that its identity stays meaningful
        self.seen = 0
        self.counts = [0] * (len(self.bounds) + 1)  # per bucket, the last one is +Inf
        self.total = 0.0

    def feed(self, values: LatencyLog) -> None:
        if values is not self.source or values.count < self.seen:  # another engine, or stats reset
            self.reset(values)
        for v in values.since(self.seen):
            self.counts[bisect.bisect_left(self.bounds, v)] += 1
            self.total += v
        self.seen = values.count

    def buckets(self) -> list[tuple[str, float]]:
        """(upper bound, cumulative count) of each bucket, +Inf last."""
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += n
            buckets.append((floatToGoString(bound), running))
        return buckets


class EngineMetrics(Collector):
    """The metrics of one engine, registered on ``registry``; ``update(engine)`` refreshes them.
    ``model_name``: the label every sample carries (none without it)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        model_name: str | None = None,
        ttft_buckets: Sequence[float] = TTFT_BUCKETS,
        tpot_buckets: Sequence[float] = TPOT_BUCKETS,
        e2e_buckets: Sequence[float] = E2E_BUCKETS,
    ) -> None:
        self._lock = threading.Lock()
        self.model_name = model_name
        self._snapshot: tuple[Metric, ...] = ()
        self._ttft = _ListHistogram("time_to_first_token_seconds", ttft_buckets)
        self._tpot = _ListHistogram("time_per_output_token_seconds", tpot_buckets)
        self._e2e = _ListHistogram("e2e_request_latency_seconds", e2e_buckets)
        registry.register(self)  # raises ValueError if these names are already there

    def update(self, engine: Engine) -> None:
        """Read the engine's counters into a new snapshot. Call it on the thread that runs the engine."""
        b = _Builder(self.model_name)
        s = engine.stats
        b.add("prompt_tokens", s.prompt_tokens)
        b.add("cached_prompt_tokens", s.cached_prompt_tokens)
        b.add("computed_tokens", s.computed_tokens)
        b.add("generated_tokens", s.generated_tokens)
        b.add("engine_steps", s.steps)
        b.add("requests_finished", s.finished)
        b.add("prefix_cache_hit_ratio", s.hit_rate)
        sched = engine.scheduler
        b.add("num_preemptions", sched.num_preemptions)
        b.add("prefix_cache_queries", s.prompt_tokens)
        b.add("prefix_cache_hits", s.cached_prompt_tokens - s.loaded_prompt_tokens, ["device"])
        b.add("num_requests_running", len(sched.running))
        b.add("num_requests_waiting", len(sched.waiting))
        b.add("num_requests_loading", len(sched.loading))

        pool = engine.pool
        b.add("kv_cache_usage_perc", (pool.num_blocks - pool.num_available) / pool.num_blocks)
        b.add("pool_blocks", pool.num_blocks)
        b.add("pool_blocks_available", pool.num_available)
        b.add("pool_blocks_cached", pool.num_cached)
        b.add("pool_blocks_in_use", pool.num_blocks - pool.num_available)
        b.add("pool_evictions", pool.evictions)

        hierarchy = engine.hierarchy
        if hierarchy is not None:
            for tier, cost in zip(hierarchy.tiers, hierarchy.costs, strict=True):
                ts = tier.stats()
                for field, metric in _TIER_COUNTERS.items():
                    b.add(metric, getattr(ts, field), [tier.name])
                b.add("tier_cost_latency_seconds", cost.latency_s, [tier.name])
                b.add("tier_cost_bandwidth_bytes_per_second", cost.bandwidth_bps, [tier.name])
                extra = dict(ts.extra)  # copied: I/O threads may add keys
                for name, value in sorted(extra.items()):
                    b.add("tier_extra", value, [tier.name, name])
                b.add("tier_dropped_writes", sum(extra.get(n, 0.0) for n in _DROPPED_EXTRAS), [tier.name])
            hs = hierarchy.stats
            loaded = dict(hs.per_tier_loaded)
            for tier in hierarchy.tiers:
                b.add("tier_blocks_loaded", loaded.get(tier.name, 0), [tier.name])
                # loads are counted when they land, finished requests' hits when they finish: the two
                # agree once the requests that loaded are done
                b.add("prefix_cache_hits", loaded.get(tier.name, 0) * pool.block_size, [tier.name])
            b.add("hierarchy_decisions", hs.load_decisions, ["load"])
            b.add("hierarchy_decisions", hs.recompute_decisions, ["recompute"])
            b.add("hierarchy_blocks_loaded", hs.blocks_loaded)
            b.add("hierarchy_blocks_written", hs.blocks_written)
            b.add("hierarchy_predicted_load_seconds", hs.predicted_load_s)
            b.add("hierarchy_actual_load_seconds", hs.actual_load_s)
            b.add("hierarchy_corrupt", hs.corrupt)
            b.add("hierarchy_write_errors", hs.write_errors)
            b.add("hierarchy_writes_dropped", hierarchy.writes.dropped)
            b.add("hierarchy_file_writes_skipped", hierarchy.writes.files_skipped)
            b.add("hierarchy_write_queue_bytes", hierarchy.writes.pending_bytes)
            b.add("prefill_seconds_per_token", hierarchy.prefill_seconds_per_token)
            b.add("step_fixed_seconds", hierarchy.step_cost.fixed_s)

        with self._lock:
            hists = ((self._ttft, s.ttft), (self._tpot, s.tpot), (self._e2e, s.e2e))
            for hist, values in hists:
                hist.feed(values)
                b.add_histogram(hist)
            self._snapshot = b.done()

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            return self._snapshot

    def describe(self) -> Iterable[Metric]:
        """Every family this collector can produce (empty), so a registry refuses duplicates up front."""
        return [_family(name, self.model_name) for name in SPECS]


def render(registry: CollectorRegistry) -> bytes:
    """The registry in the Prometheus text format (serve it with ``CONTENT_TYPE_LATEST``)."""
    return generate_latest(registry)
