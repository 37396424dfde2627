"""Per-request stage stamps (``kvtier serve --trace-stages``): where a streamed request's TTFT goes.

Off by default (when on: a dict per request and a few clock reads). Each completion request is
stamped at every hand-over between its arrival and its first SSE event, in both processes of the
engine-process layout, on one clock: ``time.perf_counter`` is CLOCK_MONOTONIC on Linux, the same in
every process of a machine, so the load generator's own stamps line up with the server's.
``GET /debug/stages`` returns the records, oldest first; ``kvtier bench serve --stages`` joins them
with the client's and prints the median of each stage (kvtier/bench/serve_stages.py).

The stages, in order (the engine-thread layout has the HTTP ones only, ``sent`` to ``written``
less the engine's):
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from typing import Any

# (stage, what happened at its stamp); a stage's time is the gap from the stamp before it
STAGES: tuple[tuple[str, str], ...] = (
    ("client_sent", "the load generator began the request (its clock starts)"),
    ("client_written", "it writes the request (after its JSON and, the first time, a connection)"),
    ("arrive", "the ASGI app was called: uvicorn read the request head"),
    ("parsed", "the route ran: body read and validated"),
    ("prepared", "chat template, tokens and sampling parameters done"),
    ("sent", "the add command is about to be written to the engine's pipe (or its thread's queue)"),
    ("read", "the engine process's reader thread unpickled it"),
    ("taken", "the engine loop took it from its inbox (after the step in flight)"),
    ("added", "Engine.add_request returned"),
    ("first_step_begin", "the step() call that returned its first token began"),
    ("first_step_end", "that step() returned"),
    ("out", "the step's message (every delta) is about to be pickled into the pipe"),
    ("p_read", "the HTTP process's reader thread unpickled it"),
    ("routed", "the event loop routed its deltas into the request queues"),
    ("got", "the handler took the first delta from its queue"),
    ("written", "the first SSE event(s) left the handler for Starlette and the socket"),
    ("client_first", "the load generator parsed the first chunk"),
)
STAGE_NAMES = tuple(name for name, _ in STAGES)
__doc__ = (__doc__ or "") + "".join(f"\n- ``{name}``: {what}" for name, what in STAGES) + "\n"

ARRIVE_KEY = "kvtier.arrive"  # the ASGI scope key StampArrival writes


class StageLog:
    """Stamps by request id, the last ``limit`` requests. Used on the event loop only."""

    def __init__(self, limit: int = 200_000) -> None:
        self.limit = limit
        self._records: OrderedDict[str, dict[str, float]] = OrderedDict()
        self.gc = GcPauses().install()  # this process's
        self.engine_gc: deque[tuple[float, float]] = deque(maxlen=100_000)  # the engine process's

    def stamp(self, request_id: str, stage: str, at: float | None = None) -> None:
        self.update(request_id, {stage: time.perf_counter() if at is None else at})

    def update(self, request_id: str, stamps: dict[str, float]) -> None:
        """Add stamps (a stage already stamped keeps its first time)."""
        record = self._records.get(request_id)
        if record is None:
            record = self._records[request_id] = {}
            while len(self._records) > self.limit:
                self._records.popitem(last=False)
        for stage, at in stamps.items():
            record.setdefault(stage, at)

    def records(self) -> list[dict[str, Any]]:
        return [{"id": rid, **stamps} for rid, stamps in self._records.items()]

    def body(self) -> dict[str, Any]:
        """GET /debug/stages: the records, and each process's gen-2 collections as (start, ms)."""
        return {
            "clock": "time.perf_counter (CLOCK_MONOTONIC)",
            "records": self.records(),
            "gc_pauses": {"http": list(self.gc.pauses), "engine": list(self.engine_gc)},
        }


class GcPauses:
    """The interpreter's garbage collections of generation 2 (the ones that walk every tracked
    object: ~150-200 ms in a process that imported torch, on this machine), as (start, ms)."""

    def __init__(self, limit: int = 100_000) -> None:
        self.pauses: deque[tuple[float, float]] = deque(maxlen=limit)
        self._start = 0.0

    def install(self) -> GcPauses:
        import gc

        gc.callbacks.append(self._callback)
        return self

    def uninstall(self) -> None:
        import gc

        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.pauses.append((self._start, (time.perf_counter() - self._start) * 1e3))

    def take(self) -> list[tuple[float, float]]:
        pauses = list(self.pauses)
        self.pauses.clear()
        return pauses


class StampArrival:
    """ASGI middleware: the time the app was called, in the scope (the route adds it to its record)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope[ARRIVE_KEY] = time.perf_counter()
        await self.app(scope, receive, send)


class EngineStamps:
    """The engine process's part: stamps of requests between their read and their first output."""

    def __init__(self) -> None:
        self.read_at: dict[str, float] = {}  # written by the reader thread, popped by the loop
        self._waiting: dict[str, dict[str, float]] = {}  # request id -> its stamps so far

    def added(self, request_id: str, taken: float) -> None:
        read = self.read_at.pop(request_id, taken)
        self._waiting[request_id] = {"read": read, "taken": taken, "added": time.perf_counter(), "steps": 0}

    def forget(self, request_id: str) -> None:
        self._waiting.pop(request_id, None)

    def first_outputs(self, request_ids: list[str], begin: float, end: float) -> dict[str, dict[str, float]]:
        """After a step() from ``begin`` to ``end`` that returned outputs of ``request_ids`` (completion
        ids): the finished records of requests whose first output this was."""
        for record in self._waiting.values():
            record["steps"] += 1
        done: dict[str, dict[str, float]] = {}
        for rid in request_ids:
            base = rid.partition("#")[0]
            stamps = self._waiting.pop(base, None)
            if stamps is not None:
                done[base] = {**stamps, "first_step_begin": begin, "first_step_end": end}
        return done
