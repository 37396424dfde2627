"""kvtier's store behind Hugging Face ``generate``: same greedy tokens as plain ``generate``, a
prefix computed by either side is used by the other, clear errors for what it cannot serve."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM, PreTrainedModel

from kvtier import LLM, SamplingParams
from kvtier.integrations.hf import KVTierStore, UnsupportedModelError
from tests.models import make_hf_model, random_prompt, save_model

BS = 16
NEW = 12


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_model(make_hf_model("llama", seed=3), tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def model(folder: str) -> PreTrainedModel:
    return LlamaForCausalLM.from_pretrained(folder).eval()


def _plain(model: PreTrainedModel, prompt: list[int], new: int = NEW) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False)
    return out[0, len(prompt) :].tolist()


def _stored(store: KVTierStore, prompt: list[int], new: int = NEW) -> list[int]:
    out = store.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False)
    return out[0, len(prompt) :].tolist()


def test_greedy_outputs_equal_plain_generate_and_the_prefix_is_loaded(
    model: PreTrainedModel, tmp_path: Path
) -> None:
    shared = random_prompt(5 * BS, seed=1)
    first, second = shared + random_prompt(7, seed=2), shared + random_prompt(9, seed=3)
    with KVTierStore(model, tiers="disk", disk_path=str(tmp_path), block_size=BS) as store:
        assert _stored(store, first) == _plain(model, first)
        assert store.stats.loaded_tokens == 0
        assert store.stats.stored_blocks == (len(first) + NEW - 1) // BS
        assert _stored(store, second) == _plain(model, second)
        assert store.stats.loaded_tokens == 5 * BS  # the shared blocks, not the other suffix
        answer = _plain(model, first)
        follow_up = first + answer + random_prompt(5, seed=8)  # the next turn: prompt and answer
        assert _stored(store, follow_up) == _plain(model, follow_up)
        assert store.stats.loaded_tokens == 5 * BS + (len(first) + NEW - 1) // BS * BS


def test_a_prefix_moves_between_kvtier_and_transformers(
    folder: str, model: PreTrainedModel, tmp_path: Path
) -> None:
    settings = dict(tiers="disk", disk_path=str(tmp_path), block_size=BS)
    prompt = random_prompt(4 * BS + 3, seed=4)
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True, result_cache=False)
    with LLM(folder, device="cpu", dtype="float32", **settings) as llm:  # kvtier computes, stores
        engine_tokens = llm.generate([prompt], params)[0].outputs[0].token_ids
    assert engine_tokens == _plain(model, prompt)
    with KVTierStore(model, **settings) as store:  # transformers loads what kvtier stored
        assert _stored(store, prompt) == engine_tokens
        assert store.stats.loaded_tokens == 4 * BS and store.stats.corrupt == 0
        other = random_prompt(3 * BS + 5, seed=5)
        hf_tokens = _stored(store, other)  # transformers computes, stores
    with LLM(folder, device="cpu", dtype="float32", load_policy="always", **settings) as llm:
        out = llm.generate([other], params)[0]
    assert out.outputs[0].token_ids == hf_tokens
    assert out.metrics["num_loaded_tokens"] == 3 * BS


def test_a_corrupted_block_is_recomputed(model: PreTrainedModel, tmp_path: Path) -> None:
    prompt = random_prompt(3 * BS + 1, seed=6)
    with KVTierStore(model, tiers="disk", disk_path=str(tmp_path), block_size=BS) as store:
        expected = _stored(store, prompt)
        disk = store.tiers[0]
        victim = sorted(Path(tmp_path).rglob("*.kvt"))[0]
        data = bytearray(victim.read_bytes())
        data[-5] ^= 0xFF
        victim.write_bytes(bytes(data))
        assert _stored(store, prompt) == expected
        assert store.stats.corrupt == 1 and disk.stats().corrupt == 1


def test_unsupported_models_and_caches_are_clear_errors(model: PreTrainedModel, tmp_path: Path) -> None:
    gpt2_folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(gpt2_folder)
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        KVTierStore(GPT2LMHeadModel.from_pretrained(gpt2_folder), disk_path=str(tmp_path))
    mistral_folder = save_model(make_hf_model("mistral", sliding_window=8), tmp_path / "mistral")
    from transformers import MistralForCausalLM

    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        KVTierStore(MistralForCausalLM.from_pretrained(mistral_folder), disk_path=str(tmp_path))
    with pytest.raises(UnsupportedModelError, match="local checkpoint folder"):
        KVTierStore(make_hf_model("llama"), disk_path=str(tmp_path))
    with KVTierStore(model, disk_path=str(tmp_path)) as store:
        ids = torch.tensor([random_prompt(20, seed=7)])
        with pytest.raises(UnsupportedModelError, match="static"):
            store.generate(ids, max_new_tokens=2, cache_implementation="static")
        with pytest.raises(UnsupportedModelError, match="past_key_values"):
            store.generate(ids, max_new_tokens=2, past_key_values=object())
        with pytest.raises(UnsupportedModelError, match="one prompt"):
            store.generate(torch.cat([ids, ids]), max_new_tokens=2)
