"""Device memory on CUDA: the pool is sized from measured activations, and a step that runs out
of memory anyway shrinks the steps instead of failing its requests. Skipped without CUDA."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
import torch

from kvtier import LLM, SamplingParams
from kvtier.engine.memory import peak_step_bytes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

MODEL = "synthetic:small"  # 384 token ids, 8192 positions


def prompt(length: int) -> list[int]:
    return [5 + i % 300 for i in range(length)]


@pytest.fixture(autouse=True)
def free_the_device() -> Iterator[None]:
    """Each test's engines hold most of the device: give it back for the next test, pass or fail."""
    yield
    gc.collect()
    torch.cuda.empty_cache()


def test_the_pool_leaves_room_for_the_largest_step() -> None:
    llm = LLM(MODEL, tiers="none", max_num_batched_tokens=4096, gpu_memory_utilization=0.5)
    engine = llm.engine
    activations = peak_step_bytes(engine.model, engine.layout, 4096, engine.config.scheduler.max_num_seqs)
    assert activations > 4096 * engine.loaded.config.hidden_size * 2  # at least the hidden states
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    pool = engine.num_blocks * engine.layout.bytes_per_block
    assert free >= activations  # what a full step needs is still free beside the pool
    assert pool >= 0.45 * (free + pool - activations)  # and the pool took about the share asked
    out = llm.generate([prompt(4000)], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    assert out.error is None and len(out.outputs[0].token_ids) == 4
    llm.close()


def test_a_step_out_of_memory_shrinks_the_steps_and_the_requests_go_on() -> None:
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    long = prompt(8000)
    llm = LLM(MODEL, tiers="none", kv_cache_memory=1 << 30, max_num_batched_tokens=8192)
    expected = llm.generate([long], params)[0].outputs[0].token_ids
    llm.engine.pool.reset_cache()
    need = peak_step_bytes(llm.engine.model, llm.engine.layout, 8192, 1)
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    blocker = torch.empty(free - need // 3, dtype=torch.uint8, device="cuda")  # a third of a step fits
    try:
        out = llm.generate([long], params)[0]
    finally:
        del blocker
        torch.cuda.empty_cache()
    assert out.error is None, out.error
    assert llm.engine.stats.oom_steps >= 1
    assert llm.engine.scheduler.limits.max_num_batched_tokens < 8192
    assert out.outputs[0].token_ids == expected
    llm.engine.pool.assert_idle()
    llm.close()
