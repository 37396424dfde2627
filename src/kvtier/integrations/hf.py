"""kvtier's tiered KV store behind Hugging Face ``model.generate``.

    from kvtier.integrations.hf import KVTierStore
    store = KVTierStore(model, tiers="disk")           # model: a transformers Llama/Mistral/Qwen2/Qwen3
    out = store.generate(input_ids, max_new_tokens=64)  # same arguments and result as model.generate

Before ``generate``, the longest stored prefix of ``input_ids`` is looked up in kvtier's tiers and
handed to ``generate`` as a ``DynamicCache`` already filled with it, so transformers prefills only
the rest; afterwards every newly computed full block is stored. Keys (chained BLAKE2b over the
model fingerprint, KV layout, salt and tokens), codec and tiers are the engine's, so a prefix that
a kvtier server computed serves a transformers script and back, when both load the same checkpoint
folder at the same dtype with the same block size (the fingerprint is computed from the folder, as
the engine does: a model whose weights were changed in memory must not use a store).

What it refuses, with an error naming the problem: a model kvtier does not run (the fingerprint
and layout would mean nothing), a model not loaded from a local checkpoint folder, sliding-window
layers (their cache drops old keys), batches of more than one prompt, and a caller's own cache
(``past_key_values``, a ``cache_implementation`` other than dynamic, ``use_cache=False``).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvtier.cache.codec import CodecConfig, CorruptObjectError, decode_block, encode_block, secret_from_env
from kvtier.cache.keys import BlockKey, KVLayout, chain_keys, root_key, tier_namespace
from kvtier.cache.tiers.base import Tier
from kvtier.config import EngineConfig
from kvtier.engine.tiers import make_tier, parse_codec
from kvtier.model.fingerprint import checkpoint_fingerprint
from kvtier.model.loader import safetensors_files
from kvtier.model.registry import UnsupportedArchitectureError, model_config_from_hf

log = logging.getLogger(__name__)


class UnsupportedModelError(UnsupportedArchitectureError):
    """The model or the way generate was asked to cache cannot use kvtier's store."""


@dataclass
class StoreStats:
    generations: int = 0
    prompt_tokens: int = 0
    loaded_tokens: int = 0  # prompt tokens whose KV came from the store
    stored_blocks: int = 0
    corrupt: int = 0  # blocks that failed verification (deleted, recomputed)


class KVTierStore:
    """The store for one transformers model. Settings are kvtier's (``tiers``, ``disk_path``,
    ``redis_url``, codecs, ``block_size``...), by name or as an ``EngineConfig``."""

    def __init__(
        self,
        model: Any,
        *,
        cache_salt: str | None = None,
        config: EngineConfig | None = None,
        **settings: Any,
    ) -> None:
        settings.setdefault("tiers", "disk")
        self.config = config or EngineConfig.load(settings)
        self.model = model
        self.salt = cache_salt
        folder = _checkpoint_folder(model)
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(str(folder))  # the folder's, as the engine reads it
        dtype = next(model.parameters()).dtype
        try:
            cfg = model_config_from_hf(hf_config, dtype)
        except UnsupportedArchitectureError as e:
            raise UnsupportedModelError(f"kvtier's store cannot serve this model: {e}") from None
        if cfg.sliding_window is not None:
            raise UnsupportedModelError(
                f"{folder} uses sliding-window attention ({cfg.sliding_window} tokens): its cache drops "
                "old keys, so stored prefixes cannot be handed to generate"
            )
        self.fingerprint = checkpoint_fingerprint(cfg, hf_config, safetensors_files(folder))
        self.layout = KVLayout(
            cfg.num_layers,
            cfg.num_kv_heads,
            cfg.head_dim,
            self.config.pool.block_size,
            str(dtype).removeprefix("torch."),
        )
        ts = self.config.tiers
        names = ts.enabled(cuda=False) if ts.tiers != "auto" else ["disk"]
        if not names:
            raise ValueError("KVTierStore needs at least one tier (tiers=disk, host, redis...)")
        self.secret = secret_from_env()
        namespace = tier_namespace(self.fingerprint, self.secret)  # the engine's, secret included
        self.tiers: list[Tier] = [make_tier(n, ts, namespace, self.layout) for n in names]
        codec_text = {"disk": ts.disk_codec, "redis": ts.redis_codec, "memcached": ts.memcached_codec}
        self.codecs = [parse_codec(codec_text.get(n, "none")) for n in names]
        self.root = root_key(self.fingerprint, self.layout, cache_salt)
        self.stats = StoreStats()

    # -- the one call -------------------------------------------------------------------------------
    def generate(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        """``model.generate(input_ids, **kwargs)`` with the stored prefix of ``input_ids`` loaded
        first and the new full blocks stored after."""
        _check_kwargs(kwargs)
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise UnsupportedModelError(
                "KVTierStore.generate takes one prompt (input_ids of shape [1, T]), "
                f"got {tuple(input_ids.shape)}"
            )
        tokens = [int(t) for t in input_ids[0].tolist()]
        cache, hit = self.load(tokens)
        kwargs.setdefault("attention_mask", torch.ones_like(input_ids))
        with warnings.catch_warnings():  # transformers 5 renames it `cache`; 4.x knows only this name
            warnings.filterwarnings("ignore", ".*past_key_values.*deprecated", FutureWarning)
            out = self.model.generate(input_ids, past_key_values=cache, **kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        self._store_after(cache, hit, tokens, sequences)
        self.stats.generations += 1
        self.stats.prompt_tokens += len(tokens)
        self.stats.loaded_tokens += hit * self.layout.block_size
        return out

    # -- load ---------------------------------------------------------------------------------------
    def load(self, tokens: list[int]) -> tuple[Any, int]:
        """A DynamicCache holding the longest stored prefix (whole blocks, at least the last token
        left to compute), and how many blocks it holds."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        if any(getattr(layer, "is_sliding", False) for layer in cache.layers):
            raise UnsupportedModelError("the model's cache has sliding-window layers; not supported")
        bs = self.layout.block_size
        keys = chain_keys(self.root, tokens[: (len(tokens) - 1) // bs * bs], bs)
        blocks = self._fetch(keys, tokens)
        if blocks:
            kv = torch.stack(blocks).to(self.model.device)  # [n, L, 2, bs, H, D]
            for layer in range(self.layout.num_layers):
                k = kv[:, layer, 0].reshape(-1, *kv.shape[-2:]).transpose(0, 1)[None]  # [1, H, n*bs, D]
                v = kv[:, layer, 1].reshape(-1, *kv.shape[-2:]).transpose(0, 1)[None]
                cache.update(k.contiguous(), v.contiguous(), layer)
        return cache, len(blocks)

    def _fetch(self, keys: list[BlockKey], tokens: list[int]) -> list[torch.Tensor]:
        """The longest verified run of blocks from the tier that holds the most of them."""
        if not keys:
            return []
        runs = [tier.lookup(keys) for tier in self.tiers]
        best = max(range(len(self.tiers)), key=lambda i: (runs[i], -i))
        n = runs[best]
        if n == 0:
            return []
        tier, bs = self.tiers[best], self.layout.block_size
        blocks: list[torch.Tensor] = []
        for i, data in enumerate(tier.get(keys[:n])):
            if data is None:
                break
            try:
                blocks.append(
                    decode_block(
                        data,
                        key=keys[i],
                        fingerprint=self.fingerprint,
                        layout=self.layout,
                        tokens=tokens[i * bs : (i + 1) * bs],
                        secret=self.secret,
                    )
                )
            except CorruptObjectError as e:
                log.warning("block %d from the %s tier rejected (%s): recomputing", i, tier.name, e.reason)
                tier.delete([keys[i]])
                tier.record_corrupt(1)
                self.stats.corrupt += 1
                break
        return blocks

    # -- store --------------------------------------------------------------------------------------
    def _store_after(self, cache: Any, hit: int, prompt: list[int], sequences: torch.Tensor) -> None:
        """Store every full block generate computed beyond the loaded ones. With several rows (beam
        search, num_return_sequences) only the prompt's blocks are common to all: store those."""
        computed = cache.get_seq_length()
        rows = cache.layers[0].keys.shape[0]
        tokens = [int(t) for t in sequences[0].tolist()] if rows == 1 else prompt
        bs = self.layout.block_size
        full = min(computed, len(tokens)) // bs
        if full <= hit:
            return
        keys = chain_keys(self.root, tokens[: full * bs], bs)
        span = slice(hit * bs, full * bs)
        per_layer = [
            torch.stack([layer.keys[0, :, span], layer.values[0, :, span]])  # [2, H, n*bs, D]
            for layer in cache.layers
        ]
        kv = torch.stack(per_layer).to("cpu", getattr(torch, self.layout.dtype))  # [L, 2, H, n*bs, D]
        L, _, H, _, D = kv.shape
        kv = kv.view(L, 2, H, full - hit, bs, D).permute(3, 0, 1, 4, 2, 5)  # [n, L, 2, bs, H, D]
        for tier, codec in zip(self.tiers, self.codecs, strict=True):
            tier.put(
                [
                    (keys[b], self._encode(keys[b], tokens[b * bs : (b + 1) * bs], kv[b - hit], codec))
                    for b in range(hit, full)
                ]
            )
        self.stats.stored_blocks += full - hit

    def _encode(self, key: BlockKey, tokens: list[int], block: torch.Tensor, codec: CodecConfig) -> bytes:
        return encode_block(
            key, self.fingerprint, self.layout, tokens, block.contiguous(), codec, self.secret
        )

    def close(self) -> None:
        for tier in self.tiers:
            tier.close()

    def __enter__(self) -> KVTierStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _checkpoint_folder(model: Any) -> Path:
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or getattr(model, "name_or_path", "")
    folder = Path(str(name))
    if not name or not (folder / "config.json").exists():
        raise UnsupportedModelError(
            f"the model was not loaded from a local checkpoint folder (name_or_path={name!r}): kvtier "
            "fingerprints the folder's weights, so load it with from_pretrained(<folder>)"
        )
    return folder


def _check_kwargs(kwargs: dict[str, Any]) -> None:
    for name in ("past_key_values", "cache"):
        if kwargs.get(name) is not None:
            raise UnsupportedModelError(f"pass no {name}: KVTierStore builds the cache itself")
    impl = kwargs.get("cache_implementation")
    if impl not in (None, "dynamic"):
        raise UnsupportedModelError(
            f"cache_implementation={impl!r} is not supported; KVTierStore fills a DynamicCache (dynamic)"
        )
    if kwargs.get("use_cache") is False:
        raise UnsupportedModelError("use_cache=False leaves nothing to load or store")
    kwargs.pop("cache_implementation", None)
