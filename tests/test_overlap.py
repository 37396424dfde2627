"""The overlapped step loop (``overlap_steps``) changes when tokens are read, never which.

Step N+1 is scheduled and launched before step N's sampled ids reach the host, so a request that
stops on a stop token or string has computed one token too many, and a decode takes its input
token from the device. Every output must equal the one step-by-step run, on every feature that
touches the step: sampling with seeds, penalties (which wait for their token), logprobs, n > 1,
stop tokens and strings, preemption in a small pool, streaming, abort mid-flight.
"""

from __future__ import annotations

from typing import Any

import pytest

from kvtier import LLM, RequestOutput, SamplingParams
from tests.models import random_prompt

MODEL = "synthetic:tiny"


def make(overlap: bool, **settings: Any) -> LLM:
    base: dict[str, Any] = dict(
        tiers="none", max_num_batched_tokens=96, overlap_steps=overlap, kv_cache_memory=32 << 20
    )
    return LLM(MODEL, **{**base, **settings})


def prompts(count: int, seed: int) -> list[list[int]]:
    return [random_prompt(20 + 13 * i, seed=seed + i, vocab=250) for i in range(count)]


def summary(outs: list[RequestOutput]) -> list[tuple[Any, ...]]:
    return [
        (c.token_ids, c.text, c.finish_reason, [lp.token_id for lp in c.logprobs or []])
        for o in outs
        for c in o.outputs
    ]


def mixed_params(stop_token: int, stop_text: str) -> list[SamplingParams]:
    return [
        SamplingParams(max_tokens=30, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=25, temperature=0.8, seed=3, ignore_eos=True, logprobs=2),
        SamplingParams(max_tokens=20, temperature=0, repetition_penalty=1.3, ignore_eos=True),
        SamplingParams(max_tokens=40, temperature=0, stop_token_ids=[stop_token], ignore_eos=True),
        SamplingParams(max_tokens=40, temperature=0, stop=[stop_text], ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0.7, seed=9, n=2, frequency_penalty=0.5),
        SamplingParams(max_tokens=1, temperature=0),
        SamplingParams(max_tokens=33, temperature=0),  # stops at EOS, if the model emits one
    ]


def stops_from_reference(prompt: list[int]) -> tuple[int, str]:
    """A stop token and a stop string that the greedy answer to ``prompt`` reaches midway."""
    ref = make(False).generate([prompt], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0]
    tokens, text = ref.outputs[0].token_ids, ref.outputs[0].text
    assert len(tokens) == 40 and len(text) > 12
    return tokens[15], text[8:11]


@pytest.mark.parametrize("pool_tokens", [None, 160])  # ample, and small enough to preempt
def test_overlapped_steps_give_the_same_outputs(pool_tokens: int | None) -> None:
    ps = prompts(8, seed=70)
    stop_token = stops_from_reference(ps[3])[0]
    stop_text = stops_from_reference(ps[4])[1]
    params = mixed_params(stop_token, stop_text)
    results = []
    for overlap in (False, True):
        settings: dict[str, Any] = {}
        if pool_tokens is not None:
            llm0 = make(overlap)
            settings["kv_cache_memory"] = llm0.engine.layout.bytes_per_block * (pool_tokens // 16)
            llm0.close()
        llm = make(overlap, **settings)
        outs = llm.generate(ps, params)
        assert not llm.engine.has_unfinished()
        llm.engine.pool.assert_idle()
        results.append((summary(outs), llm.engine.scheduler.num_preemptions))
    (plain, _), (overlapped, preemptions) = results
    assert overlapped == plain
    assert plain[3][2] == "stop" and plain[3][0][-1] == stop_token  # the stops were reached
    assert plain[4][2] == "stop" and stop_text not in plain[4][1]
    if pool_tokens is not None:
        assert preemptions > 0, "the small pool was meant to preempt"


def test_a_stream_sees_the_same_text_with_overlap() -> None:
    prompt = prompts(1, seed=90)[0]
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    llm = make(True)
    streamed = "".join(d.text for d in llm.stream(prompt, params))
    assert streamed == make(False).generate([prompt], params)[0].outputs[0].text
    assert streamed


def test_only_finished_outputs_for_a_request_that_does_not_stream() -> None:
    llm = make(True)
    engine = llm.engine
    quiet = engine.add_request(prompts(1, 5)[0], SamplingParams(max_tokens=6, ignore_eos=True), stream=False)
    loud = engine.add_request(prompts(1, 6)[0], SamplingParams(max_tokens=6, ignore_eos=True))
    seen: dict[str, list[bool]] = {quiet[0]: [], loud[0]: []}
    while engine.has_unfinished():
        for out in engine.step():
            seen[out.request_id].append(out.finished)
    assert seen[quiet[0]] == [True]
    assert seen[loud[0]] == [False] * 5 + [True]


def test_abort_while_a_step_is_in_flight_frees_everything() -> None:
    llm = make(True)
    engine = llm.engine
    ids = [engine.add_request(p, SamplingParams(max_tokens=50, ignore_eos=True))[0] for p in prompts(3, 40)]
    for _ in range(4):
        engine.step()
    assert engine._in_flight is not None  # a step is launched and not read back
    for rid in ids:
        engine.abort(rid)
    assert not engine.has_unfinished()
    engine.pool.assert_idle()
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    again = llm.generate(prompts(1, 40), params)  # and the engine serves on, right
    assert summary(again) == summary(make(False).generate(prompts(1, 40), params))
