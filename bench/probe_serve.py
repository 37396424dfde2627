"""One-off: where a streamed chat request's time goes in `kvtier serve` (issue 11's TTFT breakdown).

Why a script and not a `kvtier bench` command: it is instrumentation, not a benchmark. It monkeypatches
the server's internals (EngineLoop's thread mode, ``--engine-process off``: the stamps of every stage
must be taken in one process), which change with them; it is kept to re-run the breakdown of
docs/benchmarks.md "Serving", and fails loudly (AttributeError) once the internals it wraps move.

    python bench/probe_serve.py server --port P [kvtier serve flags]   # an instrumented server
    python bench/probe_serve.py client --port P [--conversations ...]   # load it, print the breakdown

The server wraps (monkeypatches, nothing in src/ changes) the stages of a request and records
CLOCK_MONOTONIC stamps (time.perf_counter is that clock on Linux, so both processes agree):
arrive (the ASGI app is called) -> templated (chat template done) -> queued (EngineLoop.submit sends
the add) -> added (the engine thread ran add_request) -> first step start/end (the step that produced
the first token) -> delivered (the event loop put it in the request's queue) -> sse (the first chunk
left the generator). The client adds sent and first-chunk-received. Each request carries a probe id in
the X-Probe header; GET /probe returns the server's stamps and the engine's step log.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import json
import statistics
import sys
import threading
import time
from typing import Any

PROBE: contextvars.ContextVar[str | None] = contextvars.ContextVar("probe", default=None)
STAMPS: dict[str, dict[str, float]] = {}
BY_RID: dict[str, str] = {}  # engine request id -> probe id
STEPS: list[tuple[float, float, int]] = []  # (start, end, outputs)


def _stamp(key: str | None, name: str) -> None:
    if key is not None:
        STAMPS.setdefault(key, {}).setdefault(name, time.perf_counter())


def instrument() -> None:
    from kvtier.server import app as app_mod
    from kvtier.server import completions as cmpl
    from kvtier.server import loop as loop_mod

    template = app_mod.apply_chat_template

    def apply_chat_template(state: Any, messages: Any) -> list[int]:
        out = template(state, messages)
        _stamp(PROBE.get(), "templated")
        return out

    app_mod.apply_chat_template = apply_chat_template

    submit = loop_mod.EngineLoop.submit

    async def submit_(self: Any, request_id: str, *a: Any, **k: Any) -> Any:
        key = PROBE.get()
        if key is not None:
            BY_RID[request_id] = key
        _stamp(key, "queued")
        return await submit(self, request_id, *a, **k)

    loop_mod.EngineLoop.submit = submit_  # type: ignore[method-assign]

    send = loop_mod.EngineLoop._send

    def send_(self: Any, command: Any) -> None:
        if getattr(command, "__name__", "") == "add":  # stamp when the engine thread runs it
            key = PROBE.get()

            def add() -> None:
                _stamp(key, "added")
                command()

            return send(self, add)
        return send(self, command)

    loop_mod.EngineLoop._send = send_  # type: ignore[method-assign]

    run = loop_mod.EngineLoop._dispatch

    def dispatch(self: Any, outputs: list[Any]) -> None:
        now = time.perf_counter()
        STEPS.append((getattr(self, "_probe_step_start", now), now, len(outputs)))
        for out in outputs:
            key = BY_RID.get(out.request_id.split("#")[0])
            if key is not None and "step_end" not in STAMPS.get(key, {}):
                STAMPS.setdefault(key, {})["step_index"] = len(STEPS) - 1
            _stamp(key, "step_end")
        run(self, outputs)

    loop_mod.EngineLoop._dispatch = dispatch  # type: ignore[method-assign]
    step_owner = loop_mod.EngineLoop

    init = step_owner.__init__

    def init_(self: Any, engine: Any, *a: Any, **k: Any) -> None:
        init(self, engine, *a, **k)
        step = engine.step

        def timed_step() -> Any:
            self._probe_step_start = time.perf_counter()
            return step()

        engine.step = timed_step

    step_owner.__init__ = init_  # type: ignore[method-assign]

    deliver = loop_mod._deliver

    def deliver_(batch: list[Any]) -> None:
        for _, out in batch:
            _stamp(BY_RID.get(out.request_id.split("#")[0]), "delivered")
        deliver(batch)

    loop_mod._deliver = deliver_

    events = cmpl.stream_events

    async def stream_events(job: Any, request: Any) -> Any:
        key = PROBE.get()
        async for chunk in events(job, request):
            yield chunk
            _stamp(key, "sse")  # after the send: the chunk is on the socket

    cmpl.stream_events = stream_events

    create = app_mod.create_app

    def create_app(*a: Any, **k: Any) -> Any:
        app = create(*a, **k)

        @app.get("/probe")
        async def probe() -> dict[str, Any]:
            if PROFILER is not None:
                import io
                import pstats

                PROFILER.disable()
                text = io.StringIO()
                pstats.Stats(PROFILER, stream=text).sort_stats("tottime").print_stats(30)
                with open("/tmp/probe_loop.prof.txt", "w") as f:
                    f.write(text.getvalue())
            return {
                "stamps": STAMPS,
                "steps": STEPS,
                "threads": thread_cpu(),
                "samples": top_samples(),
                "lag": LAG,
            }

        @app.get("/probe/start")
        async def probe_start() -> dict[str, Any]:
            STAMPS.clear(), STEPS.clear(), LAG.clear()
            import os

            if os.environ.get("PROBE_PROFILE"):  # cProfile of the event-loop thread only
                import cProfile

                global PROFILER
                PROFILER = cProfile.Profile()
                PROFILER.enable()
            global LAG_TASK
            if LAG_TASK is None:
                LAG_TASK = asyncio.create_task(lag_monitor(LAG))
            return {}

        asgi = app.build_middleware_stack

        def stack() -> Any:
            inner = asgi()

            async def outer(scope: Any, receive: Any, send: Any) -> None:
                if scope["type"] == "http":
                    key = dict(scope["headers"]).get(b"x-probe")
                    if key:
                        PROBE.set(key.decode())
                        _stamp(key.decode(), "arrive")
                await inner(scope, receive, send)

            return outer

        app.build_middleware_stack = stack  # type: ignore[method-assign]
        return app

    app_mod.create_app = create_app
    import kvtier.server.serve as serve_mod

    serve_mod.create_app = create_app


SAMPLES: dict[str, dict[str, int]] = {}
LAG_TASK: Any = None
PROFILER: Any = None


def sampler(interval: float = 0.002) -> None:
    """Every ``interval``: each thread's innermost frames (where it is, not where it waits for the GIL)."""
    me = threading.get_ident()
    while True:
        time.sleep(interval)
        names = {t.ident: t.name for t in threading.enumerate()}
        for ident, frame in sys._current_frames().items():
            if ident == me:
                continue
            where = []
            f: Any = frame
            while f is not None and len(where) < 4:
                where.append(f"{f.f_code.co_filename.rsplit('/', 2)[-1]}:{f.f_code.co_name}")
                f = f.f_back
            d = SAMPLES.setdefault(names.get(ident, str(ident)), {})
            k = " < ".join(where)
            d[k] = d.get(k, 0) + 1


LAG: list[float] = []


async def lag_monitor(out: list[float], every: float = 0.005) -> None:
    """How late the event loop wakes a 5 ms sleep: the time a ready callback waits for the loop."""
    while True:
        t = time.perf_counter()
        await asyncio.sleep(every)
        out.append(time.perf_counter() - t - every)


def top_samples(n: int = 12) -> dict[str, list[tuple[str, int]]]:
    return {t: sorted(d.items(), key=lambda kv: -kv[1])[:n] for t, d in SAMPLES.items()}


def thread_cpu() -> dict[str, float]:
    import os

    out = {}
    for t in threading.enumerate():
        try:
            with open(f"/proc/self/task/{t.native_id}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[t.name] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            pass
    return out


def server(argv: list[str]) -> None:
    instrument()
    import os

    if os.environ.get("PROBE_SAMPLE"):
        threading.Thread(target=sampler, daemon=True, name="sampler").start()
    from kvtier.cli import main

    sys.argv = ["kvtier", "serve", "--engine-process", "off", *argv]  # the stamps need one process
    main()


async def client(port: int, conversations: int, concurrency: int, turns: int, max_tokens: int) -> None:
    from kvtier.bench.serve import Workload
    from kvtier.bench.sse_client import SSEClient

    w = Workload(conversations, turns, 4, 40, 12, max_tokens, concurrency, seed=int(time.time()))
    client_stamps: dict[str, dict[str, float]] = {}
    model = "synthetic:tiny"
    c = SSEClient(f"http://127.0.0.1:{port}")

    async def get(path: str) -> Any:
        async with c.stream("GET", path, {}) as r:
            return json.loads(await r.read())

    async def chat(i: int, gate: asyncio.Semaphore) -> None:
        async with gate:
            history = [{"role": "system", "content": w.system_prompt(i % 4)}]
            for t in range(turns):
                history.append({"role": "user", "content": w.user_message(i, t)})
                key = f"{i}-{t}"
                body = {
                    "model": model,
                    "messages": history,
                    "max_tokens": max_tokens,
                    "stream": True,
                    "temperature": 0,
                    "ignore_eos": True,
                }
                st = client_stamps[key] = {"sent": time.perf_counter()}
                async with c.stream("POST", "/v1/chat/completions", body, {"X-Probe": key}) as r:
                    async for line in r.lines():
                        if line.startswith("data: {"):
                            st.setdefault("received", time.perf_counter())
                st["done"] = time.perf_counter()
                history.append({"role": "assistant", "content": "x" * 10})

    gate = asyncio.Semaphore(concurrency)
    await get("/probe/start")
    cpu0 = time.process_time()
    lag: list[float] = []
    monitor = asyncio.create_task(lag_monitor(lag))
    t0 = time.perf_counter()
    await asyncio.gather(*(chat(i, gate) for i in range(conversations)))
    wall = time.perf_counter() - t0
    monitor.cancel()
    server_side = await get("/probe")
    await c.aclose()
    report(client_stamps, server_side, wall, conversations * turns * max_tokens)
    print(
        f"client: CPU {time.process_time() - cpu0:.2f} s; its event loop's lag p50/p90/max "
        f"{pct(lag, 50):.1f}/{pct(lag, 90):.1f}/{max(lag) * 1e3:.1f} ms; server's "
        f"{pct(sl := server_side['lag'], 50):.1f}/{pct(sl, 90):.1f}/{max(sl) * 1e3:.1f} ms"
    )


def pct(xs: list[float], q: int) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, len(xs) * q // 100)] * 1e3 if xs else float("nan")


ORDER = ["sent", "arrive", "templated", "queued", "added", "step_end", "delivered", "sse", "received"]


def report(cs: dict[str, dict[str, float]], ss: dict[str, Any], wall: float, tokens: int) -> None:
    rows: dict[str, list[float]] = {}
    joins: list[float] = []
    steps = ss["steps"]
    for key, st in cs.items():
        s = {**ss["stamps"].get(key, {}), **st}
        if not all(k in s for k in ORDER):
            continue
        if key.endswith("-0"):
            continue  # first turns: cold prompts; the rest have their system prompt cached
        for a, b in itertools.pairwise(ORDER):
            rows.setdefault(f"{a} -> {b}", []).append((s[b] - s[a]) * 1e3)
        rows.setdefault("TTFT (sent -> received)", []).append((s["received"] - s["sent"]) * 1e3)
        start, end, _ = steps[int(s["step_index"])]  # the step that produced its first token
        joins.append((end - start) * 1e3)
    print(
        f"{len(joins)} cached-prompt requests; wall {wall:.2f} s, "
        f"{tokens / wall:.0f} output tok/s; {len(steps)} steps, "
        f"median step {statistics.median(e - b for b, e, _ in steps) * 1e3:.1f} ms"
    )
    print(f"{'stage':32s} {'p50 ms':>8s} {'p90 ms':>8s} {'mean ms':>8s}")
    print("server threads' CPU seconds:", {k: round(v, 2) for k, v in ss["threads"].items()})
    for thread, top in ss["samples"].items():
        print(f"  {thread}:")
        for where, n in top:
            print(f"    {n:6d} {where}")
    for name, xs in [*rows.items(), ("the step it joined (its length)", joins)]:
        xs = sorted(xs)
        print(f"{name:32s} {xs[len(xs) // 2]:8.2f} {xs[int(len(xs) * 0.9)]:8.2f} {statistics.mean(xs):8.2f}")


if __name__ == "__main__":
    if sys.argv[1] == "server":
        server(sys.argv[2:])
    else:
        import argparse

        p = argparse.ArgumentParser()
        p.add_argument("mode")
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--conversations", type=int, default=100)
        p.add_argument("--concurrency", type=int, default=100)
        p.add_argument("--turns", type=int, default=2)
        p.add_argument("--max-tokens", type=int, default=24)
        a = p.parse_args()
        asyncio.run(client(a.port, a.conversations, a.concurrency, a.turns, a.max_tokens))
