"""Leader election through etcd: one leader at a time, and a quick successor."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from shard_core.etcd.election import Election
from shard_core.etcd.lease import LeaseKeeper
from shard_core.etcd.store import EtcdStore


async def test_one_leader_and_a_successor_when_it_goes(store: EtcdStore) -> None:
    keeper = LeaseKeeper(store)
    keeper.start()
    leading: list[str] = []
    revisions: dict[str, int] = {}

    def candidate(name: str) -> Election:
        return Election(store=store, keeper=keeper, role="test", candidate=name, ttl_s=2)

    def work(name: str) -> Callable[[int], Awaitable[None]]:
        async def lead(revision: int) -> None:
            leading.append(name)
            revisions[name] = revision
            await asyncio.Event().wait()

        return lead

    first, second = candidate("a"), candidate("b")
    running_a = asyncio.ensure_future(first.lead(work("a")))
    await asyncio.sleep(0.5)
    running_b = asyncio.ensure_future(second.lead(work("b")))
    try:
        await asyncio.sleep(1.5)
        assert leading == ["a"]
        assert first.leading
        assert not second.leading
        # The leader's writes can be made conditional on still leading.
        assert await store.write(puts={"x": b"1"}, expect={first.key: revisions["a"]})

        running_a.cancel()  # the leader goes away; it resigns on the way out
        await asyncio.gather(running_a, return_exceptions=True)
        for _ in range(50):
            if second.leading:
                break
            await asyncio.sleep(0.1)
        assert leading == ["a", "b"]
        # The old leader's condition no longer holds: a stale plan cannot be written.
        assert await store.write(puts={"x": b"2"}, expect={first.key: revisions["a"]}) is None
    finally:
        running_b.cancel()
        await asyncio.gather(running_b, return_exceptions=True)
        await keeper.stop()
