"""The etcd wrapper against real etcd: leases, paging, and a mirror that outlives an outage."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path

import pytest

from shard_core.etcd.lease import LeaseExpiredError, LeaseKeeper
from shard_core.etcd.mirror import PrefixMirror
from shard_core.etcd.server import EtcdServer
from shard_core.etcd.store import EtcdStore
from shard_core.net import free_port
from shard_core.settings import EtcdSettings


class Recorder:
    """A mirror listener that keeps what it is told."""

    def __init__(self) -> None:
        self.state: dict[str, bytes] = {}
        self.resets = 0

    def reset(self, entries: Mapping[str, bytes]) -> None:
        self.state = dict(entries)
        self.resets += 1

    def put(self, key: str, value: bytes) -> None:
        self.state[key] = value

    def delete(self, key: str) -> None:
        self.state.pop(key, None)


async def _eventually(condition: object, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not callable(condition) or not condition():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail("condition not met in time")
        await asyncio.sleep(0.05)


async def test_page_walks_a_prefix_in_bounded_reads(store: EtcdStore) -> None:
    for index in range(7):
        await store.put(f"items/{index:02d}", str(index).encode())
    await store.put("other/x", b"not an item")

    seen, after = [], ""
    while True:
        entries, more = await store.page("items/", start_after=after, limit=3)
        assert len(entries) <= 3
        seen += [entry.value for entry in entries]
        if not more:
            break
        after = entries[-1].key
    assert seen == [str(index).encode() for index in range(7)]


async def test_write_is_all_or_nothing_and_bound_to_the_lease(store: EtcdStore) -> None:
    lease = await store.grant_lease(2)
    await store.put("gone/soon", b"x")
    await store.write(puts={"a": b"1", "b": b"2"}, deletes=["gone/soon"], lease=lease)
    a, b = await store.get("a"), await store.get("b")
    assert a is not None
    assert b is not None
    assert a.lease == b.lease == lease
    assert await store.get("gone/soon") is None

    await store.revoke_lease(lease)
    assert await store.get("a") is None
    assert await store.get("b") is None


async def test_lease_keeper_holds_leases_past_their_ttl_until_it_stops(store: EtcdStore) -> None:
    keeper = LeaseKeeper(store)
    keeper.start()
    try:
        held, dropped = await store.grant_lease(2), await store.grant_lease(2)
        await store.put("held", b"1", lease=held)
        await store.put("dropped", b"1", lease=dropped)
        for _ in range(8):  # 4 s: twice the TTL
            assert await keeper.refresh(held, timeout=2) == 2
            await asyncio.sleep(0.5)
        assert await store.get("held") is not None
        assert await store.get("dropped") is None
        with pytest.raises(LeaseExpiredError):
            await keeper.refresh(dropped, timeout=2)
    finally:
        await keeper.stop()


async def test_mirror_reads_then_follows_every_change(store: EtcdStore) -> None:
    await store.put("view/a", b"1")
    recorder = Recorder()
    mirror = PrefixMirror(store, "view/", recorder)
    mirror.start()
    try:
        await mirror.wait_synced(10)
        assert recorder.state == {"view/a": b"1"}
        await store.put("view/b", b"2")
        await store.put("view/a", b"3")
        await store.delete("view/b")
        await store.put("elsewhere", b"ignored")
        await _eventually(lambda: recorder.state == {"view/a": b"3"})
        assert not mirror.stale
    finally:
        await mirror.stop()


async def test_mirror_keeps_last_known_state_while_etcd_is_down_then_resyncs(
    tmp_path: Path,
) -> None:
    client_port, peer_port = free_port(), free_port()
    server = EtcdServer(data_dir=tmp_path, client_port=client_port, peer_port=peer_port)
    await server.start()
    settings = EtcdSettings(etcd_port=client_port, etcd_timeout_s=1)
    writer, watcher = EtcdStore(settings), EtcdStore(settings)
    recorder = Recorder()
    mirror = PrefixMirror(watcher, "view/", recorder, max_backoff_s=0.2)
    try:
        await writer.put("view/kept", b"1")
        await writer.put("view/removed", b"2")
        mirror.start()
        await mirror.wait_synced(10)

        server.stop()
        await _eventually(lambda: mirror.stale)
        assert recorder.state == {"view/kept": b"1", "view/removed": b"2"}

        server = EtcdServer(data_dir=tmp_path, client_port=client_port, peer_port=peer_port)
        await server.start()
        await writer.reconnect()
        await writer.delete("view/removed")
        await writer.put("view/added", b"3")

        await _eventually(lambda: recorder.state == {"view/kept": b"1", "view/added": b"3"})
        await _eventually(lambda: not mirror.stale)
        assert recorder.resets >= 2
    finally:
        await mirror.stop()
        await writer.close()
        await watcher.close()
        server.stop()
