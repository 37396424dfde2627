"""CUDA graphs of a one-row extend step (``cuda_graph_extend_tokens``) give the eager step's output.

A follow-up prompt on a cached prefix is one prefill row of a few tokens: the graph pads its tokens
to a bucket, writes no K/V for the padding and takes the last real token's logits. Every suffix
length, across the buckets and past the largest (eager), must give the tokens and logits of the
same engine with those graphs off. float32, so that a different GEMM shape for the padded rows
cannot flip a greedy token on random weights. GPU only: CUDA graphs need CUDA.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kvtier import LLM, SamplingParams
from tests.models import random_prompt

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")

SUFFIXES = [1, 5, 16, 17, 40, 100, 129, 255, 300]  # buckets 16..256, then eager


def engine(extend_tokens: int) -> LLM:
    settings: dict[str, Any] = dict(
        device="cuda",
        dtype="float32",
        tiers="none",
        result_cache=False,
        kv_cache_memory=256 << 20,
        cuda_graph_max_batch=4,
        cuda_graph_extend_tokens=extend_tokens,
    )
    return LLM("synthetic:small", **settings)


def run(llm: LLM) -> list[tuple[list[int], torch.Tensor]]:
    prefix = random_prompt(333, seed=1, vocab=250)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, return_logits=True)
    llm.generate([prefix], params)  # the prefix's blocks are cached from here on
    outs = []
    for i, n in enumerate(SUFFIXES):
        (out,) = llm.generate([prefix + random_prompt(n, seed=10 + i, vocab=250)], params)
        assert out.num_cached_tokens >= 320, out.num_cached_tokens  # the prefix was a hit
        outs.append((out.outputs[0].token_ids, out.outputs[0].logits))
    return outs


def test_extend_graphs_match_the_eager_step() -> None:
    graphed = engine(256)
    got = run(graphed)
    graphs = graphed.engine.runner.extend_graphs
    assert graphs is not None and graphs.buckets == [16, 32, 64, 128, 256]
    # each step computes the prefix's unaligned tail (333 - 320 tokens) and the suffix
    assert graphs.replays == sum(1 for n in SUFFIXES if 13 + n <= 256) == 7
    del graphed
    want = run(engine(0))
    for (tokens, logits), (ref_tokens, ref_logits) in zip(got, want, strict=True):
        assert tokens == ref_tokens
        assert torch.allclose(logits[0], ref_logits[0], rtol=1e-3, atol=1e-3)
