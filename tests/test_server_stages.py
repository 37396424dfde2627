"""``kvtier serve --trace-stages`` + ``kvtier bench serve --stages``: every request's stamps, in order,
from the load generator through both processes and back, for both server layouts."""

from __future__ import annotations

import asyncio
import gc

import pytest

from kvtier.bench import serve as bs
from kvtier.bench import serve_stages
from kvtier.server.engine_proc import freeze_startup_heap
from kvtier.server.stages import STAGE_NAMES
from tests.kvtier_servers import KvtierServer

W = bs.Workload(conversations=3, turns=2, system_prompts=1, system_words=20, user_words=3, max_tokens=4,
                concurrency=1)  # fmt: skip  # serial: later chats find the system prompt cached
HTTP_ONLY = ("client_sent", "client_written", "arrive", "parsed", "prepared", "sent", "got", "written",
             "client_first")  # fmt: skip


@pytest.mark.parametrize("layout", ["process", "thread"])
def test_every_request_has_its_stamps_in_order(layout: str) -> None:
    flags = ("--engine-process", "on" if layout == "process" else "off")
    server = KvtierServer(
        "--model", "synthetic:tiny", "--kv-cache-memory", str(8 << 20), "--trace-stages", *flags
    )
    try:
        samples, _ = asyncio.run(bs.run_http(W, server.url, "synthetic:tiny"))
        bs.join_stages(samples, server.url)
        body = bs.get_json(server.url + "/debug/stages")
    finally:
        assert server.stop() == 0, server.output()
    assert len(samples) == 6 and not any(s.error for s in samples)
    assert set(body["gc_pauses"]) == {"http", "engine"}
    expected = STAGE_NAMES if layout == "process" else HTTP_ONLY
    for s in samples:
        assert s.stages is not None, s.request_id
        present = [name for name in STAGE_NAMES if name in s.stages]
        assert present == list(expected), s.stages
        times = [s.stages[name] for name in present]
        assert times == sorted(times), s.stages  # one clock for the client and both processes
        assert s.stages["gc_http_ms"] >= 0
        if layout == "process":
            assert s.stages["steps"] >= 1  # the step() call that returned the first token, at least
    body = bs.report({"server": [(samples, 1.0)]}, W)
    groups = body["runs"]["server"]["stages"]
    assert set(groups) == {"first turns", "later turns"}
    assert groups["later turns"]["requests"] == 3 and groups["first turns"]["requests"] == 2
    assert "arrive" in groups["later turns"]["stages"] and "got" in groups["later turns"]["stages"]
    assert serve_stages.table(body) is not None


def test_startup_heap_is_frozen_out_of_full_collections() -> None:
    """What the server does once started: the full collection skips what start-up left."""
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()
