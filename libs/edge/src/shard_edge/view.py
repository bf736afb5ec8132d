"""What a data plane follows in etcd: the router's and the gateway's view of the shard.

Ready endpoints (by node address, gRPC for the router, HTTP for the gateway), the deployments'
traffic splits, the API keys and models that decide who may infer on what, and the versions whose
answers may be cached. Each prefix has its own mirror and etcd client, so each reconnects on its
own; while etcd is away every mirror keeps its last copy and the view says it is stale.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Generic

from shard.model.v1 import model_pb2
from shard.node.v1 import node_pb2
from shard_client.routing import B, EndpointTable, TrafficSplit, grpc_address
from shard_core import keys
from shard_core.auth import InferenceGuard, KeyRing, ModelAccess, token_hash
from shard_core.etcd.mirror import MirrorListener, PrefixMirror
from shard_core.etcd.store import EtcdStore
from shard_core.limits import RateLimits
from shard_core.tls import TlsIdentity
from shard_edge.settings import DataPlaneSettings

_log = logging.getLogger(__name__)

# How often the view looks for a renewed certificate (renewal comes hours before expiry).
RENEWAL_CHECK_S = 10.0


class ViewChanges:
    """Wakes every watcher when the view changes: each waits on the event current when it took
    its snapshot."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def notify(self) -> None:
        self.event.set()
        self.event = asyncio.Event()


class CacheableVersions:
    """Which model versions may be cached, and for how long: mirrored from `versions/`."""

    def __init__(self) -> None:
        self._ttl: dict[str, float] = {}  # etcd key -> seconds
        self._by_version: dict[tuple[str, str], float] = {}

    def reset(self, entries: Mapping[str, bytes]) -> None:
        self._ttl.clear()
        self._by_version.clear()
        for key, value in entries.items():
            self.put(key, value)

    def put(self, key: str, value: bytes) -> None:
        version = model_pb2.ModelVersion.FromString(value)
        if version.response_cache_ttl_seconds > 0:
            self._ttl[key] = version.response_cache_ttl_seconds
            _, model, _, number = version.name.split("/")
            self._by_version[(model, number)] = version.response_cache_ttl_seconds

    def delete(self, key: str) -> None:
        if self._ttl.pop(key, None) is not None:
            parts = key.rstrip("/").split("/")
            self._by_version.pop((parts[-2], str(int(parts[-1]))), None)

    def ttl(self, model: str, version: str) -> float:
        """Seconds an answer of the version may be reused; 0: not cacheable."""
        return self._by_version.get((model, version), 0.0)


class _Notifying:
    """A mirror's listener that also says when anything changed."""

    def __init__(self, listener: MirrorListener, on_change: Callable[[], None]) -> None:
        self._listener = listener
        self._on_change = on_change

    def reset(self, entries: Mapping[str, bytes]) -> None:
        self._listener.reset(entries)
        self._on_change()

    def put(self, key: str, value: bytes) -> None:
        self._listener.put(key, value)
        self._on_change()

    def delete(self, key: str) -> None:
        self._listener.delete(key)
        self._on_change()


class ShardView(Generic[B]):
    def __init__(
        self,
        settings: DataPlaneSettings,
        *,
        backend_factory: Callable[[str, str], B],
        on_backend_removed: Callable[[B], None] = lambda _: None,
        address_of: Callable[[node_pb2.ModelEndpoint], str] = grpc_address,
        on_change: Callable[[], None] = lambda: None,
        identity: TlsIdentity | None = None,
    ) -> None:
        """With `identity` (the certificate backends present to nodes), backends are opened
        again once it is renewed, so no reconnect presents an expired one."""
        self._identity = identity
        self._renewals: asyncio.Task[None] | None = None
        self.table: EndpointTable[B] = EndpointTable(
            backend_factory=backend_factory,
            on_backend_removed=on_backend_removed,
            on_change=on_change,
            address_of=address_of,
        )
        self.split = TrafficSplit(on_change=on_change)
        admin = settings.admin_token
        ring = KeyRing(admin_token_sha256=token_hash(admin.get_secret_value()) if admin else "")
        access = ModelAccess()
        self.cacheable = CacheableVersions()
        limits = RateLimits(
            key_rps=settings.key_rate_limit_rps, anonymous_rps=settings.anonymous_rate_limit_rps
        )
        self.guard = InferenceGuard(ring, access, limits)
        followed: dict[str, MirrorListener] = {
            keys.ENDPOINTS: self.table,
            keys.DEPLOYMENTS: self.split,
            keys.API_KEYS: _Notifying(ring, on_change),
            keys.MODELS: _Notifying(access, on_change),
            keys.VERSIONS: _Notifying(self.cacheable, on_change),
        }
        self._stores = [EtcdStore(settings) for _ in followed]
        self._mirrors = [
            PrefixMirror(store, prefix, listener)
            for store, (prefix, listener) in zip(self._stores, followed.items(), strict=True)
        ]
        self._routing = self._mirrors[:2]

    @property
    def synced(self) -> bool:
        """Whether the endpoints and traffic splits have been read once."""
        return all(mirror.synced for mirror in self._routing)

    @property
    def stale(self) -> bool:
        """Whether etcd is away and the routing view may be behind it."""
        return any(mirror.stale for mirror in self._routing)

    def start(self) -> None:
        for mirror in self._mirrors:
            mirror.start()
        if self._identity is not None:
            self._renewals = asyncio.ensure_future(self._follow_renewals(self._identity))

    async def _follow_renewals(self, identity: TlsIdentity) -> None:
        held = identity.material()
        while True:
            await asyncio.sleep(RENEWAL_CHECK_S)
            if (current := identity.material()) is not held:
                held = current
                _log.info("certificate renewed: reconnecting to the nodes with it")
                self.table.reopen()

    async def stop(self) -> None:
        if self._renewals is not None:
            self._renewals.cancel()
        for mirror in self._mirrors:
            await mirror.stop()
        for store in self._stores:
            await store.close()
