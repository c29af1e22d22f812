"""Per-device token buckets: a flood from one device is dropped before it costs anything.

Every hello, status and update a device sends takes a token from its bucket, which refills at
`messages_per_s` up to `burst`. A message with no token left is dropped before it is decoded or
stored; the first drop of a streak is logged and stored as a rejection, the rest are counted
and reported when the streak ends, so that a flood cannot fill the log or the state file either.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from fedfmx.config import RateLimitConfig


@dataclass
class _Bucket:
    tokens: float
    refilled_at: float
    dropped: int = 0
    """Messages dropped in the current streak (0: not throttled)."""


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    streak_started: bool = False
    """This is the first message dropped since the device was last allowed through."""
    streak_ended: int = 0
    """Allowed again after dropping this many messages (0: it was not throttled)."""


class RateLimiter:
    """One token bucket per device id; not thread-safe (the aggregator calls it under a lock)."""

    def __init__(
        self, config: RateLimitConfig, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def admit(self, device_id: str) -> Verdict:
        """Take a token from `device_id`'s bucket if it has one."""
        now = self._clock()
        bucket = self._buckets.setdefault(device_id, _Bucket(float(self.config.burst), now))
        bucket.tokens = min(
            float(self.config.burst),
            bucket.tokens + (now - bucket.refilled_at) * self.config.messages_per_s,
        )
        bucket.refilled_at = now
        if bucket.tokens < 1.0:
            bucket.dropped += 1
            return Verdict(allowed=False, streak_started=bucket.dropped == 1)
        bucket.tokens -= 1.0
        ended, bucket.dropped = bucket.dropped, 0
        return Verdict(allowed=True, streak_ended=ended)
