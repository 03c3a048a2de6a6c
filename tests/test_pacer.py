"""The rate-limit pacer's cooperation rules, fed HubSpot's headers directly; then two writers over real sockets."""

from __future__ import annotations

import math
import random
import threading
import time
from bisect import bisect_left

import pytest

from hubspot_provider.hooks._pacer import RateLimitPacer
from hubspot_provider.hooks.hubspot import HubSpotHook

from tests.test_hook import rows

MAX = 50


def headers(used: int, maximum: int = MAX, interval_ms: int = 1000) -> dict[str, str]:
    return {
        "X-HubSpot-RateLimit-Max": str(maximum),
        "X-HubSpot-RateLimit-Interval-Milliseconds": str(interval_ms),
        "X-HubSpot-RateLimit-Remaining": str(max(0, maximum - used)),
    }


def answer(pacer: RateLimitPacer, *, others: int, rate_limited: bool = False) -> None:
    """An answer with a window that holds ``others`` requests besides ours: to a new request when the
    pacer gives a slot, else to one of ours still in flight."""
    if not pacer.acquire(timeout=0.05):
        pacer._in_flight += 1
    ours = len(pacer._started)
    pacer.release(headers(others + ours), rate_limited=rate_limited)


def test_a_new_writer_sends_one_request_until_the_first_answer():
    pacer = RateLimitPacer(MAX, 1.0)
    assert pacer.acquire(timeout=0.5)
    assert not pacer.acquire(timeout=0.05)  # the window may be full of another worker's requests
    pacer.release(headers(MAX - 2))  # 48 of 50: others hold 47
    assert pacer.others == MAX - 3 and pacer.share is not None and pacer.share <= 2


def test_a_request_without_an_answer_does_not_end_the_probe():
    pacer = RateLimitPacer(MAX, 1.0)
    assert pacer.acquire(timeout=0.5)
    pacer.release(None)  # a timeout or a dropped connection: nothing learned
    assert not pacer._answered and not pacer._latencies
    assert pacer.acquire(timeout=0.5)
    assert not pacer.acquire(timeout=0.05)  # still one at a time


def test_hostile_readings_are_ignored_and_a_lower_limit_caps_the_share():
    pacer = RateLimitPacer(MAX, 1.0)
    for bad in ({"X-HubSpot-RateLimit-Max": "1" + "0" * 400, "X-HubSpot-RateLimit-Interval-Milliseconds": "1000",
                 "X-HubSpot-RateLimit-Remaining": "5"},
                {"X-HubSpot-RateLimit-Max": "100", "X-HubSpot-RateLimit-Interval-Milliseconds": "1" + "0" * 15,
                 "X-HubSpot-RateLimit-Remaining": "5"},
                {"X-HubSpot-RateLimit-Max": "0", "X-HubSpot-RateLimit-Interval-Milliseconds": "1000",
                 "X-HubSpot-RateLimit-Remaining": "0"}):
        assert pacer.acquire(timeout=0.5)
        pacer.release(bad)
        assert (pacer.max_requests, pacer.interval_s, pacer.share) == (MAX, 1.0, None)
    window = [0]
    for _ in range(2):
        round_trip([pacer], window)
    assert pacer.share == MAX - 1
    pacer._in_flight += 1
    pacer.release(headers(3, maximum=20))  # the app's limit went down
    assert pacer.share is not None and pacer.share <= 19


def test_history_stays_bounded_without_headers():
    pacer = RateLimitPacer(MAX, 0.01)
    for _ in range(300):
        assert pacer.acquire(timeout=1)
        pacer.release({})  # answers without rate-limit headers
    time.sleep(1.1)
    assert pacer.acquire(timeout=1)
    assert len(pacer._history) == 1


def test_without_headers_the_share_is_the_budget():
    pacer = RateLimitPacer(MAX, 1.0)
    for _ in range(RateLimitPacer.HEADERLESS_ANSWERS):
        assert pacer.acquire(timeout=0.5)
        pacer.release({"Content-Type": "application/json"})  # answers, without rate-limit headers
    assert pacer.share is None
    assert pacer._limit() == pacer.budget == MAX - 1
    assert all(pacer.acquire(timeout=0.5) for _ in range(4))  # no longer one at a time


def round_trip(pacers: list[RateLimitPacer], window: list[int]) -> None:
    """Every pacer starts all the requests its share allows; then each is answered with the app's
    window as HubSpot counts it (``window[0]`` requests, shared by all), or a 429 past the limit."""
    sent: list[tuple[RateLimitPacer, bool]] = []
    for pacer in pacers:
        while pacer.acquire(timeout=0):
            accepted = window[0] < MAX
            window[0] += accepted
            sent.append((pacer, accepted))
    for pacer, accepted in sent:
        pacer.release(headers(window[0]), rate_limited=not accepted)


def test_a_writer_alone_takes_the_whole_budget_once_a_second_round_trip_confirms_it():
    pacer = RateLimitPacer()
    window = [0]
    shares = []
    for _ in range(4):
        round_trip([pacer], window)
        shares.append(pacer.share)
    assert (pacer.max_requests, pacer.interval_s) == (MAX, 1.0)
    # One answer that shows nobody else is not proof of being alone: writers that start together
    # see each other only once their first requests arrive.
    assert shares == [2, MAX - 1, MAX - 1, MAX - 1]


def test_writers_that_start_together_stay_under_the_limit_while_they_grow():
    pacers = [RateLimitPacer(rng=random.Random(seed)) for seed in range(8)]
    window = [0]
    # The first writer's first answer comes back before the others' first requests arrive.
    round_trip(pacers[:1], window)
    rejected = 0
    for _ in range(12):
        before = window[0]
        round_trip(pacers, window)  # nothing leaves the 1 s window in the test's few milliseconds
        rejected += sum(1 for p in pacers if p._consecutive_429)
        assert window[0] >= before
    assert rejected == 0 and window[0] <= MAX - 1  # at most the budget was used
    assert sum(p.share for p in pacers) <= MAX + len(pacers)


def test_a_share_not_in_use_is_not_grown_again():
    pacer = at_budget(3, 5)
    pacer._share = 10.0  # grown, but only 3 of its requests are in the window yet
    for _ in range(5):
        pacer._in_flight += 1
        pacer.release(headers(3 + 10))  # room: 13 of 50 used
    assert pacer.share == 10.0


def test_a_rejected_request_frees_its_slot():
    pacer = at_budget(4, 6)
    pacer._share = 5.0
    assert pacer.acquire(timeout=0.5)
    assert len(pacer._started) == 5
    pacer.release(headers(MAX), rate_limited=True)  # HubSpot did not count it
    assert len(pacer._started) == 4 and len(pacer._history) == 4


def test_a_writer_never_claims_what_others_hold():
    pacer = RateLimitPacer(rng=random.Random(7))
    for _ in range(12):
        answer(pacer, others=30)
        assert pacer.others == 30
        # The budget (49) less the others' 30.
        assert pacer.share is not None and pacer.share <= MAX - 1 - 30


def test_over_the_budget_every_share_scales_down_once_per_reading():
    pacer = RateLimitPacer(rng=random.Random(1))
    for _ in range(40):
        answer(pacer, others=10)
    before = pacer.share
    ours = len(pacer._started)
    assert before is not None and ours >= 10
    pacer._in_flight += 1
    pacer.release(headers(MAX))  # another writer filled the window past the budget (49)
    cut = pacer.share
    # Scaled by budget / used.
    assert cut is not None and cut < before and cut <= ours * (MAX - 1) / MAX + 1e-9
    # The same (stale) reading again: our requests have not left the window, nothing more is cut.
    pacer._in_flight += 1
    pacer.release(headers(MAX))
    assert pacer.share == cut


def test_a_429_cuts_the_share():
    pacer = RateLimitPacer(rng=random.Random(2))
    for _ in range(6):
        answer(pacer, others=10)
    before = pacer.share
    answer(pacer, others=MAX, rate_limited=True)
    assert before is not None and pacer.share is not None and pacer.share < before


def at_budget(own: int, seed: int) -> RateLimitPacer:
    """A pacer holding ``own`` requests of the window, with its share at ``own``."""
    pacer = RateLimitPacer(rng=random.Random(seed))
    pacer._answered = True  # past the first answer's probe
    for _ in range(own):
        assert pacer.acquire(timeout=0.5)
    pacer._in_flight = 0
    pacer._share = float(own)
    return pacer


def test_at_the_budget_a_writer_yields_only_when_others_write():
    alone = at_budget(MAX - 1, 3)
    shared = at_budget(20, 3)
    for pacer in (alone, shared):  # 10 ms round trips: some of the others' slots are in transit
        pacer._latencies.extend([0.01, 0.01, 0.01])
    for _ in range(300):
        # The window sits at the budget: 49.
        alone._in_flight += 1
        alone.release(headers(MAX - 1))
        shared._in_flight += 1
        shared.release(headers(MAX - 1))
    assert alone.others == 0 and alone.share == MAX - 1
    assert shared.others == MAX - 1 - 20 and shared.share < 20


def test_a_bigger_writer_yields_more_often_than_a_smaller_one():
    def yields(own: int, others: int) -> int:
        pacer = at_budget(own, 11)
        pacer._latencies.extend([0.01, 0.01, 0.01])  # some of the others' slots are in transit
        count = 0
        for _ in range(2000):
            pacer._in_flight += 1
            pacer.release(headers(own + others))  # at the budget (49)
            if pacer.share < own:
                count += 1
                pacer._share = float(own)
        return count

    # Per answer, a writer holding 30 of 49 yields more often than one holding 10; per window
    # (30 answers against 10) the ratio grows with the square of the share.
    assert yields(30, MAX - 1 - 30) > 2 * yields(10, MAX - 1 - 10) > 0


def test_claims_per_window_are_the_same_for_a_small_and_a_big_writer():
    def claims(own: int, windows: int = 400) -> int:
        pacer = at_budget(own, 13)
        count = 0
        for _ in range(own * windows):  # a writer gets as many answers per window as it holds
            pacer._in_flight += 1
            pacer.release(headers(MAX - 3))  # two slots of room, in the part only claims fill
            if pacer.share > own:
                count += 1
                pacer._share = float(own)
        return count

    # Claims do not grow with the share while yields grow with its square: shares converge to
    # equal. (Claims in proportion to the share, as before, gave the big writer eight times more.)
    small, big = claims(5), claims(40)
    assert small > 100 and 0.7 < big / small < 1.4


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def alone_on_a_clock(share: float) -> tuple[Clock, RateLimitPacer]:
    """A writer past its first answer, alone with a share of ``share``, on a clock the test moves."""
    clock = Clock()
    pacer = RateLimitPacer(MAX, 1.0, clock=clock)
    pacer._answered, pacer._alone, pacer._share = True, True, share
    return clock, pacer


def answered(pacer: RateLimitPacer, started: float, used: int) -> None:
    """The answer to the request of ours that started at ``started`` (another thread's, say)."""
    pacer._local.started_at = started
    pacer.release(headers(used))


def test_a_slot_frees_a_window_after_its_start_plus_only_its_own_answer_s_delay():
    clock, pacer = alone_on_a_clock(2.0)
    fast, slow = clock.now, clock.now + 0.02
    assert pacer.acquire(timeout=0)
    clock.now += 0.01
    answered(pacer, fast, 1)  # the fastest answer: 10 ms
    clock.now = slow
    assert pacer.acquire(timeout=0)
    clock.now += 0.07
    answered(pacer, slow, 2)  # 60 ms slower: it may have arrived 60 ms later
    pacer._share = 2.0
    clock.now = fast + 1.005
    assert pacer.acquire(timeout=0)  # the fast one's slot is free a window after its start
    clock.now = slow + 1.03
    assert not pacer.acquire(timeout=0)  # the slow one's is held 60 ms more
    clock.now = slow + 1.061
    assert pacer.acquire(timeout=0)


def test_a_slow_first_answer_holds_its_slot_by_the_fastest_round_trip_known_when_it_frees():
    clock, pacer = alone_on_a_clock(2.0)
    slow = clock.now
    assert pacer.acquire(timeout=0)
    clock.now += 0.1
    answered(pacer, slow, 1)  # the first answer of the run: 100 ms (a connection being opened)
    fast = clock.now
    assert pacer.acquire(timeout=0)
    clock.now += 0.005
    answered(pacer, fast, 2)  # then the usual 5 ms
    pacer._share = 2.0  # both slots in use
    # Reckoned against itself (the only round trip known when it came back) the first answer was
    # the fastest, and its slot freed a window after its start, before HubSpot let it go if it
    # arrived late; reckoned against the fastest known by then, it is held 95 ms more.
    clock.now = slow + 1.09
    assert not pacer.acquire(timeout=0)
    clock.now = slow + 1.096
    assert pacer.acquire(timeout=0)


def test_a_request_without_an_answer_holds_its_slot_its_whole_round_trip_beyond_the_window():
    clock, pacer = alone_on_a_clock(2.0)
    fast = clock.now
    assert pacer.acquire(timeout=0)
    clock.now += 0.01
    answered(pacer, fast, 1)  # the fastest round trip: 10 ms
    lost = clock.now
    assert pacer.acquire(timeout=0)
    clock.now += 0.2
    pacer._local.started_at = lost
    pacer.release(None)  # 200 ms, and no answer: it may have arrived as late as now
    pacer._share = 1.0
    # An answer would have held it 190 ms beyond its window (its round trip less the fastest);
    # without one, the whole 200 ms.
    clock.now = lost + 1.195
    assert not pacer.acquire(timeout=0)
    clock.now = lost + 1.201
    assert pacer.acquire(timeout=0)


def test_a_request_still_in_flight_holds_only_its_own_slot_and_two_windows_at_most():
    clock, pacer = alone_on_a_clock(2.0)
    hung = clock.now
    assert pacer.acquire(timeout=0)  # never answered (a read that hangs)
    clock.now += 0.02
    fast = clock.now
    assert pacer.acquire(timeout=0)
    clock.now += 0.01
    answered(pacer, fast, 2)
    pacer._share = 2.0
    clock.now = fast + 1.001
    assert pacer.acquire(timeout=0)  # the answered one's slot frees behind the hung one
    assert not pacer.acquire(timeout=0)
    clock.now = hung + 2.001
    assert pacer.acquire(timeout=0)  # the hung one's, two windows after its start


def test_a_writer_alone_is_not_made_to_share_by_its_own_overtaking_requests_but_sees_a_newcomer():
    clock = Clock()
    pacer = at_budget(0, 4)
    pacer._clock = clock
    pacer._alone, pacer._share = True, float(MAX - 1)

    def one_more_than_ours_before_it() -> None:
        """Two requests sent, the first answered with one request in HubSpot's count beyond ours
        started before it: the second, sent by another thread, overtook it; or another writer's."""
        first = clock.now
        assert pacer.acquire(timeout=0)
        clock.now += 0.03
        assert pacer.acquire(timeout=0)
        clock.now += 0.01
        ours = sum(1 for t in pacer._history if first - 1.0 < t <= first)  # in its window as HubSpot counts
        answered(pacer, first, ours + 1)
        pacer._in_flight -= 1  # the second's answer is not needed here

    alone = clock.now
    assert pacer.acquire(timeout=0)
    clock.now += 0.01
    answered(pacer, alone, 1)  # nobody else
    one_more_than_ours_before_it()
    assert pacer.others == 0 and pacer.share == MAX - 1  # taken as its own second request
    # In every reading from then on: a newcomer's request, not overtaking, which comes and goes.
    for _ in range(8):
        one_more_than_ours_before_it()
    assert pacer.others == 1 and not pacer._alone
    # Sharing now, at the budget with the newcomer's request: it gives a slot back.
    for _ in range(200):
        if pacer.share < MAX - 1:
            break
        clock.now += 0.1  # its window does not fill up meanwhile
        one_more_than_ours_before_it()
    assert pacer.others == 1 and pacer.share < MAX - 1


def test_a_writer_alone_grows_back_to_the_whole_budget_from_within_a_slot_of_it():
    pacer = at_budget(MAX - 1, 5)
    # Cut a little by a reading over the budget (one request of its own counted late, say): less
    # than a slot of room is left, which used to be no room at all.
    pacer._alone, pacer._share = True, MAX - 1.5
    pacer._in_flight += 1
    pacer.release(headers(MAX - 1))  # the window holds our 49 and nobody else's
    assert pacer.others == 0 and pacer.share == MAX - 1


@pytest.mark.parametrize(("others", "spaced_s"), [(10, 0.6 / 20), (30, 0.6 / 20)])
def test_a_grown_share_goes_out_at_once_only_for_a_writer_holding_most_of_the_window(others, spaced_s):
    clock = Clock()
    pacer = RateLimitPacer(MAX, 1.0, clock=clock)
    pacer._answered, pacer.others, pacer._full_seen = True, others, True  # after the ramp
    for i in range(10):  # ten requests of ours spread over the last window
        clock.now += 0.09 if i else 0
        assert pacer.acquire(timeout=0)
    pacer._share = 20.0  # grown to twenty
    clock.now += spaced_s / 10  # a twentieth of the even spacing later than the last start
    assert pacer.acquire(timeout=0) == (others <= 20)
    clock.now += spaced_s  # at the spacing every writer keeps
    assert pacer.acquire(timeout=0)


class Always(random.Random):
    """Every chance taken."""

    def random(self) -> float:
        return 0.0


@pytest.mark.parametrize(("share", "after"), [(20.4, 20.4), (19.6, 20.6)])
def test_a_slot_of_room_is_claimed_and_less_is_held(share, after):
    pacer = at_budget(20, 9)
    pacer._rng = Always()
    clock = Clock()
    clock.now = time.monotonic()  # and no time passes: none of the others' slots are in transit
    pacer._clock, pacer._local.started_at = clock, None
    # With 28 others of a budget of 49: 0.6 of a slot is free for a share of 20.4, which neither
    # claims nor gives back (both limits are 20); 1.4 slots for a share of 19.6, which claims one
    # once two readings in a row have shown it.
    pacer._share = share
    shares = []
    for _ in range(300):
        pacer._in_flight += 1
        pacer.release(headers(20 + 28))
        shares.append(pacer.share)
        if pacer.share != share:
            break
    assert pacer.others == 28 and pacer.share == pytest.approx(after)
    # Every chance is taken, yet the first reading alone is not enough for a claim.
    assert shares[0] == share and len(shares) == (2 if after != share else 300)


def test_a_slot_that_left_the_window_is_used_again_at_once_and_only_growth_is_spaced():
    clock, pacer = alone_on_a_clock(10.0)
    first = clock.now
    for i in range(10):  # a burst of ten (alone, nothing is spaced), each answered at once
        clock.now = first + i * 0.001
        assert pacer.acquire(timeout=0)
        answered(pacer, clock.now, i + 1)
    pacer._share, pacer.others = 12.0, 30  # others came, and the share grew to twelve
    clock.now = first + 1.0095  # the ten slots have left the window
    # All ten are used again at once: spaced, the burst's slots would wait up to 0.6 s in all
    # (ten times 0.6 of the even 1/12 s), and others would take them for room meanwhile.
    assert all(pacer.acquire(timeout=0) for _ in range(10))
    assert not pacer.acquire(timeout=0)  # the share's two new slots are spaced
    clock.now += 0.6 / 12
    assert pacer.acquire(timeout=0)


def test_one_stalled_answer_does_not_let_a_whole_share_go_out_at_once():
    clock = Clock()
    pacer = RateLimitPacer(100, 10.0, clock=clock)
    pacer._answered, pacer._alone, pacer._share = True, True, 40.0
    first = clock.now
    for i in range(40):  # a share of forty, spread over the window
        clock.now = first + i * 0.25
        assert pacer.acquire(timeout=0)
        answered(pacer, clock.now, i + 1)
    pacer._latencies.append(30.0)  # one answer took 30 s (a stall)
    pacer._share, pacer.others = 40.0, 50
    clock.now = first + 20.0  # every slot left the window, between 10 s and 0.25 s ago
    started = 0
    while pacer.acquire(timeout=0):
        started += 1
    # Only slots that left within the last twentieth of the window (0.5 s) are used again at once,
    # not all forty: the stall does not stretch how long a freed slot counts as just freed.
    assert 1 <= started <= 3


def test_an_answer_that_grows_nothing_does_not_hold_off_the_next_one():
    class Chance(random.Random):
        # No claim on the first answer (nor a new dither), a claim on the second.
        values = [0.99, 0.9, 0.0]

        def random(self) -> float:
            return self.values.pop(0) if self.values else 0.5

    pacer = at_budget(20, 1)
    pacer._rng, pacer._last_free = Chance(), 2.0  # the reading before showed the room too
    one, two = pacer._history[-2], pacer._history[-1]  # two requests in flight together
    pacer._latencies.extend([0.001] * 3)
    # Both readings: 27 others and the 19, then 20, requests of ours HubSpot had counted with the
    # request answered; about two slots of room, which only a claim takes.
    for started, used in ((one, MAX - 4), (two, MAX - 3)):
        pacer._local.started_at = started
        pacer._in_flight += 1
        pacer.release(headers(used))
    # The second answer's request started before the first answer came back; the first answer
    # grew nothing, so the second may claim (an answer that did grow would hold it off).
    assert pacer.share == 21


def test_a_slot_left_unused_for_longer_is_room_like_any_other():
    clock, pacer = alone_on_a_clock(10.0)
    first = clock.now
    for i in range(10):
        clock.now = first + i * 0.001
        assert pacer.acquire(timeout=0)
        answered(pacer, clock.now, i + 1)
    pacer._share, pacer.others = 10.0, 30
    clock.now = first + 1.5  # the slots left the window half a second ago, and others may use them
    assert pacer.acquire(timeout=0)
    assert not pacer.acquire(timeout=0)  # spaced like any start


def test_two_writers_share_one_app_and_lose_nothing(hubspot_emulator_factory, hubspot_conn):
    emulator = hubspot_emulator_factory(rate_limit_max=10, rate_limit_interval_ms=500)
    conn_id = hubspot_conn(emulator)
    hooks = [HubSpotHook(conn_id, max_concurrency=2, max_retries=8) for _ in range(2)]
    reports: list = [None, None]

    def write(i: int) -> None:
        reports[i] = hooks[i].write_statuses(rows(60, start=i * 1000), batch_size=1)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert [r.succeeded for r in reports] == [60, 60]
    assert all(r.failed_count == 0 for r in reports)
    # Each saw the other in the window, and neither holds a share that leaves the other nothing.
    for hook in hooks:
        assert hook.pacer.share is not None and 1 <= hook.pacer.share <= hook.pacer.budget
    assert len([r for r in emulator.requests if r.kind == "ok"]) >= 120


def test_the_requests_to_keep_in_flight_follow_the_share_and_the_round_trip():
    pacer = RateLimitPacer(100, 10.0)
    assert pacer.concurrency(4, 16) == 4  # no round trip known yet
    pacer._share = 99.0
    pacer._latencies.extend([0.4] * 10)
    # 9.9 requests/s × 0.4 s = 3.96 in flight, a quarter more and one: 6.
    assert pacer.concurrency(4, 16) == 6
    pacer._share = 190.0 - 2
    assert pacer.concurrency(4, 16) == math.ceil(18.8 * 0.4 * 1.25) + 1 == 11
    pacer._latencies.extend([5.0] * 60)
    assert pacer.concurrency(4, 16) == 16  # at most the threads there are
    pacer._latencies.clear()
    pacer._latencies.extend([0.008] * 10)
    assert pacer.concurrency(4, 16) == 4  # on loopback a few are plenty: the least is kept


def peak_in_flight(emulator, latency_s: float) -> int:
    """The most write requests HubSpot (the emulator, which holds each for ``latency_s``) had at once."""
    arrivals = sorted(r.at for r in emulator.requests if r.path.endswith("/statuses/batch/write"))
    return max(bisect_left(arrivals, at + latency_s * 0.95) - i for i, at in enumerate(arrivals))


@pytest.mark.parametrize("max_concurrency", [None, 3])
def test_the_hook_sends_as_many_requests_at_once_as_the_window_and_the_latency_call_for(
        hubspot_emulator_factory, hubspot_conn, max_concurrency):
    # 100 requests a second at 0.2 s each need 20 in flight: more than the first 4, up to the 16 threads.
    emulator = hubspot_emulator_factory(rate_limit_max=100, rate_limit_interval_ms=1000, latency_s=0.2)
    hook = HubSpotHook(hubspot_conn(emulator), max_concurrency=max_concurrency)
    report = hook.write_statuses(rows(120), batch_size=1)
    assert report.succeeded == 120 and report.rate_limited == 0
    peak = peak_in_flight(emulator, 0.2)
    if max_concurrency is None:
        assert hook.concurrency() >= 12 and 4 < peak <= 16
    else:
        assert hook.concurrency() == 3 and peak <= 3


def test_the_simulator_of_writers_still_drives_the_pacer():
    """``./bin/bench sim`` reaches into the pacer (its condition and its thread-local start): if the
    pacer changes shape, this says so, instead of the simulator hanging or measuring nothing."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent / "benchmarks" / "sim_writers.py"
    spec = importlib.util.spec_from_file_location("sim_writers", path)
    sim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sim)
    run = sim.Simulation(4, windows=3, rate_max=50, interval_ms=1000, latency_ms=8, jitter=0.5,
                         stall_chance=0.02, stall_ms=60, concurrency=4, stagger_s=0.0, seed=1)
    result = run.run()
    # Every batch was answered (none left in flight or waiting), each counted once.
    assert all(w.left == 0 and w.ended_at is not None for w in run.writers)
    assert sum(w.done for w in run.writers) == run.total == 4 * (150 // 4)
    assert sum(w.requests for w in run.writers) == run.total + sum(w.rejected for w in run.writers)
    assert 0 < result["of_ceiling_pct"] <= 100


@pytest.mark.parametrize(("full_seen", "share", "others", "spaced_s"), [
    (True, 2.0, 40, 0.6 / 8), (False, 4.0, 40, 0.3 / 8), (False, 16.0, 30, 0.3 / 16),
    (False, 16.0, 4, 0.3 / 16), (False, 2.0, 40, 0.0)])
def test_a_small_share_grows_at_a_fair_pace_and_every_writer_ramps_alike(full_seen, share, others, spaced_s):
    clock = Clock()
    pacer = RateLimitPacer(MAX, 1.0, clock=clock)
    pacer._answered, pacer.others, pacer._full_seen = True, others, full_seen
    pacer._share = share  # squeezed to two slots as the others leave, or a share in the ramp
    assert pacer.acquire(timeout=0)
    if spaced_s:
        clock.now += spaced_s * 0.9
        assert not pacer.acquire(timeout=0)
        clock.now += spaced_s * 0.2
    # After the ramp, a share of two is spaced as one of eight (75 ms), not as one of two (0.3 s,
    # a window per slot to grow back when the others leave). In the ramp every writer, however
    # few of the window's requests it holds (40 others here), puts its growth to use at the same
    # pace (0.3 of the even spacing; of eight slots at least), and its first requests at once: the
    # writer holding most of the window (16 of 20 here) does not run ahead.
    assert pacer.acquire(timeout=0)


def test_the_first_growths_with_company_are_at_most_a_doubling():
    # Eight writers start together; this one's first answer shows a single other probe (the rest
    # have not arrived yet). Half the room by its part of the window would be a share of 12 (and
    # 22 for the next reading with one other): together the first readers took 125% of the budget.
    pacer = RateLimitPacer(MAX, 1.0, rng=random.Random(2))
    assert pacer.acquire(timeout=0.5)
    pacer.release(headers(2))
    assert pacer.others == 1 and pacer.share is not None and pacer.share <= 3  # doubled (and a claim at most)
    grown = pacer.share
    for _ in range(int(grown) - 1):
        assert pacer.acquire(timeout=0.5)
    pacer._in_flight = 0
    pacer._local.started_at = None
    pacer._in_flight += 1
    pacer.release(headers(int(grown) + 1))
    assert pacer.share <= 2 * grown + 1  # the second growth too


def test_with_company_a_share_s_limit_is_its_nearest_whole_number():
    shared, alone = at_budget(20, 4), at_budget(20, 4)
    shared.others, alone.others = 28, 0
    limits: dict[tuple[str, float], set[int]] = {}
    for _ in range(200):
        for name, pacer in (("shared", shared), ("alone", alone)):
            for share in (20.4, 20.6):
                pacer._share = share
                pacer._dither = pacer._rng.random()
                limits.setdefault((name, share), set()).add(pacer._limit())
    # Eight writers whose limits flip between two values answer by answer add up to more than the
    # reserve of one slot; with company the limit holds still. Alone, the fraction is dithered.
    assert limits[("shared", 20.4)] == {20} and limits[("shared", 20.6)] == {21}
    assert limits[("alone", 20.4)] == limits[("alone", 20.6)] == {20, 21}
