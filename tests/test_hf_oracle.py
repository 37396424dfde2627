"""Hugging Face as the oracle: every supported architecture, loaded from a saved checkpoint, gives
HF's logits and HF's greedy tokens (float32), and HF's bfloat16 logits within bf16 noise."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedModel

from kvtier import LLM, SamplingParams
from kvtier.model.registry import SUPPORTED_ARCHITECTURES
from tests.models import LLAMA3_ROPE, hf_greedy, hf_last_logits, make_hf_model, random_prompt, save_model

NEW_TOKENS = 32
PROMPT_LEN = 45  # not a multiple of the block size: the last block is partial
KV_MEMORY = 4 << 20
ATOL32 = 1e-4  # float32, same math in a different order
ATOL_BF16 = 0.08  # bf16 noise itself is ~0.03 on logits of magnitude ~3

CASES: dict[str, dict[str, Any]] = {
    "llama": dict(arch="llama"),
    "llama3-rope": dict(arch="llama", rope_parameters=LLAMA3_ROPE, max_position_embeddings=2048),
    "llama-tied": dict(arch="llama", tie_word_embeddings=True),
    # A window shorter than prompt + output: prefill and decode both have to drop old keys.
    "mistral-window": dict(arch="mistral", sliding_window=24),
    "qwen2-bias": dict(arch="qwen2"),
    # head_dim 32 while hidden / heads is 16: the projections are not square.
    "qwen3-qknorm": dict(arch="qwen3", head_dim=32),
    "llama-bias": dict(arch="llama", attention_bias=True, mlp_bias=True),
}


@dataclass
class Case:
    name: str
    hf: PreTrainedModel
    folder: str
    prompt: list[int]
    tokens: list[int]  # HF greedy tokens
    logits: torch.Tensor  # HF raw logits of each greedy step, [NEW_TOKENS, vocab]


@pytest.fixture(scope="module", params=list(CASES))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    name = request.param
    spec = dict(CASES[name])
    arch = spec.pop("arch")
    hf = make_hf_model(arch, seed=len(name), **spec)
    folder = save_model(hf, tmp_path_factory.mktemp(name))
    prompt = random_prompt(PROMPT_LEN, seed=len(name) + 100)
    tokens, logits = hf_greedy(hf, prompt, NEW_TOKENS)
    return Case(name, hf, folder, prompt, tokens, logits)


def _generate(llm: LLM, prompt: list[int], max_tokens: int) -> Any:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, return_logits=True)
    out = llm.generate([prompt], params)[0]
    llm.engine.pool.assert_idle()
    return out.outputs[0]


def test_config_is_what_the_case_claims(case: Case) -> None:
    """Guards the oracle itself: the features under test are really in the checkpoint."""
    cfg = json.loads((Path(case.folder) / "config.json").read_text())
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]  # GQA everywhere
    if case.name == "llama3-rope":
        assert cfg["rope_parameters"]["rope_type"] == "llama3"
    if case.name == "llama-tied":
        assert cfg["tie_word_embeddings"] is True
    if case.name == "mistral-window":
        assert cfg["sliding_window"] < PROMPT_LEN
    if case.name == "qwen2-bias":
        assert case.hf.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0
    if case.name == "qwen3-qknorm":
        assert (case.hf.model.layers[0].self_attn.q_norm.weight - 1).abs().sum() > 0
        assert cfg["head_dim"] * cfg["num_attention_heads"] != cfg["hidden_size"]
    if case.name == "llama-bias":
        assert case.hf.model.layers[0].self_attn.o_proj.bias.abs().sum() > 0
        assert case.hf.model.layers[0].mlp.down_proj.bias.abs().sum() > 0
    assert len(set(case.tokens)) > 4, "degenerate greedy output makes a weak oracle"


def test_float32_matches_hf(case: Case) -> None:
    llm = LLM(case.folder, kv_cache_memory=KV_MEMORY, block_size=16, tiers="none")
    out = _generate(llm, case.prompt, NEW_TOKENS)
    assert out.token_ids == case.tokens
    assert out.logits is not None and out.logits.shape == case.logits.shape
    # First step: the prompt's last position, against a plain HF forward pass too.
    torch.testing.assert_close(out.logits[0], hf_last_logits(case.hf, case.prompt), atol=ATOL32, rtol=1e-4)
    # Every decode step: positions PROMPT_LEN .. PROMPT_LEN + 31 through the paged cache.
    torch.testing.assert_close(out.logits, case.logits, atol=ATOL32, rtol=1e-4)


def test_bfloat16_first_step_matches_hf_bf16(case: Case) -> None:
    llm = LLM(case.folder, kv_cache_memory=KV_MEMORY, block_size=16, tiers="none", dtype="bfloat16")
    assert llm.engine.model.lm_head.weight.dtype == torch.bfloat16
    assert llm.engine.runner.kv_cache.dtype == torch.bfloat16
    out = _generate(llm, case.prompt, 1)
    hf_bf16 = copy.deepcopy(case.hf).to(torch.bfloat16)
    ref = hf_last_logits(hf_bf16, case.prompt)
    assert out.logits is not None
    got = out.logits[0]
    assert (got - ref).abs().max().item() < ATOL_BF16
    # And it really ran in bf16: not bit-equal to float32.
    assert (got - case.logits[0]).abs().max().item() > 1e-3


def test_sharded_safetensors_with_index(case: Case, tmp_path: Path) -> None:
    folder = save_model(case.hf, tmp_path / "sharded", max_shard_size="100KB")
    shards = sorted(Path(folder).glob("*.safetensors"))
    assert (Path(folder) / "model.safetensors.index.json").exists()
    assert len(shards) > 2
    llm = LLM(folder, kv_cache_memory=KV_MEMORY, block_size=16, tiers="none")
    out = _generate(llm, case.prompt, 8)
    assert out.token_ids == case.tokens[:8]
    assert out.logits is not None
    torch.testing.assert_close(out.logits, case.logits[:8], atol=ATOL32, rtol=1e-4)


def test_unsupported_architecture_lists_supported(tmp_path: Path) -> None:
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=64))
    folder = save_model(gpt2, tmp_path / "gpt2")
    with pytest.raises(ValueError) as info:
        LLM(folder, kv_cache_memory=KV_MEMORY, tiers="none")
    message = str(info.value)
    assert "GPT2LMHeadModel" in message
    for arch in SUPPORTED_ARCHITECTURES:
        assert arch in message


def test_unknown_architecture_name_lists_supported(tmp_path: Path) -> None:
    folder = Path(save_model(make_hf_model("llama", seed=1), tmp_path / "foo"))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["FooForCausalLM"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as info:
        LLM(str(folder), kv_cache_memory=KV_MEMORY, tiers="none")
    assert "FooForCausalLM" in str(info.value)
    for arch in SUPPORTED_ARCHITECTURES:
        assert arch in str(info.value)


def test_unknown_model_path_fails_clearly(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        LLM(str(missing), kv_cache_memory=KV_MEMORY, tiers="none")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        LLM(str(empty), kv_cache_memory=KV_MEMORY, tiers="none")


def test_checkpoint_without_weights_fails_clearly(tmp_path: Path) -> None:
    folder = Path(save_model(make_hf_model("llama", seed=1), tmp_path / "noweights"))
    for f in folder.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        LLM(str(folder), kv_cache_memory=KV_MEMORY, tiers="none")
