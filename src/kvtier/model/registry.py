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


class ModelConfigError(ValueError):
    """A config whose numbers cannot build a model (zero heads, negative layers, ...)."""


_POSITIVE = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
)


def check_raw_config(data: Any) -> None:
    """The sizes a config.json gives, checked before transformers reads it (it divides by the head
    count on construction: zero heads would be a bare ZeroDivisionError)."""
    if not isinstance(data, dict):
        raise ModelConfigError(f"config must be a JSON object, got {type(data).__name__}")
    for name in (*_POSITIVE, "num_key_value_heads", "head_dim"):
        value = data.get(name)
        if (
            name in data
            and value is not None
            and (isinstance(value, bool) or not isinstance(value, int) or value < 1)
        ):
            raise ModelConfigError(f"config {name} must be a positive integer, got {value!r}")


def _check_shape(hf: Any) -> None:
    """Every size is a positive integer and the heads divide evenly: otherwise building the model
    fails deep inside torch (a division by zero, a negative dimension) with no name in the message."""
    for name in (*_POSITIVE, "num_key_value_heads", "head_dim"):
        value = getattr(hf, name, None)
        if value is None and name not in _POSITIVE:
            continue  # optional: defaults to num_attention_heads / hidden_size // heads
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelConfigError(f"config {name} must be a positive integer, got {value!r}")
    heads = hf.num_attention_heads
    kv_heads = getattr(hf, "num_key_value_heads", None) or heads
    if heads % kv_heads:
        raise ModelConfigError(
            f"config num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})"
        )
    if getattr(hf, "head_dim", None) is None and hf.hidden_size % heads:
        raise ModelConfigError(
            f"config hidden_size ({hf.hidden_size}) must be a multiple of num_attention_heads ({heads})"
        )
    eps = getattr(hf, "rms_norm_eps", None)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < 1:
        raise ModelConfigError(f"config rms_norm_eps must be a number in (0, 1), got {eps!r}")


def model_config_from_hf(hf: Any, dtype: torch.dtype | None = None) -> ModelConfig:
    archs = list(getattr(hf, "architectures", None) or [])
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {archs or [getattr(hf, 'model_type', '?')]}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    _check_shape(hf)
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
