"""The response cache: answers of cacheable model versions, served again to identical requests.

A model version opts in with `response_cache_ttl_seconds`. The key is a SHA-256 over the model,
the version the request was routed to, the request's bytes without its id (so identical tensors,
parameters and outputs asked for, whatever the id), and, for private models, the caller: an
answer bought with one key is never served to another. The router caches, not the gateway: only
the router knows which version a request that names none was routed to, and it serves gRPC and
REST callers alike. A caller that sends `cache-control: no-cache` (the gateway passes the HTTP
header on) gets a fresh answer, which then replaces the cached one.

`ResponseCache` is the interface; `MemoryCache` keeps entries in this process, bounded in bytes
and least recently used first out. A shared store (Redis, memcached) can implement the same two
async methods when several routers should share hits.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

NO_CACHE = "no-cache"


def cache_key(model: str, version: str, request: bytes, caller: str) -> bytes:
    digest = hashlib.sha256()
    for part in (model.encode(), version.encode(), caller.encode()):
        digest.update(len(part).to_bytes(4, "little"))
        digest.update(part)
    digest.update(request)
    return digest.digest()


class ResponseCache(Protocol):
    async def get(self, key: bytes) -> bytes | None: ...

    async def put(self, key: bytes, value: bytes, ttl_s: float) -> None: ...


class MemoryCache:
    """In-process entries, expiring after their TTL, the least recently used dropped first once
    they hold more than `max_bytes`."""

    def __init__(self, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._clock = clock
        self._entries: OrderedDict[bytes, tuple[float, bytes]] = OrderedDict()

    async def get(self, key: bytes) -> bytes | None:
        found = self._entries.get(key)
        if found is None:
            return None
        expires, value = found
        if self._clock() >= expires:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return value

    async def put(self, key: bytes, value: bytes, ttl_s: float) -> None:
        if len(value) > self.max_bytes:
            return
        self._drop(key)
        self._entries[key] = (self._clock() + ttl_s, value)
        self.bytes += len(value)
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: bytes) -> None:
        found = self._entries.pop(key, None)
        if found is not None:
            self.bytes -= len(found[1])
