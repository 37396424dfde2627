"""BERT-family sentence encoders as sentence-transformers publishes them: encoder, pooling, normalise.

A folder holds ``config.json`` (a ``BertModel``), weights (``model.safetensors`` or
``pytorch_model.bin``), tokenizer files and, for sentence-transformers, ``modules.json`` listing
Transformer -> Pooling (``1_Pooling/config.json``) -> optional Normalize. Those files decide the
vector; a module this encoder does not implement (Dense, another architecture) is refused by name
rather than silently skipped, since a skipped module gives wrong vectors.

Parameter names are Hugging Face's, so the state dict loads as saved. Attention is
``torch.nn.functional.scaled_dot_product_attention`` with a padding mask.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kvtier.model.fingerprint import weight_identity
from kvtier.model.registry import UnsupportedArchitectureError

SUPPORTED_ENCODERS = ("bert",)
POOLING_MODES = ("cls_token", "max_tokens", "mean_tokens", "mean_sqrt_len_tokens", "lasttoken")
_ST_TRANSFORMER = "sentence_transformers.models.Transformer"
_ST_POOLING = "sentence_transformers.models.Pooling"
_ST_NORMALIZE = "sentence_transformers.models.Normalize"


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> BertConfig:
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_ENCODERS:
            supported = ", ".join(SUPPORTED_ENCODERS)
            raise UnsupportedArchitectureError(
                f"encoder model_type {model_type!r} is not supported; supported: {supported}"
            )
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise UnsupportedArchitectureError(
                f"position_embedding_type {raw['position_embedding_type']!r} is not supported; only absolute"
            )
        act = raw.get("hidden_act", "gelu")
        if act not in _ACTIVATIONS:
            raise UnsupportedArchitectureError(f"hidden_act {act!r}; supported: {', '.join(_ACTIVATIONS)}")
        return cls(
            raw["vocab_size"],
            raw["hidden_size"],
            raw["num_hidden_layers"],
            raw["num_attention_heads"],
            raw["intermediate_size"],
            raw["max_position_embeddings"],
            raw.get("type_vocab_size", 2),
            raw.get("layer_norm_eps", 1e-12),
            act,
        )


_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class _Dense(nn.Module):
    """``dense`` then (optionally) residual + ``LayerNorm``: HF's BertSelfOutput / BertOutput."""

    def __init__(self, d_in: int, d_out: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _SelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.heads = cfg.num_heads

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        shape = (b, s, self.heads, h // self.heads)
        q, k, v = (proj(x).view(shape).transpose(1, 2) for proj in (self.query, self.key, self.value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).reshape(b, s, h)


class _Attention(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.self = _SelfAttention(cfg)
        self.output = _Dense(cfg.hidden_size, cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class _Intermediate(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class _Layer(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.attention = _Attention(cfg)
        self.intermediate = _Intermediate(cfg)
        self.output = _Dense(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class _Encoder(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(cfg) for _ in range(cfg.num_layers))


def _embedding(n: int, dim: int) -> nn.Embedding:
    """An embedding left uninitialised (the checkpoint fills it): nn.Embedding's own random init
    on the meta device imports triton, which must not happen before a test sets TRITON_INTERPRET."""
    return nn.Embedding(n, dim, _weight=torch.empty(n, dim))


class _Embeddings(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = _embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = _embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = _embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
        x = x + self.token_type_embeddings.weight[0]  # one segment: token type 0 everywhere
        return self.LayerNorm(x)


class BertEncoder(nn.Module):
    """token ids + attention mask -> last hidden states ``[batch, seq, hidden]``."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = _Embeddings(cfg)
        self.encoder = _Encoder(cfg)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(input_ids)
        mask = attention_mask.bool()[:, None, None, :]  # [b, 1, 1, s]: keys a query may see
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x


@dataclass(frozen=True)
class Pooling:
    modes: tuple[str, ...]  # in sentence-transformers' concatenation order
    normalize: bool

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.to(hidden.dtype)[..., None]
        lengths = m.sum(1).clamp(min=1e-9)
        parts = []
        for mode in self.modes:
            if mode == "cls_token":
                parts.append(hidden[:, 0])
            elif mode == "max_tokens":
                parts.append(hidden.masked_fill(m == 0, -1e9).max(1).values)
            elif mode == "mean_tokens":
                parts.append((hidden * m).sum(1) / lengths)
            elif mode == "mean_sqrt_len_tokens":
                parts.append((hidden * m).sum(1) / lengths.sqrt())
            else:  # lasttoken
                last = mask.sum(1).long() - 1
                parts.append(hidden[torch.arange(hidden.shape[0]), last])
        out = torch.cat(parts, dim=-1)
        return F.normalize(out, p=2, dim=-1) if self.normalize else out


@dataclass
class LoadedEncoder:
    model: BertEncoder
    tokenizer: Any
    pooling: Pooling
    max_seq_length: int
    do_lower_case: bool
    fingerprint: str
    dim: int


def is_encoder_folder(path: str) -> bool:
    """A sentence-transformers folder, or a plain folder whose config.json is an encoder."""
    folder = Path(path)
    if (folder / "modules.json").exists():
        return True
    config = folder / "config.json"
    if not config.exists():
        return False
    try:
        raw = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    return raw.get("model_type") in SUPPORTED_ENCODERS


def _modules(folder: Path) -> tuple[Pooling, Path]:
    """Pooling and normalisation from modules.json (a plain folder: mean pooling, no normalise)."""
    listing = folder / "modules.json"
    if not listing.exists():
        return Pooling(("mean_tokens",), False), folder
    modules = json.loads(listing.read_text())
    types = [m.get("type") for m in modules]
    known = (_ST_TRANSFORMER, _ST_POOLING, _ST_NORMALIZE)
    unknown = [t for t in types if t not in known]
    if unknown or types[:1] != [_ST_TRANSFORMER]:
        raise UnsupportedArchitectureError(
            f"{listing}: modules {unknown or types} are not supported; kvtier runs Transformer, "
            "then Pooling, then an optional Normalize"
        )
    transformer = folder / (modules[0].get("path") or "")
    pooling = next((m for m in modules if m["type"] == _ST_POOLING), None)
    modes: tuple[str, ...] = ("mean_tokens",)
    if pooling is not None:
        raw = json.loads((folder / pooling["path"] / "config.json").read_text())
        on = [k.removeprefix("pooling_mode_") for k, v in raw.items() if k.startswith("pooling_mode_") and v]
        bad = [m for m in on if m not in POOLING_MODES]
        if bad or not on:
            raise UnsupportedArchitectureError(
                f"pooling modes {bad or on} are not supported; supported: {', '.join(POOLING_MODES)}"
            )
        modes = tuple(m for m in POOLING_MODES if m in on)
    return Pooling(modes, _ST_NORMALIZE in types), transformer


def _weights(folder: Path) -> tuple[dict[str, torch.Tensor], bytes]:
    """The state dict and an identity of the weight files (for the fingerprint)."""
    st = sorted(folder.glob("*.safetensors"))
    if st:
        from safetensors.torch import load_file

        state: dict[str, torch.Tensor] = {}
        for f in st:
            state.update(load_file(str(f)))
        return state, weight_identity(st)
    bin_file = folder / "pytorch_model.bin"
    if not bin_file.exists():
        raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {folder}")
    state = torch.load(str(bin_file), map_location="cpu", weights_only=True, mmap=True)
    h = hashlib.blake2b(digest_size=32)
    for name in sorted(state):  # names, shapes and every byte: .bin files are small encoders
        t = state[name]
        h.update(name.encode() + str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return state, h.digest()


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in ("bert.", "model."):
        if any(k.startswith(prefix + "embeddings.") for k in state):
            return {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def _file_digest(folder: Path, names: tuple[str, ...]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for n in names:
        p = folder / n
        data = p.read_bytes() if p.exists() else b""
        h.update(struct.pack("<Q", len(data)) + data)
    return h.digest()


def load_encoder(path: str, device: torch.device, dtype: torch.dtype = torch.float32) -> LoadedEncoder:
    folder = Path(path)
    pooling, transformer_dir = _modules(folder)
    config_path = transformer_dir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{transformer_dir} has no config.json: not an encoder checkpoint folder")
    raw = json.loads(config_path.read_text())
    cfg = BertConfig.from_json(raw)
    st_cfg_path = transformer_dir / "sentence_bert_config.json"
    st_cfg = json.loads(st_cfg_path.read_text()) if st_cfg_path.exists() else {}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(transformer_dir))
    max_len = int(
        st_cfg.get("max_seq_length") or min(tokenizer.model_max_length, cfg.max_position_embeddings)
    )
    max_len = min(max_len, cfg.max_position_embeddings)
    state, weights_id = _weights(transformer_dir)
    with torch.device("meta"):
        model = BertEncoder(cfg)
    expected = {n for n, _ in model.named_parameters()}
    state = _strip_prefix(state)
    missing = expected - state.keys()
    if missing:
        raise ValueError(f"encoder checkpoint {transformer_dir} lacks weights: {sorted(missing)[:5]}")
    model.load_state_dict({k: state[k].to(device, dtype) for k in expected}, strict=False, assign=True)
    do_lower = bool(st_cfg.get("do_lower_case", False))
    h = hashlib.blake2b(digest_size=16)
    for part in (
        b"encoder/1",
        json.dumps(raw, sort_keys=True).encode(),
        weights_id,
        repr((pooling, max_len, do_lower)).encode(),
        _file_digest(transformer_dir, ("tokenizer.json", "vocab.txt", "tokenizer_config.json")),
        str(dtype).encode(),
    ):
        h.update(struct.pack("<Q", len(part)) + part)
    dim = cfg.hidden_size * len(pooling.modes)
    return LoadedEncoder(model.eval(), tokenizer, pooling, max_len, do_lower, h.hexdigest(), dim)
