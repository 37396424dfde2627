"""``kvtier bench serve``: multi-turn chat load on any OpenAI-compatible server, or on the engine itself.

The workload: ``conversations`` chats, each opened with one of ``system_prompts`` shared system prompts
(so different chats share a cached prefix) and run for ``turns`` turns, every turn sending the whole
history so far (so each turn's prompt extends the last one's: the cache's best case, and a real one).
Turns of one chat run one after another; chats run ``concurrency`` at a time, or start at
``request_rate`` per second (Poisson arrivals).

The same workload runs through HTTP (``run_http``: streaming chat completions, timed on the client:
TTFT at the first chunk, inter-token latency between chunks) or in-process on the Engine API
(``run_offline``: the ceiling the server is measured against, timed the same way at each step's
outputs). ``compare`` runs both on one machine in one go and reports the server's fraction.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from kvtier.bench.sse_client import open_streamer

WORDS = [
    "cache",
    "block",
    "tier",
    "prefix",
    "token",
    "model",
    "engine",
    "server",
    "request",
    "stream",
    "batch",
    "layer",
    "memory",
    "disk",
    "host",
    "redis",
    "key",
    "value",
    "attention",
    "decode",
    "prefill",
    "chunk",
    "policy",
    "evict",
    "load",
    "store",
    "hit",
    "miss",
]


@dataclass
class Workload:
    conversations: int = 32
    turns: int = 4
    system_prompts: int = 2  # distinct shared system prompts
    system_words: int = 300  # about 6 tokens a word on a byte tokenizer, ~1.3 on a BPE one
    user_words: int = 12
    max_tokens: int = 32
    concurrency: int = 16  # chats in flight (ignored when request_rate is set)
    request_rate: float | None = None  # chats started per second, Poisson
    ignore_eos: bool = True  # fixed output lengths: runs compare like for like
    seed: int = 0
    # in every system prompt: a server that outlives one bench run must not answer the next run's
    # identical greedy requests from its result cache (no model work: a throughput of thousands)
    run_id: str = field(default_factory=lambda: random.SystemRandom().randbytes(4).hex())

    def system_prompt(self, i: int) -> str:
        rng = random.Random(f"system-{self.seed}-{i}")
        words = " ".join(rng.choice(WORDS) for _ in range(self.system_words))
        return f"System prompt {i} of run {self.run_id}. {words}"

    def user_message(self, chat: int, turn: int) -> str:
        rng = random.Random(f"user-{self.seed}-{chat}-{turn}")
        return f"Question {turn} of chat {chat}: " + " ".join(
            rng.choice(WORDS) for _ in range(self.user_words)
        )


@dataclass
class Sample:
    """One request, as its client saw it."""

    chat: int
    turn: int
    start: float
    ttft: float
    e2e: float
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int
    itl: list[float] = field(default_factory=list)  # gaps between streamed chunks
    error: str | None = None
    request_id: str = ""  # the server's completion id (its chunks' "id")
    written_at: float | None = None  # when the client wrote the request (lean client only)
    stages: dict[str, float] | None = None  # --stages: the server's stamps, the client's at both ends

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


# -- drivers ---------------------------------------------------------------------------------------

TurnFn = Callable[[int, int, list[dict[str, str]]], "asyncio.Future[tuple[Sample, str]]"]


async def _drive(w: Workload, turn_fn: Callable[..., Any]) -> tuple[list[Sample], float]:
    """Run every chat's turns in order; chats by concurrency or Poisson arrivals. (samples, seconds)."""
    samples: list[Sample] = []

    async def chat(c: int) -> None:
        history = [{"role": "system", "content": w.system_prompt(c % w.system_prompts)}]
        for t in range(w.turns):
            history.append({"role": "user", "content": w.user_message(c, t)})
            sample, reply = await turn_fn(c, t, list(history))
            samples.append(sample)
            if sample.error:
                return
            history.append({"role": "assistant", "content": reply})

    start = time.perf_counter()
    if w.request_rate:
        rng = random.Random(w.seed)
        tasks = []
        for c in range(w.conversations):
            tasks.append(asyncio.create_task(chat(c)))
            await asyncio.sleep(rng.expovariate(w.request_rate))
        await asyncio.gather(*tasks)
    else:
        gate = asyncio.Semaphore(w.concurrency)

        async def gated(c: int) -> None:
            async with gate:
                await chat(c)

        await asyncio.gather(*(gated(c) for c in range(w.conversations)))
    return samples, time.perf_counter() - start


async def run_http(
    w: Workload,
    url: str,
    model: str,
    api_key: str | None = None,
    timeout: float = 600.0,
    client: str = "lean",
) -> tuple[list[Sample], float]:
    """The workload against ``url`` (the server's root, e.g. http://127.0.0.1:8000). ``client``:
    "lean" (bench/sse_client.py: costs the machine little, so the figures are the server's) or
    "httpx" (any URL: https, proxies)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with open_streamer(client, url, headers, timeout) as open_stream:

        async def turn(c: int, t: int, messages: list[dict[str, str]]) -> tuple[Sample, str]:
            body: dict[str, Any] = {
                "model": model,
                "messages": messages,
                "max_tokens": w.max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            if w.ignore_eos:
                body["ignore_eos"] = True
            return await _stream_turn(open_stream, body, c, t)

        return await _drive(w, turn)


async def _stream_turn(open_stream: Any, body: dict[str, Any], c: int, t: int) -> tuple[Sample, str]:
    start = time.perf_counter()
    first: float | None = None
    last = start
    itl: list[float] = []
    text: list[str] = []
    usage: dict[str, Any] = {}
    request_id = ""
    async with open_stream(body) as (status, lines, read, written_at):
        if status != 200:
            answer = await read()
            return Sample(c, t, start, 0, 0, 0, 0, 0, error=f"{status} {answer[:200]!r}"), ""
        async for line in lines:
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter()
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if not chunk.get("choices"):
                continue
            if first is None:
                first = now
                request_id = str(chunk.get("id", ""))
            else:
                itl.append(now - last)
            last = now
            text.append(chunk["choices"][0].get("delta", {}).get("content") or "")
    end = time.perf_counter()
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    sample = Sample(
        c,
        t,
        start,
        (first or end) - start,
        end - start,
        int(usage.get("prompt_tokens", 0)),
        int(usage.get("completion_tokens", 0)),
        int(cached),
        itl,
        request_id=request_id,
        written_at=written_at,
    )
    return sample, "".join(text)


def run_offline(w: Workload, engine: Any, stages: bool = False) -> tuple[list[Sample], float]:
    """The workload on ``engine`` in this process: the same Engine API the server drives, no HTTP.
    ``stages``: each sample gets the stamps a traced server's would have on this side of the pipe
    (kvtier/server/stages.py: client_sent, added, first_step_begin/end, client_first; steps)."""
    from kvtier.engine.request import SamplingParams

    params = SamplingParams(max_tokens=w.max_tokens, temperature=0.0, ignore_eos=w.ignore_eos)
    # request id -> (its future, its sample, when its text last grew, how long its text is)
    waiters: dict[str, tuple[asyncio.Future[tuple[Sample, str]], Sample, float | None, int]] = {}
    ids = iter(range(1 << 62))
    step_calls = [0, 0.0]  # step() calls so far, when the latest began

    async def turn(c: int, t: int, messages: list[dict[str, str]]) -> tuple[Sample, str]:
        rid = f"bench-{next(ids)}"
        start = time.perf_counter()
        engine.add_request(engine.apply_chat_template(messages), params, rid)
        fut: asyncio.Future[tuple[Sample, str]] = asyncio.get_running_loop().create_future()
        sample = Sample(c, t, start, 0, 0, 0, 0, 0, request_id=rid)
        if stages:
            sample.stages = {"client_sent": start, "added": time.perf_counter(), "steps": -step_calls[0]}
        waiters[rid] = (fut, sample, None, 0)
        return await fut

    def observe(out: Any, now: float) -> None:
        """Timed as a client of the server sees it: the first token, then each output that adds
        text (the server sends no chunk for a token that ends inside a multi-byte character)."""
        fut, s, last, sent = waiters[out.request_id]
        text = out.outputs[0].text
        if last is None:
            s.ttft = now - s.start
            last = now
            if s.stages is not None:
                s.stages["steps"] += step_calls[0]
                s.stages.update(first_step_begin=step_calls[1], first_step_end=now, client_first=now)
        elif len(text) > sent or out.finished:
            s.itl.append(now - last)
            last = now
        waiters[out.request_id] = (fut, s, last, len(text))
        if out.finished:
            del waiters[out.request_id]
            s.e2e = now - s.start
            s.prompt_tokens = len(out.prompt_token_ids)
            s.output_tokens = len(out.outputs[0].token_ids)
            s.cached_tokens = out.num_cached_tokens
            fut.set_result((s, text))

    async def stepper(done: asyncio.Event) -> None:
        while not done.is_set():
            if not engine.has_unfinished():
                await asyncio.sleep(0)  # let the chats add their next turns
                continue
            step_calls[0] += 1
            step_calls[1] = time.perf_counter()
            outs = engine.step()
            now = time.perf_counter()
            for out in outs:
                observe(out, now)
            await asyncio.sleep(0)

    async def main() -> tuple[list[Sample], float]:
        done = asyncio.Event()
        task = asyncio.create_task(stepper(done))
        try:
            return await _drive(w, turn)
        finally:
            done.set()
            await task

    if not stages:
        return asyncio.run(main())
    from kvtier.bench.serve_stages import add_gc_pauses
    from kvtier.server.stages import GcPauses

    gc_pauses = GcPauses().install()  # this process's full collections: the engine's, here
    try:
        samples, seconds = asyncio.run(main())
    finally:
        gc_pauses.uninstall()
    add_gc_pauses(samples, {"engine": gc_pauses.take()})
    return samples, seconds


# -- summary ---------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank-interpolated percentile (numpy's default 'linear'); NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(samples: list[Sample], seconds: float) -> dict[str, Any]:
    ok = [s for s in samples if not s.error]
    out_tokens = sum(s.output_tokens for s in ok)
    prompt_tokens = sum(s.prompt_tokens for s in ok)
    # "cached": most of the prompt came from the cache (its system prompt at least; every prompt
    # shares the chat template's first block, so "any cached token" would be every request)
    cached = [s for s in ok if s.cached_tokens * 2 >= s.prompt_tokens]
    series: dict[str, list[float]] = {
        "ttft": [s.ttft for s in ok],
        "ttft_cached": [s.ttft for s in cached],
        "tpot": [t for s in ok if (t := s.tpot) is not None],
        "itl": [x for s in ok for x in s.itl],
        "e2e": [s.e2e for s in ok],
    }
    summary: dict[str, Any] = {
        "requests": len(samples),
        "failed": len(samples) - len(ok),
        "seconds": seconds,
        "request_throughput": len(ok) / seconds if seconds else 0.0,
        "output_token_throughput": out_tokens / seconds if seconds else 0.0,
        "total_token_throughput": (out_tokens + prompt_tokens) / seconds if seconds else 0.0,
        "prompt_tokens": prompt_tokens,
        "output_tokens": out_tokens,
        "cached_token_share": sum(s.cached_tokens for s in ok) / prompt_tokens if prompt_tokens else 0.0,
    }
    for name, values in series.items():
        summary[f"{name}_p50_ms"] = percentile(values, 50) * 1e3
        summary[f"{name}_p99_ms"] = percentile(values, 99) * 1e3
    return summary


def report(runs: dict[str, list[tuple[list[Sample], float]]], w: Workload) -> dict[str, Any]:
    """JSON-ready: the workload, each run's summary (the median of its repeats, metric by metric), the
    repeats' summaries, the last repeat's samples, and the server/offline ratios: the median of the
    ratios of repeats run back to back, so that a machine whose load drifts compares like with like."""
    body: dict[str, Any] = {"workload": asdict(w), "runs": {}}
    for name, repeats in runs.items():
        summaries = [summarize(samples, seconds) for samples, seconds in repeats]
        median = {k: statistics.median(s[k] for s in summaries) for k in summaries[0]}
        body["runs"][name] = {
            "summary": median,
            "repeats": summaries,
            "samples": [asdict(s) for s in repeats[-1][0]],
        }
        if any(s.stages for samples, _ in repeats for s in samples):  # --stages: every repeat's
            from kvtier.bench import serve_stages

            body["runs"][name]["stages"] = serve_stages.summarize([s for r, _ in repeats for s in r])
    for name in [n for n in runs if n != "offline"] if "offline" in runs else []:
        pairs = list(zip(body["runs"][name]["repeats"], body["runs"]["offline"]["repeats"], strict=False))
        for label, key in (
            ("throughput", "output_token_throughput"),
            ("ttft_cached_p50", "ttft_cached_p50_ms"),
        ):
            each = [srv[key] / off[key] for srv, off in pairs]
            body.setdefault("ratios", {})[f"{label}_{name}_over_offline"] = statistics.median(each)
            body.setdefault("ratio_ranges", {})[f"{label}_{name}_over_offline"] = [min(each), max(each)]
    return body


TABLE_ROWS = (
    ("requests (failed)", lambda s: f"{int(s['requests'])} ({int(s['failed'])})"),
    ("request throughput /s", lambda s: f"{s['request_throughput']:.2f}"),
    ("output tokens /s", lambda s: f"{s['output_token_throughput']:.1f}"),
    ("total tokens /s", lambda s: f"{s['total_token_throughput']:.1f}"),
    ("cached-token share", lambda s: f"{s['cached_token_share']:.1%}"),
    *(
        (f"{m} p{q} ms", (lambda s, k=f"{m}_p{q}_ms": f"{s[k]:.1f}"))
        for m in ("ttft", "ttft_cached", "tpot", "itl", "e2e")
        for q in (50, 99)
    ),
)


def table(body: dict[str, Any]) -> Any:
    from rich.table import Table

    runs = body["runs"]
    t = Table(title="kvtier bench serve")
    t.add_column("metric")
    for name in runs:
        t.add_column(name, justify="right")
    for label, fmt in TABLE_ROWS:
        t.add_row(label, *(fmt(r["summary"]) for r in runs.values()))
    for name, value in body.get("ratios", {}).items():
        lo, hi = body.get("ratio_ranges", {}).get(name, (value, value))
        t.add_row(name.replace("_", " "), *([""] * (len(runs) - 1)), f"{value:.3f} [{lo:.2f}-{hi:.2f}]")
    return t


# -- one-command runs ------------------------------------------------------------------------------


def warmup_workload(w: Workload) -> Workload:
    """A short untimed pass first (first-call costs: kernels, allocator, connections), with other
    system prompts than the timed run's, so it leaves that run nothing cached."""
    import dataclasses

    return dataclasses.replace(w, seed=w.seed + 1_000_003, conversations=min(4, w.conversations), turns=1)


def offline(w: Workload, config: Any, stages: bool = False) -> tuple[list[Sample], float]:
    """The workload on a fresh in-process engine built from ``config`` (cold cache, like a new server)."""
    from kvtier.engine.engine import Engine

    engine = Engine(config)
    try:
        run_offline(warmup_workload(w), engine)
        return run_offline(w, engine, stages)
    finally:
        engine.close()


def get_json(url: str, headers: dict[str, str] | None = None, timeout: float = 30) -> Any:
    """GET a JSON answer with the standard library (the bench needs no httpx unless --client httpx)."""
    import urllib.request

    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as r:
        return json.loads(r.read())


def join_stages(samples: list[Sample], url: str, api_key: str | None = None) -> None:
    """Give each sample the stamps of a server started with ``--trace-stages`` (GET /debug/stages)."""
    from kvtier.bench import serve_stages

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    serve_stages.join(samples, get_json(url + "/debug/stages", headers))


def served(
    w: Workload,
    config: Any,
    startup_timeout: float = 300.0,
    client: str = "lean",
    extra_args: Sequence[str] = (),
    stages: bool = False,
) -> tuple[list[Sample], float]:
    """The workload on a fresh ``kvtier serve`` subprocess with ``config`` (written to a YAML file
    for it) and ``extra_args``: a cold cache, like a fresh offline engine. ``stages``: the server
    stamps each request (``--trace-stages``) and each sample gets its stamps."""
    import dataclasses
    import os
    import subprocess
    import sys
    import tempfile

    import yaml

    from kvtier.bench.servers import free_port

    port = free_port()  # reserved until the server binds it (bench/servers.py)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump({name: dataclasses.asdict(part) for name, part in config.parts().items()}, f)
    cmd = [sys.executable, "-m", "kvtier.cli", "serve", "--config", f.name, "--port", str(port)]
    cmd += ["--log-level", "warning", "--max-pending-requests", str(max(1024, 4 * w.conversations))]
    cmd += list(extra_args) + (["--trace-stages"] if stages else [])
    proc = subprocess.Popen(cmd, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"kvtier serve exited with {proc.returncode}")
            try:
                models = get_json(url + "/v1/models", timeout=2)["data"]
                break
            except (OSError, KeyError, ValueError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"kvtier serve did not start within {startup_timeout} s") from None
                time.sleep(0.2)
        asyncio.run(run_http(warmup_workload(w), url, models[0]["id"], client=client))
        samples, seconds = asyncio.run(run_http(w, url, models[0]["id"], client=client))
        if stages:
            join_stages(samples, url)
        return samples, seconds
    finally:
        proc.terminate()
        proc.wait(60)
        os.unlink(f.name)
