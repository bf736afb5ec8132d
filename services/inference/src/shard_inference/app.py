"""Assembles and runs the inference router process."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import grpc
from opentelemetry import metrics

from shard.inference.v1 import endpoint_service_pb2_grpc
from shard_client.routing import EndpointTable, TrafficSplit
from shard_core import keys
from shard_core.auth import InferenceGuard, KeyRing, ModelAccess, token_hash
from shard_core.etcd.mirror import PrefixMirror
from shard_core.etcd.store import EtcdStore
from shard_core.grpc.server import GrpcServer
from shard_core.limits import RateLimits
from shard_inference.backends import SERVICE, NodeChannel
from shard_inference.cache import CacheableVersions, MemoryCache
from shard_inference.endpoints import EndpointWatch, ViewChanges
from shard_inference.repository import Repository
from shard_inference.servicer import InferenceRouter
from shard_inference.settings import InferenceSettings

_log = logging.getLogger(__name__)

# Health of the router's view of the shard: NOT_SERVING while it serves from a stale copy.
VIEW_HEALTH = "shard.inference.v1.EndpointView"
ENDPOINT_SERVICE = "shard.inference.v1.EndpointService"


def _guard(
    settings: InferenceSettings,
) -> tuple[InferenceGuard, CacheableVersions, list[PrefixMirror]]:
    """Who may infer on what, within which limits, and which versions may be cached: each
    followed in etcd by its own mirror (started by the caller)."""
    admin = settings.admin_token
    ring = KeyRing(admin_token_sha256=token_hash(admin.get_secret_value()) if admin else "")
    access = ModelAccess()
    cacheable = CacheableVersions()
    mirrors = [
        PrefixMirror(EtcdStore(settings), keys.API_KEYS, ring),
        PrefixMirror(EtcdStore(settings), keys.MODELS, access),
        PrefixMirror(EtcdStore(settings), keys.VERSIONS, cacheable),
    ]
    limits = RateLimits(
        key_rps=settings.key_rate_limit_rps, anonymous_rps=settings.anonymous_rate_limit_rps
    )
    return InferenceGuard(ring, access, limits), cacheable, mirrors


async def serve(settings: InferenceSettings) -> None:
    store = EtcdStore(settings)
    server_stops: list[Callable[[], Awaitable[None]]] = []
    changes = ViewChanges()
    table: EndpointTable[NodeChannel] = EndpointTable(
        backend_factory=NodeChannel.open,
        on_backend_removed=NodeChannel.close_later,
        on_change=changes.notify,
    )
    mirror = PrefixMirror(store, keys.ENDPOINTS, table)
    mirror.start()
    split = TrafficSplit(on_change=changes.notify)
    # Each mirror reconnects its own client on failure, so each gets one of its own.
    deployments = PrefixMirror(EtcdStore(settings), keys.DEPLOYMENTS, split)
    deployments.start()
    meter = metrics.get_meter("shard.inference")
    meter.create_observable_gauge(
        "shard_router_routes",
        callbacks=[lambda _: [metrics.Observation(table.route_count())]],
        description="Ready model endpoints the router can send requests to.",
    )
    meter.create_observable_gauge(
        "shard_router_view_stale",
        callbacks=[lambda _: [metrics.Observation(int(mirror.stale))]],
        description="1 while the router serves from its last known view because etcd is away.",
    )
    failed_attempts = meter.create_counter(
        "shard_router_failed_attempts",
        description="Requests a node could not be reached for (each retried elsewhere if the "
        "retry budget allowed), by node Triton address.",
    )
    guard, cacheable, guard_mirrors = _guard(settings)
    for guard_mirror in guard_mirrors:
        guard_mirror.start()
        server_stops.append(guard_mirror.stop)
    responses = MemoryCache(settings.response_cache_bytes)
    lookups = meter.create_counter(
        "shard_router_cache_lookups",
        description="Response cache lookups of cacheable model versions, by result (hit, miss).",
    )
    meter.create_observable_gauge(
        "shard_router_cache_bytes",
        callbacks=[lambda _: [metrics.Observation(responses.bytes)]],
        description="Bytes of answers the response cache holds.",
    )
    watch = EndpointWatch(table, split, changes, guard)
    registry = grpc.aio.insecure_channel(settings.registry_address)
    router = InferenceRouter(
        table,
        split=split,
        max_attempts=settings.max_attempts,
        ready=lambda: mirror.synced and deployments.synced,
        repository=Repository(registry),
        guard=guard,
        cacheable=cacheable,
        responses=responses,
        on_cache=lambda hit: lookups.add(1, {"result": "hit" if hit else "miss"}),
        trusted_proxies=settings.trusted_proxies,
        on_failure=lambda address: failed_attempts.add(1, {"address": address}),
    )

    def register(server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers((router.handler(),))
        endpoint_service_pb2_grpc.add_EndpointServiceServicer_to_server(watch, server)

    # No interceptors on the data plane: every request pays for them, and the router answers
    # with Triton's own status codes rather than the management APIs' error details.
    server = GrpcServer(
        address=settings.address,
        services=[SERVICE, ENDPOINT_SERVICE],
        register=register,
        interceptors=(),
    )
    server.on_shutdown(mirror.stop)
    for stop in server_stops:
        server.on_shutdown(stop)
    server.on_shutdown(deployments.stop)
    server.on_shutdown(store.close)

    async def close_registry() -> None:
        await registry.close(None)

    server.on_shutdown(close_registry)
    await server.start()

    async def report_view() -> None:
        # The router keeps serving from its last known view while etcd is away; it says so
        # here (and in the shard_router_view_stale gauge), not by refusing traffic.
        while True:
            fresh = not (mirror.stale or deployments.stale)
            await server.set_component(VIEW_HEALTH, serving=fresh)
            await asyncio.sleep(0.5)

    reporting = asyncio.ensure_future(report_view())

    async def stop_reporting() -> None:
        reporting.cancel()
        await asyncio.gather(reporting, return_exceptions=True)

    server.on_shutdown(stop_reporting)
    _log.info("inference router serving on port %d", server.port)
    await server.serve_until_signalled()
