"""``Engine.set_intake``: a server's requests taken inside a step, just before it schedules.

On CUDA the engine first waits until the device is part-way through the step in flight (an event
recorded before one of its layers), so what arrived meanwhile joins the step launched next. The
outputs must not change: only when requests join.
"""

from __future__ import annotations

import pytest
import torch

from kvtier.config import EngineConfig
from kvtier.engine.engine import Engine
from kvtier.engine.request import SamplingParams

PARAMS = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def engine_on(device: str) -> Engine:
    return Engine(
        EngineConfig.load(
            {"model": "synthetic:tiny", "kv_cache_memory": 16 << 20, "tiers": "none", "device": device}
        )
    )


def test_the_intake_point_is_checked() -> None:
    engine = engine_on("cpu")
    try:
        with pytest.raises(ValueError, match=r"intake point must be in \[0, 1\).*got 1.5"):
            engine.set_intake(lambda: None, 1.5)
    finally:
        engine.close()


def run_with_late_arrivals(engine: Engine, at: float | None) -> dict[str, list[int]]:
    """Requests that arrive one per step (through the intake, or between steps without one)."""
    arrivals = [(f"r{i}", list(range(3 + i, 40 + 7 * i))) for i in range(6)]
    calls = []

    def intake() -> None:
        calls.append(len(engine.requests))
        if arrivals:
            rid, prompt = arrivals.pop(0)
            engine.add_request(prompt, PARAMS, rid)

    engine.set_intake(intake if at is not None else None, at or 0.0)
    engine.add_request([1, 2, 3, 4, 5], PARAMS, "first")
    tokens: dict[str, list[int]] = {}
    steps = 0
    while engine.has_unfinished() or arrivals:
        if at is None and arrivals:
            rid, prompt = arrivals.pop(0)
            engine.add_request(prompt, PARAMS, rid)
        steps += 1
        for out in engine.step():
            tokens[out.request_id] = list(out.outputs[0].token_ids)
    assert len(calls) == (steps if at is not None else 0)  # once a step, before it schedules
    return tokens


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
    ],
)
def test_requests_taken_inside_steps_get_the_same_tokens(device: str) -> None:
    engine = engine_on(device)
    try:
        plain = run_with_late_arrivals(engine, None)
        engine.pool.reset_cache()
        taken_in = run_with_late_arrivals(engine, 0.5)
        assert taken_in == plain and len(plain) == 7 and all(len(t) == 12 for t in plain.values())
        if device == "cuda":  # eager steps got their midway event, and the engine waited on it
            assert engine.runner.midway_layer == engine.loaded.config.num_layers // 2
            assert engine.stats.intake_wait_seconds > 0
    finally:
        engine.close()
