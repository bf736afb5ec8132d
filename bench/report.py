"""What the benchmarks share: one run's measurements, and the table they print."""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Result:
    requests: int
    seconds: float
    latencies_ms: list[float]
    hop_cpu_s: float  # CPU the shard's own processes spent

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        return statistics.quantiles(self.latencies_ms, n=100)[int(q) - 1]


def print_header(cpu_label: str) -> None:
    print(
        f"{'target':<12} {'conc':>4} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'x base':>9} {'+p50 ms':>8} {cpu_label:>17}"
    )


def print_rows(concurrency: int, results: Mapping[str, Result], *, baseline: str) -> None:
    """One row per target: throughput, latency, the ratio and added p50 against `baseline`, and
    the shard's CPU per request (none for the baseline, which bypasses the shard)."""
    base = results[baseline]
    for name, result in results.items():
        ratio = result.throughput / base.throughput
        added = result.percentile(50) - base.percentile(50)
        cpu_us = 0 if name == baseline else result.hop_cpu_s / result.requests * 1e6
        print(
            f"{name:<12} {concurrency:>4} {result.throughput:>9.0f} "
            f"{result.percentile(50):>8.2f} {result.percentile(99):>8.2f} "
            f"{ratio:>9.2f} {added:>8.2f} {cpu_us:>17.0f}"
        )
