"""The engine loop: one thread owns the Engine and drives ``step``; HTTP handlers talk to it by message.

Handlers (on the asyncio event loop) never touch the engine: ``submit`` and ``abort`` queue a command and
wake the thread, which applies every queued command between two steps, so requests that arrive
together join the same batch. Each step's outputs go back to the event loop in one thread-safe call
(not one per token), into the per-request ``RequestStream`` queues that the handlers read.

Hand-off: after a step whose outputs went to the event loop, the engine thread waits (at most
``handoff`` times that step's length) until the loop has written them out. Both threads share one
interpreter lock; stepping on while the loop writes a chunk to each of 100 sockets makes every write
and every torch call wait for the lock (bench/probe_serve.py: ~0.15 ms a write), which slowed both
and let a new request wait a whole step for the loop to even read it. During the hand-off the loop
also reads new requests, and their adds join the very next step.

Backpressure: at most ``max_pending`` requests are accepted and unfinished at once; one more is refused
with ``QueueFull`` (HTTP 503) before anything is tokenised into the engine.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from kvtier.engine.engine import Engine
from kvtier.engine.request import RequestOutput, SamplingParams
from kvtier.metrics import EngineMetrics, render
from kvtier.server.outputs import Delta, DeltaTracker
from kvtier.server.stages import StageLog

log = logging.getLogger(__name__)

METRICS_INTERVAL_S = 1.0  # the metrics snapshot is refreshed at least this often while busy


class QueueFull(Exception):
    """The bounded queue is full (HTTP 503 with Retry-After)."""


class ShuttingDown(Exception):
    """The server stops accepting requests (HTTP 503)."""


class EngineUnavailable(ShuttingDown):
    """The engine is gone (its thread failed or its process died): HTTP 503 naming why."""


def check_admission(unavailable: str | None, accepting: bool, pending: int, max_pending: int) -> None:
    """Whether a loop takes one more request: raises EngineUnavailable (why it cannot serve),
    ShuttingDown, or QueueFull (its bound on requests in flight)."""
    if unavailable is not None:
        raise EngineUnavailable(unavailable)
    if not accepting:
        raise ShuttingDown("the server is shutting down")
    if pending >= max_pending:
        raise QueueFull(f"the server has {pending} requests in flight, its limit: retry later")


@dataclass
class RequestStream:
    """What a handler reads: every Delta of one request's completions, then None at the end."""

    request_id: str
    ids: list[str]
    final_only: bool = False  # deliver only finished outputs (a non-streaming handler needs no more)
    queue: asyncio.Queue[Delta | None] = field(default_factory=asyncio.Queue)
    unfinished: set[str] = field(default_factory=set)
    error: BaseException | None = None

    @property
    def finished(self) -> bool:
        return not self.unfinished


class OpenStreams:
    """The streams handlers are reading (event-loop side). A shutdown whose drain time runs out
    ends them with ``ShuttingDown`` before uvicorn cancels their handlers: a stream then sends an
    error event and [DONE], a waiting non-streaming handler answers 503, instead of a cut
    connection."""

    def __init__(self) -> None:
        self._streams: dict[int, RequestStream] = {}
        self._ended: str | None = None  # end_all's reason, once it ran

    def add(self, stream: RequestStream) -> None:
        self._streams[id(stream)] = stream
        if self._ended is not None:  # accepted before the signal, added only after the deadline
            self._end(stream, self._ended)

    def _end(self, stream: RequestStream, reason: str) -> None:
        if stream.error is None:
            stream.error = ShuttingDown(reason)
        stream.queue.put_nowait(None)

    def discard(self, stream: RequestStream) -> None:
        self._streams.pop(id(stream), None)

    def end_all(self, reason: str) -> int:
        """On the event loop: end every open stream (its handler's release aborts the engine's
        side); returns how many."""
        self._ended = reason
        ended = [s for s in self._streams.values() if not s.finished]
        for stream in ended:
            self._end(stream, reason)
        if ended:
            log.warning("%s: ending %d requests", reason, len(ended))
        return len(ended)

    def end_all_after(self, event_loop: asyncio.AbstractEventLoop, delay_s: float, reason: str) -> None:
        """From any thread (a signal handler): ``end_all(reason)`` in ``delay_s`` seconds."""
        event_loop.call_soon_threadsafe(event_loop.call_later, delay_s, self.end_all, reason)


class EngineLoop:
    def __init__(
        self,
        engine: Engine,
        max_pending: int,
        handoff: float = 1.0,
        stages: StageLog | None = None,
        model_name: str | None = None,
    ) -> None:
        self.engine = engine
        self.stages = stages  # --trace-stages: the HTTP side's stamps (the engine's are not taken here)
        self.max_pending = max_pending
        self.registry = CollectorRegistry()
        self.metrics = EngineMetrics(self.registry, model_name)  # the served name labels every sample
        self.handoff = handoff  # the most a step's outputs are waited for, as a fraction of the step
        self._delivered = threading.Event()
        self._commands: deque[Callable[[], None]] = deque()
        self._wake = threading.Event()
        self._streams: dict[str, RequestStream] = {}  # child request id -> its stream (engine thread)
        self._tracker = DeltaTracker()  # engine thread
        self._pending = 0  # accepted, unfinished requests (event-loop thread)
        self._accepting = True
        self._stop = False
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self.open_streams = OpenStreams()
        self._thread = threading.Thread(target=self._run, name="kvtier-engine", daemon=True)
        self._last_metrics = 0.0
        self.fatal: BaseException | None = None

    # -- event-loop side ------------------------------------------------------------------------
    def start(self) -> None:
        self._event_loop = asyncio.get_running_loop()
        self._thread.start()

    @property
    def num_pending(self) -> int:
        return self._pending

    def stop_accepting(self) -> None:
        self._accepting = False

    @property
    def accepting(self) -> bool:
        """False once a shutdown began: new requests are refused (503), /health says so."""
        return self._accepting

    async def submit(
        self,
        request_id: str,
        token_ids: list[int],
        params: SamplingParams,
        salt: str | None,
        final_only: bool = False,
        queue: asyncio.Queue[Delta | None] | None = None,
    ) -> RequestStream:
        """Add a request; raises QueueFull, ShuttingDown, or the engine's InvalidRequestError."""
        check_admission(self.unavailable(), self._accepting, self._pending, self.max_pending)
        self._pending += 1
        done: asyncio.Future[RequestStream] = asyncio.get_running_loop().create_future()

        def add() -> None:
            try:
                ids = self.engine.add_request(
                    token_ids, params, request_id, cache_salt=salt, stream=not final_only
                )
            except BaseException as e:  # InvalidRequestError, or a bug: the handler reports it
                self._reply(done.set_exception, e)
                return
            stream = RequestStream(request_id, ids, final_only, queue or asyncio.Queue(), set(ids))
            for rid in ids:
                self._streams[rid] = stream
            self._reply(done.set_result, stream)

        if self.stages is not None:
            self.stages.stamp(request_id, "sent")
        self._send(add)
        try:
            stream = await done
        except BaseException:
            self._pending -= 1
            if not done.done():  # the handler was cancelled (client gone): undo the add, queued after it
                self._send(lambda: self._abort_id(request_id))
            raise
        self.open_streams.add(stream)
        return stream

    def release(self, stream: RequestStream) -> None:
        """The handler is done with ``stream`` (finished, failed or disconnected): abort what runs."""
        self._pending -= 1
        self.open_streams.discard(stream)
        if not stream.finished:
            self._send(lambda: self._abort(stream))

    def unavailable(self) -> str | None:
        """Why no request can be served now (/health's 503), or None."""
        return f"the engine loop failed: {self.fatal}" if self.fatal is not None else None

    async def metrics_text(self) -> bytes:
        """The Prometheus text of a fresh metrics snapshot."""
        await self.refresh_metrics()
        return render(self.registry)

    async def refresh_metrics(self) -> None:
        """A fresh metrics snapshot, made on the engine thread between two steps."""
        if not self._thread.is_alive():
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def update() -> None:
            self._update_metrics()
            self._reply(done.set_result, None)

        self._send(update)
        await done

    def shutdown(self, timeout: float = 60.0) -> None:
        """Stop the thread (after aborting what is left) and flush the tiers (Engine.close)."""
        self._accepting = False
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("the engine thread did not stop within %.0f s", timeout)
            return
        self.engine.close()

    # -- engine-thread side ---------------------------------------------------------------------
    def _send(self, command: Callable[[], None]) -> None:
        self._commands.append(command)
        self._wake.set()

    def _reply(self, fn: Callable[..., Any], *args: Any) -> None:
        assert self._event_loop is not None
        self._event_loop.call_soon_threadsafe(_if_pending, fn, *args)

    def _run(self) -> None:
        try:
            while not self._stop:
                self._apply_commands()
                if self.engine.has_unfinished():
                    start = time.perf_counter()
                    outputs = self.engine.step()
                    took = time.perf_counter() - start
                    if self._dispatch(outputs) and self.handoff > 0:
                        self._delivered.wait(self.handoff * took)
                else:
                    self._wake.wait(METRICS_INTERVAL_S)
                    self._wake.clear()
                if time.monotonic() - self._last_metrics > METRICS_INTERVAL_S:
                    self._update_metrics()
            self._apply_commands()
            for stream in list(dict.fromkeys(self._streams.values())):
                self._abort(stream)
        except BaseException as e:  # a bug in the engine: fail every request rather than hang them
            log.exception("the engine loop failed")
            self.fatal = e
            for stream in list(dict.fromkeys(self._streams.values())):
                stream.error = e
                self._reply(stream.queue.put_nowait, None)

    def _apply_commands(self) -> None:
        while self._commands:
            self._commands.popleft()()

    def _dispatch(self, outputs: list[RequestOutput]) -> bool:
        """Hand the outputs to the event loop; whether there were any for it."""
        if not outputs:
            return False
        batch: list[tuple[RequestStream, Delta]] = []
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None or (stream.final_only and not out.finished):
                continue
            if (delta := self._tracker.delta(out)) is not None:  # None: nothing to send (yet)
                batch.append((stream, delta))
            if out.finished:
                del self._streams[out.request_id]
        if not batch:
            return False
        assert self._event_loop is not None
        self._delivered.clear()
        self._event_loop.call_soon_threadsafe(self._deliver, batch)
        return True

    def _deliver(self, batch: list[tuple[RequestStream, Delta]]) -> None:
        """On the event loop: wake the handlers; once they ran (they were scheduled first, and each
        writes before it awaits again), let the engine thread go on."""
        _deliver(batch)
        assert self._event_loop is not None
        self._event_loop.call_soon(self._delivered.set)

    def _abort(self, stream: RequestStream) -> None:
        self.engine.abort(stream.request_id)
        for rid in stream.ids:
            self._streams.pop(rid, None)
            self._tracker.forget(rid)

    def _abort_id(self, request_id: str) -> None:
        stream = next((s for s in self._streams.values() if s.request_id == request_id), None)
        if stream is not None:
            self._abort(stream)

    def _update_metrics(self) -> None:
        self._last_metrics = time.monotonic()
        self.metrics.update(self.engine)


def _deliver(batch: list[tuple[RequestStream, Delta]]) -> None:
    for stream, out in batch:
        if out.finished:
            stream.unfinished.discard(out.request_id)
        stream.queue.put_nowait(out)
        if stream.finished:
            stream.queue.put_nowait(None)


def _if_pending(fn: Callable[..., Any], *args: Any) -> None:
    """Set a future's result unless its waiter went away (a cancelled handler)."""
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, asyncio.Future) and owner.done():
        return
    fn(*args)
