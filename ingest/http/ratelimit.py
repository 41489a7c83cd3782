"""Per-token rate limiting with token buckets, bounded in memory."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable


class TokenBuckets:
    """One bucket per key: `rate` tokens per second refill, `burst` at most; least recently used forgotten."""

    def __init__(self, rate: float, burst: int, *, max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._max = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()  # key -> [tokens, last refill]

    def take(self, key: str) -> float:
        """0 if a request may pass now (and spend a token), else seconds until it could."""
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = [self.burst, now]
            while len(self._buckets) > self._max:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket[0] = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
            bucket[1] = now
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            return 0.0
        return (1.0 - bucket[0]) / self.rate


def retry_after_seconds(wait: float) -> str:
    """Retry-After value (whole seconds, at least 1)."""
    return str(max(1, math.ceil(wait)))
