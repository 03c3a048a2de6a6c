"""Writers sharing one app's rate limit, simulated: the real pacer on a simulated clock.

``./bin/bench writers`` runs real processes against the emulator and takes a minute per row; this
runs the same contest in well under a second of CPU per row, so a change to
:class:`~hubspot_provider.hooks._pacer.RateLimitPacer` can be tried on many seeds, writer counts and
latencies before the real benchmark confirms it. Each writer is a ``RateLimitPacer`` with
``--concurrency`` request threads (as the hook's thread pool); the server counts arrivals in a
rolling window, answers 429 when it is full and sends ``X-HubSpot-RateLimit-Remaining`` as read when
it answers, as the emulator does. Round trips are ``--latency-ms`` with log-normal jitter and, at a
chance per request, a stall (a busy CPU, a garbage collection). A 429 blocks the writer for
``wait_after_429`` and the batch is sent again, as the hook does.

Run with ``./bin/bench sim [--writers 1,2,4,8] [--seeds 5]``; prints JSON. With ``--stagger-s`` the
writers end apart by design and the ramp is not in the first window, so the fairness figure
(the first writer's end as a part of the last one's) and the first window's part of the 429s
are for writers that start together. Nothing is asserted: a
simulation leaves out what real processes add (CPU contention between writers, scheduling), so its
figures guide, and the real benchmark's are the ones the README gives.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import statistics
from types import SimpleNamespace

from hubspot_provider.hooks._pacer import RateLimitPacer


class _Waits(Exception):
    """Raised from the pacer's condition wait: the thread sleeps this long (``None``: until woken)."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds


class _Condition:
    """Stands in for the pacer's ``threading.Condition``: a wait ends the call, to be made again."""

    def __init__(self, writer: _Writer) -> None:
        self.writer = writer

    def __enter__(self) -> _Condition:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def wait(self, seconds: float | None = None) -> None:
        raise _Waits(seconds)

    def notify_all(self) -> None:
        self.writer.woken = True


class _Writer:
    def __init__(self, sim: Simulation, index: int, batches: int, start_at: float) -> None:
        self.sim = sim
        self.index = index
        self.left = batches  # batches not yet sent successfully (nor being sent)
        self.done = 0
        self.requests = 0
        self.rejected = 0
        self.ended_at: float | None = None
        self.started_at = start_at
        self.woken = False
        self.pacer = RateLimitPacer(rng=random.Random(sim.rng.random()), clock=lambda: sim.now)
        self.pacer._cond = _Condition(self)  # noqa: SLF001 - the simulation drives the pacer's waits
        self.threads = [SimpleNamespace(started_at=None, timer=0, busy=False) for _ in range(sim.concurrency)]
        self.waiting: set[int] = set()


class Simulation:
    def __init__(self, writers: int, *, windows: int, rate_max: int, interval_ms: int, latency_ms: float,
                 jitter: float, stall_chance: float, stall_ms: float, concurrency: int, stagger_s: float,
                 seed: int, cold_ms: float = 0.0) -> None:
        self.rng = random.Random(seed)
        self.now = 0.0
        self.rate_max = rate_max
        self.interval_s = interval_ms / 1000
        self.interval_ms = interval_ms
        self.latency_s = latency_ms / 1000
        self.jitter = jitter
        self.stall_chance = stall_chance
        self.stall_s = stall_ms / 1000
        self.cold_s = cold_ms / 1000
        self.concurrency = concurrency
        self.window: list[float] = []  # arrival times counted in the server's window, in order
        self.rejected_by_window: dict[int, int] = {}  # 429s by the window they came in (0: the first)
        self.events: list[tuple[float, int, object]] = []
        self.seq = 0
        total = int(rate_max / self.interval_s * windows * self.interval_s)
        self.writers = [_Writer(self, i, total // writers, i * stagger_s) for i in range(writers)]
        self.total = sum(w.left for w in self.writers)

    def at(self, when: float, action) -> None:
        self.seq += 1
        heapq.heappush(self.events, (when, self.seq, action))

    def round_trip(self) -> tuple[float, float]:
        """The two halves of one round trip: to the server, and back."""
        rtt = self.latency_s * math.exp(self.rng.gauss(0, self.jitter))
        if self.rng.random() < self.stall_chance:
            rtt += self.rng.random() * self.stall_s
        if self.now < self.interval_s / 2:  # processes still warming up (imports, first connections)
            rtt += self.rng.random() * self.cold_s
        there = rtt * self.rng.uniform(0.3, 0.7)
        return there, rtt - there

    def count(self, now: float) -> int:
        horizon = now - self.interval_s
        drop = 0
        while drop < len(self.window) and self.window[drop] <= horizon:
            drop += 1
        del self.window[:drop]
        return len(self.window)

    def try_send(self, writer: _Writer, t: int) -> None:
        thread = writer.threads[t]
        if thread.busy or not writer.left:
            return
        writer.pacer._local = thread  # noqa: SLF001 - this thread's own started_at
        try:
            writer.pacer.acquire()
        except _Waits as wait:
            writer.waiting.add(t)
            thread.timer += 1
            if wait.seconds is not None:
                timer = thread.timer
                # (a hair later: on a simulated clock, now + (t - now) can fall short of t)
                self.at(self.now + wait.seconds + 1e-9, lambda: thread.timer == timer and self.wake(writer, t))
            return
        writer.waiting.discard(t)
        writer.left -= 1
        thread.busy = True
        writer.requests += 1
        there, back = self.round_trip()
        self.at(self.now + there, lambda: self.arrive(writer, t, back))

    def wake(self, writer: _Writer, t: int) -> None:
        writer.waiting.discard(t)
        self.try_send(writer, t)

    def arrive(self, writer: _Writer, t: int, back: float) -> None:
        rejected = self.count(self.now) >= self.rate_max
        if rejected:
            index = int(self.now // self.interval_s)
            self.rejected_by_window[index] = self.rejected_by_window.get(index, 0) + 1
        else:
            self.window.append(self.now)
        headers = {"X-HubSpot-RateLimit-Max": str(self.rate_max),
                   "X-HubSpot-RateLimit-Interval-Milliseconds": str(self.interval_ms),
                   "X-HubSpot-RateLimit-Remaining": str(max(0, self.rate_max - self.count(self.now)))}
        self.at(self.now + back, lambda: self.answer(writer, t, headers, rejected))

    def answer(self, writer: _Writer, t: int, headers: dict[str, str], rejected: bool) -> None:
        thread = writer.threads[t]
        writer.pacer._local = thread  # noqa: SLF001
        writer.woken = False
        writer.pacer.release(headers, rate_limited=rejected)
        thread.busy = False
        if rejected:
            writer.rejected += 1
            writer.left += 1
            wait_s = writer.pacer.wait_after_429()
            writer.pacer.block_for(wait_s)
            thread.timer += 1
            timer = thread.timer
            self.at(self.now + wait_s, lambda: thread.timer == timer and self.wake(writer, t))
        else:
            writer.done += 1
            if not writer.left and not any(th.busy for th in writer.threads):
                writer.ended_at = self.now
            self.try_send(writer, t)
        if writer.woken:
            for other in sorted(writer.waiting):
                if other != t:
                    writer.threads[other].timer += 1
                    self.wake(writer, other)

    def run(self) -> dict:
        for writer in self.writers:
            for t in range(self.concurrency):
                self.at(writer.started_at, lambda w=writer, t=t: self.try_send(w, t))
        while self.events:
            self.now, _, action = heapq.heappop(self.events)
            action()
        wall = max(w.ended_at or self.now for w in self.writers)
        requests = sum(w.requests for w in self.writers)
        rejected = sum(w.rejected for w in self.writers)
        ceiling = self.rate_max / self.interval_s
        ended = sorted(w.ended_at or self.now for w in self.writers)
        return {"of_ceiling_pct": 100 * self.total / wall / ceiling, "pct_429": 100 * rejected / max(1, requests),
                "first_end_pct_of_last": 100 * ended[0] / ended[-1], "ended_s": [round(t, 1) for t in ended],
                "rejected_in_first_window": self.rejected_by_window.get(0, 0), "rejected": rejected}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--writers", default="1,2,4,8")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--rate-max", type=int, default=50)
    parser.add_argument("--interval-ms", type=int, default=1000)
    parser.add_argument("--latency-ms", type=float, default=8.0, help="median round trip")
    parser.add_argument("--jitter", type=float, default=0.5, help="log-normal sigma of the round trip")
    parser.add_argument("--stall-chance", type=float, default=0.02)
    parser.add_argument("--stall-ms", type=float, default=60.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--cold-ms", type=float, default=0.0,
                        help="up to this much more round trip in the first half window (processes warming up)")
    parser.add_argument("--stagger-s", type=float, default=0.0)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="try another value of one of the pacer's constants, e.g. --set YIELD=0.1")
    args = parser.parse_args()
    for setting in args.set:
        name, _, value = setting.partition("=")
        if not name.isupper() or not hasattr(RateLimitPacer, name):
            parser.error(f"--set {setting}: {name!r} is not one of the pacer's constants")
        setattr(RateLimitPacer, name, type(getattr(RateLimitPacer, name))(value))
    rows = []
    for n in (int(n) for n in args.writers.split(",")):
        runs = [Simulation(n, windows=args.windows, rate_max=args.rate_max, interval_ms=args.interval_ms,
                           latency_ms=args.latency_ms, jitter=args.jitter, stall_chance=args.stall_chance,
                           stall_ms=args.stall_ms, concurrency=args.concurrency, stagger_s=args.stagger_s,
                           seed=seed, cold_ms=args.cold_ms).run() for seed in range(args.seeds)]
        pct = [r["of_ceiling_pct"] for r in runs]
        rejected = [r["pct_429"] for r in runs]
        rows.append({"writers": n, "of_ceiling_pct_mean": round(statistics.mean(pct), 1),
                     "of_ceiling_pct_min": round(min(pct), 1), "pct_429_mean": round(statistics.mean(rejected), 2),
                     "pct_429_max": round(max(rejected), 2),
                     # Fair shares end together: the first writer's end as a part of the last one's.
                     "first_end_pct_of_last_mean": round(statistics.mean(r["first_end_pct_of_last"] for r in runs)),
                     # The ramp's part of the 429s: those that came in the first window.
                     "pct_429_in_first_window": round(100 * sum(r["rejected_in_first_window"] for r in runs)
                                                      / max(1, sum(r["rejected"] for r in runs))),
                     "ended_s_seed0": runs[0]["ended_s"]})
    print(json.dumps({"simulated": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
