"""The engine's side of the result cache: which requests may use it, their key, and the stores.

A request is served from the result cache only if its answer is fully determined by its inputs:
greedy, or sampling with a seed; one completion (n == 1); no per-step logits asked (they are not
stored). Its key covers everything that changes the tokens or the text: see ``output_params``.
"""

from __future__ import annotations

import os
from dataclasses import fields
from typing import Any

from kvtier.cache.codec import secret_from_env
from kvtier.cache.keys import BlockKey
from kvtier.cache.results import ResultStore, result_key
from kvtier.cache.tiers.base import Tier
from kvtier.cache.tiers.disk import DiskTier
from kvtier.cache.tiers.memory import MemoryTier
from kvtier.cache.tiers.redis import RedisTier
from kvtier.config import ConfigError, EngineConfig
from kvtier.engine.request import SamplingParams

# SamplingParams fields that do not change what is generated (only what is kept or how it is served).
_NOT_OUTPUT = {"result_cache", "return_logits", "n"}


def cacheable(params: SamplingParams) -> bool:
    return (
        params.result_cache
        and params.n == 1
        and not params.return_logits
        and (params.greedy or params.seed is not None)
    )


def output_params(
    params: SamplingParams, eos_token_ids: tuple[int, ...], max_model_len: int
) -> dict[str, Any]:
    """Every input of the answer besides model, salt and prompt, as JSON values. New SamplingParams
    fields are included unless listed in ``_NOT_OUTPUT``: forgetting one can only cost hits."""
    out: dict[str, Any] = {}
    for f in fields(params):
        if f.name in _NOT_OUTPUT:
            continue
        value = getattr(params, f.name)
        if params.greedy and f.name in ("seed", "top_k", "top_p", "min_p"):
            continue  # greedy ignores them: the same answer for any of their values
        out[f.name] = list(value) if isinstance(value, list | tuple) else value
    out["eos_token_ids"] = list(eos_token_ids)
    out["max_model_len"] = max_model_len  # a long answer may stop at the context's end
    return out


def request_result_key(
    fingerprint: str,
    salt: str | None,
    prompt_token_ids: list[int],
    params: SamplingParams,
    eos_token_ids: tuple[int, ...],
    max_model_len: int,
) -> BlockKey:
    return result_key(
        fingerprint, salt, prompt_token_ids, output_params(params, eos_token_ids, max_model_len)
    )


def _tier(name: str, config: EngineConfig, namespace: str, folder: str) -> Tier:
    rs, ts = config.results, config.tiers
    if name == "memory":
        return MemoryTier(rs.result_memory_capacity, rs.result_policy)
    if name == "disk":
        root = os.path.join(ts.resolved_disk_path(), folder)
        return DiskTier(root, namespace, rs.result_disk_capacity, rs.result_policy, read_threads=0)
    if name == "redis":
        if not ts.redis_url:
            raise ConfigError("the redis result tier needs redis_url (KVTIER_REDIS_URL)")
        return RedisTier(
            ts.redis_url, f"{namespace}.{folder}", ttl_seconds=ts.redis_ttl, timeout_seconds=ts.redis_timeout
        )
    if name == "memcached":
        try:
            from kvtier.engine.tiers import make_tier  # the memcached tier lands there
        except ImportError:  # pragma: no cover
            raise ConfigError("the memcached result tier needs the memcached tier") from None
        return make_tier("memcached", ts, f"{namespace}.{folder}", None)  # type: ignore[arg-type]
    raise ConfigError(f"unknown result tier {name!r}")


def build_result_store(config: EngineConfig, fingerprint: str, kind: int, folder: str) -> ResultStore:
    """A store of one kind (results or embeddings) on the configured result tiers; ``folder``
    separates the kinds on shared tiers (a subfolder of the disk path, a Redis namespace suffix)."""
    tiers = [_tier(n, config, fingerprint, folder) for n in config.results.tier_names()]
    return ResultStore(
        tiers, fingerprint, kind, compression=config.results.result_compression, secret=secret_from_env()
    )
