"""Rate-limit pacing from HubSpot's headers, cooperative across writers of the same app.

Pacing happens *before* a 429, not after: a run stays just under HubSpot's rolling limit while
other writers share it, with no store shared between them: ``X-HubSpot-RateLimit-Remaining`` on
every answer tells each writer how full the app's window is.
"""

from __future__ import annotations

import math
from bisect import bisect_right
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping

__all__ = ["RateLimitPacer"]


class RateLimitPacer:
    """Keeps request starts under HubSpot's rolling limit, learned from its response headers.

    HubSpot counts an app's requests in a rolling window (``X-HubSpot-RateLimit-Max`` requests per
    ``-Interval-Milliseconds``) from when each arrives. The pacer remembers when each of its own
    requests started and frees the slot one window later, plus however much longer than the
    fastest round trip seen that request's own answer took (it may have arrived that much
    later): most slots free a window after their start, and a slow answer holds only its own.
    Counting from the answer instead would stretch every window by the latency.

    **Several writers, no shared store.** Each writer (a task on some worker, or another
    integration of the same app) holds a *share*: how many of its own requests may be in the
    window. Every answer's ``X-HubSpot-RateLimit-Remaining`` says how full the whole app's window
    is; the writer's own requests that HubSpot counted with it (those started within a window
    before it: arrival times differ from start times by the latency, alike for all) are taken off,
    and what is left is the others'. Each writer steers its share so that the shares add up to the
    ``budget`` (the limit less a 1% reserve, at least one request), with rules that add up right
    without knowing how many writers there are:

    * **Alone** (the window holds nobody else's requests): the whole budget, once a second
      round trip confirms it (the first doubles the share). One reading is no proof: writers
      that start together see each other only once their first requests have arrived. Requests
      of its own that overtook the one answered (sent by other threads) are not taken for
      another writer's, and a share cut by a reading at the limit grows back to the budget.
    * **Only a share in use grows.** Others cannot see a share until its requests arrive, so a
      writer whose window holds fewer requests than its share does not grow it again.
    * **A share's first two growths are at most a doubling** (plus a claim), with others writing
      as without. Writers that start together see each other only as their requests arrive: the
      first to read the window see few of the others, and taking their part of the room by that
      reading would take the room of those not yet seen (eight writers took 125% of the budget
      this way, and the first to read kept twice the share of the last).
    * **Room left**: a writer takes half the room times its part of the window, so all together
      take half the room per round trip (one increase per round trip: an older reading does not
      show it) and approach the budget without overshooting it. The last
      4% of the budget goes only by *claims* of one slot, made at a chance per answer of
      ``0.5 / share``: half a claim per window for each writer, whatever its share. A claim needs
      a whole slot of room in this reading and the writer's previous one: another writer's slot
      between leaving the window and its reuse shows as room in one reading.
    * **No room left** (its share, the others' requests and the slots in transit come to more
      than the budget, while the window itself is not over it), while others write: a writer
      gives a slot back at a chance per answer of
      ``8% × its part of the window``, so each writer's yields grow with the square of its share
      while its claims do not grow at all (additive increase, multiplicative decrease): shares
      converge to equal (a fair share), and the slot freed goes to whoever claims it first.
      Between no room and a slot of room a writer holds its share.
    * With company, a share's limit is its nearest whole number (alone, its fraction is
      dithered): a dithered limit flips between two values from one answer to the next, and the
      flips of eight writers add up to more than the reserve.
    * **Over the budget** (or a 429): every writer scales its share by ``budget / used``. A share
      already cut below what it has in the window is not cut again for the same reading. A
      rejected request frees its slot: HubSpot does not count it.
    * Slots of other writers between leaving the window and being used again look like room; the
      expected number of them (the others' requests times one and a half mean round trips less
      the fastest, over the window) is not room.
    * A slot of its own that just left the window is used again at once (within one even spacing
      and the slowest recent round trip of leaving, a twentieth of the window at most): the
      writer's count in the window stays level, and no other writer takes the slot for room in
      the meantime.
    * Other starts, while others write, are spread out over the window (at most 1/0.6 of the even
      rate of the share, or of a share of 8 slots if it is smaller, so that a writer squeezed to a
      slot or two regrows as fast as a fair one when others finish), so no burst of slots leaves
      the window at once for every writer to race for (a writer alone sends as fast as its window
      allows). Until the window has been seen full (the ramp) every writer puts its growth to use
      at the same part of that rate, 1/0.3 of it, whatever part of the window it holds (after the
      ramp, only the writer holding most of the window goes faster), and its first requests (a
      share of one or two) go out at once. After the ramp, a share just grown is put to use at
      once (at 20 times the even rate) by a writer that holds at least as many of the window's
      requests as all others together: until it is used others cannot see it, and a slow regrowth
      of the biggest writer is most of the window left unused.

    Until the first answer a writer sends one request: a new writer (a shard's task starting while
    another worker fills the window) would otherwise send a burst into a full window. After a few
    answers without rate-limit headers (a proxy that strips them) the share is the budget: local
    accounting. Readings that are zero, negative or absurdly large are ignored. Thread-safe.
    """

    # Part of the room all writers together take per round trip.
    TAKE = 0.5
    # Room (in slots) that counts as room with others writing: a share grows only with this much
    # (beyond the part only claims fill) and claims a slot only with this much in two readings in
    # a row.
    ROOM = 1.0
    # Slots each writer claims per window, whatever its share, while the last part of the budget
    # has room (seen in two readings in a row).
    CLAIMS_PER_WRITER = 0.5
    # The last part of the budget that only claims fill, so a newcomer has an equal chance at it.
    CLAIM_ONLY = 0.04
    # Chance per answer, times the writer's part of the window, that it gives a slot back.
    YIELD = 0.08
    # Starts are at least this part of the share's even spacing apart.
    SPACING = 0.6
    # ... of the spacing of a share of at least this many slots: a small share (a writer squeezed
    # to a slot or two, or one still ramping up) grows at the pace of a fair one.
    SPACING_SLOTS = 8
    # ... and this part, for every writer alike, until the window has been seen full (the ramp).
    RAMP_SPACING = 0.3
    # ... and this part, once it has, while a share just grown is not yet in use by a writer that
    # holds at least as many of the window's requests as all others together.
    CATCH_UP = 0.05
    # Growths of a share, with others writing, that are at most a doubling: one reading is no
    # proof of how many writers there are.
    CAUTIOUS_GROWTHS = 2
    # Answers without rate-limit headers after which a new writer stops probing with one request.
    HEADERLESS_ANSWERS = 3
    # Readings beyond these are ignored (HubSpot's largest limit is a few hundred per 10 s).
    MAX_REQUESTS_CAP = 1_000_000
    INTERVAL_MS_CAP = 86_400_000

    def __init__(
        self, max_requests: int = 100, interval_s: float = 10.0, *, rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self.max_requests = max_requests
        self.interval_s = interval_s
        self._started: deque[float] = deque()  # start times of this writer's requests in the window
        # Answered ones, by start: each one's round trip, and whether an answer came (the part of
        # the round trip beyond the fastest holds the slot past its window; without an answer, all).
        self._hold: dict[float, list[tuple[float, bool] | None]] = {}
        self._history: deque[float] = deque()  # and over the last two windows
        self._in_flight = 0
        self._share: float | None = None  # None until HubSpot's headers told how full the window is
        self._blocked_until = 0.0
        self._consecutive_429 = 0
        self._cond = threading.Condition()
        self._local = threading.local()
        self._latencies: deque[float] = deque(maxlen=64)
        self._fastest = math.inf  # the fastest round trip ever seen: slots are held against it
        self._margin = 0.0
        self._rng = rng or random.Random()
        self._dither = self._rng.random()
        self._grown_at = 0.0
        self._answered = False
        self._recent_others: deque[int] = deque(maxlen=8)  # others in the last few readings, as read
        self._alone = False  # a reading from a request started after growing showed nobody else
        self._headerless = 0
        self._freed: deque[float] = deque()  # when slots left the window, until used again
        self._full_seen = False  # a reading has shown the window (nearly) full: the ramp is over
        self._growths = 0  # how many times the share has grown
        self._last_free = 0.0  # the room the previous reading showed
        self.others = 0  # other writers' requests in the window at the last answer

    @property
    def reserve(self) -> int:
        """Requests of the limit left unused: 1%, at least one."""
        return max(1, round(self.max_requests * 0.01))

    @property
    def budget(self) -> int:
        return max(1, self.max_requests - self.reserve)

    @property
    def share(self) -> float | None:
        """This writer's share of the window; ``None`` until HubSpot's headers have been seen."""
        return self._share

    def _limit(self) -> int:
        if self._share is None:
            return self.budget
        if self.others:
            # With company a share's limit is its nearest whole number: a dithered limit flips
            # between two values from one answer to the next, and eight writers' flips add up to
            # more than a slot of noise in the window, which the reserve cannot absorb.
            return max(1, math.floor(self._share + 0.5))
        return max(1, math.floor(self._share + self._dither))

    def concurrency(self, low: int, high: int) -> int:
        """Requests to keep in flight to fill this writer's share of the window: the requests per
        second the share allows times the mean round trip (Little's law), a quarter more and one
        more for the round trips' spread; ``low`` until a round trip is known, ``high`` at most."""
        with self._cond:
            if not self._latencies:
                return low
            wanted = math.ceil(self._limit() / self.interval_s * self._latency_mean() * 1.25) + 1
            return max(low, min(high, wanted))

    def acquire(self, timeout: float | None = None) -> bool:
        """Wait for room in the window and take a slot; ``False`` when ``timeout`` seconds pass first."""
        give_up = None if timeout is None else self._clock() + timeout
        with self._cond:
            while True:
                now = self._clock()
                limit = float("inf") if give_up is None else give_up - now
                if now < self._blocked_until:
                    if limit <= 0:
                        return False
                    self._cond.wait(min(self._blocked_until - now, limit))
                    continue
                frees_at = self._free_slots(now)
                while self._history and self._history[0] <= now - 2 * self.interval_s - 1:
                    self._history.popleft()
                limit_n = self._limit()
                # A slot that just left the window is used again at once: the writer's count in the
                # window stays as it was, and others, who cannot tell a slot between two uses of it
                # from room, have no time to take it.
                even = self.interval_s / limit_n
                freed = self._freed
                while freed and freed[0] < now - even - self._reuse_grace():
                    freed.popleft()
                # Other starts (a share just grown) are spread evenly over the window: no bursts, so
                # no burst of slots leaving the window at once that every writer would race to fill.
                # During the ramp every writer puts its growth to use at the same part of its even
                # rate, whatever part of the window it holds. After it, a share just grown is put to
                # use at once by a writer holding most of the window: others see a share only once
                # it is used, and its growth is most of theirs.
                if not self._full_seen:
                    spacing = self.RAMP_SPACING
                elif len(self._started) < limit_n - 1 and self.others <= limit_n:
                    spacing = self.CATCH_UP
                else:
                    spacing = self.SPACING
                # A small share is spaced as one of SPACING_SLOTS: a writer squeezed to one or two
                # slots would otherwise take a window per slot to grow back when others finish, and
                # a ramp that starts from one slot would take windows to get going.
                pace = self.interval_s / max(limit_n, self.SPACING_SLOTS)
                # A writer's first requests (a share of one or two during the ramp) confirm what
                # the first answers showed; they are not spaced.
                ramp_start = not self._full_seen and limit_n <= 2
                spaced = (self._started[-1] + pace * spacing
                          if self._started and self.others and not freed and not ramp_start else now)
                # Until the first answer tells how full the app's window is (another worker may have
                # filled it), one request at a time: the reserve absorbs that probe.
                probing = not self._answered and self._in_flight > 0
                if len(self._started) < limit_n and now >= spaced and not probing:
                    self._in_flight += 1
                    if freed:
                        freed.popleft()
                    self._started.append(now)
                    self._history.append(now)
                    self._local.started_at = now
                    return True
                if limit <= 0:
                    return False
                # Woken early when the share grows, an answer comes, or the oldest slot frees.
                wait_s = None if frees_at is None else max(0.0, frees_at - now)
                if self._started and self.others and len(self._started) < limit_n:
                    wait_s = max(0.0, (spaced if frees_at is None else min(spaced, frees_at)) - now)
                if give_up is not None:
                    wait_s = limit if wait_s is None else min(wait_s, limit)
                self._cond.wait(wait_s)

    def _latency_mean(self) -> float:
        return sum(self._latencies) / len(self._latencies) if self._latencies else 0.0

    def _reuse_grace(self) -> float:
        """How long after leaving the window a slot still counts as one to use again at once: the
        slowest recent round trip (a thread may be busy that long), a twentieth of the window at
        most, so one stalled answer does not let a whole share's slots pile up and go out at once."""
        return min(max(self._latencies, default=0.0), self.interval_s / 20)

    def _free_slots(self, now: float) -> float | None:
        """Free the slots of requests that have surely left HubSpot's window; when the next one
        frees (``None``: no slot held).

        A request leaves the window one interval after it arrived. It arrived after it started, by
        at most its round trip less the fastest round trip of late (the rest of the fastest one is
        spent on the way back, and a new request takes at least as long to arrive): that excess
        holds the slot longer. It is reckoned when the slot would free, against the fastest round
        trip seen by then: the first answers of a run are slow (connections still being opened,
        processes warming up), and reckoned against each other they would free their slots before
        HubSpot does. Most answers come in about the fastest time, so most slots free a window
        after their start, and one slow answer holds only its own. A request still in flight holds
        its slot until its answer, or two windows at most.
        """
        started, hold = self._started, self._hold
        if not started:
            return None
        if started[0] > now - self.interval_s:  # nothing can have left yet
            return started[0] + self.interval_s
        kept: deque[float] = deque()
        freed: list[float] = []
        taken: dict[float, int] = {}  # holds used so far, per start (two requests may share one)
        # The fastest round trip ever seen, not of late: were it to rise (answers slowing down), a
        # slot held against a faster one could free before HubSpot lets it go. (It is known once
        # any request has been answered; an unanswered one's hold does not use it.)
        fastest = self._fastest
        frees_at = None
        for first in started:
            holds = hold.get(first, ())
            used = taken.get(first, 0)
            taken[first] = used + 1
            if used < len(holds):
                round_trip, answered = holds[used]
                at = first + self.interval_s + max(0.0, round_trip - fastest if answered else round_trip)
            else:  # still in flight
                at = first + 2 * self.interval_s
            if at <= now:
                freed.append(at)
                if used < len(holds):
                    holds[used] = None  # spent
                continue
            kept.append(first)
            frees_at = at if frees_at is None else min(frees_at, at)
        for first in taken:
            left = [held for held in hold.get(first, ()) if held is not None]
            if left:
                hold[first] = left
            else:
                hold.pop(first, None)
        self._started = kept
        self._freed.extend(sorted(freed))  # in time order, so that the oldest are dropped first
        return frees_at

    def release(self, headers: Mapping[str, str] | None, *, rate_limited: bool = False) -> None:
        with self._cond:
            self._in_flight -= 1
            if not rate_limited:
                self._consecutive_429 = 0
            now = self._clock()
            started = getattr(self._local, "started_at", None)
            self._local.started_at = None
            if rate_limited and started is not None:
                # HubSpot does not count a request it rejected: its slot is free again.
                for queue in (self._started, self._history):
                    try:
                        queue.remove(started)
                    except ValueError:
                        pass
            if started is not None and not rate_limited:
                if headers is not None:
                    self._latencies.append(now - started)
                    self._fastest = min(self._fastest, now - started)
                    self._margin = min(max(self._latencies) - min(self._latencies), self.interval_s / 50)
                # Without an answer the request may have arrived as late as now: its whole round
                # trip holds the slot, not only what exceeds the fastest.
                if self._started and started >= self._started[0]:  # its slot is still held
                    self._hold.setdefault(started, []).append((now - started, headers is not None))
            if headers is not None:  # an answer (None: nothing came back, nothing to learn)
                if self._learn(headers, now, rate_limited, started):
                    self._answered = True
                else:
                    # Answers without HubSpot's headers (a proxy strips them, or the token
                    # endpoint): after a few, fall back to local accounting.
                    self._headerless += 1
                    self._answered = self._answered or self._headerless >= self.HEADERLESS_ANSWERS
            self._cond.notify_all()

    def _learn(
        self, headers: Mapping[str, str], now: float, rate_limited: bool, started: float | None
    ) -> bool:
        """Steer the share by one answer's headers; ``False`` when they hold no usable reading."""
        try:
            maximum = int(headers["X-HubSpot-RateLimit-Max"])
            interval_ms = int(headers["X-HubSpot-RateLimit-Interval-Milliseconds"])
            remaining = int(headers["X-HubSpot-RateLimit-Remaining"])
        except (KeyError, ValueError, TypeError):
            return False
        # A hostile or broken reading (zero, negative, absurdly large) is ignored, not learned.
        if not (0 < maximum <= self.MAX_REQUESTS_CAP and 0 < interval_ms <= self.INTERVAL_MS_CAP):
            return False
        self.max_requests = maximum
        self.interval_s = interval_ms / 1000
        horizon = now - self.interval_s
        ours = sum(1 for t in self._started if t > horizon)
        history = self._history
        if started is not None:
            # HubSpot counted this request when it arrived, and with it every request of ours that
            # arrived in the window before: those that started in the window before this one did
            # (latencies alike), whatever the latency.
            counted = bisect_right(history, started) - bisect_right(history, started - self.interval_s)
        else:
            counted = ours
        used = maximum - max(0, remaining)
        others = max(0, used - counted)
        # Requests of ours started after this one, before its answer, may have overtaken it (they
        # are prepared and sent by other threads), so a reading can show one or two requests more
        # than ours with nobody else writing. Such a reading is taken as ours when what is left
        # beyond all of them is nothing and a recent reading showed nobody else at all: overtaking
        # comes and goes, while another writer's requests (a newcomer's one a window, say) show
        # in every reading.
        self._recent_others.append(others)
        overtaken = started is not None and used <= (
            bisect_right(history, now) - bisect_right(history, started - self.interval_s - self._margin))
        if overtaken and min(self._recent_others) == 0:
            others = 0
        self.others = others
        self._alone = self._alone and not others
        budget = self.budget
        self._full_seen = self._full_seen or used >= budget - 1
        share = float(max(1, ours)) if self._share is None else self._share
        # Other writers' slots between leaving the window and being used again look like room.
        # Such a slot is away for its answer's way back beyond the fastest round trip and the next
        # request's way there: on average a mean round trip less the fastest, counted here with
        # half a mean round trip more as a margin (chosen in the simulator, not derived).
        fastest = min(self._latencies, default=0.0)
        phantom = others * max(0.0, 1.5 * self._latency_mean() - fastest) / self.interval_s
        if rate_limited or used > budget:
            # Everyone scales by the same factor; a share already cut below what is in the window
            # (its requests have not left yet) is not cut again for the same reading.
            share = min(share, max(1.0, ours) * budget / max(used, budget + 1))
            self._last_free = -1.0  # no room: the next reading alone does not make a claim
        else:
            free = budget - others - phantom - share
            last_free, self._last_free = self._last_free, free
            # One increase per round trip: an answer to a request sent before the last increase
            # does not show it yet (an answer that grew nothing holds off none).
            # Only a share in use is grown: others cannot see a share not yet used, so growing
            # it again would build on room they are about to take.
            realized = ours >= math.floor(share)
            if (free >= self.ROOM or (free > 0 and not others)) and realized and (
                    started is None or started >= self._grown_at):
                grown_from = share
                if others:
                    bulk = max(0.0, free - max(1, round(budget * self.CLAIM_ONLY)))
                    growth = self.TAKE * bulk * share / (share + others)
                    if self._growths < self.CAUTIOUS_GROWTHS:
                        # Writers that start together see each other only as their requests
                        # arrive: an early reading shows few of them, and the first writers to
                        # read it would take the room of those not yet seen.
                        growth = min(growth, share)
                    share += growth
                    # A claim needs the room in two readings in a row: a slot of another writer
                    # between leaving the window and its reuse shows as room in one.
                    if last_free >= self.ROOM and self._rng.random() < self.CLAIMS_PER_WRITER / max(1.0, share):
                        share += 1
                elif self._alone:
                    share += free
                else:
                    # Alone by one reading: double. Writers that start together see each other
                    # only once their first requests arrive, so one more round trip decides.
                    share += min(free, share)
                    self._alone = True
                share = min(share, budget - others - phantom)
                if share > grown_from:  # an answer that grew nothing holds off no later one
                    self._grown_at = now
                    self._growths += 1
            elif others and free < 0 and self._rng.random() < self.YIELD * share / (share + others):
                share -= 1
        # Never above the budget: a limit that went down (or a share learned from an odd reading).
        self._share = max(1.0, min(share, float(budget)))
        if self._rng.random() < 1 / max(1.0, ours):
            self._dither = self._rng.random()
        return True

    def block_for(self, seconds: float) -> None:
        """Hold every start for ``seconds`` (after a 429, the window is fuller than we knew)."""
        with self._cond:
            self._blocked_until = max(self._blocked_until, self._clock() + seconds)

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
