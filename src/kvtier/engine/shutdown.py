"""Pending writes survive the end of the process: at interpreter exit and on SIGTERM.

Write-through queues a block as soon as it is full, and writer threads store it a moment later; a
process that ends (returns from main, ``sys.exit``, a SIGTERM from a supervisor) without
``close()`` would lose what is still queued. So every engine with tiers is registered here (weakly:
registration keeps no engine alive), and:

- at exit (``atexit``) each live engine is closed within ``exit_flush_timeout`` seconds in all
  (writes still queued then are dropped and counted: a hung tier cannot hold the exit);
- on SIGTERM the queued writes are flushed within the same bound, then the previous handler runs
  (the default one terminates the process by the signal, as if we had not been there). The handler
  only waits for the write queue: the signal may arrive in the middle of a step, when the engine's
  own state must not be touched. It is installed only from the main thread (the only place Python
  allows it), and only over the default handler or a Python one, which it chains to; a handler set
  later (a server's) replaces it, and that server then closes its engine itself.

This registry is process-wide state by nature (an exit is the process's); it holds nothing else.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable
from types import FrameType
from typing import Any, Protocol

log = logging.getLogger(__name__)


class Closable(Protocol):
    def close(self, timeout: float | None = None) -> bool: ...

    def flush_writes(self, timeout: float | None = None) -> bool: ...


_engines: weakref.WeakSet[Any] = weakref.WeakSet()
_timeouts: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
_lock = threading.Lock()
_installed = {"atexit": False, "sigterm": False}
_previous: dict[str, Any] = {}


def register(engine: Closable, timeout: float) -> None:
    """Close ``engine`` at exit and flush its writes on SIGTERM, within ``timeout`` seconds."""
    with _lock:
        _engines.add(engine)
        _timeouts[engine] = timeout
        if not _installed["atexit"]:
            atexit.register(_at_exit)
            _installed["atexit"] = True
        if not _installed["sigterm"]:
            _installed["sigterm"] = _install_sigterm()


def forget(engine: Closable) -> None:
    with _lock:
        _engines.discard(engine)


def _live() -> list[tuple[Any, float]]:
    with _lock:
        return [(e, _timeouts.get(e, 5.0)) for e in list(_engines)]


def _each_within(action: Callable[[Any, float], bool]) -> None:
    """``action(engine, seconds left)`` for every live engine, under one deadline (the largest
    timeout of them)."""
    engines = _live()
    if not engines:
        return
    deadline = time.monotonic() + max(t for _, t in engines)
    for engine, _ in engines:
        try:
            if not action(engine, max(0.0, deadline - time.monotonic())):
                log.warning("exit: the tiers did not take every queued write in time; the rest is dropped")
        except Exception:  # exiting: report, never stop the other engines' flush
            log.exception("exit: closing an engine failed")


def _at_exit() -> None:
    _each_within(lambda engine, left: engine.close(timeout=left))


def _install_sigterm() -> bool:
    if threading.current_thread() is not threading.main_thread():
        return False  # signal.signal works only there; a later engine made there installs it
    try:
        previous = signal.getsignal(signal.SIGTERM)
    except (ValueError, OSError):
        return False
    if previous is signal.SIG_IGN or previous is None:
        return True  # someone chose to ignore SIGTERM (or set a C handler): leave it so
    _previous["sigterm"] = previous
    signal.signal(signal.SIGTERM, _on_sigterm)
    return True


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    _each_within(lambda engine, left: engine.flush_writes(timeout=left))
    previous = _previous.get("sigterm", signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)
        return
    # The default action: terminate by the signal, as the process would have without us.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)
