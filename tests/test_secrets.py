"""Instances with different cache secrets (or none) share a disk folder and a Redis without a fight.

Before, a reader with another ``KVTIER_CACHE_SECRET`` found the others' objects under the same
namespace, could not verify them, and deleted them: two misconfigured instances destroyed each
other's cache. Now the namespace carries the secret's key id, so each sees and deletes only its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kvtier import LLM, SamplingParams
from kvtier.cache.codec import SECRET_ENV
from kvtier.cache.keys import key_id, tier_namespace
from tests.models import random_prompt
from tests.redis_servers import RedisServer

PROMPT = random_prompt(80, seed=41, vocab=256)
PARAMS = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
CACHED = 64  # 80 tokens: four full blocks of 16, the last recomputed for its logits


def _objects(disk: Path, redis_server: RedisServer) -> dict[str, int]:
    """Stored objects per namespace, disk and Redis together."""
    counts: dict[str, int] = {}
    for path in disk.glob("*/*/*.kvt"):
        ns = path.parent.parent.name
        counts[ns] = counts.get(ns, 0) + 1
    client = redis_server.client()
    try:
        for name in client.scan_iter(match="kvtier:*"):
            ns = name.decode().split(":")[1]
            counts[ns] = counts.get(ns, 0) + 1
    finally:
        client.close()
    return counts


def _run(disk: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, secret: str | None) -> Any:
    if secret is None:
        monkeypatch.delenv(SECRET_ENV, raising=False)
    else:
        monkeypatch.setenv(SECRET_ENV, secret)
    llm = LLM(
        "synthetic:tiny",
        kv_cache_memory=1 << 20,
        tiers="disk,redis",
        disk_path=str(disk),
        redis_url=redis_server.url,
        write_policy="write-through",
    )
    try:
        out = llm.generate([PROMPT], PARAMS)[0]
        stats = llm.engine.hierarchy.stats if llm.engine.hierarchy else None
        return llm.engine.namespace, out, stats.corrupt if stats else 0
    finally:
        llm.close()


@pytest.mark.redis
def test_different_secrets_never_share_or_delete(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = tmp_path / "disk"
    ns_a, first, _ = _run(disk, redis_server, monkeypatch, "secret-a")
    assert first.num_cached_tokens == 0
    after_a = _objects(disk, redis_server)
    assert set(after_a) == {ns_a} and after_a[ns_a] == 2 * 5  # five blocks, on disk and in Redis

    results = {}
    for secret in ("secret-b", None):
        ns, out, corrupt = _run(disk, redis_server, monkeypatch, secret)
        results[secret] = ns
        assert out.num_cached_tokens == 0  # nothing of another secret is used...
        assert corrupt == 0  # ...or even read: it lives in another namespace
        assert _objects(disk, redis_server)[ns_a] == after_a[ns_a]  # and nothing of it is deleted
        assert out.outputs[0].token_ids == first.outputs[0].token_ids
    assert len({ns_a, results["secret-b"], results[None]}) == 3

    ns, again, corrupt = _run(disk, redis_server, monkeypatch, "secret-a")  # the same secret: all hits
    assert ns == ns_a and corrupt == 0
    assert again.num_cached_tokens == CACHED
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    final = _objects(disk, redis_server)
    assert len(final) == 3 and all(n == 10 for n in final.values())


def test_key_ids_are_stable_distinct_and_not_the_secret() -> None:
    assert key_id(b"one") == key_id(b"one")
    assert key_id(b"one") != key_id(b"two")
    assert b"one".hex() not in key_id(b"one")
    assert tier_namespace("f" * 32, None) == "f" * 32
    assert tier_namespace("f" * 32, b"one") == "f" * 32 + "." + key_id(b"one")
