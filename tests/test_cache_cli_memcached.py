"""``kvtier cache`` on a real memcached filled by two tiny engines (two model fingerprints).

memcached cannot list its objects: ``stats`` shows the server's own numbers and the registered
namespaces, ``clear`` and ``gc`` invalidate namespaces by bumping counters, and an engine started
afterwards finds nothing of what was dropped (and everything that was kept).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from kvtier import LLM, SamplingParams
from kvtier.cli import app
from tests.memcached_servers import MemcachedServer, start_server
from tests.redis_servers import free_port

pytestmark = pytest.mark.memcached

PROMPT = "The cache remembers every block it has seen. " * 6


def engine(url: str, seed: int) -> LLM:
    return LLM(
        "synthetic:tiny",
        seed=seed,
        kv_cache_memory=1 << 20,
        tiers="memcached",
        memcached_url=url,
        write_policy="write-through",
        load_policy="always",
    )


def run(url: str, seed: int) -> tuple[str, int]:
    """A fresh engine generates PROMPT; returns its fingerprint and how many tokens it loaded."""
    llm = engine(url, seed)
    try:
        (out,) = llm.generate([PROMPT], SamplingParams(max_tokens=4))
        return llm.engine.fingerprint, int(out.metrics["num_loaded_tokens"])
    finally:
        llm.close()


@pytest.fixture
def filled() -> Iterator[tuple[MemcachedServer, list[str]]]:
    server = start_server(item_size=4 << 10)  # the tiny model's 8 KiB blocks take 3 items each
    try:
        fingerprints = [run(server.url, seed)[0] for seed in (0, 1)]
        assert run(server.url, 0)[1] > 0  # written through: a second engine loads them
        yield server, fingerprints
    finally:
        server.stop()


def invoke(*args: str, input: str | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["cache", *args], input=input)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_stats_shows_the_servers_own_numbers(filled: tuple[MemcachedServer, list[str]]) -> None:
    server, fingerprints = filled
    code, out, err = invoke("stats", "--json", "--tier", "memcached", "--memcached-url", server.url)
    assert code == 0, err
    (tier,) = json.loads(out)["tiers"]
    assert tier["tier"] == "memcached" and tier["where"] == server.url
    assert sorted(tier["namespaces"]) == sorted(fingerprints)
    (numbers,) = tier["servers"].values()
    raw = {k.decode(): int(v) for k, v in server.client().stats().items() if k in (b"curr_items", b"bytes")}
    assert numbers["items"] == raw["curr_items"] > 3 * 5 and numbers["bytes"] == raw["bytes"]
    assert numbers["item_size_max"] == 4 << 10 and numbers["get_hits"] > 0
    assert 0 < numbers["hit_ratio"] <= 1 and numbers["evictions"] == 0

    code, out, _ = invoke("stats", "--tier", "memcached", "--memcached-url", server.url)
    assert code == 0 and "evictions" in out and "hit ratio" in out and fingerprints[0] in out
    code, out, err = invoke("ls", "--tier", "memcached", "--memcached-url", server.url)
    assert code == 0 and "cannot list" in err


def test_gc_then_clear_invalidate_namespaces(filled: tuple[MemcachedServer, list[str]]) -> None:
    server, (keep, _) = filled
    args = ["--tier", "memcached", "--memcached-url", server.url]
    code, out, err = invoke("gc", "--fingerprint", keep, "--dry-run", *args)
    assert code == 0 and "would invalidate 1 other namespace(s)" in out, err
    assert run(server.url, 1)[1] > 0  # a dry run changes nothing

    code, out, err = invoke("gc", "--fingerprint", keep, *args)
    assert code == 0 and "invalidated 1 other namespace(s)" in out, err
    assert run(server.url, 1)[1] == 0  # dropped: recomputed (and written again)
    assert run(server.url, 0)[1] > 0  # kept

    code, out, _ = invoke("clear", *args, input="n\n")
    assert code == 1 and "Delete every object from memcached" in out  # declined
    assert run(server.url, 0)[1] > 0
    code, out, err = invoke("clear", "--yes", *args)
    assert code == 0 and "every namespace invalidated" in out, err
    assert run(server.url, 0)[1] == 0 and run(server.url, 1)[1] == 0


def test_unreachable_memcached_exits_2_naming_it() -> None:
    url = f"memcached://127.0.0.1:{free_port()}"
    for command in (["stats"], ["clear", "--yes"], ["gc", "--fingerprint", "abc"]):
        code, _, err = invoke(*command, "--tier", "memcached", "--memcached-url", url)
        assert code == 2 and url in err, (command, err)
    code, _, err = invoke("stats", "--tier", "memcached")
    assert code == 2 and "--memcached-url" in err
