"""Assembles and runs the inference router process."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc
from opentelemetry import metrics

from shard.auth.v1 import key_service_pb2, key_service_pb2_grpc
from shard.inference.v1 import endpoint_service_pb2_grpc
from shard.node.v1 import node_service_pb2, node_service_pb2_grpc
from shard_core import tls
from shard_core.auth import AUTHORIZATION
from shard_core.grpc.server import GrpcServer
from shard_core.pki import Workload, spiffe_id
from shard_core.tls import TlsIdentity
from shard_edge.edge import GRPC_DOOR, EdgePorts, edge_of, private_directory
from shard_edge.view import ShardView, ViewChanges
from shard_inference.backends import SERVICE, NodeChannel
from shard_inference.cache import MemoryCache
from shard_inference.callers import Proxies
from shard_inference.endpoints import EndpointWatch, Issuer
from shard_inference.repository import Repository
from shard_inference.servicer import InferenceRouter
from shard_inference.settings import InferenceSettings
from shard_inference.verification import Outcome, Verifier

_log = logging.getLogger(__name__)

# Health of the router's view of the shard: NOT_SERVING while it serves from a stale copy.
VIEW_HEALTH = "shard.inference.v1.EndpointView"
ENDPOINT_SERVICE = "shard.inference.v1.EndpointService"
ROUTER_SOCKET = "router.sock"


async def serve(settings: InferenceSettings) -> None:
    server_stops: list[Callable[[], Awaitable[None]]] = []
    changes = ViewChanges()
    identity = TlsIdentity(settings.tls_dir) if settings.tls_dir else None
    view: ShardView[NodeChannel] = ShardView(
        settings,
        backend_factory=NodeChannel.opener(identity, settings.trust_domain),
        on_backend_removed=NodeChannel.close_later,
        on_change=changes.notify,
        identity=identity,
    )
    view.start()
    server_stops.append(view.stop)
    table, split = view.table, view.split
    meter = metrics.get_meter("shard.inference")
    failed_attempts = meter.create_counter(
        "shard_router_failed_attempts",
        description="Requests a node could not be reached for (each retried elsewhere if the "
        "retry budget allowed), by node Triton address.",
    )
    responses = MemoryCache(settings.response_cache_bytes)
    lookups = meter.create_counter(
        "shard_router_cache_lookups",
        description="Response cache lookups of cacheable model versions, by result (hit, miss).",
    )
    _gauges(meter, view, responses)
    # The admin token, or a watcher's key, rides on each call.
    registry = tls.peer_channel(
        settings.registry_address,
        mesh_address=settings.registry_mesh_address,
        identity=identity,
        expect=Workload(trust_domain=settings.trust_domain, kind="service", name="registry"),
    )
    watch = EndpointWatch(
        table, split, changes, view.guard, _issuer(registry, settings.upstream_timeout_s)
    )
    verifier = _verifier(settings, registry, view, meter)
    server_stops.append(verifier.stop)
    router = InferenceRouter(
        table,
        split=split,
        max_attempts=settings.max_attempts,
        ready=lambda: view.synced,
        repository=Repository(registry),
        guard=view.guard,
        cacheable=view.cacheable,
        responses=responses,
        verifier=verifier,
        on_cache=lambda hit: lookups.add(1, {"result": "hit" if hit else "miss"}),
        # The gateway names its clients: trusted at its addresses, or by its certificate.
        proxies=Proxies(
            addresses=settings.trusted_proxies,
            workload=spiffe_id(settings.trust_domain, "service", "gateway") if identity else "",
        ),
        on_failure=lambda address: failed_attempts.add(1, {"address": address}),
        upstream_timeout_s=settings.upstream_timeout_s,
        stream_timeout_s=settings.stream_timeout_s,
    )

    # The router serves its edge only, on a Unix socket in a directory only this user may open.
    directory = private_directory(settings.edge_dir)
    edge = edge_of(
        view,
        settings,
        door=GRPC_DOOR,
        ports=EdgePorts(
            plaintext=settings.address or None,
            tls=settings.tls_address if identity else None,
            mesh=settings.mesh_address if identity else None,
        ),
        trust_domain=settings.trust_domain,
        tls_dir=settings.tls_dir,
        directory=directory,
        temporary=settings.edge_dir is None,
        service_socket=directory / ROUTER_SOCKET,
        meter=meter,
    )
    ads = edge.ads

    def register(server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers((router.handler(),))
        endpoint_service_pb2_grpc.add_EndpointServiceServicer_to_server(watch, server)
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(ads, server)

    socket = directory / ROUTER_SOCKET
    socket.unlink(missing_ok=True)
    # No interceptors on the data plane: every request pays for them, and the router answers
    # with Triton's own status codes rather than the management APIs' error details.
    server = GrpcServer(
        address=f"unix:{socket}",
        services=[SERVICE, ENDPOINT_SERVICE],
        register=register,
        interceptors=(),
    )
    for stop in server_stops:
        server.on_shutdown(stop)
    # The edge's configuration streams never end on their own: end them, and the edge keeps
    # serving while the calls in flight finish.
    server.on_stopping(ads.close)

    async def close_registry() -> None:
        await registry.close(None)

    server.on_shutdown(close_registry)
    await server.start()
    server.on_shutdown(await edge.run(changes))

    async def report_view() -> None:
        # The router keeps serving from its last known view while etcd is away; it says so
        # here (and in the shard_router_view_stale gauge), not by refusing traffic.
        while True:
            await server.set_component(VIEW_HEALTH, serving=not view.stale)
            await asyncio.sleep(0.5)

    reporting = asyncio.ensure_future(report_view())

    async def stop_reporting() -> None:
        reporting.cancel()
        await asyncio.gather(reporting, return_exceptions=True)

    server.on_shutdown(stop_reporting)
    _log.info(
        "inference router serving through its edge on %s",
        ", ".join(f"{address} ({kind})" for kind, address in edge.addresses().items()),
    )
    await server.serve_until_signalled()


def _verifier(
    settings: InferenceSettings,
    registry: grpc.aio.Channel,
    view: ShardView[NodeChannel],
    meter: metrics.Meter,
) -> Verifier:
    """Re-runs a share of answers on other replicas; a node caught lying is reported."""
    verifications = meter.create_counter(
        "shard_router_verifications",
        description="Answers checked by running their request again on other replicas, by "
        "outcome (agreed, caught, undecided, unchecked, skipped).",
    )

    async def report(node: str, reason: str) -> None:
        """Have the registry quarantine a node (`nodes/{id}`) caught giving a wrong answer."""
        if settings.admin_token is None:
            _log.error("cannot report %s (no admin token): %s", node, reason)
            return
        token = settings.admin_token.get_secret_value()
        await node_service_pb2_grpc.NodeServiceStub(registry).QuarantineNode(
            node_service_pb2.QuarantineNodeRequest(name=node, reason=reason),
            metadata=((AUTHORIZATION, f"Bearer {token}"),),
            timeout=30,
        )

    def counted(outcome: Outcome) -> None:
        verifications.add(1, {"outcome": outcome.value})

    return Verifier(
        view.table,
        fraction=view.guard.access.verify_fraction,
        report=report,
        timeout_s=settings.upstream_timeout_s,
        on_outcome=counted,
    )


def _gauges(meter: metrics.Meter, view: ShardView[NodeChannel], responses: MemoryCache) -> None:
    meter.create_observable_gauge(
        "shard_router_routes",
        callbacks=[lambda _: [metrics.Observation(view.table.route_count())]],
        description="Ready model endpoints the router can send requests to.",
    )
    meter.create_observable_gauge(
        "shard_router_view_stale",
        callbacks=[lambda _: [metrics.Observation(int(view.stale))]],
        description="1 while the router serves from its last known view because etcd is away.",
    )
    meter.create_observable_gauge(
        "shard_router_cache_bytes",
        callbacks=[lambda _: [metrics.Observation(responses.bytes)]],
        description="Bytes of answers the response cache holds.",
    )


def _issuer(registry: grpc.aio.Channel, timeout_s: float) -> Issuer:
    """Client certificates from the registry, asked for with the watcher's own key."""
    keys = key_service_pb2_grpc.KeyServiceStub(registry)

    async def issue(
        request: bytes, models: Sequence[str], authorization: str
    ) -> key_service_pb2.ClientCertificate:
        answer = await keys.IssueClientCertificate(
            key_service_pb2.IssueClientCertificateRequest(
                certificate_request=request, models=models
            ),
            metadata=((AUTHORIZATION, authorization),),
            timeout=timeout_s,
        )
        return answer.certificate

    return issue
