"""Exponential back-off, the one helper every retry loop uses.

``Backoff.failed()`` records a failure and returns how long to wait before
the next try (``base * factor**(failures-1)``, at most ``cap``, spread by
``jitter`` so many retriers do not wake together); ``succeeded()`` starts
over. ``until`` is the monotonic time before which the next try should not
start, for callers that schedule rather than sleep.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass


@dataclass
class Backoff:
    base: float = 0.5
    cap: float = 30.0
    factor: float = 2.0
    jitter: float = 0.0  # fraction: 0.2 spreads each delay over +-20 %
    failures: int = 0
    until: float = 0.0

    def peek(self) -> float:
        """The delay the next failure would get, without recording one."""
        return min(self.base * self.factor**self.failures, self.cap)

    def failed(self) -> float:
        delay = self.peek()
        self.failures += 1
        if self.jitter:
            delay *= 1 + random.uniform(-self.jitter, self.jitter)
        self.until = time.monotonic() + delay
        return delay

    def succeeded(self) -> None:
        self.failures = 0
        self.until = 0.0

    def waiting(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) < self.until
