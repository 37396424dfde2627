"""`kvtier serve` with the engine in its own process (the default): what that process layout adds.

A dead engine process makes the server unhealthy and fails requests cleanly (no hang); SIGTERM drains
and the engine process flushes its tiers and exits; the metrics are the engine process's counters;
an engine process whose HTTP process was killed shuts itself down. Real servers on loopback.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import typer

from tests.kvtier_servers import KvtierServer

MODEL = "synthetic:tiny"
SERVER_ARGS = ("--model", MODEL, "--kv-cache-memory", str(8 << 20), "--max-model-len", "4096")
# thousands of engine steps: still running when the test kills the engine, on any machine
LONG: dict[str, Any] = {"model": MODEL, "prompt": "a long one", "max_tokens": 4000, "ignore_eos": True}


def engine_pid(server: KvtierServer) -> int:
    m = re.search(r"engine process (\d+)\)", server.output())
    assert m, server.output()
    return int(m.group(1))


def gone(pid: int, timeout: float = 60.0) -> bool:
    """Whether ``pid`` exits (or is a zombie) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state == "Z":
            return True
        time.sleep(0.1)
    return False


def running_both(server: KvtierServer, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while server.metrics()["kvtier:num_requests_running"] < 2:
        assert time.monotonic() < deadline, "the second request never ran"
        time.sleep(0.05)


def test_a_killed_engine_process_fails_requests_and_health() -> None:
    server = KvtierServer(*SERVER_ARGS)
    try:
        pid = engine_pid(server)
        results: dict[str, httpx.Response] = {}

        def non_streamed() -> None:
            results["r"] = httpx.post(server.url + "/v1/completions", json=LONG, timeout=60)

        waiter = threading.Thread(target=non_streamed)
        with httpx.stream(
            "POST", server.url + "/v1/completions", json={**LONG, "stream": True}, timeout=60
        ) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")  # it runs
            waiter.start()
            running_both(server)  # the non-streamed one is in the engine too
            os.kill(pid, signal.SIGKILL)
            rest = [line for line in lines if line.startswith("data: ")]  # ends: the server closes it
        assert rest[-1] == "data: [DONE]" and '"error"' in rest[-2], rest[-3:]
        assert "engine process exited with code -9" in rest[-2]
        waiter.join(60)
        assert results["r"].status_code == 500, results["r"].text
        assert "engine process exited with code -9" in results["r"].json()["error"]["message"]
        health = httpx.get(server.url + "/health", timeout=10)
        assert health.status_code == 503 and "exited with code -9" in health.json()["error"]["message"]
        start = time.monotonic()
        refused = httpx.post(server.url + "/v1/completions", json={**LONG, "max_tokens": 2}, timeout=10)
        assert refused.status_code == 503 and "exited with code -9" in refused.json()["error"]["message"]
        assert time.monotonic() - start < 5  # refused at once, not after a timeout
        assert httpx.get(server.url + "/metrics", timeout=10).status_code == 200  # the last snapshot
    finally:
        assert server.stop() == 0, server.output()


def test_metrics_are_the_engine_process_counters() -> None:
    server = KvtierServer(*SERVER_ARGS)
    try:
        before = server.wait_idle()
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        for i in range(3):
            c.completions.create(
                model=MODEL, prompt=f"count me {i}", max_tokens=5, extra_body={"ignore_eos": True}
            )
        after = server.wait_idle()

        def grew(name: str) -> float:
            return after[f"kvtier:{name}"] - before[f"kvtier:{name}"]

        assert grew("requests_finished_total") == 3
        assert grew("generated_tokens_total") == 15
        assert grew("time_to_first_token_seconds_count") == 3
        assert grew("e2e_request_latency_seconds_count") == 3
        assert grew("prompt_tokens_total") == sum(len(f"count me {i}") for i in range(3))
        assert grew("engine_steps_total") >= 5
        assert after["kvtier:pool_blocks_in_use"] == 0
    finally:
        assert server.stop() == 0, server.output()


def test_sigterm_drains_then_the_engine_process_flushes_and_exits(tmp_path: Path) -> None:
    tiers = {"KVTIER_TIERS": "disk", "KVTIER_DISK_PATH": str(tmp_path / "cache")}
    server = KvtierServer(*SERVER_ARGS, "--shutdown-timeout", "60", env=tiers)
    pid = engine_pid(server)
    body = {"model": MODEL, "prompt": "persist me " * 20, "max_tokens": 200, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: {")
        server.terminate()  # in flight: it must still finish
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]" and '"completion_tokens":200' in rest[-2], rest[-3:]
    assert server.wait(90) == 0, server.output()
    assert gone(pid, 10), "the engine process outlived its server"
    assert "Traceback" not in server.output(), server.output()
    again = KvtierServer(*SERVER_ARGS, env=tiers)  # a fresh process: what the first one stored below
    try:
        c = openai.OpenAI(base_url=again.url + "/v1", api_key="none", max_retries=0, timeout=60)
        out = c.completions.create(model=MODEL, prompt=body["prompt"], max_tokens=2)
        assert out.usage is not None and out.usage.prompt_tokens_details is not None
        assert (out.usage.prompt_tokens_details.cached_tokens or 0) >= 16 * 13  # every full block
    finally:
        assert again.stop() == 0, again.output()


def test_an_engine_process_whose_server_was_killed_exits() -> None:
    server = KvtierServer(*SERVER_ARGS)
    pid = engine_pid(server)
    server.proc.kill()
    server.proc.wait(30)
    assert gone(pid), "the engine process kept running without its HTTP process"


def test_engine_process_setting_is_checked_before_the_model_loads() -> None:
    from typer.testing import CliRunner

    from kvtier.cli import _variant, app

    result = CliRunner().invoke(app, ["serve", "--model", "synthetic:tiny", "--engine-process", "maybe"])
    assert isinstance(result.exception, ValueError)
    assert "engine_process must be one of auto, on, off" in str(result.exception)
    assert "'maybe'" in str(result.exception)
    assert _variant("thread=--engine-process off") == ("thread", ["--engine-process", "off"])
    with pytest.raises(typer.BadParameter, match="NAME=FLAGS"):
        _variant("--engine-process off")


def test_join_window_is_a_share_of_the_device_wait() -> None:
    """The engine process waits for new requests only out of time step() waits for the device
    anyway: the smaller of the last two waits, times the setting, at most 50 ms; nothing on a CPU."""
    from kvtier.server.engine_proc import join_window_s

    assert join_window_s(0.5, 0.020, 0.030) == pytest.approx(0.010)
    assert join_window_s(0.5, 0.030, 0.004) == pytest.approx(0.002)  # the long step before does not count
    assert join_window_s(1.0, 0.5, 0.5) == pytest.approx(0.05)
    assert join_window_s(0.0, 0.02, 0.02) == 0.0
    assert join_window_s(0.5, 0.0, 0.0) == 0.0  # a CPU engine computes in launch: it never waits
    from kvtier.server.app import ServerSettings

    assert ServerSettings().join_window_fraction() == 0.0  # off: it made the H200's cached TTFT worse

    from typer.testing import CliRunner

    from kvtier.cli import app

    result = CliRunner().invoke(app, ["serve", "--model", "synthetic:tiny", "--join-window", "2"])
    assert isinstance(result.exception, ValueError)
    assert "join_window must be between 0 and 1" in str(result.exception) and "2" in str(result.exception)


def test_commands_that_arrive_within_the_join_window_are_taken_in_one_turn() -> None:
    """A real engine and pipe: a turn with a window takes what arrives before its end, not only what
    was queued when it began (the window itself comes from the device, so it is set here)."""
    import multiprocessing

    from kvtier.config import EngineConfig
    from kvtier.engine.engine import Engine
    from kvtier.server.engine_proc import EngineCore

    engine = Engine(
        EngineConfig.load({"model": "synthetic:tiny", "kv_cache_memory": 8 << 20, "tiers": "none"})
    )
    ours, theirs = multiprocessing.Pipe(duplex=False)
    core = EngineCore(engine, theirs, join_window=0.5)
    try:
        acks: list[Any] = []
        metrics: list[Any] = []

        def later() -> None:  # after the turn began; "shutdown" ends it before its (long) window
            core.inbox.put(("metrics", 7))
            core.inbox.put(("shutdown",))

        late = threading.Timer(0.05, later)
        late.start()
        assert core._take(acks, metrics, block=False, until=time.perf_counter() + 60) is True
        late.join()
    finally:
        engine.close()
        ours.close()
    assert [seq for seq, _ in metrics] == [7]
