"""One latency and health tracker for a remote endpoint, shared by the router
(each region's HTTP endpoint, ``cluster.router.table.Region``) and the node
(each other region's gRPC endpoint, ``node.grpc_service.Peer``).

``Health`` keeps:

- a smoothed round-trip time, like TCP's SRTT/RTTVAR: the first sample
  seeds it, then ``srtt = 0.7 srtt + 0.3 sample``; and a p95 over the last
  ``window`` samples, recomputed every 8 samples (the router's hedging
  delay);
- up or down, the reason of the last verdict and when the state changed
  (wall clock);
- consecutive good probes (``oks``): a down endpoint is back after
  ``up_after`` of them -- at once if no probe ever failed (first sight);
  one failed probe takes it out;
- consecutive failed requests (``fails``): a fatal one (connection error,
  timeout) takes it out at once, others (5xx) after ``fail_after`` in a
  row; any answered request starts over;
- a hold-off after failed transfers (``hold``, a ``cluster.backoff.Backoff``:
  1 s, doubling, at most 10 s by default): whoever picks among endpoints
  puts a held-off one last until the hold-off passes or a probe succeeds.
  A good probe lifts the current hold-off but keeps its escalation; a
  transfer that succeeds resets it.

Going down forgets the latency samples (an endpoint that hung has only
stalls to show); coming back starts from the best of the probes that brought
it back, not from the stalls that took it out.

Subclasses add what their side needs (a session, gauges, logs) by
extending ``observe`` and ``set_up``.
"""

from __future__ import annotations

import math
import time
from collections import deque

from cluster.backoff import Backoff

P95_EVERY = 8  # samples between recomputations of the p95


class Health:
    def __init__(
        self,
        name: str,
        *,
        up: bool = False,
        reason: str = "not probed yet",
        up_after: int = 2,
        fail_after: int = 3,
        window: int = 64,
        hold: Backoff | None = None,
    ) -> None:
        self.name = name
        self.up = up
        self.reason = reason
        self.changed = time.time()
        self.up_after = up_after
        self.fail_after = fail_after
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.samples: deque[float] = deque(maxlen=window)
        self._p95: float | None = None
        self._since_p95 = 0
        self.oks = 0  # consecutive good probes
        self.fails = 0  # consecutive failed requests
        self.probes = 0
        self.probe_failures = 0
        self.errors = 0  # failed requests, ever
        self.last_ok = 0.0  # monotonic time of the last good probe or answer
        self.hold = hold if hold is not None else Backoff(base=1.0, cap=10.0)

    # -- latency -------------------------------------------------------------

    def observe(self, seconds: float) -> None:
        """One round-trip sample."""
        if self.srtt is None:
            self.srtt, self.rttvar = seconds, seconds / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - seconds)
            self.srtt = 0.7 * self.srtt + 0.3 * seconds
        self.samples.append(seconds)
        self._since_p95 += 1
        if self._p95 is None or self._since_p95 >= P95_EVERY:
            self._since_p95 = 0
            s = sorted(self.samples)
            self._p95 = s[min(len(s) - 1, math.ceil(0.95 * len(s)) - 1)]

    @property
    def p95(self) -> float | None:
        return self._p95

    def slow(self, waited: float) -> bool:
        """A request was abandoned after ``waited`` seconds: the endpoint is
        at least that slow. A lower bound only ever raises the estimate;
        True when it did."""
        if self.srtt is None or waited > self.srtt:
            self.observe(waited)
            return True
        return False

    # -- state ---------------------------------------------------------------

    def set_up(self, up: bool, reason: str) -> bool:
        """Record a verdict; True when the state changed."""
        self.reason = reason
        if up == self.up:
            return False
        if up and self.samples:
            seed = min(self.samples)
            self.samples.clear()
            self.srtt = None
            self.observe(seed)
        elif not up:
            self.samples.clear()
            self._p95 = None
            self.srtt = None
        self.up = up
        self.changed = time.time()
        return True

    def probe_ok(self, rtt: float) -> bool:
        """A probe was answered as it should in ``rtt`` seconds; True when
        that brought the endpoint back."""
        self.probes += 1
        self.oks += 1
        self.last_ok = time.monotonic()
        self.hold.until = 0.0
        self.observe(rtt)
        if not self.up and (self.oks >= self.up_after or self.probes == self.oks):
            self.fails = 0
            return self.set_up(True, "healthy")
        if self.up:
            self.reason = "healthy"
        return False

    def probe_failed(self, why: str) -> bool:
        """A probe failed; True when that took the endpoint out."""
        self.probes += 1
        self.probe_failures += 1
        self.oks = 0
        return self.set_up(False, why)

    def request_ok(self, latency: float | None = None) -> None:
        """A real request was answered (not with a server error)."""
        self.fails = 0
        self.last_ok = time.monotonic()
        if latency is not None:
            self.observe(latency)

    def request_failed(self, why: str, *, fatal: bool) -> bool:
        """A real request failed; True when that took the endpoint out."""
        self.errors += 1
        self.fails += 1
        self.oks = 0
        if self.up and (fatal or self.fails >= self.fail_after):
            return self.set_up(False, why)
        return False

    # -- hold-off after failed transfers ---------------------------------------

    def transfer_failed(self) -> float:
        """Hold the endpoint off; the hold-off in seconds."""
        return self.hold.failed()

    def transfer_ok(self) -> None:
        self.hold.succeeded()

    def held(self, now: float | None = None) -> bool:
        return self.hold.waiting(now)
