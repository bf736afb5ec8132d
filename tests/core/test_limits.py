"""Token buckets per caller and per model."""

from __future__ import annotations

import pytest

from shard_core.errors import InvalidArgumentError, ResourceExhaustedError
from shard_core.limits import RateLimits, check_rate, retry_after_header


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _admitted(limits: RateLimits, count: int, **call: object) -> int:
    admitted = 0
    for _ in range(count):
        try:
            limits.admit(**call)  # type: ignore[arg-type]
            admitted += 1
        except ResourceExhaustedError:
            pass
    return admitted


def test_a_key_gets_a_burst_of_two_seconds_then_its_rate() -> None:
    clock = Clock()
    limits = RateLimits(key_rps=5, anonymous_rps=1, clock=clock)
    call = {"caller": "keys/a", "caller_rps": 0.0, "model": "m", "model_rps": 0.0}
    assert _admitted(limits, 20, **call) == 10
    with pytest.raises(ResourceExhaustedError) as raised:
        limits.admit(**call)  # type: ignore[arg-type]
    assert raised.value.reason == "RATE_LIMITED"
    assert float(raised.value.metadata["retry_after_s"]) == pytest.approx(0.2)
    clock.now += 1
    assert _admitted(limits, 20, **call) == 5
    # Another key has its own bucket, and a key's own rate beats the default.
    assert _admitted(limits, 20, **{**call, "caller": "keys/b", "caller_rps": 2.0}) == 4


def test_anonymous_callers_share_a_bucket_per_address() -> None:
    limits = RateLimits(key_rps=100, anonymous_rps=1, clock=Clock())
    call = {"caller": "anonymous/10.0.0.1", "caller_rps": 0.0, "model": "m", "model_rps": 0.0}
    assert _admitted(limits, 5, **call) == 2
    assert _admitted(limits, 5, **{**call, "caller": "anonymous/10.0.0.2"}) == 2


def test_a_model_limit_holds_for_everyone_together() -> None:
    limits = RateLimits(key_rps=100, anonymous_rps=100, clock=Clock())
    admitted = sum(
        _admitted(limits, 1, caller=f"keys/{n}", caller_rps=0.0, model="m", model_rps=3.0)
        for n in range(20)
    )
    assert admitted == 6


def test_zero_means_no_limit_and_the_bucket_table_is_bounded() -> None:
    limits = RateLimits(key_rps=0, anonymous_rps=0, capacity=3, clock=Clock())
    call = {"caller": "keys/a", "caller_rps": 0.0, "model": "m", "model_rps": 0.0}
    assert _admitted(limits, 1000, **call) == 1000
    bounded = RateLimits(key_rps=1, anonymous_rps=1, capacity=3, clock=Clock())
    for n in range(10):
        bounded.admit(caller=f"keys/{n}", caller_rps=0.0, model="m", model_rps=0.0)
    assert len(bounded._buckets) == 3


def test_rates_must_be_finite_and_not_negative() -> None:
    for good in (0, 0.5, 2.5, 1e6):
        check_rate(good, "f")
    # Below 0.5 a second, a bucket of two seconds' worth never holds a request.
    for bad in (-1.0, 0.1, 1e7, float("inf"), float("nan")):
        with pytest.raises(InvalidArgumentError):
            check_rate(bad, "api_key.rate_limit_rps")
    assert retry_after_header(0.01) == "1"
    assert retry_after_header(2.2) == "3"
