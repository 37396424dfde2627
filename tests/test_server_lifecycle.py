"""`kvtier serve` under pressure: the bounded queue, SIGTERM during load, and a loopback load test."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
import torch

from tests.kvtier_servers import KvtierServer

MODEL = "synthetic:tiny"
SERVER_ARGS = ("--model", MODEL, "--kv-cache-memory", str(8 << 20), "--max-model-len", "1024")


def test_full_queue_answers_503_with_retry_after() -> None:
    # the bound from the environment: server options take KVTIER_* as the engine's settings do
    server = KvtierServer(*SERVER_ARGS, env={"KVTIER_MAX_PENDING_REQUESTS": "1"})
    try:
        # 1000 engine steps: the one HTTP round trip below comes long before the first request ends
        body = {"model": MODEL, "prompt": "first", "max_tokens": 1000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as first:
            assert first.status_code == 200
            lines = first.iter_lines()  # kept: a dropped iterator would close the response
            assert next(lines).startswith("data: {")  # it runs now
            refused = httpx.post(server.url + "/v1/completions", json={**body, "stream": False}, timeout=30)
            assert refused.status_code == 503, refused.text
            assert refused.headers["retry-after"] == "1"
            err = refused.json()["error"]
            assert err["code"] == 503 and "1 requests in flight" in err["message"]
            rest = [line for line in lines if line.startswith("data: ")]
            assert rest[-1] == "data: [DONE]"
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        again = c.completions.create(model=MODEL, prompt="second", max_tokens=3)
        assert again.choices[0].finish_reason in ("length", "stop")
    finally:
        assert server.stop() == 0, server.output()


class Outcomes:
    """What each client request of the SIGTERM test ended as."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.completed = 0
        self.refused = 0
        self.broken: list[str] = []

    def add(self, kind: str, detail: str = "") -> None:
        with self.lock:
            if kind == "completed":
                self.completed += 1
            elif kind == "refused":
                self.refused += 1
            else:
                self.broken.append(detail)


def one_request(c: openai.OpenAI, i: int, out: Outcomes) -> bool:
    """Run one request; False once the server refuses (the worker then stops)."""
    args: dict[str, Any] = dict(model=MODEL, prompt=f"request {i} " * (1 + i % 7), max_tokens=24,
                                extra_body={"ignore_eos": True})  # fmt: skip
    started = False
    try:
        if i % 2:
            chunks = list(c.completions.create(stream=True, **args))
            started = True
            done = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
            ok = len(done) == 1 and done[0].choices[0].finish_reason == "length"
        else:
            res = c.completions.create(**args)
            started = True
            ok = res.choices[0].finish_reason == "length" and res.usage is not None
            ok = ok and res.usage.completion_tokens == 24
        out.add("completed" if ok else "broken", f"request {i} ended early")
        return True
    except openai.APIStatusError as e:
        out.add("refused" if e.status_code == 503 else "broken", f"request {i}: {e.status_code} {e.message}")
    except openai.APIConnectionError as e:  # the listening socket closed: refused before any answer
        out.add("broken" if started else "refused", f"request {i} cut after its answer began: {e}")
    return False


def test_sigterm_during_load_finishes_or_refuses_every_request() -> None:
    server = KvtierServer(*SERVER_ARGS, "--shutdown-timeout", "60")
    out = Outcomes()
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)

    def worker(w: int) -> None:
        for k in range(1000):  # bounded: the server refuses long before
            if not one_request(c, w * 1000 + k, out):
                return

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(16)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while out.completed < 32 and time.monotonic() < deadline:  # load is on
        time.sleep(0.05)
    server.terminate()
    code = server.wait(90)
    for t in threads:
        t.join(30)
    assert code == 0, server.output()
    assert out.completed >= 32 and not out.broken, (out.broken, server.output())
    assert out.refused >= 1  # every worker ends on a refusal; some at least saw it
    assert "Traceback" not in server.output(), server.output()


@pytest.mark.parametrize("layout", [(), ("--engine-process", "off")], ids=["engine-process", "engine-thread"])
def test_sigterm_past_the_drain_time_ends_running_requests_cleanly(layout: tuple[str, ...]) -> None:
    """Requests still running when the drain time (--shutdown-timeout) is up end with the shutdown
    named, a stream with an error event and [DONE], a waiting request with a 503: no cut connection,
    no traceback, and the process exits 0."""
    server = KvtierServer(
        "--model", MODEL, "--kv-cache-memory", str(64 << 20), "--max-model-len", "4096",
        "--shutdown-timeout", "1", *layout,
    )  # fmt: skip
    try:
        url = server.url + "/v1/completions"
        body = {"model": MODEL, "prompt": "long", "max_tokens": 4000, "ignore_eos": True}  # ~5 s of steps
        plain: list[httpx.Response] = []
        waiting = threading.Thread(target=lambda: plain.append(httpx.post(url, json=body, timeout=60)))
        two = {**body, "prompt": ["long", "longer"], "stream": True}  # a stream of two prompts
        with httpx.stream("POST", url, json=two, timeout=60) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: {")  # it runs
            waiting.start()
            deadline = time.monotonic() + 30
            while server.metrics()["kvtier:num_requests_running"] < 3 and time.monotonic() < deadline:
                time.sleep(0.02)
            server.terminate()
            events = [line[6:] for line in lines if line.startswith("data: ")]
        waiting.join(30)
        assert events[-1] == "[DONE]"
        err = json.loads(events[-2])["error"]
        assert err["code"] == 503 and "shutting down" in err["message"], err
        assert len(events) > 3  # tokens came before the end
        assert plain and plain[0].status_code == 503, plain
        assert "shutting down" in plain[0].json()["error"]["message"]
        assert plain[0].headers["retry-after"]
        assert server.wait(60) == 0, server.output()
        assert "Traceback" not in server.output() and "ASGI" not in server.output(), server.output()
    finally:
        if server.proc.poll() is None:  # an assertion failed before the signal
            server.stop()


@pytest.mark.slow
def test_load_500_requests_100_concurrent() -> None:
    """Every request completes with exactly its tokens and no block leaks; the run's figures are
    printed (``pytest -s``: docs/benchmarks.md, "Serving", quotes them)."""
    server = KvtierServer(*SERVER_ARGS, "--max-num-seqs", "128")
    try:
        began = time.perf_counter()
        results = asyncio.run(_load(server.url, requests=500, concurrency=100))
        wall = time.perf_counter() - began
        assert len(results) == 500
        bad = [r for r in results if r.generated != r.asked]
        assert not bad, bad[:5]  # every request generated exactly what it asked for
        m = server.wait_idle()
        assert m["kvtier:pool_blocks_in_use"] == 0  # no leaked blocks
        assert m["kvtier:pool_blocks_available"] == m["kvtier:pool_blocks"]
        assert m["kvtier:requests_finished_total"] == 500
    finally:
        assert server.stop() == 0, server.output()
    print(_load_summary(results, wall))
    offline = _offline_rate()
    print(f"  the same requests offline (LLM.generate, the server's settings): {offline:.0f} tok/s")


@dataclass
class LoadResult:
    index: int
    streaming: bool
    asked: int  # tokens
    generated: int
    latency_s: float  # sent -> the whole answer
    ttft_s: float | None  # sent -> the first chunk (streaming only)


def _workload(requests: int) -> list[tuple[str, int]]:
    """(prompt, max_tokens) of each request: prompts of 5-600 tokens, 1-48 tokens each."""
    rng = random.Random(0)
    return [("load " * rng.randint(1, 120), rng.randint(1, 48)) for _ in range(requests)]


def _offline_rate(requests: int = 500) -> float:
    """Output tok/s of the same requests through ``LLM.generate`` in this process, on one torch
    thread as the server's engine on this 2-core machine (the peer of the load test's figure)."""
    from kvtier import LLM, SamplingParams

    work = _workload(requests)
    params = [
        SamplingParams(max_tokens=n, temperature=0.7, seed=i, ignore_eos=True)
        for i, (_, n) in enumerate(work)
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    llm = LLM(MODEL, kv_cache_memory=8 << 20, max_model_len=1024, max_num_seqs=128)
    try:
        began = time.perf_counter()
        outs = llm.generate([p for p, _ in work], params)
        took = time.perf_counter() - began
    finally:
        llm.close()
        torch.set_num_threads(threads)
    return sum(len(o.outputs[0].token_ids) for o in outs) / took


async def _load(url: str, requests: int, concurrency: int) -> list[LoadResult]:
    """Mixed prompt and output lengths, half streaming; each request's tokens and times."""
    work = _workload(requests)
    c = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> LoadResult:
        prompt, max_tokens = work[i]
        args: dict[str, Any] = dict(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0.7,
                                    seed=i, extra_body={"ignore_eos": True})  # fmt: skip
        async with gate:
            sent = time.perf_counter()
            if i % 2:
                stream = await c.completions.create(
                    stream=True, stream_options={"include_usage": True}, **args
                )
                first, usage = None, []
                async for ch in stream:
                    first = first or time.perf_counter()
                    if ch.usage:
                        usage.append(ch.usage)
                made = usage[-1].completion_tokens if usage else -1
                ttft = (first or sent) - sent
                return LoadResult(i, True, max_tokens, made, time.perf_counter() - sent, ttft)
            res = await c.completions.create(**args)
            made = res.usage.completion_tokens if res.usage else -1
            return LoadResult(i, False, max_tokens, made, time.perf_counter() - sent, None)

    try:
        return list(await asyncio.gather(*(one(i) for i in range(requests))))
    finally:
        await c.close()


def _load_summary(results: list[LoadResult], wall: float) -> str:
    def pct(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    tokens = sum(r.generated for r in results)
    lines = [
        f"load test: {len(results)} requests in {wall:.1f} s, {tokens} tokens, {tokens / wall:.0f} tok/s"
    ]
    for kind, streaming in (("streaming", True), ("non-streaming", False)):
        lat = [r.latency_s for r in results if r.streaming == streaming]
        lines.append(
            f"  {kind}: {len(lat)} requests, latency p50 {pct(lat, 0.5):.2f} s, p99 {pct(lat, 0.99):.2f} s"
        )
    ttft = [r.ttft_s for r in results if r.ttft_s is not None]
    lines.append(f"  streaming TTFT p50 {pct(ttft, 0.5):.2f} s, p99 {pct(ttft, 0.99):.2f} s")
    return "\n".join(lines)


def test_the_drain_deadline_ends_open_streams_and_any_added_after_it() -> None:
    """``OpenStreams.end_all`` ends what is unfinished (a finished stream keeps its answer), and a
    request accepted before the signal whose add is answered only after the deadline is ended too."""
    from kvtier.server.loop import OpenStreams, RequestStream, ShuttingDown

    async def run() -> None:
        streams = OpenStreams()
        running = RequestStream("a", ["a"], unfinished={"a"})
        done = RequestStream("b", ["b"])  # finished: nothing unfinished
        streams.add(running)
        streams.add(done)
        assert streams.end_all("the server is shutting down") == 1
        assert isinstance(running.error, ShuttingDown) and running.queue.get_nowait() is None
        assert done.error is None and done.queue.empty()
        late = RequestStream("c", ["c"], unfinished={"c"})
        streams.add(late)
        assert isinstance(late.error, ShuttingDown) and late.queue.get_nowait() is None

    asyncio.run(run())
