"""EngineMetrics: after real workloads the rendered text parses and matches the engine's own counters."""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from kvtier import LLM, SamplingParams
from kvtier.engine.engine import Engine
from kvtier.metrics import TTFT_BUCKETS, EngineMetrics, render

if TYPE_CHECKING:
    from tests.redis_servers import RedisServer

PROMPTS = ["Metrics mirror the engine's counters. " * 6, "Every tier gets its own label. " * 6]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(registry: CollectorRegistry) -> tuple[Samples, dict[str, str]]:
    """(sample name, labels) -> value, and family name -> type, from the rendered text."""
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(render(registry).decode()):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples, types


def value(samples: Samples, metric: str, /, **labels: str) -> float:
    return samples[(metric, frozenset(labels.items()))]


def tiered_llm(tmp_path: Path, url: str) -> LLM:
    return LLM(
        "synthetic:tiny",
        kv_cache_memory=1 << 20,
        tiers="disk,redis",
        disk_path=str(tmp_path / "disk"),
        redis_url=url,
        write_policy="write-through",
        load_policy="always",  # loads for certain: the cost model's choice on a tiny model is not
    )


def check_engine_metrics(samples: Samples, engine: Engine) -> None:
    s = engine.stats
    assert value(samples, "kvtier:prompt_tokens_total") == s.prompt_tokens
    assert value(samples, "kvtier:cached_prompt_tokens_total") == s.cached_prompt_tokens
    assert value(samples, "kvtier:computed_tokens_total") == s.computed_tokens
    assert value(samples, "kvtier:generated_tokens_total") == s.generated_tokens
    assert value(samples, "kvtier:engine_steps_total") == s.steps
    assert value(samples, "kvtier:requests_finished_total") == s.finished
    assert value(samples, "kvtier:prefix_cache_hit_ratio") == pytest.approx(s.hit_rate)
    assert value(samples, "kvtier:time_to_first_token_seconds_count") == len(s.ttft)
    assert value(samples, "kvtier:time_to_first_token_seconds_sum") == pytest.approx(sum(s.ttft))
    for bound in TTFT_BUCKETS:
        le = str(float(bound))
        expected = sum(t <= bound for t in s.ttft)
        assert value(samples, "kvtier:time_to_first_token_seconds_bucket", le=le) == expected
    assert value(samples, "kvtier:time_to_first_token_seconds_bucket", le="+Inf") == len(s.ttft)
    pool = engine.pool
    assert value(samples, "kvtier:pool_blocks") == pool.num_blocks
    assert value(samples, "kvtier:pool_blocks_available") == pool.num_available
    assert value(samples, "kvtier:pool_blocks_cached") == pool.num_cached
    assert value(samples, "kvtier:pool_blocks_in_use") == pool.num_blocks - pool.num_available
    assert value(samples, "kvtier:pool_evictions_total") == pool.evictions
    used = (pool.num_blocks - pool.num_available) / pool.num_blocks
    assert value(samples, "kvtier:kv_cache_usage_perc") == pytest.approx(used)
    assert value(samples, "kvtier:prefix_cache_queries_total") == s.prompt_tokens
    device_hits = s.cached_prompt_tokens - s.loaded_prompt_tokens
    assert value(samples, "kvtier:prefix_cache_hits_total", tier="device") == device_hits
    assert value(samples, "kvtier:num_preemptions_total") == engine.scheduler.num_preemptions
    sched = engine.scheduler
    assert value(samples, "kvtier:num_requests_running") == len(sched.running)
    assert value(samples, "kvtier:num_requests_waiting") == len(sched.waiting)
    assert value(samples, "kvtier:num_requests_loading") == len(sched.loading)
    for name, values in (("time_per_output_token_seconds", s.tpot), ("e2e_request_latency_seconds", s.e2e)):
        assert value(samples, f"kvtier:{name}_count") == len(values) > 0
        assert value(samples, f"kvtier:{name}_sum") == pytest.approx(sum(values))


def test_metrics_match_the_engine_and_its_tiers(tmp_path: Path, redis_server: RedisServer) -> None:
    params = SamplingParams(max_tokens=4)
    first = tiered_llm(tmp_path, redis_server.url)  # writes every block through to disk and Redis
    first.generate(PROMPTS, params)
    first.close()

    llm = tiered_llm(tmp_path, redis_server.url)  # a fresh device pool: the prompts load from disk
    try:
        registry = CollectorRegistry()
        metrics = EngineMetrics(registry)
        llm.generate(PROMPTS, params)
        engine, hierarchy = llm.engine, llm.engine.hierarchy
        assert hierarchy is not None
        hierarchy.flush()
        metrics.update(engine)
        samples, types = scrape(registry)

        check_engine_metrics(samples, engine)
        assert types["kvtier:prompt_tokens"] == "counter"
        assert types["kvtier:pool_blocks"] == "gauge"
        assert types["kvtier:time_to_first_token_seconds"] == "histogram"
        assert engine.stats.cached_prompt_tokens > 0  # the workload did use the lower tiers

        for tier in hierarchy.tiers:
            ts = tier.stats()
            t = tier.name
            assert value(samples, "kvtier:tier_lookups_total", tier=t) == ts.lookups
            assert value(samples, "kvtier:tier_hits_total", tier=t) == ts.hits
            assert value(samples, "kvtier:tier_misses_total", tier=t) == ts.misses
            assert value(samples, "kvtier:tier_puts_total", tier=t) == ts.puts
            assert value(samples, "kvtier:tier_read_bytes_total", tier=t) == ts.bytes_read
            assert value(samples, "kvtier:tier_written_bytes_total", tier=t) == ts.bytes_written
            assert value(samples, "kvtier:tier_read_seconds_total", tier=t) == pytest.approx(ts.read_seconds)
            assert value(samples, "kvtier:tier_write_seconds_total", tier=t) == pytest.approx(
                ts.write_seconds
            )
            assert value(samples, "kvtier:tier_evictions_total", tier=t) == ts.evictions
            assert value(samples, "kvtier:tier_corrupt_total", tier=t) == ts.corrupt
            assert value(samples, "kvtier:tier_errors_total", tier=t) == ts.errors
            dropped = ts.extra.get("dropped", 0.0) + ts.extra.get("dropped_too_large", 0.0)
            assert value(samples, "kvtier:tier_dropped_writes_total", tier=t) == dropped
            loaded_tokens = hierarchy.stats.per_tier_loaded.get(t, 0) * engine.pool.block_size
            assert value(samples, "kvtier:prefix_cache_hits_total", tier=t) == loaded_tokens
            for name, extra in ts.extra.items():
                assert value(samples, "kvtier:tier_extra", tier=t, name=name) == pytest.approx(extra)
        assert value(samples, "kvtier:tier_hits_total", tier="disk") > 0
        assert "breaker_open" in {dict(labels).get("name") for _, labels in samples}

        hs = hierarchy.stats
        assert value(samples, "kvtier:hierarchy_decisions_total", decision="load") == hs.load_decisions
        assert (
            value(samples, "kvtier:hierarchy_decisions_total", decision="recompute") == hs.recompute_decisions
        )
        assert value(samples, "kvtier:hierarchy_blocks_loaded_total") == hs.blocks_loaded > 0
        assert value(samples, "kvtier:hierarchy_blocks_written_total") == hs.blocks_written
        assert value(samples, "kvtier:hierarchy_predicted_load_seconds_total") == pytest.approx(
            hs.predicted_load_s
        )
        assert value(samples, "kvtier:hierarchy_actual_load_seconds_total") == pytest.approx(hs.actual_load_s)
        assert value(samples, "kvtier:hierarchy_corrupt_total") == hs.corrupt
        assert value(samples, "kvtier:tier_blocks_loaded_total", tier="disk") == hs.per_tier_loaded["disk"]
        assert value(samples, "kvtier:tier_blocks_loaded_total", tier="redis") == hs.per_tier_loaded["redis"]
        assert value(samples, "kvtier:prefill_seconds_per_token") == pytest.approx(
            hierarchy.prefill_seconds_per_token
        )
        assert value(samples, "kvtier:step_fixed_seconds") == pytest.approx(hierarchy.step_cost.fixed_s)
        for tier, cost in zip(hierarchy.tiers, hierarchy.costs, strict=True):
            assert value(samples, "kvtier:tier_cost_latency_seconds", tier=tier.name) == pytest.approx(
                cost.latency_s
            )
    finally:
        llm.close()


def test_updates_are_snapshots_and_counters_only_grow() -> None:
    registry = CollectorRegistry()
    metrics = EngineMetrics(registry)
    assert scrape(registry)[0] == {}  # nothing until the first update

    llm = LLM("synthetic:tiny", kv_cache_memory=1 << 20)  # tiers none (conftest): no hierarchy
    try:
        assert llm.engine.hierarchy is None
        llm.generate(PROMPTS[0], SamplingParams(max_tokens=3))
        metrics.update(llm.engine)
        before, _ = scrape(registry)
        check_engine_metrics(before, llm.engine)
        assert not any(name.startswith(("kvtier:tier_", "kvtier:hierarchy_")) for name, _ in before)

        llm.generate(PROMPTS, SamplingParams(max_tokens=3))
        assert scrape(registry)[0] == before  # a scrape shows the last update, not the live engine
        metrics.update(llm.engine)
        after, _ = scrape(registry)
        check_engine_metrics(after, llm.engine)  # the TTFT histogram fed only the new entries
        assert value(after, "kvtier:time_to_first_token_seconds_count") == 3
        assert value(after, "kvtier:cached_prompt_tokens_total") > 0  # PROMPTS[0] again, from the pool
        for key, v in before.items():
            if key[0].endswith(("_total", "_count", "_sum")):
                assert after[key] >= v, key
    finally:
        llm.close()


def test_a_new_engine_restarts_the_histogram() -> None:
    registry = CollectorRegistry()
    metrics = EngineMetrics(registry)
    for n in (2, 1):
        llm = LLM("synthetic:tiny", kv_cache_memory=1 << 20)
        try:
            llm.generate(PROMPTS[:n], SamplingParams(max_tokens=2))
            metrics.update(llm.engine)
            samples, _ = scrape(registry)
            check_engine_metrics(samples, llm.engine)
            assert value(samples, "kvtier:time_to_first_token_seconds_count") == n
        finally:
            llm.close()


def test_registries_are_independent_and_names_unique() -> None:
    a, b = CollectorRegistry(), CollectorRegistry()
    EngineMetrics(a)
    EngineMetrics(b)  # no global state: a second registry takes a second set
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        EngineMetrics(a)
    with pytest.raises(ValueError, match="increasing"):
        EngineMetrics(CollectorRegistry(), ttft_buckets=(1.0, 0.5))


def test_latency_logs_stay_bounded_and_the_histograms_still_count_everything() -> None:
    from kvtier.engine.output import LatencyLog

    log = LatencyLog(keep=50)
    seen = 0
    for i in range(1, 301):
        log.append(float(i))
        if i % 7 == 0:  # a reader that keeps up sees every value once
            assert log.since(seen) == [float(v) for v in range(seen + 1, i + 1)]
            seen = log.count
    assert len(log) == 50 and log.count == 300 and list(log) == [float(v) for v in range(251, 301)]
    assert log.since(0) == list(log)  # a reader that fell behind gets what is still kept

    llm = LLM("synthetic:tiny", kv_cache_memory=1 << 20, tiers="none")
    stats = llm.engine.stats
    for log_ in (stats.ttft, stats.e2e, stats.tpot):
        log_._values = deque(maxlen=20)  # a small window, to see it bound
    registry = CollectorRegistry()
    metrics = EngineMetrics(registry)
    for i in range(6):
        llm.generate([[1 + i, 2, 3]] * 10, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
        metrics.update(llm.engine)
    assert len(stats.ttft) == 20 and stats.ttft.count == 60
    samples = {s.name: s.value for f in registry.collect() for s in f.samples if not s.labels}
    assert samples["kvtier:time_to_first_token_seconds_count"] == 60
