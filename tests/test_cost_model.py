"""The recompute side of the load-vs-recompute decision: StepCost's fit, and KVHierarchy.plan using it."""

from __future__ import annotations

import hashlib

import pytest
import torch

from kvtier.cache.hierarchy import MIN_STEP_SAMPLES, STEP_WINDOW, KVHierarchy, Segment, StepCost
from kvtier.cache.keys import KVLayout
from kvtier.cache.tiers.host import HostTier

NS = "model-a"
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype="float32")
BB = LAYOUT.bytes_per_block
SIZES = [64, 128, 256, 512, 1024, 2048, 300, 700]  # tokens per step, cycled


def key(i: int) -> bytes:
    return hashlib.blake2b(i.to_bytes(8, "little"), digest_size=32).digest()


def feed(cost: StepCost, steps: int, fixed: float, per_token: float) -> None:
    for i in range(steps):
        n = SIZES[i % len(SIZES)]
        cost.observe(n, fixed + per_token * n)


# -- StepCost ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [MIN_STEP_SAMPLES, 40, 3 * STEP_WINDOW])
def test_fit_recovers_fixed_and_per_token(steps: int) -> None:
    cost = StepCost(per_token_s=1e-3)
    feed(cost, steps, 0.03, 2e-5)
    assert cost.samples == steps
    assert cost.fixed_s == pytest.approx(0.03, rel=0.01)
    assert cost.per_token_s == pytest.approx(2e-5, rel=0.01)


def test_fit_with_noise_stays_close() -> None:
    g = torch.Generator().manual_seed(0)
    noise = (torch.rand(400, generator=g, dtype=torch.float64) - 0.5) * 2e-4  # +-0.1 ms
    cost = StepCost(per_token_s=1e-3)
    for i in range(400):
        n = SIZES[i % len(SIZES)]
        cost.observe(n, 0.03 + 2e-5 * n + float(noise[i]))
    assert cost.fixed_s == pytest.approx(0.03, rel=0.02)
    assert cost.per_token_s == pytest.approx(2e-5, rel=0.02)


def test_constant_step_size_falls_back_to_per_token_only() -> None:
    cost = StepCost(per_token_s=1e-3, fixed_s=0.5)
    n, t = 512, 0.03 + 2e-5 * 512
    for _ in range(2 * MIN_STEP_SAMPLES):
        cost.observe(n, t)
    assert cost.per_token_s == pytest.approx(t / n, rel=1e-9)
    assert cost.fixed_s == 0.0


def test_fewer_than_min_samples_keep_the_seed() -> None:
    cost = StepCost(per_token_s=1e-3, fixed_s=0.25)
    feed(cost, MIN_STEP_SAMPLES - 1, 0.03, 2e-5)
    assert cost.samples == MIN_STEP_SAMPLES - 1
    assert (cost.per_token_s, cost.fixed_s) == (1e-3, 0.25)
    # Steps that measured nothing are ignored.
    for tokens, seconds in ((0, 0.1), (-5, 0.1), (100, 0.0), (100, -1.0)):
        cost.observe(tokens, seconds)
    assert cost.samples == MIN_STEP_SAMPLES - 1
    assert (cost.per_token_s, cost.fixed_s) == (1e-3, 0.25)
    feed(cost, 1, 0.03, 2e-5)  # the 8th sample replaces the seed
    assert cost.samples == MIN_STEP_SAMPLES
    assert cost.fixed_s != 0.25 and cost.per_token_s != 1e-3


def test_recompute_charges_extra_steps_beyond_the_first() -> None:
    cost = StepCost(per_token_s=1e-4, fixed_s=0.05)
    assert cost.recompute_s(0, 2048) == 0.0
    assert cost.recompute_s(100, 2048) == pytest.approx(100e-4)
    assert cost.recompute_s(2048, 2048) == pytest.approx(2048e-4)  # fits in the step that runs anyway
    assert cost.recompute_s(2049, 2048) == pytest.approx(2049e-4 + 0.05)
    assert cost.recompute_s(3 * 2048, 2048) == pytest.approx(3 * 2048e-4 + 2 * 0.05)
    assert cost.recompute_s(3 * 2048 + 1, 2048) == pytest.approx((3 * 2048 + 1) * 1e-4 + 3 * 0.05)
    assert cost.recompute_s(5000, 1000) == pytest.approx(5000e-4 + 4 * 0.05)
    assert cost.recompute_s(4, 0) == pytest.approx(4e-4 + 3 * 0.05)  # a zero budget counts as one token
    no_fixed = StepCost(per_token_s=1e-4)
    assert no_fixed.recompute_s(10_000, 100) == pytest.approx(1.0)


def test_fit_follows_a_change_of_regime() -> None:
    cost = StepCost(per_token_s=1e-3)
    feed(cost, 4 * STEP_WINDOW, 0.03, 2e-5)
    assert cost.fixed_s == pytest.approx(0.03, rel=0.01)
    feed(cost, STEP_WINDOW, 0.01, 5e-5)  # one window in: still between the two regimes
    assert cost.fixed_s > 0.01 * 1.05
    assert cost.per_token_s < 5e-5 * 0.95
    feed(cost, 5 * STEP_WINDOW, 0.01, 5e-5)  # six windows in: the old regime is forgotten
    assert cost.fixed_s == pytest.approx(0.01, rel=0.01)
    assert cost.per_token_s == pytest.approx(5e-5, rel=0.01)
    assert cost.samples == 10 * STEP_WINDOW


# -- KVHierarchy.plan -------------------------------------------------------------------------------


def _hierarchy(num_blocks: int, step_tokens: int = 2048) -> tuple[KVHierarchy, HostTier, list[bytes]]:
    host = HostTier(LAYOUT, NS, 16 * BB)
    g = torch.Generator().manual_seed(0)
    keys = [key(i) for i in range(num_blocks)]
    for i, k in enumerate(keys):
        host.store(k, [i] * LAYOUT.block_size, torch.randn(LAYOUT.block_shape, generator=g))
    h = KVHierarchy(tiers=[host], codecs=[None], layout=LAYOUT, fingerprint=NS, step_tokens=step_tokens)
    return h, host, keys


def test_plan_loads_from_a_fast_host_and_recomputes_when_it_is_slow() -> None:
    h, host, keys = _hierarchy(4)
    try:
        asked = [*keys, key(99), key(3)]  # a miss ends the run
        plan = h.plan(asked)
        assert plan.num_blocks == 4
        assert plan.segments == [Segment(tier=0, start=0, count=4)]
        assert plan.keys == asked
        assert 0 < plan.predicted_load_s < plan.predicted_recompute_s
        assert plan.predicted_recompute_s == pytest.approx(h.step_cost.recompute_s(16, h.step_tokens))
        assert (h.stats.load_decisions, h.stats.recompute_decisions) == (1, 0)

        h.costs[0].latency_s = 1e3
        plan = h.plan(asked)
        assert plan.num_blocks == 0 and plan.segments == []
        assert plan.predicted_load_s == 0.0
        assert (h.stats.load_decisions, h.stats.recompute_decisions) == (1, 1)

        # Nothing held: no decision either way.
        plan = h.plan([key(50), key(51)])
        assert plan.num_blocks == 0
        assert (h.stats.load_decisions, h.stats.recompute_decisions) == (1, 1)
        assert host.lookup(keys) == 4  # planning neither loads nor removes anything
    finally:
        h.close()
    assert len(host) == 0  # the hierarchy closed its tier


def test_plan_uses_the_fitted_step_cost() -> None:
    """The same host tier is worth loading from or not depending on the fitted step: a short prefix
    that fits in the step that runs anyway costs only its tokens' share; once its prefill needs a
    second step, recomputing it costs a whole extra (launch-bound) step and loading wins."""
    h, _, keys = _hierarchy(4, step_tokens=2048)
    try:
        feed(h.step_cost, 2 * STEP_WINDOW, 0.03, 2e-5)  # launch-bound: fixed 30 ms >> 20 us per token
        assert h.prefill_seconds_per_token == pytest.approx(2e-5, rel=0.01)
        h.costs[0].latency_s = 5e-4  # a load: ~0.52 ms
        plan = h.plan(keys)  # 16 tokens in the current step: ~0.32 ms to recompute
        assert plan.num_blocks == 0
        assert (h.stats.load_decisions, h.stats.recompute_decisions) == (0, 1)

        h.step_tokens = 8  # 16 tokens need a second step: ~30.3 ms to recompute
        plan = h.plan(keys)
        assert plan.num_blocks == 4
        assert plan.predicted_recompute_s == pytest.approx(0.03 + 16 * 2e-5, rel=0.01)
        assert plan.predicted_load_s < plan.predicted_recompute_s
        assert (h.stats.load_decisions, h.stats.recompute_decisions) == (1, 1)

        # always_load overrides the cost model.
        h.step_tokens = 2048
        h.costs[0].latency_s = 1e3
        assert h.plan(keys).num_blocks == 0
        h.always_load = True
        assert h.plan(keys).num_blocks == 4
        assert (h.stats.load_decisions, h.stats.recompute_decisions) == (2, 2)
    finally:
        h.close()


def test_observe_step_feeds_the_step_cost() -> None:
    h, _, _ = _hierarchy(0)
    try:
        assert h.prefill_seconds_per_token == 1e-3  # the seed
        for i in range(2 * MIN_STEP_SAMPLES):
            n = SIZES[i % len(SIZES)]
            h.observe_step(n, 0.02 + 1e-5 * n)
        assert h.step_cost.samples == 2 * MIN_STEP_SAMPLES
        assert h.step_cost.fixed_s == pytest.approx(0.02, rel=0.01)
        assert h.prefill_seconds_per_token == pytest.approx(1e-5, rel=0.01)
    finally:
        h.close()


def test_a_long_decode_phase_keeps_the_prefill_fit() -> None:
    """Decode steps (1-4 tokens, timing jitter) carry no slope: after thousands of them the fit
    learned from prefill steps must still predict recompute, not charge the fixed part per token."""
    import random

    rng = random.Random(1)

    def true(n: int) -> float:
        return 0.010 + 20e-6 * n

    cost = StepCost(1e-3)
    for _ in range(32):
        n = rng.choice([256, 512, 1024, 2048])
        cost.observe(n, true(n) * rng.uniform(0.97, 1.03))
    assert cost.recompute_s(2048, 2048) == pytest.approx(20e-6 * 2048, rel=0.2)
    for _ in range(3000):
        n = rng.randint(1, 4)
        cost.observe(n, true(n) * rng.uniform(0.97, 1.03))
        assert cost.recompute_s(2048, 2048) == pytest.approx(20e-6 * 2048, rel=0.2)


def test_a_measured_host_bandwidth_turns_a_recompute_into_a_load() -> None:
    """The estimate of a tier learns only from loads it makes: from a seed far below the real copy
    rate a long prefix is always recomputed and the seed is never corrected. A measured seed (what
    the engine gives the host tier at start) makes the same plan load."""
    h, _, keys = _hierarchy(4)
    try:
        tokens = 4 * LAYOUT.block_size
        h.step_cost.per_token_s = 1e-6
        h.costs[0].latency_s = 0.0
        h.costs[0].bandwidth_bps = 0.5 * (4 * BB) / h.step_cost.recompute_s(tokens, h.step_tokens)
        assert h.plan(keys).num_blocks == 0  # at the seed, loading looks twice as dear
        h.seed_bandwidth(4 * (4 * BB) / h.step_cost.recompute_s(tokens, h.step_tokens))
        plan = h.plan(keys)
        assert plan.num_blocks == 4
        assert plan.predicted_load_s == pytest.approx(plan.predicted_recompute_s / 4)
    finally:
        h.close()


def test_an_engine_with_a_host_tier_starts_from_the_measured_copy_rate() -> None:
    from kvtier.cache.hierarchy import SEED_COSTS
    from kvtier.config import EngineConfig
    from kvtier.engine.engine import Engine

    engine = Engine(EngineConfig.load({"model": "synthetic:tiny", "device": "cpu", "tiers": "host"}))
    try:
        assert engine.hierarchy is not None
        measured = engine.hierarchy.costs[0].bandwidth_bps
        assert measured != SEED_COSTS["host"].bandwidth_bps
        assert measured > 1e8  # a memory copy, not a guess: even a loaded CPU copies 100 MB/s
    finally:
        engine.close()
