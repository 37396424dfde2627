"""The HTTP side of an engine in its own process (``engine_process=on``; the child: engine_proc.py).

Same interface as ``EngineLoop`` (submit, release, metrics_text, shutdown...), so the routes do not
know which one runs. Handlers on the event loop write commands to the child's pipe (both pipes hold
1 MiB, so a write hardly ever waits for the child's reader thread). One reader thread here waits on the
output pipe and hands each message (one per engine step, every request's deltas in it) to the event
loop in one ``call_soon_threadsafe``.

If the child dies, the output pipe closes: every unfinished completion gets a last delta with the
error (a 500, or an error event in its stream), pending adds fail with 503, /health says why, and new
requests get 503 at once. Nothing waits on a dead process.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import itertools
import logging
import multiprocessing
import threading
import time
from typing import Any

from kvtier.config import EngineConfig
from kvtier.engine.request import InvalidRequestError, SamplingParams, completion_ids
from kvtier.server.engine_proc import run_engine_process
from kvtier.server.loop import EngineUnavailable, OpenStreams, RequestStream, check_admission
from kvtier.server.outputs import Delta, EngineInfo, failed
from kvtier.server.stages import StageLog

log = logging.getLogger(__name__)

METRICS_TIMEOUT_S = 10.0  # a scrape waits this long for the child, then shows the last snapshot
F_SETPIPE_SZ = 1031  # Linux fcntl: a pipe's buffer size (default 64 KiB; unprivileged limit 1 MiB)
PIPE_BYTES = 1 << 20


class EngineAddFailed(RuntimeError):
    """The engine process could not add a request (not a bad input: its own failure). HTTP 500."""


class ProcessEngineLoop:
    def __init__(
        self,
        config: EngineConfig,
        max_pending: int,
        log_level: str = "warning",
        threads: int | None = None,
        start_timeout: float = 600.0,
        stages: StageLog | None = None,
        join_window: float = 0.0,
        served_model_name: str | None = None,
    ) -> None:
        self.max_pending = max_pending
        self.stages = stages  # --trace-stages: the stamps of each request, engine's included
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: safe with CUDA
        commands_in, self._commands = ctx.Pipe(duplex=False)
        self._outputs, outputs_out = ctx.Pipe(duplex=False)
        self.process = ctx.Process(
            target=run_engine_process,
            args=(
                commands_in,
                outputs_out,
                config,
                log_level,
                threads,
                stages is not None,
                join_window,
                served_model_name,
            ),
            name="kvtier-engine",
        )
        self.process.start()
        commands_in.close()  # the child's ends: ours closed, so the child's exit closes the pipe
        outputs_out.close()
        self.info, self.tokenizer = self._wait_ready(start_timeout)
        for pipe in (self._commands, self._outputs):  # a burst of long prompts fits without waiting
            with contextlib.suppress(OSError):
                fcntl.fcntl(pipe.fileno(), F_SETPIPE_SZ, PIPE_BYTES)
        self._send_lock = threading.Lock()  # shutdown sends from a worker thread
        self._streams: dict[str, RequestStream] = {}  # completion id -> its stream (event loop)
        self._adds: dict[str, asyncio.Future[None]] = {}  # request id -> its add's answer
        self._metrics: dict[int, asyncio.Future[bytes]] = {}
        self._metrics_seq = itertools.count()
        self._last_metrics = b""
        self._pending = 0
        self._accepting = True
        self._stopping = False
        self.closed_ok: bool | None = None  # the child's Engine.close: every write stored
        self.fatal: str | None = None
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self.open_streams = OpenStreams()
        self._reader = threading.Thread(target=self._read, name="kvtier-engine-outputs", daemon=True)

    def _wait_ready(self, timeout: float) -> tuple[EngineInfo, Any]:
        deadline = time.monotonic() + timeout
        while not self._outputs.poll(0.2):
            if not self.process.is_alive() or time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError(f"the engine process did not start (exit code {self.process.exitcode})")
        try:
            message = self._outputs.recv()
        except EOFError:
            self.process.join(10)
            raise RuntimeError(f"the engine process exited with {self.process.exitcode}") from None
        if message[0] != "ready":
            self.process.join(30)
            raise RuntimeError(message[1])
        return message[1], message[2]

    # -- event-loop side ------------------------------------------------------------------------
    def start(self) -> None:
        self._event_loop = asyncio.get_running_loop()
        self._reader.start()

    @property
    def num_pending(self) -> int:
        return self._pending

    def stop_accepting(self) -> None:
        self._accepting = False

    @property
    def accepting(self) -> bool:
        """False once a shutdown began: new requests are refused (503), /health says so."""
        return self._accepting

    def unavailable(self) -> str | None:
        if self.fatal is not None:
            return self.fatal
        if not self._stopping and not self.process.is_alive():
            return f"the engine process exited with code {self.process.exitcode}"
        return None

    async def submit(
        self,
        request_id: str,
        token_ids: list[int],
        params: SamplingParams,
        salt: str | None,
        final_only: bool = False,
        queue: asyncio.Queue[Delta | None] | None = None,
    ) -> RequestStream:
        """Add a request; raises QueueFull, ShuttingDown, EngineUnavailable or InvalidRequestError."""
        check_admission(self.unavailable(), self._accepting, self._pending, self.max_pending)
        # the completions' ids are known here (Engine.add_request's rule), so that deltas arriving
        # with the add's answer find their stream
        ids = completion_ids(request_id, params.n if isinstance(params.n, int) and params.n > 1 else 1)
        stream = RequestStream(request_id, ids, final_only, queue or asyncio.Queue(), set(ids))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._adds[request_id] = done
        for rid in ids:
            self._streams[rid] = stream
        self._pending += 1
        try:
            if self.stages is not None:
                self.stages.stamp(request_id, "sent")
            self._send(("add", request_id, array.array("i", token_ids).tobytes(), params, salt, final_only))
            await done
        except BaseException:
            self._pending -= 1
            self._adds.pop(request_id, None)
            self._drop(stream)
            if not done.done():  # the handler was cancelled (client gone): undo the add
                self._try_send(("abort", request_id))
            raise
        self.open_streams.add(stream)
        return stream

    def release(self, stream: RequestStream) -> None:
        """The handler is done with ``stream``: abort what still runs."""
        self._pending -= 1
        self.open_streams.discard(stream)
        if not stream.finished:
            self._drop(stream)
            self._try_send(("abort", stream.request_id))

    async def metrics_text(self) -> bytes:
        """The child's Prometheus text, made between two of its steps (the last one if it is gone)."""
        if self.unavailable() is not None or self._event_loop is None:
            return self._last_metrics
        seq = next(self._metrics_seq)
        fut: asyncio.Future[bytes] = self._event_loop.create_future()
        self._metrics[seq] = fut
        try:
            self._send(("metrics", seq))
            return await asyncio.wait_for(fut, METRICS_TIMEOUT_S)
        except (TimeoutError, EngineUnavailable):
            return self._last_metrics
        finally:
            self._metrics.pop(seq, None)

    def shutdown(self, timeout: float = 60.0) -> None:
        """Tell the child to finish (it aborts what is left, flushes its tiers, exits 0); wait for it.
        Idempotent: ``kvtier serve`` calls it again after uvicorn, in case its lifespan never ran."""
        if self._stopping:
            return
        self._accepting = False
        self._stopping = True
        self._try_send(("shutdown",))
        if self._reader.is_alive():
            self._reader.join(timeout)
        self.process.join(timeout)
        if self.process.is_alive():
            log.error("the engine process did not stop within %.0f s: killed", timeout)
            self.process.kill()
            self.process.join(10)
        elif self.closed_ok is False:
            log.warning("the engine process stopped; some queued tier writes did not make it in time")

    # -- pipes ------------------------------------------------------------------------------------
    def _send(self, message: tuple[Any, ...]) -> None:
        """Write a command at once (as a one-command list: the child reads lists). The pipe holds
        1 MiB, so the write hardly ever waits for the child's reader thread, which needs the child's
        interpreter lock back from the engine's Python before it can empty the pipe: with 64 KiB, a
        burst of long prompts made the event loop wait for it. Tried and dropped: a writer thread,
        and one write per turn of the event loop; with either, sent -> read went from 0.2-1.7 ms
        to 7-32 ms (p50, `kvtier bench serve --stages`, load 3-5): the thread waits for the event
        loop's interpreter lock, the turn's end for every handler of the turn."""
        try:
            with self._send_lock:
                self._commands.send([message])
        except (OSError, ValueError) as e:  # the child is gone (its reader closed the pipe)
            raise EngineUnavailable(self.unavailable() or f"the engine process is gone: {e}") from None

    def _try_send(self, message: tuple[Any, ...]) -> None:
        with contextlib.suppress(EngineUnavailable):
            self._send(message)

    def _read(self) -> None:
        """The reader thread: every message of the child to the event loop, then its end."""
        try:
            while True:
                message = self._outputs.recv()
                if message[0] == "step" and message[4]:  # --trace-stages
                    read = time.perf_counter()
                    for rid, record in message[4].items():
                        if rid != "_gc":
                            record["p_read"] = read
                self._to_loop(self._on_message, message)
                if message[0] in ("closed", "failed"):
                    break
        except (EOFError, OSError):
            pass
        self.process.join(5)  # its exit code, for the message
        self._to_loop(self._on_exit)

    def _to_loop(self, fn: Any, *args: Any) -> None:
        assert self._event_loop is not None
        with contextlib.suppress(RuntimeError):  # the event loop is closed: the server is gone already
            self._event_loop.call_soon_threadsafe(fn, *args)

    # -- on the event loop ------------------------------------------------------------------------
    def _on_message(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "step":
            _, acks, deltas, metrics, stamps = message
            for request_id, error in acks:
                self._answer_add(request_id, error)
            if stamps and self.stages is not None:
                self.stages.engine_gc.extend(stamps.pop("_gc", []))
                routed = time.perf_counter()
                for request_id, record in stamps.items():
                    self.stages.update(request_id, {**record, "routed": routed})
            self._route(deltas)
            for seq, text in metrics:
                self._last_metrics = text
                fut = self._metrics.get(seq)
                if fut is not None and not fut.done():
                    fut.set_result(text)
        elif kind == "closed":
            self.closed_ok = bool(message[1])
        elif kind == "failed":
            self.fatal = str(message[1])

    def _answer_add(self, request_id: str, error: str | None) -> None:
        fut = self._adds.pop(request_id, None)
        if fut is None or fut.done():
            return
        if error is None:
            fut.set_result(None)
        elif error.startswith("invalid: "):
            fut.set_exception(InvalidRequestError(error.removeprefix("invalid: ")))
        else:
            fut.set_exception(EngineAddFailed(f"the engine could not add the request: {error}"))

    def _route(self, deltas: list[Delta]) -> None:
        for d in deltas:
            stream = self._streams.get(d.request_id)
            if stream is None or (stream.final_only and not d.finished):
                continue
            if d.finished:
                del self._streams[d.request_id]
                stream.unfinished.discard(d.request_id)
            stream.queue.put_nowait(d)
            if stream.finished:
                stream.queue.put_nowait(None)

    def _drop(self, stream: RequestStream) -> None:
        for rid in stream.ids:
            self._streams.pop(rid, None)

    def _on_exit(self) -> None:
        """The child's output pipe closed. Unexpected: fail everything that waits on it."""
        if self._stopping and self.fatal is None:
            return
        why = self.fatal or f"the engine process exited with code {self.process.exitcode}"
        self.fatal = why
        log.error("%s: failing %d requests", why, len(self._streams))
        for fut in self._adds.values():
            if not fut.done():
                fut.set_exception(EngineUnavailable(why))
        self._adds.clear()
        self._route([failed(rid, why) for rid in list(self._streams)])
        for waiter in self._metrics.values():
            if not waiter.done():
                waiter.set_result(self._last_metrics)
