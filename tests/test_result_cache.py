"""The result cache: a repeated deterministic request is answered without model work, exactly as
a fresh computation answers it; anything that could change the answer is a miss."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvtier import LLM, SamplingParams
from kvtier.cache.results import KIND_RESULT, encode_object
from kvtier.engine.results import request_result_key

PROMPT = "The tiered cache remembers"
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=12, temperature=0.9, top_k=50, seed=7, ignore_eos=True)


def _llm(**settings: Any) -> LLM:
    settings.setdefault("result_cache", True)  # tests/conftest.py turns it off for other tests
    return LLM("synthetic:tiny", device="cpu", kv_cache_memory=8 << 20, **settings)


@pytest.fixture
def llm() -> LLM:
    return _llm()


def _answer(out: Any) -> tuple[list[int], str, str]:
    c = out.outputs[0]
    return c.token_ids, c.text, c.finish_reason


def _fresh(prompt: Any, params: SamplingParams, **settings: Any) -> tuple[list[int], str, str]:
    with _llm(result_cache=False, **settings) as other:
        return _answer(other.generate(prompt, params)[0])


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_hit_is_exactly_the_fresh_answer_and_costs_no_model_work(llm: LLM, params: SamplingParams) -> None:
    first = llm.generate(PROMPT, params)[0]
    assert first.served_from == "model"
    steps, computed = llm.engine.stats.steps, llm.engine.stats.computed_tokens
    again = llm.generate(PROMPT, params)[0]
    assert again.served_from == "result-cache" and again.metrics["result_cache_tier"] == "memory"
    assert _answer(again) == _answer(first) == _fresh(PROMPT, params)
    assert again.prompt_token_ids == first.prompt_token_ids and again.finished
    assert (llm.engine.stats.steps, llm.engine.stats.computed_tokens) == (steps, computed)
    llm.engine.pool.assert_idle()


def test_logprobs_are_stored_and_served_exactly(llm: LLM) -> None:
    params = dataclasses.replace(GREEDY, logprobs=3)
    first, again = llm.generate(PROMPT, params)[0], llm.generate(PROMPT, params)[0]
    assert again.served_from == "result-cache"
    assert first.outputs[0].logprobs and again.outputs[0].logprobs == first.outputs[0].logprobs
    assert len(again.outputs[0].logprobs[0].top) == 3
    assert llm.generate(PROMPT, dataclasses.replace(GREEDY, logprobs=2))[0].served_from == "model"


def test_a_hit_streams_like_a_normal_answer(llm: LLM) -> None:
    computed = list(llm.stream(PROMPT, GREEDY))
    served = list(llm.stream(PROMPT, GREEDY))
    assert served[-1].output.served_from == "result-cache"
    for deltas in (computed, served):
        assert deltas[-1].finished and deltas[-1].finish_reason == "length"
        assert [d.finished for d in deltas[:-1]] == [False] * (len(deltas) - 1)
    text = "".join(d.text for d in served)
    tokens = [t for d in served for t in d.token_ids]
    assert text == "".join(d.text for d in computed)
    assert tokens == [t for d in computed for t in d.token_ids]


def test_stop_strings_and_the_stop_reason_are_served_as_computed(llm: LLM) -> None:
    probe = _answer(llm.generate(PROMPT, dataclasses.replace(GREEDY, result_cache=False))[0])[1]
    stop = probe[3:5]  # a stop string the greedy answer meets
    params = dataclasses.replace(GREEDY, stop=[stop])
    first, again = llm.generate(PROMPT, params)[0], llm.generate(PROMPT, params)[0]
    assert again.served_from == "result-cache"
    assert _answer(again) == _answer(first) and first.outputs[0].finish_reason == "stop"
    assert stop not in first.outputs[0].text


CHANGES: dict[str, dict[str, Any]] = {
    "max_tokens": dict(max_tokens=11),
    "temperature": dict(temperature=0.8),
    "seed": dict(seed=8),
    "top_k": dict(top_k=10),
    "top_p": dict(top_p=0.9),
    "min_p": dict(min_p=0.05),
    "repetition_penalty": dict(repetition_penalty=1.2),
    "presence_penalty": dict(presence_penalty=0.5),
    "frequency_penalty": dict(frequency_penalty=0.5),
    "stop": dict(stop=["zz"]),
    "stop_token_ids": dict(stop_token_ids=[3]),
    "logit_bias": dict(logit_bias={3: 5.0}),
    "ignore_eos": dict(ignore_eos=False),
    "include_stop_str_in_output": dict(include_stop_str_in_output=True),
}


def test_any_changed_parameter_prompt_or_salt_is_a_miss(llm: LLM) -> None:
    llm.generate(PROMPT, SEEDED)
    llm.generate(PROMPT, SEEDED, cache_salt="tenant-a")
    assert llm.generate(PROMPT, SEEDED)[0].served_from == "result-cache"
    for name, change in CHANGES.items():
        out = llm.generate(PROMPT, dataclasses.replace(SEEDED, **change))[0]
        assert out.served_from == "model", name
    assert llm.generate(PROMPT + ".", SEEDED)[0].served_from == "model"
    assert llm.generate(PROMPT, SEEDED, cache_salt="tenant-b")[0].served_from == "model"
    assert llm.generate(PROMPT, SEEDED, cache_salt="tenant-a")[0].served_from == "result-cache"
    # greedy ignores seed and the sampling filters: one answer, one entry
    llm.generate(PROMPT, GREEDY)
    same = dataclasses.replace(GREEDY, seed=5, top_k=3, top_p=0.5)
    assert llm.generate(PROMPT, same)[0].served_from == "result-cache"
    llm.generate(PROMPT, dataclasses.replace(GREEDY, logit_bias={3: 5.0, 9: -2.0}))
    reordered = dataclasses.replace(GREEDY, logit_bias={9: -2.0, 3: 5.0})  # a bias in another order
    assert llm.generate(PROMPT, reordered)[0].served_from == "result-cache"
    as_numpy = dataclasses.replace(GREEDY, logit_bias={np.int64(9): -2.0, np.int32(3): np.float32(5.0)})
    assert llm.generate(PROMPT, as_numpy)[0].served_from == "result-cache"  # numpy values: the same key
    seeded = dataclasses.replace(SEEDED, seed=np.uint64(2**64 - 1), temperature=np.float64(0.7))
    assert llm.generate(PROMPT, seeded)[0].served_from == "model"
    assert llm.generate(PROMPT, dataclasses.replace(seeded, seed=2**64 - 1))[0].served_from == "result-cache"


def test_another_model_is_a_miss_on_a_shared_tier(tmp_path: Path) -> None:
    settings = dict(result_tiers="disk", disk_path=str(tmp_path))
    with _llm(**settings) as a:
        a.generate(PROMPT, GREEDY)
    with _llm(**settings) as b:  # same model, another process: a hit from disk
        out = b.generate(PROMPT, GREEDY)[0]
        assert out.served_from == "result-cache" and out.metrics["result_cache_tier"] == "disk"
    with _llm(seed=1, **settings) as other:  # other weights: another fingerprint
        out = other.generate(PROMPT, GREEDY)[0]
        assert out.served_from == "model"
        assert _answer(out) == _fresh(PROMPT, GREEDY, seed=1)


def test_what_is_never_cached_and_the_opt_outs(llm: LLM) -> None:
    unseeded = dataclasses.replace(SEEDED, seed=None)
    cases = [
        unseeded,
        dataclasses.replace(GREEDY, return_logits=True),
        dataclasses.replace(GREEDY, n=2),
        dataclasses.replace(GREEDY, result_cache=False),
    ]
    for params in cases:
        llm.generate(PROMPT, params)
        assert llm.generate(PROMPT, params)[0].served_from == "model", params
    assert llm.engine.results is not None and llm.engine.results.store.stats.puts == 0
    with _llm(result_cache=False) as off:
        off.generate(PROMPT, GREEDY)
        assert off.engine.results is None
        assert off.generate(PROMPT, GREEDY)[0].served_from == "model"


def test_a_corrupted_stored_result_is_a_counted_miss(tmp_path: Path) -> None:
    with _llm(result_tiers="disk", disk_path=str(tmp_path)) as llm:
        expected = _answer(llm.generate(PROMPT, GREEDY)[0])
        results = llm.engine.results
        assert results is not None
        disk = results.store.tiers[0]
        (path,) = Path(tmp_path).rglob("*.kvt")
        data = bytearray(path.read_bytes())
        data[-3] ^= 0x40
        path.write_bytes(bytes(data))
        out = llm.generate(PROMPT, GREEDY)[0]
        assert out.served_from == "model" and _answer(out) == expected
        assert results.store.stats.corrupt == 1 and disk.stats().corrupt == 1
        assert llm.generate(PROMPT, GREEDY)[0].served_from == "result-cache"  # stored again

        # an intact object whose payload is not a result (another writer's bug): also a counted miss
        eng = llm.engine
        ids = eng.tokenize(PROMPT)
        key = request_result_key(
            eng.fingerprint, None, ids, GREEDY, eng.loaded.config.eos_token_ids, results.max_model_len
        )
        disk.put([(key, encode_object(key, eng.fingerprint, KIND_RESULT, b"{not json"))])
        out = llm.generate(PROMPT, GREEDY)[0]
        assert out.served_from == "model" and _answer(out) == expected
        assert results.store.stats.corrupt == 2
