"""The aggregator's per-device token buckets."""

from aggregator.rate_limit import RateLimiter, Verdict
from fedfmx.config import RateLimitConfig


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_passes_then_only_the_refill_and_a_streak_is_reported_once() -> None:
    clock = Clock()
    limiter = RateLimiter(RateLimitConfig(messages_per_s=2.0, burst=3), clock)
    assert [limiter.admit("cam").allowed for _ in range(3)] == [True, True, True]
    assert limiter.admit("cam") == Verdict(allowed=False, streak_started=True)
    assert limiter.admit("cam") == Verdict(allowed=False)  # the same streak: counted only
    clock.now = 0.5  # one token back at 2 messages/s: let through, the streak goes on
    assert limiter.admit("cam") == Verdict(allowed=True)
    assert limiter.admit("cam") == Verdict(allowed=False)
    clock.now = 100.0  # refilled to the burst (not beyond): the streak of 3 drops ends
    assert limiter.admit("cam") == Verdict(allowed=True, streak_ended=3)
    assert [limiter.admit("cam").allowed for _ in range(3)] == [True, True, False]


def test_each_device_has_its_own_bucket() -> None:
    limiter = RateLimiter(RateLimitConfig(messages_per_s=1.0, burst=1), Clock())
    assert limiter.admit("cam-1").allowed
    assert not limiter.admit("cam-1").allowed
    assert limiter.admit("cam-2").allowed
