"""CUDA graphs of a step that is a few decodes and one short prefill row (``cuda_graph_mixed_decodes``)
give the eager step's output.

A follow-up turn on a cached prefix usually arrives while other requests decode: the step is their
decode rows and its one extend row. The graph pads the decode rows (slot -1, length 0) and the row's
tokens to their buckets and takes the logits of every decode row and of the row's last real token.
Every suffix length, across the token buckets and past the largest (eager), with and without
chunked prefill (a chunk short of the prompt's end samples nothing), must give the tokens and
logits of the same engine with those graphs off. float32, so that another GEMM shape cannot flip a
greedy token on random weights. GPU only: CUDA graphs need CUDA.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kvtier import LLM, SamplingParams
from kvtier.engine.engine import Engine
from tests.models import random_prompt

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")

SUFFIXES = [1, 5, 16, 40, 100, 200]  # 13 + n tokens a row: buckets 16..128, then eager
DECODERS = 3


def engine(mixed_decodes: int, step_tokens: int) -> LLM:
    settings: dict[str, Any] = dict(
        device="cuda",
        dtype="float32",
        tiers="none",
        result_cache=False,
        kv_cache_memory=256 << 20,
        cuda_graph_max_batch=8,
        cuda_graph_extend_tokens=128,
        cuda_graph_mixed_decodes=mixed_decodes,
        max_num_batched_tokens=step_tokens,
    )
    return LLM("synthetic:small", **settings)


def step_until(engine: Engine, done: dict[str, Any], want: set[str]) -> None:
    while not want <= done.keys():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out


def run(llm: LLM) -> list[tuple[list[int], list[torch.Tensor]]]:
    """Three requests decode for the whole run; each follow-up prompt joins their steps."""
    eng = llm.engine
    prefix = random_prompt(333, seed=1, vocab=250)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, return_logits=True)
    llm.generate([prefix], params)  # the prefix's blocks are cached from here on
    long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True, return_logits=True)
    order = [eng.add_request(random_prompt(40, seed=100 + i, vocab=250), long)[0] for i in range(DECODERS)]
    done: dict[str, Any] = {}
    for _ in range(3):
        eng.step()  # the decoders' prefills, then decodes
    for i, n in enumerate(SUFFIXES):
        (rid,) = eng.add_request(prefix + random_prompt(n, seed=10 + i, vocab=250), params)
        order.append(rid)
        step_until(eng, done, {rid})
        assert done[rid].num_cached_tokens >= 320, done[rid].num_cached_tokens  # the prefix was a hit
    step_until(eng, done, set(order))
    eng.pool.assert_idle()
    return [(done[r].outputs[0].token_ids, done[r].outputs[0].logits) for r in order]


@pytest.mark.parametrize("step_tokens", [2048, 64], ids=["whole-rows", "chunked"])
def test_mixed_graphs_match_the_eager_step(step_tokens: int) -> None:
    graphed = engine(4, step_tokens)
    got = run(graphed)
    graphs = graphed.engine.runner.mixed_graphs
    assert graphs is not None
    assert graphs.decode_buckets == [1, 2, 4]
    # the row's tokens never exceed the step's budget, so no bucket is captured past it
    assert graphs.token_buckets == [t for t in (16, 32, 64, 128) if t <= step_tokens]
    assert graphs.replays >= (4 if step_tokens == 2048 else 6), graphs.replays
    del graphed
    want = run(engine(0, step_tokens))
    for (tokens, logits), (ref_tokens, ref_logits) in zip(got, want, strict=True):
        assert tokens == ref_tokens
        assert len(logits) == len(ref_logits)
        for a, b in zip(logits, ref_logits, strict=True):
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-3)
