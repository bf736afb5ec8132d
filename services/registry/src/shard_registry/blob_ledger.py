"""Who stored which blobs, how many bytes each principal holds, and what is collected when
nothing refers to it any more.

The blob store is shared and content-addressed, so what grows without bound is what strangers
put in it. Every upload is charged to its principal: a holder record `blob-holders/{sha}/{who}`
(size, time) and a running total `blob-usage/{who}`. An upload declares its size first; it is
refused outright over `max_blob_bytes`, and over the principal's quota, counting the bytes its
uploads in flight have reserved (`reserve` before the first byte, `hold` or `release` after),
so concurrent uploads cannot pass the quota together. Admins have no quota.

Garbage collection: a blob no model version's files and no task (its input or results) refer
to, and that nobody stored within the grace period, is deleted; its holders are refunded. So are
the temporary objects of uploads a crash left behind. A blob whose only reference went (a
deleted version, a task past its retention) goes one grace period later.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from shard.model.v1 import model_pb2
from shard.task.v1 import task_pb2
from shard_core import keys
from shard_core.auth import Principal
from shard_core.errors import InvalidArgumentError, ResourceExhaustedError
from shard_core.etcd import paging
from shard_core.etcd.store import Entry, EtcdStore
from shard_registry.artifacts import BlobStore

_log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class BlobLimits:
    max_blob_bytes: int = 32 << 30
    quota_bytes: int = 256 << 30
    gc_grace_s: float = 24 * 3600


def _sha_of(name: str) -> str:
    return name.removeprefix("blobs/")


class BlobLedger:
    def __init__(
        self,
        *,
        store: EtcdStore,
        blobs: BlobStore,
        limits: BlobLimits | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._blobs = blobs
        self.limits = limits or BlobLimits()
        self._clock = clock

    def check_size(self, size: int) -> None:
        if size < 0:
            raise InvalidArgumentError(
                "header.size_bytes must not be negative", metadata={"field": "header.size_bytes"}
            )
        if size > self.limits.max_blob_bytes:
            raise InvalidArgumentError(
                f"header.size_bytes {size} is above the largest blob the shard stores "
                f"({self.limits.max_blob_bytes})",
                reason="BLOB_TOO_LARGE",
                metadata={"field": "header.size_bytes"},
            )

    async def usage(self, principal: str) -> int:
        found = await self._store.get(keys.blob_usage(principal))
        return int(json.loads(found.value)["bytes"]) if found else 0

    async def _add(self, principal: str, delta: int, *, limit: int | None = None) -> None:
        """Add `delta` bytes to the principal's usage by compare-and-swap; refuse going over
        `limit`."""
        key = keys.blob_usage(principal)
        while True:
            found = await self._store.get(key)
            used = int(json.loads(found.value)["bytes"]) if found else 0
            if limit is not None and used + delta > limit:
                raise ResourceExhaustedError(
                    f"{principal} stores {used} bytes of blobs (uploads in flight included); "
                    f"{delta} more would pass its quota of {limit}",
                    reason="QUOTA_EXCEEDED",
                    metadata={"field": "header.size_bytes"},
                )
            value = json.dumps({"bytes": max(used + delta, 0)}).encode()
            expect = {key: found.mod_revision if found else 0}
            if await self._store.write(puts={key: value}, expect=expect) is not None:
                return

    async def reserve(self, who: Principal, sha: str, size: int) -> bool:
        """Charge an upload's declared size before its first byte, within the quota; False
        (nothing charged) when `who` holds that blob already."""
        if await self._store.get(keys.blob_holder(sha, who.id)) is not None:
            return False
        if not who.admin:
            await self._add(who.id, size, limit=self.limits.quota_bytes)
        return True

    async def release(self, who: Principal, size: int) -> None:
        """Give back a reservation whose upload failed or stored nothing new for `who`."""
        if not who.admin:
            await self._add(who.id, -size)

    async def hold(self, who: Principal, sha: str, size: int) -> bool:
        """Record that `who` stored blob `sha`; False (and nothing written) if it held it
        already. Admins' blobs are recorded too, so that collection sees them."""
        record = json.dumps({"size": size, "time": self._clock()}).encode()
        key = keys.blob_holder(sha, who.id)
        return await self._store.write(puts={key: record}, expect={key: 0}) is not None

    async def _referenced(self) -> set[str]:
        """Every blob a model version or a task refers to."""
        found: set[str] = set()
        async for entry in paging.every(self._store, keys.VERSIONS):
            found.update(f.sha256 for f in model_pb2.ModelVersion.FromString(entry.value).files)
        async for entry in paging.every(self._store, keys.TASKS):
            task = task_pb2.Task.FromString(entry.value)
            found.add(_sha_of(task.input))
            if task.result.output:
                found.add(_sha_of(task.result.output))
        return found

    async def collect(self) -> int:
        """Delete the blobs nothing refers to that nobody stored within the grace period, and
        the leftovers of abandoned uploads. Returns how many blobs went."""
        cutoff = self._clock() - self.limits.gc_grace_s
        referenced = await self._referenced()
        holders: defaultdict[str, list[Entry]] = defaultdict(list)
        async for entry in paging.every(self._store, keys.BLOB_HOLDERS):
            holders[entry.key.removeprefix(keys.BLOB_HOLDERS).split("/", 1)[0]].append(entry)
        collected = 0
        for sha, entries in holders.items():
            records = [json.loads(entry.value) for entry in entries]
            if sha in referenced or any(record["time"] >= cutoff for record in records):
                continue
            expect = {entry.key: entry.mod_revision for entry in entries}
            if await self._store.write(deletes=list(expect), expect=expect) is None:
                continue  # someone stored it again meanwhile
            remaining, _ = await self._store.page(
                f"{keys.BLOB_HOLDERS}{sha}/", start_after="", limit=1
            )
            if not remaining:  # nobody stored it again after the holders were read
                await self._blobs.delete(sha)
                collected += 1
            for entry, record in zip(entries, records, strict=True):
                principal = entry.key.rsplit("/", 1)[1].replace(":", "/")
                await self._add(principal, -int(record["size"]))
        abandoned = await self._blobs.forget_abandoned_uploads(cutoff)
        if collected or abandoned:
            _log.info("collected %d blobs and %d abandoned uploads", collected, abandoned)
        return collected
