"""Rate limits for inference: token buckets per caller and per model.

Each API key has a bucket (its own `rate_limit_rps`, or the service's default for keys); anonymous
callers have one per client address, at the anonymous rate; each model whose owner set a
`rate_limit_rps` has one bucket for everyone together. Buckets hold twice their rate, so short
bursts pass. A refusal says how long until a token is back (`retry_after_s`), which the gateway
sends as `Retry-After` and gRPC callers find in the error's metadata.

The buckets live in the process that admits the request. A shared store (Redis, or etcd for
coarse limits) can take their place when several gateways or routers must share one budget; the
`RateLimits.admit` interface stays.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from shard_core.errors import InvalidArgumentError, ResourceExhaustedError

BURST_SECONDS = 2.0
MIN_RATE_RPS = 1 / BURST_SECONDS
MAX_RATE_RPS = 1_000_000.0


@dataclass(slots=True)
class TokenBucket:
    rate: float  # tokens a second
    tokens: float
    stamp: float

    def take(self, now: float) -> float:
        """Take a token: 0 when one was there, else the seconds until one will be."""
        capacity = self.rate * BURST_SECONDS
        self.tokens = min(capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class RateLimits:
    """The buckets of one process, the least recently used forgotten beyond `capacity`."""

    def __init__(
        self,
        *,
        key_rps: float,
        anonymous_rps: float,
        capacity: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._key_rps = key_rps
        self._anonymous_rps = anonymous_rps
        self._capacity = capacity
        self._clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def _take(self, name: str, rate: float, now: float) -> float:
        bucket = self._buckets.get(name)
        if bucket is None or bucket.rate != rate:
            bucket = self._buckets[name] = TokenBucket(rate, rate * BURST_SECONDS, now)
            if len(self._buckets) > self._capacity:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(name)
        return bucket.take(now)

    def admit(self, *, caller: str, caller_rps: float, model: str, model_rps: float) -> None:
        """Take a token for `caller` (a key name, or `anonymous/<address>`; rate 0: the default
        for its kind) and for `model` (rate 0: unlimited); refuse with RESOURCE_EXHAUSTED."""
        now = self._clock()
        anonymous = caller.startswith("anonymous/")
        rate = caller_rps or (self._anonymous_rps if anonymous else self._key_rps)
        wait = self._take(f"caller/{caller}", rate, now) if rate > 0 else 0.0
        if wait:
            who = "anonymous callers from your address" if anonymous else "this API key"
            raise _limited(f"{who} may make {rate:g} requests a second", wait)
        if model_rps > 0:
            wait = self._take(f"model/{model}", model_rps, now)
            if wait:
                raise _limited(f"model '{model}' takes {model_rps:g} requests a second", wait)


def _limited(what: str, wait_s: float) -> ResourceExhaustedError:
    return ResourceExhaustedError(
        f"rate limit: {what}; retry in {wait_s:.2f} s",
        reason="RATE_LIMITED",
        metadata={"retry_after_s": f"{wait_s:.3f}"},
    )


def retry_after_header(wait_s: float) -> str:
    """`Retry-After` takes whole seconds."""
    return str(max(1, math.ceil(wait_s)))


def check_rate(rate: float, field: str) -> None:
    """A rate limit is 0 (none of its own) or a number of requests a second from MIN_RATE_RPS
    (a bucket holding two seconds' worth must hold a whole request) to MAX_RATE_RPS."""
    if not (rate == 0 or MIN_RATE_RPS <= rate <= MAX_RATE_RPS):
        raise InvalidArgumentError(
            f"{field} must be 0 (no limit of its own) or {MIN_RATE_RPS:g} to {MAX_RATE_RPS:g} "
            "requests a second",
            metadata={"field": field},
        )
