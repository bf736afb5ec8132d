"""Triton's per-model statistics, summed over every node that serves the model: to a client the
shard reports what one very large Triton would."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from tritonclient.grpc import service_pb2


def _add_durations(target: Any, source: Any) -> None:
    """Add every `StatisticDuration` (count, ns) field of `source` into `target`."""
    for field, value in source.ListFields():
        if field.message_type is not None and field.message_type.name == "StatisticDuration":
            duration = getattr(target, field.name)
            duration.count += value.count
            duration.ns += value.ns


def _add(target: Any, source: Any) -> None:
    target.last_inference = max(target.last_inference, source.last_inference)
    target.inference_count += source.inference_count
    target.execution_count += source.execution_count
    _add_durations(target.inference_stats, source.inference_stats)
    batches = {batch.batch_size: batch for batch in target.batch_stats}
    for batch in source.batch_stats:
        if batch.batch_size not in batches:
            batches[batch.batch_size] = target.batch_stats.add(batch_size=batch.batch_size)
        _add_durations(batches[batch.batch_size], batch)
    for key, response in source.response_stats.items():
        _add_durations(target.response_stats[key], response)


def summed(replies: Iterable[Any]) -> Any:
    """One `ModelStatisticsResponse` adding up the replicas' answers, model by model."""
    total = service_pb2.ModelStatisticsResponse()
    by_model: dict[tuple[str, str], Any] = {}
    for reply in replies:
        for stats in reply.model_stats:
            key = (stats.name, stats.version)
            if key not in by_model:
                by_model[key] = total.model_stats.add(name=stats.name, version=stats.version)
            _add(by_model[key], stats)
    ordered = sorted(total.model_stats, key=lambda s: (s.name, s.version))
    result = service_pb2.ModelStatisticsResponse()
    result.model_stats.extend(ordered)
    return result


class NodeStatistics:
    """Each node's statistics with at most one question in flight per node and request:
    callers that ask while one is out share its answer, so however many ask at once (a flood
    of nameless statistics calls), a node answers one at a time."""

    def __init__(self) -> None:
        self._in_flight: dict[tuple[str, bytes], asyncio.Future[Any]] = {}

    async def get(self, address: str, request: bytes, fetch: Callable[[], Awaitable[bytes]]) -> Any:
        """The node's `ModelStatisticsResponse` to `request`."""
        key = (address, request)
        future = self._in_flight.get(key)
        if future is None:
            future = self._in_flight[key] = asyncio.ensure_future(self._fetch(fetch))
            future.add_done_callback(lambda _: self._in_flight.pop(key, None))
        return await asyncio.shield(future)

    @staticmethod
    async def _fetch(fetch: Callable[[], Awaitable[bytes]]) -> Any:
        return service_pb2.ModelStatisticsResponse.FromString(await fetch())
