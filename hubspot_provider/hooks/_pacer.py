"""Rate-limit pacing from HubSpot's headers, cooperative across writers of the same app.

Pacing happens *before* a 429, not after: a run stays just under HubSpot's rolling limit while
other writers share it.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Mapping

__all__ = ["RateLimitPacer"]


class RateLimitPacer:
    """Keeps request starts under HubSpot's rolling limit, learned from its response headers.

    HubSpot counts requests per app in a rolling window (``X-HubSpot-RateLimit-Max`` requests per
    ``-Interval-Milliseconds``), from when each request arrives. The pacer remembers when each of
    its own requests started and frees its slot one window later: a request that started a window
    after an earlier one also arrives a window after it, give or take the difference in their
    latencies, which the ``reserve`` slot absorbs. (Counting from the answer instead would stretch
    every window by the request's latency: 5% of the ceiling at 0.4 s against HubSpot's 10 s
    window.) It subtracts what ``-Remaining`` says others used. A start waits until the window has
    room, so a long run stays just under the limit instead of bouncing off 429s. Thread-safe.
    """

    def __init__(self, max_requests: int = 100, interval_s: float = 10.0, reserve: int = 1) -> None:
        self.max_requests = max_requests
        self.interval_s = interval_s
        self.reserve = reserve
        self._started: deque[float] = deque()  # start times of this writer's requests in the window
        self._in_flight = 0
        self._others = 0
        self._blocked_until = 0.0
        self._consecutive_429 = 0
        self._cond = threading.Condition()
        self._local = threading.local()
        self._latencies: deque[float] = deque(maxlen=64)
        self._margin = 0.0

    def _budget(self) -> int:
        return max(1, self.max_requests - self.reserve - self._others)

    def acquire(self, timeout: float | None = None) -> bool:
        """Wait for room in the window and take a slot; ``False`` when ``timeout`` seconds pass first."""
        give_up = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                now = time.monotonic()
                if give_up is not None and now >= give_up:
                    return False
                limit = float("inf") if give_up is None else give_up - now
                if now < self._blocked_until:
                    self._cond.wait(min(self._blocked_until - now, limit))
                    continue
                horizon = now - self.interval_s - self._margin
                while self._started and self._started[0] <= horizon:
                    self._started.popleft()
                if len(self._started) < self._budget():
                    self._in_flight += 1
                    self._started.append(now)
                    self._local.started_at = now
                    return True
                # Woken early when the window is re-learned (or the oldest slot frees).
                wait_s = (self._started[0] - horizon) if self._started else None
                if give_up is not None:
                    wait_s = limit if wait_s is None else min(wait_s, limit)
                self._cond.wait(wait_s)

    def release(self, headers: Mapping[str, str] | None, *, rate_limited: bool = False) -> None:
        with self._cond:
            self._in_flight -= 1
            if not rate_limited:
                self._consecutive_429 = 0
            now = time.monotonic()
            started = getattr(self._local, "started_at", None)
            if started is not None:
                # How much latencies vary: two requests started a window apart can reach HubSpot
                # closer together than that by up to this much, so each slot is held that much longer.
                self._local.started_at = None
                self._latencies.append(now - started)
                self._margin = min(max(self._latencies) - min(self._latencies), self.interval_s / 50)
            if headers:
                self._learn(headers, now)
            self._cond.notify_all()

    def _learn(self, headers: Mapping[str, str], now: float) -> None:
        try:
            maximum = int(headers["X-HubSpot-RateLimit-Max"])
            interval_ms = int(headers["X-HubSpot-RateLimit-Interval-Milliseconds"])
            remaining = int(headers["X-HubSpot-RateLimit-Remaining"])
        except (KeyError, ValueError, TypeError):
            return
        if maximum <= 0 or interval_ms <= 0:
            return
        self.max_requests = maximum
        self.interval_s = interval_ms / 1000
        horizon = now - self.interval_s
        ours = sum(1 for t in self._started if t > horizon)
        self._others = max(0, (maximum - remaining) - ours)

    def block_for(self, seconds: float) -> None:
        """Hold every start for ``seconds`` (after a 429, the window is fuller than we knew)."""
        with self._cond:
            self._blocked_until = max(self._blocked_until, time.monotonic() + seconds)

    def wait_after_429(self) -> float:
        """How long to hold off after a 429 that came without ``Retry-After``.

        A 429 while our own window is far from full means other clients of the app filled it, and
        when their requests leave the window is unknown: start at 1/20 of the window and double on
        each consecutive 429, up to the whole window. Rejected requests do not use up the budget,
        so a short first wait costs little.
        """
        with self._cond:
            self._consecutive_429 += 1
            return min(self.interval_s, self.interval_s / 20 * 2 ** (self._consecutive_429 - 1))
