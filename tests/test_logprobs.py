"""Per-token logprobs: the sampled token's log-softmax of the model's logits, and the top alternatives."""

from __future__ import annotations

import pytest

from kvtier import LLM, SamplingParams
from kvtier.engine.request import InvalidRequestError


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("synthetic:tiny", kv_cache_memory=1 << 20)


def test_logprobs_match_the_logits(llm: LLM) -> None:
    params = SamplingParams(max_tokens=5, temperature=0.8, seed=3, logprobs=4, return_logits=True)
    c = llm.generate(["logprobs come from the raw logits"], params)[0].outputs[0]
    assert c.logprobs is not None and c.logits is not None and len(c.logprobs) == len(c.token_ids) == 5
    for token, lp, logits in zip(c.token_ids, c.logprobs, c.logits, strict=True):
        ref = logits.float().log_softmax(-1)
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(ref[token].item(), abs=1e-5)
        values, ids = ref.topk(4)
        assert [t for t, _ in lp.top] == ids.tolist()
        assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-5)


def test_logprobs_off_and_zero(llm: LLM) -> None:
    outs = llm.generate(["a", "b"], [SamplingParams(max_tokens=2), SamplingParams(max_tokens=2, logprobs=0)])
    assert outs[0].outputs[0].logprobs is None
    zero = outs[1].outputs[0].logprobs
    assert zero is not None and len(zero) == 2 and all(lp.top == [] for lp in zero)


def test_logprobs_limit(llm: LLM) -> None:
    with pytest.raises(InvalidRequestError, match=r"logprobs must be in \[0, 20\]"):
        llm.generate(["x"], SamplingParams(logprobs=21))
