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
        http, _ = asyncio.run(bs.run_http(W, server.url, "synthetic:tiny"))  # the lean client
        via_httpx, _ = asyncio.run(bs.run_http(W, server.url, "synthetic:tiny", client="httpx"))
        wrong, _ = asyncio.run(bs.run_http(W, server.url, "no-such-model"))
    finally:
        assert server.stop() == 0, server.output()
    # both clients read the same answers (the server's replies are greedy: the same every time)
    assert [
        (s.prompt_tokens, s.output_tokens, len(s.itl))
        for s in sorted(via_httpx, key=lambda s: (s.chat, s.turn))
    ] == [
        (s.prompt_tokens, s.output_tokens, len(s.itl)) for s in sorted(http, key=lambda s: (s.chat, s.turn))
    ]
    # an error answer (here 404, a plain JSON body) is a failed sample with its status, not a hang
    assert wrong and all(s.error and s.error.startswith("404") and "no-such-model" in s.error for s in wrong)
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


def test_lean_client_reads_chunked_and_sized_bodies_and_reuses_connections() -> None:
    """The load generator's own HTTP client against a real loopback server that answers in both
    framings (chunked SSE lines split across chunks, and Content-Length), keep-alive or close."""
    from kvtier.bench.sse_client import HTTPError, SSEClient

    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            length = int(
                next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1]
            )
            body = await reader.readexactly(length)
            if b'"chunked"' in body:
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                for part in (b'data: {"a"', b":1}\n\ndata: [DONE]\n", b"\n"):  # a line split in two
                    writer.write(b"%x\r\n%s\r\n" % (len(part), part))
                writer.write(b"0\r\n\r\n")
            elif b'"close"' in body:
                writer.write(b"HTTP/1.1 500 Oops\r\nConnection: close\r\nContent-Length: 4\r\n\r\nbad!")
                await writer.drain()
                break
            else:
                writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}")
            await writer.drain()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = SSEClient(f"http://127.0.0.1:{port}")
        try:
            for _ in range(3):
                async with client.stream("POST", "/x", {"kind": "chunked"}) as r:
                    assert r.status == 200
                    assert [line async for line in r.lines()] == ['data: {"a":1}', "", "data: [DONE]", ""]
                async with client.stream("POST", "/x", {"kind": "sized"}) as r:
                    assert (r.status, await r.read()) == (404, b"{}")
            assert connections == 1  # every answer was read to its end: one kept-alive connection
            async with client.stream("POST", "/x", {"kind": "close"}) as r:
                assert (r.status, await r.read()) == (500, b"bad!")
            async with client.stream("POST", "/x", {"kind": "sized"}) as r:  # a new connection
                assert r.status == 404
                await r.read()
            assert connections == 2
        finally:
            await client.aclose()
            server.close()
            await server.wait_closed()
        with pytest.raises(ValueError, match="plain http"):
            SSEClient("https://example.com")
        assert issubclass(HTTPError, Exception)

    asyncio.run(main())
