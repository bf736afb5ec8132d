"""What the benchmarks share: one run's measurements, the CPU of the shard's processes, and the
table they print."""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass

import psutil

# The shard's processes a benchmark charges CPU to, by the column they are reported in.
Watched = Mapping[str, psutil.Process]


def cpu_seconds(watched: Watched) -> dict[str, float]:
    """User and system CPU time of each watched process so far."""
    return {name: sum(process.cpu_times()[:2]) for name, process in watched.items()}


@dataclass(frozen=True, kw_only=True)
class Result:
    requests: int
    seconds: float
    latencies_ms: list[float]
    cpu_s: Mapping[str, float]  # CPU each of the shard's own processes spent

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        return statistics.quantiles(self.latencies_ms, n=100)[int(q) - 1]


def measured(
    requests: int,
    seconds: float,
    latencies_ms: list[float],
    before: Mapping[str, float],
    watched: Watched,
) -> Result:
    after = cpu_seconds(watched)
    return Result(
        requests=requests,
        seconds=seconds,
        latencies_ms=latencies_ms,
        cpu_s={name: after[name] - before[name] for name in watched},
    )


def print_header(watched: Watched) -> None:
    """The table's header: a column of µs of CPU per request for each watched process."""
    columns = "".join(f" {name[:9]:>9}" for name in watched)
    print(
        f"{'target':<12} {'conc':>4} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'x base':>7} {'+p50 ms':>8}{columns}   (CPU µs/request)"
    )


def print_rows(concurrency: int, results: Mapping[str, Result], *, baseline: str) -> None:
    """One row per target: throughput, latency, the ratio and added p50 against `baseline`, and
    each of the shard's processes' CPU per request (what the row's path made them spend)."""
    base = results[baseline]
    for name, result in results.items():
        ratio = result.throughput / base.throughput
        added = result.percentile(50) - base.percentile(50)
        cpu = "".join(
            f" {seconds / result.requests * 1e6:>9.0f}" for seconds in result.cpu_s.values()
        )
        print(
            f"{name:<12} {concurrency:>4} {result.throughput:>9.0f} "
            f"{result.percentile(50):>8.2f} {result.percentile(99):>8.2f} "
            f"{ratio:>7.2f} {added:>8.2f}{cpu}"
        )
