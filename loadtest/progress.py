"""Progress of a long run: a bar on a terminal, plain lines otherwise.

On a TTY the current step redraws one line (``\\r``) a few times a second::

    [ 3/12] pull 10MB c4 @ meridian  [########------------]  40%  16/40  812 MiB/s  err 0  4.1s

Off a terminal (CI logs, pipes) it prints a plain line when a step starts,
every ``interval`` seconds while it runs, and when it ends.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from loadtest.samples import MIB


class Progress:
    def __init__(
        self, stream: TextIO | None = None, interval: float = 5.0, enabled: bool = True
    ) -> None:
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval
        self.enabled = enabled
        self.label = ""
        self.total = 0
        self.bound = 0.0
        self.t0 = 0.0
        self.last_line = 0.0
        self.index = ""
        self.state = (0, 0, 0)

    def _write(self, text: str) -> None:
        if not self.enabled:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def start(self, label: str, total: int, bound_s: float, index: str = "") -> None:
        self.label, self.total, self.bound, self.index = label, max(total, 1), bound_s, index
        self.t0 = self.last_line = time.monotonic()
        self.state = (0, 0, 0)
        if not self.tty:
            self._write(f"{self._prefix()}started (at most {total} requests, {bound_s:.0f}s)\n")
        else:
            self._draw()

    def _prefix(self) -> str:
        return (f"[{self.index}] " if self.index else "") + f"{self.label}  "

    def _figures(self) -> str:
        n, err, nbytes = self.state
        el = max(time.monotonic() - self.t0, 1e-9)
        rate = f"{nbytes / el / MIB:.0f} MiB/s" if nbytes > 10 * n else f"{n / el:.0f} req/s"
        count = f"{n}/{self.total}" if n <= self.total else f"{n} requests"
        return f"{count}  {rate}  err {err}  {el:.1f}s"

    def _fraction(self) -> float:
        el = time.monotonic() - self.t0
        by_count = self.state[0] / self.total
        by_time = el / self.bound if self.bound > 0 else 0.0
        return min(1.0, max(by_count, by_time))

    def _draw(self) -> None:
        frac = self._fraction()
        width = 24
        fill = int(frac * width)
        bar = "#" * fill + "-" * (width - fill)
        self._write(f"\r\x1b[K{self._prefix()}[{bar}] {frac * 100:3.0f}%  {self._figures()}")

    def update(self, n: int, err: int, nbytes: int) -> None:
        self.state = (n, err, nbytes)
        self.tick()

    def tick(self) -> None:
        if self.tty:
            self._draw()
        elif time.monotonic() - self.last_line >= self.interval:
            self.last_line = time.monotonic()
            self._write(f"{self._prefix()}{self._fraction() * 100:.0f}%  {self._figures()}\n")

    def done(self, summary: str = "") -> None:
        if self.tty:
            self._draw()
            self._write("\n")
        self._write(f"{self._prefix()}done: {summary or self._figures()}\n" if not self.tty else "")
        if self.tty and summary:
            self._write(f"    {summary}\n")

    def note(self, text: str) -> None:
        self._write(("\r\x1b[K" if self.tty else "") + text + "\n")
