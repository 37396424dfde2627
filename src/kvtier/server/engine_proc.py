"""The engine's own process (``engine_process=on``): vLLM V1's EngineCore, over the public Engine API.

Why a process: an engine thread and the HTTP event loop in one interpreter take turns on its lock;
every socket write of the loop waited for a torch call of the engine and the other way round, so the
server's steps ran ~2x the offline engine's on a CPU (docs/benchmarks.md "Serving"). Here the engine
has an interpreter of its own and the HTTP process only formats and streams.

The child is started with ``spawn`` (a fresh interpreter: safe with CUDA, which a forked child of a
process that touched it is not). Two one-way pipes carry pickled tuples:

- HTTP -> engine: lists of commands (one command each today), in order:
  ``("add", request_id, token ids as int32 bytes, SamplingParams, salt, final_only)``,
  ``("abort", request_id)``, ``("metrics", seq)``, ``("shutdown",)``.
- engine -> HTTP: ``("ready", EngineInfo, tokenizer)`` once; then per loop turn at most one
  ``("step", acks, deltas, metrics, stamps)``: the adds it took (``(request_id, error or None)``),
  every completion's ``Delta`` of the step, the Prometheus text of the metrics asked for, and with
  ``--trace-stages`` the engine's stamps of the requests whose first token this is (else None); at the end
  ``("closed", every write stored)`` or ``("failed", message)``.

A thread reads the command pipe into a queue, so the HTTP side never waits for a step to end to hand
over a request; the engine thread takes everything queued between two steps (requests that arrive
together join one batch). The child ignores SIGINT and SIGTERM: the HTTP process drains and then
says ``shutdown``, and a child whose parent died sees its pipe close and shuts down the same way
(tiers flushed, exit 0).
"""

from __future__ import annotations

import array
import contextlib
import gc
import logging
import queue
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from kvtier.config import EngineConfig
from kvtier.engine.request import InvalidRequestError
from kvtier.server.outputs import Delta, DeltaTracker, EngineInfo
from kvtier.server.stages import EngineStamps, GcPauses

log = logging.getLogger(__name__)

METRICS_INTERVAL_S = 1.0  # the child's metrics snapshot is refreshed at least this often while busy
_EOF = ("eof",)


def run_engine_process(
    commands: Connection,
    outputs: Connection,
    config: EngineConfig,
    log_level: str,
    threads: int | None,
    trace_stages: bool = False,
    join_window: float = 0.0,
    served_model_name: str | None = None,
) -> None:
    """The child's main: build the engine, say ready, serve commands until shutdown or EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the whole group
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the HTTP process drains first, then says shutdown
    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.WARNING),
        format="%(levelname)s %(name)s (engine process): %(message)s",
    )
    try:
        import torch

        if threads is not None:
            torch.set_num_threads(threads)
        from kvtier.engine.engine import Engine

        engine = Engine(config)
    except BaseException as e:  # a model that does not load: the HTTP process reports it and exits
        outputs.send(("failed", f"the engine did not start: {type(e).__name__}: {e}"))
        sys.exit(1)
    info = EngineInfo.of(engine)
    outputs.send(("ready", info, engine.tokenizer))
    freeze_startup_heap()
    stamps = EngineStamps() if trace_stages else None
    core = EngineCore(engine, outputs, stamps, join_window, served_model_name or info.model_name)
    reader = threading.Thread(target=core.read, args=(commands,), name="kvtier-commands", daemon=True)
    reader.start()
    sys.exit(core.run())


def freeze_startup_heap() -> None:
    """Take every object alive after start-up (modules, torch's, the model's and the app's Python
    objects) out of the garbage collector's full (generation-2) passes, as vLLM does. A process that
    imported torch holds ~200k tracked objects, and a full pass over them took 150-200 ms on this
    machine: under load one ran every few seconds, stalled the event loop (or the engine) that long,
    and sat inside the TTFT of every request arriving meanwhile (``kvtier bench serve --stages``:
    every first turn of a 100-chat burst). Objects created later are still collected."""
    gc.collect()
    gc.freeze()


JOIN_WINDOW_CAP_S = 0.05


def join_window_s(fraction: float, waited: float, waited_before: float) -> float:
    """How long the engine process may wait for new requests between two step() calls without
    delaying the device: ``fraction`` of what each of the last two calls waited for it (the smaller:
    a long prefill followed by a short decode must not leave it idle), at most 50 ms.

    Why it costs the device nothing: with overlapped steps, step() schedules and launches step N+1,
    then waits for step N's tokens. While the device computes the step the last call launched,
    starting the next call later only shortens that next call's own wait, as long as it starts in
    time to launch before the device runs dry. What it buys: a request that arrives in the window (a
    chat's next turn, sent as its last one finished) joins the next launch instead of the one after,
    one step less of TTFT; offline, an engine gets it at once. 0 on a CPU engine, which computes in
    launch and so never waits."""
    return min(JOIN_WINDOW_CAP_S, fraction * min(waited, waited_before))


class EngineCore:
    def __init__(
        self,
        engine: Any,
        outputs: Connection,
        stamps: EngineStamps | None = None,
        join_window: float = 0.0,
        model_name: str | None = None,
    ) -> None:
        from prometheus_client import CollectorRegistry

        from kvtier.metrics import EngineMetrics

        self.engine = engine
        self.outputs = outputs
        self.inbox: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self.tracker = DeltaTracker()
        self.registry = CollectorRegistry()
        self.metrics = EngineMetrics(self.registry, model_name)  # the served name labels every sample
        self._last_metrics = 0.0
        # with overlapped steps only: without, the device idles from the end of step() to the next
        self.join_window = join_window if engine.config.scheduler.overlap_steps else 0.0
        self._window = 0.0  # how long this turn may wait for commands (join_window_s)
        self._waited = 0.0  # how long the last step() waited for the device
        self.stamps = stamps  # --trace-stages
        self.gc = GcPauses().install() if stamps is not None else None
        self._trace: dict[str, dict[str, float]] = {}  # this turn's finished stamps

    def read(self, commands: Connection) -> None:
        """The reader thread: commands into the inbox until the HTTP side closes its end."""
        try:
            while True:
                batch = commands.recv()  # a list of commands
                for command in batch:
                    if self.stamps is not None and command[0] == "add":
                        self.stamps.read_at[command[1]] = time.perf_counter()
                    self.inbox.put(command)
        except (EOFError, OSError):
            self.inbox.put(_EOF)

    def run(self) -> int:
        """Step while there is work; between steps, take every queued command. The exit status."""
        try:
            stop = False
            while not stop:
                acks: list[tuple[str, str | None]] = []
                metrics: list[tuple[int, bytes]] = []
                busy = self.engine.has_unfinished()
                # idle: block for the next command (the metrics still refresh once a second); busy:
                # also take what comes within the join window (time the device leaves the host)
                until = time.perf_counter() + self._window if busy else 0.0
                stop = self._take(acks, metrics, block=not busy, until=until)
                deltas = self._step() if self.engine.has_unfinished() and not stop else []
                if time.monotonic() - self._last_metrics > METRICS_INTERVAL_S:
                    self._update_metrics()
                if acks or deltas or metrics:
                    self.outputs.send(("step", acks, deltas, metrics, self._take_trace()))
            return self._close()
        except BaseException as e:  # a bug in the engine: say so (every request fails), then exit
            log.exception("the engine process failed")
            with contextlib.suppress(OSError):
                self.outputs.send(("failed", f"the engine failed: {type(e).__name__}: {e}"))
            return 1

    def _take(
        self,
        acks: list[tuple[str, str | None]],
        metrics: list[tuple[int, bytes]],
        block: bool,
        until: float = 0.0,
    ) -> bool:
        """Apply the queued commands (waiting for one when ``block``, and for more until the time
        ``until``); whether to stop."""
        try:
            command = self.inbox.get(timeout=METRICS_INTERVAL_S) if block else self._next(until)
        except queue.Empty:
            return False
        while True:
            kind = command[0]
            if kind == "add":
                taken = time.perf_counter()
                acks.append(self._add(*command[1:]))
                if self.stamps is not None and acks[-1][1] is None:
                    self.stamps.added(command[1], taken)
            elif kind == "abort":
                self._abort(command[1])
            elif kind == "metrics":
                self._update_metrics()
                from kvtier.metrics import render

                metrics.append((command[1], render(self.registry)))
            else:  # "shutdown", or the HTTP process is gone
                return True
            try:
                command = self._next(until)
            except queue.Empty:
                return False

    def _next(self, until: float) -> tuple[Any, ...]:
        """The next queued command, waiting for one until ``until`` (else queue.Empty)."""
        left = until - time.perf_counter()
        return self.inbox.get(timeout=left) if left > 0 else self.inbox.get_nowait()

    def _add(
        self, request_id: str, tokens: bytes, params: Any, salt: str | None, final_only: bool
    ) -> tuple[str, str | None]:
        ids = array.array("i")
        ids.frombytes(tokens)
        try:
            self.engine.add_request(ids.tolist(), params, request_id, cache_salt=salt, stream=not final_only)
        except InvalidRequestError as e:
            return request_id, f"invalid: {e}"
        except Exception as e:  # its own failure only: the others keep running
            log.exception("adding request %s failed", request_id)
            return request_id, f"failed: {type(e).__name__}: {e}"
        return request_id, None

    def _abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self.tracker.forget(request_id)
        if self.stamps is not None:
            self.stamps.forget(request_id)

    def _step(self) -> list[Delta]:
        begin = time.perf_counter()
        before = self.engine.stats.wait_seconds
        outputs = self.engine.step()
        waited = self.engine.stats.wait_seconds - before
        self._window = join_window_s(self.join_window, waited, self._waited)
        self._waited = waited
        if self.stamps is not None:
            ids = [out.request_id for out in outputs]
            self._trace.update(self.stamps.first_outputs(ids, begin, time.perf_counter()))
        return [d for out in outputs if (d := self.tracker.delta(out)) is not None]

    def _take_trace(self) -> dict[str, Any] | None:
        if self.gc is not None and self.gc.pauses:
            self._trace["_gc"] = self.gc.take()  # type: ignore[assignment]
        if not self._trace:
            return None
        trace, self._trace = self._trace, {}
        out = time.perf_counter()
        for rid, record in trace.items():
            if rid != "_gc":
                record["out"] = out
        return trace

    def _update_metrics(self) -> None:
        self._last_metrics = time.monotonic()
        self.metrics.update(self.engine)

    def _close(self) -> int:
        """Abort what is left, store what the tiers should keep (Engine.close), say so."""
        for rid in list(self.engine.requests):
            self.engine.abort(rid)
        ok = self.engine.close()
        with contextlib.suppress(OSError):  # the HTTP process is gone: nobody to tell
            self.outputs.send(("closed", ok))
        return 0
