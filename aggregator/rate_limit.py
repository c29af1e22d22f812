"""Per-device token buckets: a flood from one device is dropped before it costs anything.

Every hello, status and update a device sends takes a token from its bucket, which refills at
`messages_per_s` up to `burst`. A message with no token left is dropped before it is decoded or
stored. The first drop of a throttling streak is logged and stored as a rejection; the rest are
counted, and reported when the streak ends: at the first message after the bucket has refilled
completely (the device slowed down). So a flood, however long, costs one line in the log and one
row in the state file.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from fedfmx.config import RateLimitConfig


@dataclass
class _Bucket:
    tokens: float
    refilled_at: float
    dropped: int = 0
    """Messages dropped in the current streak (0: not throttled)."""

    def refill(self, now: float, config: RateLimitConfig) -> None:
        elapsed = now - self.refilled_at
        self.tokens = min(float(config.burst), self.tokens + elapsed * config.messages_per_s)
        self.refilled_at = now


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    streak_started: bool = False
    """This is the first message dropped since the device was last allowed through."""
    streak_ended: int = 0
    """The device slowed down after this many messages were dropped (0: no streak ended)."""


class RateLimiter:
    """One token bucket per device id; not thread-safe (the aggregator calls it under a lock).

    At most `max_tracked` buckets are kept, the least recently used dropped first, so a flood
    of ever-new ids (a broker without ACLs) cannot grow the aggregator's memory.
    """

    def __init__(
        self,
        config: RateLimitConfig,
        clock: Callable[[], float] = time.monotonic,
        max_tracked: int = 10_000,
    ) -> None:
        self.config = config
        self._clock = clock
        self._max_tracked = max_tracked
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def admit(self, device_id: str) -> Verdict:
        """Take a token from `device_id`'s bucket if it has one."""
        now = self._clock()
        bucket = self._buckets.get(device_id)
        if bucket is None:
            bucket = self._buckets[device_id] = _Bucket(float(self.config.burst), now)
            if len(self._buckets) > self._max_tracked:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(device_id)
        bucket.refill(now, self.config)
        ended = 0
        if bucket.dropped and bucket.tokens >= self.config.burst:
            ended, bucket.dropped = bucket.dropped, 0
        if bucket.tokens < 1.0:
            bucket.dropped += 1
            return Verdict(allowed=False, streak_started=bucket.dropped == 1)
        bucket.tokens -= 1.0
        return Verdict(allowed=True, streak_ended=ended)
