"""A clock the test moves: for circuit breakers (``CircuitBreaker(clock=...)``, or a tier's breaker's
``_clock``), so that whether a backoff has passed is the test's decision, not the machine's speed."""

from __future__ import annotations

import time


class ManualClock:
    """Starts at the real monotonic time; advances only by ``now += seconds``."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now
