"""HF architecture name -> how to build it. Unsupported names fail with the supported list."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ModelConfig:
    """The numbers our decoder needs, normalised from any supported HF config."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_window: int | None
    dtype: torch.dtype
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None


def _qkv_o_bias(arch: str, hf: Any) -> tuple[bool, bool, bool]:
    """(qkv bias, o_proj bias, q/k norm) per family, as each HF modeling file builds it."""
    attention_bias = bool(getattr(hf, "attention_bias", False))
    if arch == "LlamaForCausalLM":
        return attention_bias, attention_bias, False
    if arch == "MistralForCausalLM":
        return False, False, False
    if arch == "Qwen2ForCausalLM":
        return True, False, False
    if arch == "Qwen3ForCausalLM":
        return attention_bias, attention_bias, True
    raise AssertionError(arch)


SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


class UnsupportedArchitectureError(ValueError):
    pass


def _sliding_window(arch: str, hf: Any) -> int | None:
    window = getattr(hf, "sliding_window", None)
    if arch == "MistralForCausalLM":
        return int(window) if window else None
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and getattr(hf, "use_sliding_window", False):
        # Qwen applies the window only to layers past max_window_layers; we do not split layers yet.
        raise UnsupportedArchitectureError(f"{arch} with use_sliding_window=True is not supported yet")
    return None


def _eos_ids(hf: Any) -> tuple[int, ...]:
    eos = getattr(hf, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(int(e) for e in eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def model_config_from_hf(hf: Any, dtype: torch.dtype | None = None) -> ModelConfig:
    archs = list(getattr(hf, "architectures", None) or [])
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {archs or [getattr(hf, 'model_type', '?')]}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    qkv_bias, o_bias, qk_norm = _qkv_o_bias(arch, hf)
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    config_dtype = getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None) or torch.float32
    if isinstance(config_dtype, str):
        config_dtype = getattr(torch, config_dtype)
    return ModelConfig(
        architecture=arch,
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads,
        num_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
        head_dim=head_dim,
        rms_norm_eps=hf.rms_norm_eps,
        max_position_embeddings=hf.max_position_embeddings,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        qk_norm=qk_norm,
        sliding_window=_sliding_window(arch, hf),
        dtype=dtype or config_dtype,
        eos_token_ids=_eos_ids(hf),
        bos_token_id=getattr(hf, "bos_token_id", None),
    )
