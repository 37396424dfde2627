"""Embeddings with a per-input cache: ``LLM(model=<sentence-transformers folder>).embed(texts)``.

Each input's vector is stored under ``embedding_key(fingerprint, text)`` in the result tiers, so
re-embedding a corpus computes only the texts that are new or changed; duplicates within one call
are computed once. What is computed runs in batches of ``embedding_batch_size``, longest texts
first (as sentence-transformers does), so a batch pads little.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kvtier.cache.results import (
    KIND_EMBEDDING,
    embedding_from_bytes,
    embedding_key,
    embedding_to_bytes,
)
from kvtier.config import EngineConfig
from kvtier.engine.engine import resolve_device
from kvtier.engine.request import InvalidRequestError
from kvtier.engine.results import build_result_store
from kvtier.model.bert import LoadedEncoder, load_encoder

_DTYPES = {
    "auto": torch.float32,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass
class EmbedStats:
    inputs: int = 0  # texts asked for
    computed: int = 0  # texts run through the encoder
    cached: int = 0  # texts served from the cache
    batches: int = 0


class Embedder:
    def __init__(self, config: EngineConfig, encoder: LoadedEncoder | None = None) -> None:
        ms = config.model
        if ms.dtype not in _DTYPES:
            raise ValueError(f"unsupported dtype {ms.dtype!r}; supported: {', '.join(_DTYPES)}")
        self.device = resolve_device(ms.device)
        # float32 by default on every device: the vectors must match the reference's
        self.encoder = encoder or load_encoder(ms.model, self.device, _DTYPES[ms.dtype])
        self.batch_size = config.results.embedding_batch_size
        self.store = (
            build_result_store(config, self.encoder.fingerprint, KIND_EMBEDDING, "embeddings")
            if config.results.embedding_cache
            else None
        )
        self.stats = EmbedStats()

    @property
    def fingerprint(self) -> str:
        return self.encoder.fingerprint

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def embed(
        self, texts: str | Sequence[str], use_cache: bool = True, salt: str | None = None
    ) -> np.ndarray:
        """``[len(texts), dim]`` float32 vectors (one text: still a 2-D array of one row). ``salt``
        keys the cached vectors apart (a server's tenants)."""
        items = [texts] if isinstance(texts, str) else list(texts)
        bad = [i for i, t in enumerate(items) if not isinstance(t, str)]
        if bad:
            raise InvalidRequestError(f"input {bad[0]} is a {type(items[bad[0]]).__name__}, not a string")
        out = np.empty((len(items), self.dim), dtype=np.float32)
        unique = list(dict.fromkeys(items))
        vectors = self._cached(unique, salt) if use_cache and self.store is not None else {}
        todo = [t for t in unique if t not in vectors]
        computed = self._compute(todo)
        if computed and use_cache and self.store is not None:
            keys = [embedding_key(self.fingerprint, t, salt) for t in todo]
            self.store.put_many([(k, embedding_to_bytes(v)) for k, v in zip(keys, computed, strict=True)])
        vectors.update(zip(todo, computed, strict=True))
        for i, t in enumerate(items):
            out[i] = vectors[t]
        s = self.stats
        s.inputs += len(items)
        s.computed += len(todo)
        s.cached += len(unique) - len(todo)
        return out

    def _cached(self, texts: list[str], salt: str | None) -> dict[str, np.ndarray]:
        assert self.store is not None
        keys = [embedding_key(self.fingerprint, t, salt) for t in texts]
        found: dict[str, np.ndarray] = {}
        for text, key, hit in zip(texts, keys, self.store.get_many(keys), strict=True):
            if hit is None:
                continue
            try:
                found[text] = embedding_from_bytes(hit[0], self.dim)
            except ValueError:  # an intact object of another size: not ours, a counted miss
                self.store.reject(key, hit[1])
        return found

    @torch.inference_mode()
    def _compute(self, texts: list[str]) -> list[np.ndarray]:
        if not texts:
            return []
        enc = self.encoder
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        result: list[np.ndarray] = [np.empty(0)] * len(texts)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            batch = [texts[i].lower() if enc.do_lower_case else texts[i] for i in idx]
            tok = enc.tokenizer(
                batch, padding=True, truncation=True, max_length=enc.max_seq_length, return_tensors="pt"
            )
            ids = tok["input_ids"].to(self.device)
            mask = tok["attention_mask"].to(self.device)
            pooled = enc.pooling(enc.model(ids, mask), mask).float().cpu().numpy()
            for row, i in enumerate(idx):
                result[i] = pooled[row]
            self.stats.batches += 1
        return result

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
