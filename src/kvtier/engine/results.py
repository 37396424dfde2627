"""The engine's side of the result cache: which requests may use it, their key, and the stores.

A request is served from the result cache only if its answer is fully determined by its inputs:
greedy, or sampling with a seed; one completion (n == 1); no per-step logits asked (they are not
stored). Its key covers everything that changes the tokens or the text: see ``output_params``.
"""

from __future__ import annotations

import os
from dataclasses import fields
from typing import Any

import numpy as np

from kvtier.cache.codec import CorruptObjectError, secret_from_env
from kvtier.cache.keys import BlockKey, tier_namespace
from kvtier.cache.results import KIND_RESULT, CachedResult, ResultStore, result_key
from kvtier.cache.tiers.base import Tier
from kvtier.cache.tiers.disk import DiskTier
from kvtier.cache.tiers.memory import MemoryTier
from kvtier.config import ConfigError, EngineConfig
from kvtier.engine.request import (
    CompletionOutput,
    FinishReason,
    Request,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
)

SERVED_FROM_CACHE = "result-cache"

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
        if isinstance(value, dict):  # logit_bias: the same bias in any order is the same answer
            value = sorted(value.items())
        out[f.name] = _plain(value)
    out["eos_token_ids"] = list(eos_token_ids)
    out["max_model_len"] = max_model_len  # a long answer may stop at the context's end
    return out


def _plain(value: Any) -> Any:
    """``value`` as JSON values: numpy numbers (which SamplingParams takes) as Python's, tuples as
    lists, at any depth."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


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
        from kvtier.cache.tiers.redis import RedisTier  # redis-py only when a Redis tier is built

        return RedisTier(
            ts.redis_url, f"{namespace}.{folder}", ttl_seconds=ts.redis_ttl, timeout_seconds=ts.redis_timeout
        )
    if name == "memcached":
        if not ts.memcached_url:
            raise ConfigError("the memcached result tier needs memcached_url (KVTIER_MEMCACHED_URL)")
        from kvtier.engine.tiers import make_tier

        # the layout only sizes KV-block tiers; memcached stores any object
        return make_tier("memcached", ts, f"{namespace}.{folder}", None)  # type: ignore[arg-type]
    raise ConfigError(f"unknown result tier {name!r}")


def build_result_store(config: EngineConfig, fingerprint: str, kind: int, folder: str) -> ResultStore:
    """A store of one kind (results or embeddings) on the configured result tiers; ``folder``
    separates the kinds on shared tiers (a subfolder of the disk path, a Redis namespace suffix)."""
    secret = secret_from_env()
    namespace = tier_namespace(fingerprint, secret)  # another secret's objects: never seen, never deleted
    tiers = [_tier(n, config, namespace, folder) for n in config.results.tier_names()]
    return ResultStore(tiers, fingerprint, kind, compression=config.results.result_compression, secret=secret)


def _logprob_from_json(raw: Any) -> TokenLogprob:
    """``[token_id, logprob, [[id, logprob], ...]]`` back into the engine's type (floats round-trip
    exactly through JSON: Python writes the shortest repr that reads back the same double)."""
    token_id, logprob, top = raw
    return TokenLogprob(int(token_id), float(logprob), [(int(i), float(p)) for i, p in top])


class ResultCache:
    """The engine's result cache: looked up in ``add_request`` (a hit is queued for the next
    ``step`` and never reaches the scheduler), filled in ``_finish`` from a finished request."""

    def __init__(
        self, config: EngineConfig, fingerprint: str, eos_token_ids: tuple[int, ...], max_model_len: int
    ) -> None:
        self.store = build_result_store(config, fingerprint, KIND_RESULT, "results")
        self.fingerprint = fingerprint
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.ready: list[RequestOutput] = []  # answers served from the cache, for the next step

    def key(self, token_ids: list[int], params: SamplingParams, salt: str | None) -> BlockKey | None:
        if not cacheable(params):
            return None
        return request_result_key(
            self.fingerprint, salt, token_ids, params, self.eos_token_ids, self.max_model_len
        )

    def serve(self, key: BlockKey, request_id: str, prompt: str | None, token_ids: list[int]) -> bool:
        """Queue the stored answer for ``key`` as ``request_id``'s output; False on a miss."""
        found = self.store.get(key)
        if found is None:
            return False
        payload, tier = found
        try:
            hit = CachedResult.from_bytes(payload)
        except CorruptObjectError:
            self.store.reject(key, tier)
            return False
        completion = CompletionOutput(0, list(hit.token_ids), hit.text, hit.finish_reason)
        if hit.logprobs is not None:
            try:
                completion.logprobs = [_logprob_from_json(x) for x in hit.logprobs]
            except (TypeError, ValueError):
                self.store.reject(key, tier)
                return False
        metrics: dict[str, Any] = {"num_preemptions": 0, "num_loaded_tokens": 0, "ttft": 0.0, "e2e": 0.0}
        metrics["result_cache_tier"] = tier
        out = RequestOutput(
            request_id, prompt, token_ids, [completion], True, len(token_ids), metrics,
            served_from=SERVED_FROM_CACHE,
        )  # fmt: skip
        self.ready.append(out)
        return True

    def remember(self, req: Request, reason: FinishReason) -> None:
        """Store a request's answer if it ended on its own (not aborted, failed or empty)."""
        if req.result_key is None or reason not in (FinishReason.STOP, FinishReason.LENGTH):
            return
        if req.error is not None or not req.output_token_ids:
            return
        value = CachedResult(list(req.output_token_ids), req.output_text, reason.value, req.stop_reason)
        if req.params.logprobs is not None:
            value.logprobs = [
                [lp.token_id, lp.logprob, [list(t) for t in lp.top]] for lp in req.output_logprobs
            ]
        try:
            payload = value.to_bytes()
        except ValueError:  # a non-finite logprob has no JSON form: this answer is not stored
            return
        self.store.put(req.result_key, payload)

    def take_ready(self) -> list[RequestOutput]:
        ready, self.ready = self.ready, []
        return ready

    def drop(self, request_id: str) -> None:
        self.ready = [o for o in self.ready if o.request_id != request_id]

    def close(self) -> None:
        self.store.close()
