"""`kvtier bench serve`: the workload, its two drivers (HTTP and in-process) and the report."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvtier.bench import serve as bs
from kvtier.cli import app
from kvtier.config import EngineConfig
from kvtier.engine.engine import Engine
from tests.kvtier_servers import KvtierServer

W = bs.Workload(conversations=3, turns=2, system_prompts=2, system_words=20, user_words=3, max_tokens=4,
                concurrency=2)  # fmt: skip
SETTINGS = {"model": "synthetic:tiny", "kv_cache_memory": 8 << 20, "tiers": "none"}


def by_turn(samples: list[bs.Sample]) -> dict[tuple[int, int], bs.Sample]:
    return {(s.chat, s.turn): s for s in samples}


def test_http_and_offline_run_the_same_conversations() -> None:
    engine = Engine(EngineConfig.load(SETTINGS))
    offline, seconds = bs.run_offline(W, engine)
    assert seconds > 0 and len(offline) == 6 and not any(s.error for s in offline)
    off = by_turn(offline)
    assert all(s.output_tokens == 4 and s.ttft <= s.e2e for s in offline)
    # a second turn resends the first one's history, and chat 2 shares chat 0's system prompt
    assert all(off[(c, 1)].cached_tokens > 0 for c in range(3))
    assert off[(2, 0)].cached_tokens > 0 or off[(0, 0)].cached_tokens > 0
    assert off[(0, 1)].prompt_tokens > off[(0, 0)].prompt_tokens

    server = KvtierServer("--model", "synthetic:tiny", "--kv-cache-memory", str(8 << 20))
    try:
        http, _ = asyncio.run(bs.run_http(W, server.url, "synthetic:tiny"))
    finally:
        assert server.stop() == 0, server.output()
    got = by_turn(http)
    assert set(got) == set(off) and not any(s.error for s in http)
    for key, s in got.items():  # same greedy replies, so the same growing prompts
        assert (s.prompt_tokens, s.output_tokens) == (off[key].prompt_tokens, off[key].output_tokens)
        assert len(s.itl) <= s.output_tokens - 1
    summary = bs.summarize(http, 1.0)
    assert summary["requests"] == 6 and summary["output_tokens"] == 24
    assert 0 < summary["cached_token_share"] < 1


def test_percentile_and_report() -> None:
    assert bs.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert bs.percentile([5.0], 99) == 5.0
    s = bs.Sample(0, 0, 0.0, 0.1, 0.5, 10, 5, 8, [0.1] * 4)
    body = bs.report({"server": [([s], 1.0), ([s], 2.0)], "offline": [([s], 1.0), ([s], 1.0)]}, W)
    assert body["runs"]["server"]["summary"]["output_token_throughput"] == pytest.approx(
        3.75
    )  # median of 5, 2.5
    assert body["ratios"]["throughput_server_over_offline"] == pytest.approx(0.75)  # median of 1.0, 0.5
    assert s.tpot == pytest.approx(0.1)


def test_cli_offline_and_launched_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVTIER_TIERS", "none")
    out, svg = tmp_path / "bench.json", tmp_path / "bench.svg"
    args = ["bench", "serve", "--offline", "--launch", "--model", "synthetic:tiny", "--kv-cache-memory",
            str(8 << 20), "--conversations", "2", "--turns", "2", "--system-words", "10", "--max-tokens", "3",
            "--json", str(out), "--plot", str(svg)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    body = json.loads(out.read_text())
    assert set(body["runs"]) == {"offline", "server"}
    for run in body["runs"].values():
        assert run["summary"]["requests"] == 4 and run["summary"]["failed"] == 0
    assert body["ratios"]["throughput_server_over_offline"] > 0
    assert "ttft_cached_p50_server_over_offline" in body["ratios"]
    assert svg.read_text().startswith("<svg") and "polyline" in svg.read_text()
    assert "throughput server over offline" in result.output
