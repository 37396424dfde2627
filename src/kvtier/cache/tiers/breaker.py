"""The circuit breaker shared by the network tiers (Redis, memcached).

A dead server must not cost every request a timeout: after ``failures`` consecutive failures the
breaker opens, and for the backoff period every call is refused at once without touching the network
(the tier reports a miss); then one call is let through as a probe (half-open): success closes the
breaker, failure reopens it with the backoff doubled (up to ``max_backoff``). Each tier decides what a
failure is (a server that answers with an error reply is alive) and calls ``record_success`` /
``record_failure`` / ``release_probe`` around its backend calls.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

# The longest a tier stays skipped after it failed: a server back from an outage serves again within
# this (plus one PING). 30 s here made loads resume 6 s after Redis came back; a probe costs one
# round trip (or one timeout while the server is still down) per period, so a few seconds is cheap.
MAX_BACKOFF_S = 2.0


class CircuitBreaker:
    """Closed -> (``failures`` in a row) -> open -> (backoff elapsed) -> half-open: one probe.

    Thread-safe. While open, ``allow()`` is False without any I/O. While half-open exactly one caller
    gets True (the probe); its success closes the breaker, its failure reopens it with the backoff
    doubled up to ``max_backoff``.
    """

    CLOSED, OPEN, HALF_OPEN = 0, 1, 2
    STATE_NAMES = ("closed", "open", "half_open")

    def __init__(
        self,
        failures: int,
        backoff: float,
        max_backoff: float = MAX_BACKOFF_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failures < 1:
            raise ValueError(f"breaker_failures must be >= 1, got {failures}")
        if backoff <= 0 or max_backoff < backoff:
            raise ValueError(f"need 0 < breaker backoff <= max backoff, got {backoff} and {max_backoff}")
        self.failures_to_open = failures
        self.base_backoff = backoff
        self.max_backoff = max_backoff
        self._clock = clock
        self._lock = threading.Lock()
        self.state = self.CLOSED
        self.consecutive_failures = 0
        self.trips = 0
        self.short_circuits = 0
        self.backoff = backoff
        self._open_until = 0.0
        self._probe_in_flight = False

    def allow(self) -> bool:
        with self._lock:
            if self.state == self.CLOSED:
                return True
            if self.state == self.OPEN and self._clock() >= self._open_until:
                self.state = self.HALF_OPEN
                self._probe_in_flight = False
            if self.state == self.HALF_OPEN and not self._probe_in_flight:
                self._probe_in_flight = True
                return True
            self.short_circuits += 1
            return False

    @property
    def probing(self) -> bool:
        """True while the one half-open probe is out: its caller should check the backend cheaply
        (a PING) before spending the real operation's time on it."""
        with self._lock:
            return self.state == self.HALF_OPEN and self._probe_in_flight

    def record_success(self) -> bool:
        """Returns True if this closed an open or half-open breaker."""
        with self._lock:
            was_open = self.state != self.CLOSED
            self.state = self.CLOSED
            self.consecutive_failures = 0
            self.backoff = self.base_backoff
            self._probe_in_flight = False
            return was_open

    def record_failure(self) -> bool:
        """Returns True if this failure opened the breaker."""
        with self._lock:
            self.consecutive_failures += 1
            if self.state == self.HALF_OPEN:
                self.backoff = min(self.backoff * 2, self.max_backoff)
                self._open()
                return True
            if self.state == self.CLOSED and self.consecutive_failures >= self.failures_to_open:
                self._open()
                return True
            return False  # open already: a call that started before it opened failed late

    def release_probe(self) -> None:
        """The probe ended without telling anything about the backend (a programming error)."""
        with self._lock:
            self._probe_in_flight = False

    def _open(self) -> None:
        self.state = self.OPEN
        self._open_until = self._clock() + self.backoff
        self._probe_in_flight = False
        self.trips += 1

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return {
                "breaker_state": float(self.state),  # 0 closed, 1 open, 2 half-open
                "breaker_open": float(self.state != self.CLOSED),
                "breaker_trips": float(self.trips),
                "breaker_consecutive_failures": float(self.consecutive_failures),
                "breaker_backoff_seconds": self.backoff,
                "breaker_short_circuits": float(self.short_circuits),
            }
