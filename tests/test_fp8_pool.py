"""The fp8 KV pool on the CPU (torch reference): sizes, scales, accuracy, and blocks that go down to
the disk tier as fp8 bytes and come back as they were."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kvtier import LLM, SamplingParams
from tests.models import make_hf_model, random_prompt, save_model

POOL = 8 << 20


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_model(make_hf_model("llama", seed=3), tmp_path_factory.mktemp("fp8"))


def make(folder: str, **settings: Any) -> LLM:
    base: dict[str, Any] = dict(device="cpu", kv_cache_memory=POOL, block_size=8, tiers="none")
    return LLM(folder, **{**base, **settings})


def greedy(n: int = 8) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, return_logits=True)


def test_fp8_pool_holds_four_times_the_blocks_of_float32(folder: str) -> None:
    full, fp8 = make(folder).engine, make(folder, kv_cache_dtype="fp8").engine
    assert fp8.layout.dtype == "float8_e4m3fn" and fp8.runner.kv_cache.dtype == torch.float8_e4m3fn
    assert fp8.num_blocks == 4 * full.num_blocks  # the tiny model computes in float32 on the CPU


def test_scales_are_powers_of_two_measured_the_same_way_twice(folder: str) -> None:
    a, b = make(folder, kv_cache_dtype="fp8").engine, make(folder, kv_cache_dtype="fp8").engine
    assert a.kv_scales is not None and b.kv_scales is not None
    assert torch.equal(a.kv_scales, b.kv_scales)
    assert torch.equal(torch.exp2(torch.log2(a.kv_scales).round()), a.kv_scales)
    assert a.fingerprint == b.fingerprint != make(folder).engine.fingerprint  # fp8 blocks never mix


def test_fp8_logits_stay_close_to_full_precision(folder: str) -> None:
    prompts = [random_prompt(30 + 7 * i, seed=i) for i in range(3)]
    ref = make(folder).generate(prompts, greedy())
    got = make(folder, kv_cache_dtype="fp8").generate(prompts, greedy())
    for r, g in zip(ref, got, strict=True):
        a, b = r.outputs[0].logits[0], g.outputs[0].logits[0]
        assert ((a - b).norm() / a.norm()).item() < 0.1


def test_fp8_blocks_go_to_disk_and_come_back_as_they_were(folder: str, tmp_path: Path) -> None:
    prompt = random_prompt(100, seed=9)
    settings = dict(kv_cache_dtype="fp8", tiers="disk", disk_path=str(tmp_path), load_policy="always")
    first = make(folder, **settings)
    ref = first.generate([prompt], greedy())[0].outputs[0]
    first.close()  # write-back: persists the device's blocks
    assert list(tmp_path.rglob("*")), "nothing was written to disk"
    second = make(folder, **settings)
    out = second.generate([prompt], greedy())[0]
    assert second.engine.hierarchy is not None
    stats = second.engine.hierarchy.stats
    assert stats.blocks_loaded == 12 and stats.corrupt == 0  # 99 computed prompt tokens: 12 full blocks
    assert out.outputs[0].token_ids == ref.token_ids
    second.close()
