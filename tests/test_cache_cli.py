"""``kvtier cache`` against real tiers: a disk folder and a real redis-server, filled by a tiny engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis
from typer.testing import CliRunner

from kvtier import LLM, SamplingParams
from kvtier.cli import app

if TYPE_CHECKING:  # imported at run time by pytest_plugins (so that pytest can rewrite it first)
    from tests.redis_servers import RedisServer

pytestmark = pytest.mark.redis

# Distinct prompts, so that every written block has its own key: objects per namespace = blocks written.
PROMPTS = ["The cache remembers every block it has seen. " * 6, "Keys chain from the model fingerprint. " * 6]


@dataclass
class Filled:
    disk: Path
    url: str
    fingerprints: list[str]  # synthetic:tiny with seeds 0 and 1: two namespaces in each tier
    written: dict[str, int]  # namespace -> blocks the engine wrote (to every tier)

    def args(self, *more: str) -> list[str]:
        return ["--disk-path", str(self.disk), "--redis-url", self.url, *more]

    def disk_files(self, namespace: str) -> list[Path]:
        return sorted((self.disk / namespace).glob("*/*.kvt"))

    def redis_names(self, namespace: str) -> list[bytes]:
        client = redis.Redis.from_url(self.url)
        try:
            return sorted(client.scan_iter(match=f"kvtier:{namespace}:*"))
        finally:
            client.close()


def fill(disk: Path, url: str, seed: int) -> tuple[str, int]:
    llm = LLM(
        "synthetic:tiny",
        seed=seed,
        kv_cache_memory=1 << 20,
        tiers="disk,redis",
        disk_path=str(disk),
        redis_url=url,
        write_policy="write-through",
    )
    hierarchy = llm.engine.hierarchy
    assert hierarchy is not None
    try:
        llm.generate(PROMPTS, SamplingParams(max_tokens=4))
    finally:
        llm.close()  # flushes the writes
    return llm.engine.fingerprint, hierarchy.stats.blocks_written


@pytest.fixture
def filled(tmp_path: Path, redis_server: RedisServer) -> Filled:
    disk = tmp_path / "disk"
    written = dict(fill(disk, redis_server.url, seed) for seed in (0, 1))
    fingerprints = list(written)
    assert len(fingerprints) == 2 and all(n > 10 for n in written.values())
    return Filled(disk, redis_server.url, fingerprints, written)


def invoke(args: list[str], input: str | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["cache", *args], input=input)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def stats_json(filled: Filled, *more: str) -> dict[str, dict]:
    code, out, err = invoke(["stats", "--json", *filled.args(*more)])
    assert code == 0, err
    return {t["tier"]: t for t in json.loads(out)["tiers"]}


# ------------------------------------------------------------------------------------------ stats, ls


def test_stats_counts_every_namespace(filled: Filled) -> None:
    tiers = stats_json(filled)
    assert list(tiers) == ["disk", "redis"]
    for name, tier in tiers.items():
        per_ns = {n["namespace"]: n for n in tier["namespaces"]}
        assert set(per_ns) == set(filled.fingerprints)
        for fp in filled.fingerprints:
            assert per_ns[fp]["entries"] == filled.written[fp], name
        assert tier["entries"] == sum(filled.written.values())
        assert tier["bytes"] == sum(n["bytes"] for n in per_ns.values())
        assert tier["sampled"] == tier["entries"]  # under the default sample of 200
        assert tier["unreadable"] == 0
    disk = tiers["disk"]
    for fp in filled.fingerprints:
        files = filled.disk_files(fp)
        assert len(files) == filled.written[fp]
        assert {n["namespace"]: n["bytes"] for n in disk["namespaces"]}[fp] == sum(
            f.stat().st_size for f in files
        )
    assert disk["codecs"] == {"none": disk["entries"]}
    assert disk["compression_ratio"] == 1.0
    redis_tier = tiers["redis"]
    assert redis_tier["codecs"] == {"lz4": redis_tier["entries"]}  # the default redis_codec none+lz4
    assert redis_tier["compression_ratio"] > 0
    assert redis_tier["bytes"] < disk["bytes"]  # compressed, and Redis stores the bytes as they are
    assert sum(len(filled.redis_names(fp)) for fp in filled.fingerprints) == redis_tier["entries"]


def test_stats_sample_limits_the_headers_read(filled: Filled) -> None:
    tiers = stats_json(filled, "--sample", "5", "--tier", "disk")
    assert list(tiers) == ["disk"]
    assert tiers["disk"]["sampled"] == 5
    assert tiers["disk"]["entries"] == sum(filled.written.values())


def test_stats_table(filled: Filled) -> None:
    code, out, _ = invoke(["stats", *filled.args()])
    assert code == 0
    assert str(filled.disk) in out and filled.url in out
    for fp in filled.fingerprints:
        assert out.count(fp) == 2  # one row per tier
    assert "host tier: lives only inside a running engine" in out
    total_rows = [line for line in out.splitlines() if f" {sum(filled.written.values())} │" in line]
    assert [r.split("│")[1].strip() for r in total_rows] == ["disk", "redis"]


def test_ls_one_line_per_object(filled: Filled) -> None:
    code, out, _ = invoke(["ls", "--tier", "disk", "--limit", "0", *filled.args()])
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["tier", "namespace", "key", "bytes", "codec", "tokens"]
    rows = [line.split() for line in lines[1:]]
    assert len(rows) == sum(filled.written.values())
    sizes = {p.name[:16]: p.stat().st_size for fp in filled.fingerprints for p in filled.disk_files(fp)}
    for tier, ns, key, size, codec, tokens in rows:
        assert tier == "disk" and ns in filled.fingerprints
        assert int(size) == sizes[key]
        assert (codec, tokens) == ("none", "16")  # block_size 16

    code, out, err = invoke(["ls", "--tier", "redis", "--limit", "3", *filled.args()])
    assert code == 0
    rows = [line.split() for line in out.splitlines()[1:]]
    assert len(rows) == 3 and all(r[0] == "redis" and r[4] == "lz4" for r in rows)
    assert f"{sum(filled.written.values()) - 3} more objects" in err

    fp = filled.fingerprints[1]
    code, out, _ = invoke(["ls", "--namespace", fp, "--limit", "0", *filled.args()])
    rows = [line.split() for line in out.splitlines()[1:]]
    assert len(rows) == 2 * filled.written[fp] and {r[1] for r in rows} == {fp}


def test_ls_and_stats_flag_an_unreadable_object(filled: Filled) -> None:
    fp = filled.fingerprints[0]
    victim = filled.disk_files(fp)[0]
    victim.write_bytes(b"not a kvtier object")
    code, out, _ = invoke(["ls", "--tier", "disk", "--limit", "0", "--namespace", fp, *filled.args()])
    assert code == 0
    assert [line.split()[4] for line in out.splitlines()[1:]].count("corrupt") == 1
    assert stats_json(filled, "--tier", "disk")["disk"]["unreadable"] == 1


def test_settings_from_a_yaml_file(filled: Filled, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVTIER_TIERS")  # the environment would win over the file
    config = tmp_path / "kvtier.yaml"
    config.write_text(f"tiers:\n  tiers: disk,redis\n  disk_path: {filled.disk}\n  redis_url: {filled.url}\n")
    code, out, err = invoke(["stats", "--json", "--config", str(config)])
    assert code == 0, err
    tiers = {t["tier"]: t for t in json.loads(out)["tiers"]}
    assert tiers["disk"]["entries"] == tiers["redis"]["entries"] == sum(filled.written.values())


# ------------------------------------------------------------------------------------------ gc, clear


def test_gc_keeps_the_model_and_drops_the_others(filled: Filled) -> None:
    keep, other = filled.fingerprints  # seeds 0 and 1
    code, out, err = invoke(["gc", "--model", "synthetic:tiny", "--dry-run", *filled.args()])
    assert code == 0, err
    assert f"keeping model fingerprint {keep}" in out
    assert len(filled.disk_files(other)) == filled.written[other]  # a dry run changes nothing

    code, out, err = invoke(["gc", "--model", "synthetic:tiny", *filled.args()])
    assert code == 0, err
    assert f"disk {filled.disk}: kept {filled.written[keep]} objects, dropped {filled.written[other]}" in out
    assert f"redis {filled.url}: kept {filled.written[keep]} objects, dropped {filled.written[other]}" in out
    assert filled.disk_files(other) == [] and filled.redis_names(other) == []
    assert not (filled.disk / other).exists()
    assert len(filled.disk_files(keep)) == len(filled.redis_names(keep)) == filled.written[keep]

    # The same model again keeps everything.
    code, out, _ = invoke(["gc", "--model", "synthetic:tiny", *filled.args()])
    assert code == 0 and out.count("dropped 0") == 2
    assert len(filled.disk_files(keep)) == len(filled.redis_names(keep)) == filled.written[keep]

    # Another model's fingerprint (seed 1, as --model or given directly) drops them.
    code, out, _ = invoke(
        ["gc", "--model", "synthetic:tiny", "--seed", "1", "--tier", "disk", *filled.args()]
    )
    assert code == 0 and f"keeping model fingerprint {other}" in out
    assert filled.disk_files(keep) == [] and len(filled.redis_names(keep)) == filled.written[keep]
    code, out, _ = invoke(["gc", "--fingerprint", other, "--tier", "redis", *filled.args()])
    assert code == 0 and f"dropped {filled.written[keep]}" in out
    assert filled.redis_names(keep) == []


def test_gc_needs_a_model_or_a_fingerprint(filled: Filled) -> None:
    code, _, err = invoke(["gc", *filled.args()])
    assert code == 2 and "exactly one of --model and --fingerprint" in err
    code, _, err = invoke(["gc", "--model", str(filled.disk / "no-such-model"), *filled.args()])
    assert code == 2 and "no-such-model" in err


def test_clear(filled: Filled) -> None:
    total = sum(filled.written.values())
    code, out, _ = invoke(["clear", *filled.args()], input="n\n")
    assert code == 1 and f"Delete {total} objects from disk" in out  # declined: nothing deleted
    assert stats_json(filled)["disk"]["entries"] == total

    code, out, err = invoke(["clear", "--tier", "disk", "--yes", *filled.args()])
    assert code == 0, err
    assert f"removed {total} objects" in out
    tiers = stats_json(filled)
    assert tiers["disk"]["entries"] == 0 and tiers["redis"]["entries"] == total
    assert list(filled.disk.iterdir()) == []  # namespace folders gone too

    code, out, _ = invoke(["clear", *filled.args()], input="y\n")
    assert code == 0 and f"redis {filled.url}: removed {total} objects" in out
    tiers = stats_json(filled)
    assert tiers["disk"]["entries"] == tiers["redis"]["entries"] == 0


def test_clear_leaves_other_keys_and_files_alone(filled: Filled) -> None:
    client = redis.Redis.from_url(filled.url)
    try:
        client.set("unrelated", b"x")
        client.set("kvtier:meta", b"y")
        stray = filled.disk / "notes.txt"
        stray.write_text("mine")
        code, _, _ = invoke(["clear", "--yes", *filled.args()])
        assert code == 0
        assert client.get("unrelated") == b"x" and client.get("kvtier:meta") == b"y"
        assert stray.read_text() == "mine"
    finally:
        client.close()


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "command", [["stats"], ["ls"], ["clear", "--yes"], ["gc", "--fingerprint", "0" * 32]]
)
def test_unreachable_redis_exits_2_naming_the_url(filled: Filled, command: list[str]) -> None:
    from tests.redis_servers import free_port

    url = f"redis://127.0.0.1:{free_port()}"
    code, out, err = invoke([*command, "--disk-path", str(filled.disk), "--redis-url", url])
    assert code == 2
    assert f"cannot reach Redis at {url}" in err
    assert "Traceback" not in out + err
    # Redis is checked before anything is touched: the disk tier still holds everything.
    assert stats_json(filled, "--tier", "disk")["disk"]["entries"] == sum(filled.written.values())


def test_password_is_not_printed(tmp_path: Path) -> None:
    from tests.redis_servers import free_port

    url = f"redis://:hunter2@127.0.0.1:{free_port()}"
    code, _, err = invoke(["stats", "--tier", "redis", "--redis-url", url])
    assert code == 2 and "hunter2" not in err and "cannot reach Redis at redis://:***@127.0.0.1" in err


def test_configuration_errors_exit_2(tmp_path: Path) -> None:
    env_tiers = os.environ.get("KVTIER_TIERS")
    assert env_tiers == "none"  # set by conftest: nothing is configured
    code, _, err = invoke(["stats"])
    assert code == 2 and "no tiers configured" in err
    code, _, err = invoke(["stats", "--tier", "redis"])
    assert code == 2 and "needs a URL" in err
    code, _, err = invoke(["ls", "--redis-url", "memcached://127.0.0.1:1"])
    assert code == 2 and "unsupported Redis URL scheme" in err
    (tmp_path / "file").write_text("")
    code, _, err = invoke(["stats", "--disk-path", str(tmp_path / "file")])
    assert code == 2 and "is not a folder" in err
    code, _, err = invoke(["clear", "--tier", "host", "--yes"])
    assert code == 2 and "lives only inside a running engine" in err


def test_console_script_unreachable_redis_no_traceback(tmp_path: Path) -> None:
    from tests.redis_servers import free_port

    url = f"redis://127.0.0.1:{free_port()}"
    proc = subprocess.run(
        [sys.executable, "-m", "kvtier.cli", "cache", "stats", "--tier", "redis", "--redis-url", url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert f"cannot reach Redis at {url}" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
