"""Load a model: a HF checkpoint folder (safetensors, mmap, meta device) or ``synthetic:<name>``.

Every model gets its fingerprint (model/fingerprint.py): a digest of architecture config, every weight
byte and dtype that is part of every cache key, so a changed model never reuses old KV.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors import safe_open

from kvtier.model.bytetok import BYTE_VOCAB, CHAT_TEMPLATE, SPECIAL_TOKENS, ByteTokenizer
from kvtier.model.fingerprint import (
    CheckpointError,
    _config_bytes,  # noqa: F401 - tests compare configs through it
    _reason,
    checkpoint_fingerprint,
    synthetic_fingerprint,
)
from kvtier.model.llama import CausalLM
from kvtier.model.registry import (
    ModelConfig,
    ModelConfigError,
    UnsupportedArchitectureError,
    check_raw_config,
    model_config_from_hf,
)

log = logging.getLogger(__name__)

SYNTHETIC_PREFIX = "synthetic:"
# Real architectures with seeded random weights: benchmarks run the true shapes without downloads.
SYNTHETIC_MODELS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        arch="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=320,
        max_position_embeddings=4096,
    ),
    "small": dict(
        arch="llama",
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        vocab_size=384,
        max_position_embeddings=8192,
    ),
    "llama-3.2-1b": dict(
        arch="llama",
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=32.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
    ),
    "llama-3.1-8b": dict(
        arch="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
    ),
    "qwen3-0.6b": dict(
        arch="qwen3",
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        max_position_embeddings=40960,
        tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
    ),
}


@dataclass
class LoadedModel:
    model: CausalLM
    config: ModelConfig
    hf_config: Any
    tokenizer: Any  # a transformers PreTrainedTokenizerBase, or None for token-id-only use
    fingerprint: str
    name: str


def byte_level_tokenizer() -> ByteTokenizer:
    """The synthetic models' tokenizer (and that of checkpoints without tokenizer files)."""
    return ByteTokenizer()


def hf_byte_level_tokenizer() -> Any:
    """The same tokenizer built by transformers: the oracle ``ByteTokenizer`` is tested against."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    alphabet.sort()
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|end|>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
    )


def _synthetic_hf_config(name: str, dtype: torch.dtype) -> Any:
    """The synthetic model's config. With the default rope it is a plain namespace holding what
    ``model_config_from_hf`` and the rotary embedding read (the values ``LlamaConfig`` /
    ``Qwen3Config`` would hold): importing transformers' config modules took 2-5 s of a 12 s start.
    Scaled ropes come from transformers' own functions, which need its config class."""
    if name not in SYNTHETIC_MODELS:
        raise ValueError(f"unknown synthetic model {name!r}; available: {', '.join(SYNTHETIC_MODELS)}")
    spec = dict(SYNTHETIC_MODELS[name])
    arch = spec.pop("arch")
    rope = spec.pop("rope_parameters", None)
    spec.update(
        bos_token_id=256,
        eos_token_id=256 + SPECIAL_TOKENS.index("<|end|>"),
        pad_token_id=256 + SPECIAL_TOKENS.index("<pad>"),
        rms_norm_eps=1e-5,
    )
    arch_name = "LlamaForCausalLM" if arch == "llama" else "Qwen3ForCausalLM"
    if rope is None or rope.get("rope_type", "default") == "default":
        rope = rope or {"rope_type": "default", "rope_theta": 10000.0}
        defaults = dict(
            model_type=arch,
            architectures=[arch_name],
            head_dim=spec["hidden_size"] // spec["num_attention_heads"],
            tie_word_embeddings=False,
            attention_bias=False,
            mlp_bias=False,
            use_sliding_window=False,
            sliding_window=None,
        )
        hf: Any = SimpleNamespace(**{**defaults, **spec})
        hf.rope_parameters = hf.rope_scaling = dict(rope)
        hf.rope_theta = rope["rope_theta"]
    else:
        from transformers import LlamaConfig, Qwen3Config

        cls = LlamaConfig if arch == "llama" else Qwen3Config
        hf = cls(**spec, architectures=[arch_name])
        hf.rope_parameters = rope  # set after construction: keeps the validation of real configs quiet
        hf.rope_scaling = rope
    hf.dtype = dtype
    return hf


def _init_synthetic_weights(model: CausalLM, seed: int, device: torch.device) -> None:
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)


def _build_on_meta(cfg: ModelConfig, hf_config: Any) -> CausalLM:
    with torch.device("meta"):
        model = CausalLM(cfg, hf_config)
    return model


def _materialize(model: CausalLM, device: torch.device, dtype: torch.dtype) -> None:
    """Give every meta parameter uninitialised memory on ``device`` (the caller fills it).

    Not ``to_empty``: its ``empty_like`` of a meta tensor runs torch's Python reference kernels,
    whose first use imports sympy and torch.fx (1.6 s of every start)."""
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                fresh = torch.empty(p.shape, dtype=dtype, device=device)
                module._parameters[name] = torch.nn.Parameter(fresh, requires_grad=p.requires_grad)


def load_synthetic(name: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> LoadedModel:
    hf_config = _synthetic_hf_config(name, dtype)
    cfg = model_config_from_hf(hf_config, dtype)
    model = _build_on_meta(cfg, hf_config)
    _materialize(model, device, dtype)
    model.rotary = type(model.rotary)(hf_config, cfg.head_dim).to(device)  # buffers are not on meta
    model.tie_weights()
    _init_synthetic_weights(model, seed, device)
    fingerprint = synthetic_fingerprint(name, seed, cfg, hf_config, device)
    return LoadedModel(
        model.eval(), cfg, hf_config, byte_level_tokenizer(), fingerprint, SYNTHETIC_PREFIX + name
    )


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"cannot read the weight index {index}: {_reason(e)}") from None
        if not names or not all(isinstance(n, str) and n and "/" not in n and n != ".." for n in names):
            raise CheckpointError(
                f"the weight index {index} names no weight files, or names outside {folder}"
            )
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(f"the weight index {index} names {missing[0]}, which is not in {folder}")
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    return files


def _load_tokenizer(folder: Path, cfg: ModelConfig) -> Any:
    has_tokenizer = any(
        (folder / n).exists() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    )
    if has_tokenizer:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder))
    if cfg.vocab_size >= BYTE_VOCAB:
        log.warning("%s has no tokenizer files: using the byte-level tokenizer", folder)
        return byte_level_tokenizer()
    return None


def _checkpoint_config(folder: Path, dtype: torch.dtype | None) -> tuple[Any, ModelConfig]:
    if not (folder / "config.json").exists():
        raise FileNotFoundError(
            f"model path {str(folder)!r} is not a Hugging Face checkpoint folder (no config.json); "
            f"use a local folder or synthetic:<{'|'.join(SYNTHETIC_MODELS)}>"
        )
    from transformers import AutoConfig

    try:
        check_raw_config(json.loads((folder / "config.json").read_text()))
    except (OSError, ValueError) as e:  # ModelConfigError, a JSONDecodeError, an unreadable file
        raise ModelConfigError(f"{folder / 'config.json'}: {_reason(e)}") from None
    try:
        hf_config = AutoConfig.from_pretrained(str(folder))
    except (ValueError, KeyError, OSError, TypeError, ArithmeticError) as e:
        raise UnsupportedArchitectureError(f"cannot read {folder / 'config.json'}: {_reason(e)}") from e
    try:
        cfg = model_config_from_hf(hf_config, dtype)
    except ModelConfigError as e:
        raise ModelConfigError(f"{folder / 'config.json'}: {e}") from None
    return hf_config, cfg


def load_checkpoint(
    path: str | os.PathLike[str], device: torch.device, dtype: torch.dtype | None
) -> LoadedModel:
    folder = Path(path)
    hf_config, cfg = _checkpoint_config(folder, dtype)
    files = _safetensors_files(folder)
    model = _build_on_meta(cfg, hf_config)
    state = _read_state_dict(files, cfg, device)
    expected = {n for n, _ in model.named_parameters()}
    if cfg.tie_word_embeddings:
        expected.discard("lm_head.weight")
        state.pop("lm_head.weight", None)
    missing = expected - state.keys()
    if missing:
        raise ValueError(f"checkpoint {folder} lacks weights: {sorted(missing)[:5]}")
    try:
        model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False, assign=True)
    except RuntimeError as e:  # a tensor whose shape config.json does not predict
        raise CheckpointError(f"the weights in {folder} do not match its config.json: {e}") from None
    model.rotary = type(model.rotary)(hf_config, cfg.head_dim).to(device)
    model.tie_weights()
    fingerprint = checkpoint_fingerprint(cfg, hf_config, files)
    return LoadedModel(model.eval(), cfg, hf_config, _load_tokenizer(folder, cfg), fingerprint, str(folder))


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder (``kvtier.integrations.hf`` fingerprints them)."""
    return _safetensors_files(folder)


def _read_state_dict(files: list[Path], cfg: ModelConfig, device: torch.device) -> dict[str, torch.Tensor]:
    """Tensors come straight from the mmap'd files onto the device; a dtype cast is the only copy."""
    state: dict[str, torch.Tensor] = {}
    load_device = "cpu" if device.type == "cpu" else str(device)
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device=load_device) as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    tensor = f.get_tensor(name)
                    state[name] = tensor if tensor.dtype == cfg.dtype else tensor.to(cfg.dtype)
        except Exception as e:  # SafetensorsError, OSError, a torch error on a bad dtype: all name no file
            raise CheckpointError(f"cannot read the weights file {path}: {_reason(e)}") from None
    return state


def load_model(
    name_or_path: str, device: torch.device, dtype: torch.dtype | None = None, seed: int = 0
) -> LoadedModel:
    """``synthetic:<name>`` or a local HF checkpoint folder. Model hubs are never contacted."""
    if name_or_path.startswith(SYNTHETIC_PREFIX):
        default = torch.bfloat16 if device.type == "cuda" else torch.float32
        return load_synthetic(name_or_path[len(SYNTHETIC_PREFIX) :], device, dtype or default, seed)
    return load_checkpoint(name_or_path, device, dtype)


def fingerprint_of(
    name_or_path: str, device: torch.device, dtype: torch.dtype | None = None, seed: int = 0
) -> str:
    """The fingerprint ``load_model`` would give, without building the model (``kvtier cache gc``)."""
    if name_or_path.startswith(SYNTHETIC_PREFIX):
        name = name_or_path[len(SYNTHETIC_PREFIX) :]
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        hf_config = _synthetic_hf_config(name, dtype)
        return synthetic_fingerprint(name, seed, model_config_from_hf(hf_config, dtype), hf_config, device)
    folder = Path(name_or_path)
    hf_config, cfg = _checkpoint_config(folder, dtype)
    return checkpoint_fingerprint(cfg, hf_config, _safetensors_files(folder))
