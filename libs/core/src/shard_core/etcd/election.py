"""Leader election through etcd: one replica of a service does the work only one may do.

The leader holds `leader/{role}`, created only if absent and bound to its lease; the lease is
refreshed every third of its TTL. A leader that cannot refresh stops leading at once; when it dies,
the key expires with its lease and another replica takes over. The leader's key revision lets its
writes be conditional on still leading (`EtcdStore.write(expect=...)`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from shard_core import keys
from shard_core.etcd.lease import LeaseKeeper
from shard_core.etcd.store import EtcdStore

_log = logging.getLogger(__name__)


class Election:
    def __init__(
        self, *, store: EtcdStore, keeper: LeaseKeeper, role: str, candidate: str, ttl_s: int
    ) -> None:
        self._store = store
        self._keeper = keeper
        self.key = keys.leader(role)
        self._candidate = candidate
        self._ttl_s = ttl_s
        self._lease: int | None = None
        self.leading = False

    async def _campaign(self) -> int:
        """Wait until this candidate leads; return the revision of its leader key."""
        while True:
            try:
                lease = await self._store.grant_lease(self._ttl_s)
                revision = await self._store.write(
                    puts={self.key: self._candidate.encode()}, lease=lease, expect={self.key: 0}
                )
                if revision is not None:
                    self._lease = lease
                    return revision
                await self._store.revoke_lease(lease)
            except Exception as error:
                _log.warning("election for %s failed: %s", self.key, error)
            await asyncio.sleep(self._ttl_s / 3)

    async def _hold(self) -> None:
        assert self._lease is not None
        while True:
            await asyncio.sleep(self._ttl_s / 3)
            await self._keeper.refresh(self._lease, timeout=self._ttl_s / 3)

    async def lead(self, work: Callable[[int], Awaitable[None]]) -> None:
        """Forever: campaign, then run `work(leader_revision)` for as long as this leads."""
        while True:
            revision = await self._campaign()
            self.leading = True
            _log.info("%s leads %s", self._candidate, self.key)
            holding = asyncio.ensure_future(self._hold())
            working = asyncio.ensure_future(work(revision))
            try:
                await asyncio.wait({holding, working}, return_when=asyncio.FIRST_COMPLETED)
                for task in (holding, working):
                    if task.done() and not task.cancelled() and task.exception():
                        _log.warning("leadership of %s ended: %s", self.key, task.exception())
            finally:
                self.leading = False
                for task in (holding, working):
                    task.cancel()
                await asyncio.gather(holding, working, return_exceptions=True)
                await self.resign()

    async def resign(self) -> None:
        if self._lease is not None:
            lease, self._lease = self._lease, None
            with contextlib.suppress(Exception):
                await self._store.revoke_lease(lease)
