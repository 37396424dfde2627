"""``kvtier serve``: build the engine, then run the app on uvicorn until SIGTERM or SIGINT.

Shutdown order: the signal stops new requests (503, and uvicorn closes its listening socket), uvicorn
waits up to ``shutdown_timeout_s`` for in-flight requests to finish (a moment before that, those
left are ended with an error event or a 503 naming the shutdown, and aborted), and the app's
lifespan ends the engine loop and flushes the tiers (``Engine.close``). The process then exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from types import FrameType
from typing import Any

import uvicorn

from kvtier.config import EngineConfig
from kvtier.engine.engine import Engine, resolve_device
from kvtier.model.bert import is_encoder_folder
from kvtier.server.app import ServerSettings, create_app, create_app_for
from kvtier.server.engine_proc import freeze_startup_heap
from kvtier.server.loop import EngineLoop
from kvtier.server.proc_loop import ProcessEngineLoop
from kvtier.server.stages import StageLog

log = logging.getLogger(__name__)

DRAIN_MARGIN_S = 1.0  # before uvicorn's graceful timeout: the error events' time to be written


class _Server(uvicorn.Server):
    """uvicorn's server, telling the engine loop to refuse new requests the moment a signal comes."""

    def __init__(self, config: uvicorn.Config, loop: EngineLoop | ProcessEngineLoop) -> None:
        super().__init__(config)
        self.engine_loop = loop

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        first = not self.should_exit
        self.engine_loop.stop_accepting()
        super().handle_exit(sig, frame)
        # uvicorn re-raises the signal after its shutdown, so the process would die of it (-15);
        # a shutdown that drained and flushed is a success: exit 0.
        self._captured_signals.clear()
        if first:
            self._end_requests_before_the_drain_time_is_up()

    def _end_requests_before_the_drain_time_is_up(self) -> None:
        """uvicorn cancels the handlers still running when its graceful timeout ends: their clients
        would see a cut connection. A moment before, the loop ends their streams instead: each gets
        an error event naming the shutdown (or a 503), then the handlers return on their own."""
        timeout = self.config.timeout_graceful_shutdown
        try:
            event_loop = asyncio.get_running_loop()  # the signal is handled on the loop's thread
        except RuntimeError:  # before the loop runs: nothing is in flight
            return
        if timeout is None:
            return
        reason = f"the server is shutting down; the request did not finish within {timeout} s"
        delay = max(0.0, timeout - min(DRAIN_MARGIN_S, timeout / 4))
        self.engine_loop.open_streams.end_all_after(event_loop, delay, reason)


def run_server(config: EngineConfig, settings: ServerSettings, log_level: str = "info") -> None:
    if is_encoder_folder(config.model.model):  # an embedding model: /v1/embeddings, not completions
        from kvtier.engine.embedder import Embedder
        from kvtier.server.embeddings import create_embedding_app

        embedder = Embedder(config)
        log.warning(
            "kvtier serving embeddings of %s on http://%s:%d",
            config.model.model,
            settings.host,
            settings.port,
        )
        _serve(create_embedding_app(embedder, settings, config.model.model), settings, log_level)
        embedder.close()
        return
    device_type = resolve_device(config.model.device).type
    threads = torch_threads_for_server(device_type, os.environ, os.cpu_count())
    if settings.engine_process_for(device_type):
        stages = StageLog() if settings.trace_stages else None
        loop = ProcessEngineLoop(
            config,
            settings.max_pending_requests,
            log_level,
            threads,
            stages=stages,
            join_window=settings.join_window_fraction(),
            served_model_name=settings.served_model_name,
        )
        app = create_app_for(loop, loop.info, loop.tokenizer, settings)
        where = f"engine process {loop.process.pid}"
    else:
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        app = create_app(Engine(config), settings)
        where = "engine thread"
    freeze_startup_heap()
    info = app.state.kvtier.info
    log.warning(
        "kvtier serving %s on http://%s:%d (%d KV blocks, %s torch threads, %s)",
        app.state.kvtier.model_names[0],
        settings.host,
        settings.port,
        info.num_blocks,
        threads if threads is not None else "default",
        where,
    )
    try:
        _serve(app, settings, log_level)
    finally:
        if isinstance(app.state.kvtier.loop, ProcessEngineLoop):  # uvicorn failed before its lifespan
            app.state.kvtier.loop.shutdown()


def torch_threads_for_server(device_type: str, env: Mapping[str, str], cpus: int | None) -> int | None:
    """A CPU engine leaves one core to the HTTP event loop: with torch's default (every core), each of
    its parallel regions waits for the thread the loop just took the core from. On this 2-core machine
    that made the server 3-7x slower than with one thread (docs/benchmarks.md "Serving"). None: keep
    torch's choice (a GPU engine, or OMP_NUM_THREADS set by the user)."""
    if device_type != "cpu" or "OMP_NUM_THREADS" in env:
        return None
    return max(1, (cpus or 1) - 1)


def _serve(app: Any, settings: ServerSettings, log_level: str) -> None:
    uconfig = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=max(1, round(settings.shutdown_timeout_s)),
        lifespan="on",
    )
    _Server(uconfig, app.state.kvtier.loop).run()
