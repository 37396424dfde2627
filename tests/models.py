"""Tiny Hugging Face models for the tests: built here, with random weights, saved as checkpoints.

Weights are re-drawn with a larger spread than HF's default init (and norm weights and biases made
non-trivial), so greedy tokens do not collapse into one repeated token and logit ties are unlikely.
The configs carry no bos/eos/pad ids unless a test asks: HF ``generate`` then runs the full
``max_new_tokens`` without masking any token, which is what ``ignore_eos=True`` does in kvtier.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

ARCHITECTURES: dict[str, tuple[type, type]] = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}

VOCAB = 300
TINY: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA: two query heads per KV head
    head_dim=16,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)

LLAMA3_ROPE: dict[str, Any] = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
    "rope_theta": 500000.0,
}


def tiny_config(arch: str = "llama", **overrides: Any) -> Any:
    config_cls, model_cls = ARCHITECTURES[arch]
    settings = {**TINY, **overrides}
    return config_cls(**settings, architectures=[model_cls.__name__])


def randomize_(model: PreTrainedModel, seed: int, std: float = 0.1) -> PreTrainedModel:
    """Redraw every parameter: matrices N(0, std), norm weights 1 + N(0, 0.3), biases N(0, std)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
            if "norm" in name:
                p.copy_(1.0 + 0.3 * noise)
            else:
                p.copy_(std * noise)
    return model


def make_hf_model(arch: str = "llama", seed: int = 0, std: float = 0.1, **overrides: Any) -> PreTrainedModel:
    """A float32 HF model of the tiny shape, in eval mode, with seeded random weights."""
    _, model_cls = ARCHITECTURES[arch]
    model = model_cls(tiny_config(arch, **overrides)).eval()
    return randomize_(model, seed, std)


def save_model(model: PreTrainedModel, folder: str | os.PathLike[str], **kwargs: Any) -> str:
    """``save_pretrained`` (safetensors); kwargs go through, e.g. ``max_shard_size="40KB"``."""
    model.save_pretrained(str(folder), **kwargs)
    return str(folder)


def random_prompt(length: int, seed: int, vocab: int = VOCAB) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (length,), generator=gen).tolist()


def bytes_per_block(model: PreTrainedModel, block_size: int, dtype_bytes: int = 4) -> int:
    """KV bytes of one block of the tiny model (to size a pool in blocks)."""
    c = model.config
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * dtype_bytes * block_size


@torch.no_grad()
def hf_greedy(
    model: PreTrainedModel, prompt: list[int], max_new_tokens: int
) -> tuple[list[int], torch.Tensor]:
    """HF greedy generation: (new tokens, raw logits of every step as [max_new_tokens, vocab] float32)."""
    out = model.generate(
        torch.tensor([prompt], device=model.device),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=model.device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    tokens = out.sequences[0, len(prompt) :].tolist()
    logits = torch.stack([step[0] for step in out.logits]).float()
    assert len(tokens) == max_new_tokens, "the HF model stopped early: it should have no eos id"
    return tokens, logits


@torch.no_grad()
def hf_last_logits(model: PreTrainedModel, prompt: list[int]) -> torch.Tensor:
    """Logits at the prompt's last position from one plain forward pass: [vocab] float32."""
    return model(torch.tensor([prompt])).logits[0, -1].float()
