"""Node statistics: callers asking at once share one question to the node."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from tritonclient.grpc import service_pb2

from shard_inference.statistics import NodeStatistics


async def test_concurrent_callers_share_one_question_per_node() -> None:
    statistics = NodeStatistics()
    asked: list[str] = []
    answer = asyncio.Event()

    def fetcher(address: str) -> Callable[[], Awaitable[bytes]]:
        async def fetch() -> bytes:
            asked.append(address)
            await answer.wait()
            reply = service_pb2.ModelStatisticsResponse()
            reply.model_stats.add(name=address, inference_count=1)
            return bytes(reply.SerializeToString())

        return fetch

    calls = [
        asyncio.ensure_future(statistics.get(address, b"", fetcher(address)))
        for address in ["a", "b"] * 50
    ]
    await asyncio.sleep(0)
    answer.set()
    replies = await asyncio.gather(*calls)
    assert sorted(asked) == ["a", "b"]
    assert {reply.model_stats[0].name for reply in replies} == {"a", "b"}
    # Once answered, the next caller asks again: nothing stale is kept.
    await statistics.get("a", b"", fetcher("a"))
    assert sorted(asked) == ["a", "a", "b"]
