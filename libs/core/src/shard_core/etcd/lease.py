"""Refreshing many etcd leases over one LeaseKeepAlive stream.

etcd's LeaseKeepAlive is a bidirectional stream that can carry any number of leases, so one
registry replica can hold thousands of node leases with one stream instead of one call per
heartbeat.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import AsyncIterator

from aetcd import rpc

from shard_core.errors import FailedPreconditionError
from shard_core.etcd.store import EtcdStore, StoreUnavailableError

_log = logging.getLogger(__name__)


class LeaseExpiredError(FailedPreconditionError):
    reason = "LEASE_EXPIRED"


class LeaseKeeper:
    """Refreshes leases on demand over one shared, self-healing keepalive stream."""

    def __init__(self, store: EtcdStore) -> None:
        self._store = store
        # One queue per stream: a broken stream's request iterator ends with it (None), so no
        # leftover iterator can swallow the lease ids meant for the next stream.
        self._requests: asyncio.Queue[int | None] = asyncio.Queue()
        self._waiters: defaultdict[int, list[asyncio.Future[int]]] = defaultdict(list)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="lease keepalive")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._fail_all(StoreUnavailableError("the lease keeper stopped"))

    async def refresh(self, lease_id: int, *, timeout: float) -> int:
        """Refresh one lease; return its new TTL in seconds, or raise if it has expired."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters[lease_id].append(future)
        self._requests.put_nowait(lease_id)
        try:
            ttl = await asyncio.wait_for(future, timeout)
        except TimeoutError as error:
            raise StoreUnavailableError(f"lease {lease_id:x} not refreshed in time") from error
        if ttl <= 0:
            raise LeaseExpiredError(f"lease {lease_id:x} has expired")
        return ttl

    @staticmethod
    async def _requests_stream(
        queue: asyncio.Queue[int | None],
    ) -> AsyncIterator[rpc.LeaseKeepAliveRequest]:
        while (lease_id := await queue.get()) is not None:
            yield rpc.LeaseKeepAliveRequest(ID=lease_id)

    async def _run(self) -> None:
        while True:
            try:
                await self._store.connect()
                stream = self._store.client.leasestub.LeaseKeepAlive(
                    self._requests_stream(self._requests), metadata=self._store.client.metadata
                )
                async for reply in stream:
                    for future in self._waiters.pop(reply.ID, ()):
                        if not future.done():
                            future.set_result(reply.TTL)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                _log.warning("lease keepalive stream broke: %s", error)
                broken, self._requests = self._requests, asyncio.Queue()
                broken.put_nowait(None)
                self._fail_all(StoreUnavailableError(f"lease keepalive failed: {error}"))
                await asyncio.sleep(0.2)

    def _fail_all(self, error: Exception) -> None:
        waiters, self._waiters = self._waiters, defaultdict(list)
        for futures in waiters.values():
            for future in futures:
                if not future.done():
                    future.set_exception(error)
