"""A request the engine fails (a fault injected into one request's step) gets a 500 in OpenAI's body,
or an error event when its stream has begun; the server and every other request keep going."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn

from kvtier.config import EngineConfig
from kvtier.engine.engine import Engine
from kvtier.server.app import ServerSettings, create_app
from tests.redis_servers import free_port

MARK = "FAIL-ME"


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    engine = Engine(
        EngineConfig.load({"model": "synthetic:tiny", "kv_cache_memory": 8 << 20, "tiers": "none"})
    )
    marker = engine.tokenize(MARK)
    advance = engine._advance

    def failing(chunk: Any, result: Any, now: float) -> Any:
        if chunk.request.prompt_token_ids[: len(marker)] == marker:
            raise RuntimeError("injected fault")
        return advance(chunk, result, now)

    engine._advance = failing  # type: ignore[method-assign]
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(engine, ServerSettings(port=port)), port=port, log_level="error")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(60)
    assert not thread.is_alive()


def test_failed_request_is_a_500_and_others_run(url: str) -> None:
    body = {"model": "synthetic:tiny", "max_tokens": 4}
    bad = httpx.post(url + "/v1/completions", json={**body, "prompt": MARK + " now"}, timeout=30)
    assert bad.status_code == 500, bad.text
    err = bad.json()["error"]
    assert err["code"] == 500 and "injected fault" in err["message"]
    with httpx.stream("POST", url + "/v1/completions", json={**body, "prompt": MARK, "stream": True}) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert "injected fault" in lines[-2] and '"error"' in lines[-2] and lines[-1] == "data: [DONE]"
    good = httpx.post(url + "/v1/completions", json={**body, "prompt": "fine"}, timeout=30)
    assert good.status_code == 200 and good.json()["choices"][0]["finish_reason"] == "length"
    health = httpx.get(url + "/health", timeout=30).json()
    assert health == {"status": "ok", "pending_requests": 0}
