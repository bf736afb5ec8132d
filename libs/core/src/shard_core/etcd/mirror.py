"""A local, always-current copy of every key under an etcd prefix.

The mirror reads the prefix, then watches it from the next revision, so no change between the
read and the watch is lost. When the connection breaks it keeps the last known-good copy, says so
(`stale`), reconnects with backoff and resyncs from a fresh read: consumers see a `reset` with the
full new state, never a gap.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Protocol

from shard_core.etcd.store import EtcdStore

_log = logging.getLogger(__name__)


class MirrorListener(Protocol):
    """What a consumer of a mirror implements; calls arrive on the event loop, in order."""

    def reset(self, entries: Mapping[str, bytes]) -> None: ...

    def put(self, key: str, value: bytes) -> None: ...

    def delete(self, key: str) -> None: ...


class PrefixMirror:
    """Keeps `listener` equal to the keys under `prefix`, across reconnects."""

    def __init__(
        self,
        store: EtcdStore,
        prefix: str,
        listener: MirrorListener,
        *,
        max_backoff_s: float = 2.0,
    ) -> None:
        self._store = store
        self._prefix = prefix
        self._listener = listener
        self._max_backoff_s = max_backoff_s
        self._synced = asyncio.Event()
        self._connected = False
        self._last_sync = 0.0
        self._task: asyncio.Task[None] | None = None

    @property
    def synced(self) -> bool:
        """True once the first full read has been delivered."""
        return self._synced.is_set()

    @property
    def stale(self) -> bool:
        """True while the watch is down and the copy may be behind etcd."""
        return not self._connected

    @property
    def last_sync_time(self) -> float:
        """Wall-clock time of the last full read."""
        return self._last_sync

    async def wait_synced(self, timeout: float) -> None:
        await asyncio.wait_for(self._synced.wait(), timeout)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"mirror {self._prefix}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            try:
                await self._sync_and_watch()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                if self._connected:
                    _log.warning(
                        "watch of %s lost (%s); serving last known state", self._prefix, error
                    )
                self._connected = False
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff_s)
            try:
                await self._store.reconnect()
            except Exception as error:
                _log.debug("etcd reconnect failed: %s", error)
                continue
            backoff = 0.05

    async def _sync_and_watch(self) -> None:
        snapshot = await self._store.snapshot(self._prefix)
        watch = await self._store.watch(self._prefix, start_revision=snapshot.revision + 1)
        self._listener.reset({entry.key: entry.value for entry in snapshot.entries})
        self._connected = True
        self._last_sync = time.time()
        self._synced.set()
        _log.info(
            "synced %d keys under %s at revision %d",
            len(snapshot.entries),
            self._prefix,
            snapshot.revision,
        )
        async for event in watch:
            key = self._store.relative(event.kv.key)
            if event.kind == "PUT":
                self._listener.put(key, event.kv.value)
            else:
                self._listener.delete(key)
        raise ConnectionError("watch ended")
