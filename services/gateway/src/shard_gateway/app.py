"""Assembles and runs the gateway process: its edge (an Envoy on the gateway's ports, which
sends REST inference straight to the nodes) and, behind it on a private Unix socket, the Python
gateway, which serves everything else."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from aiohttp import web
from envoy.service.discovery.v3 import ads_pb2_grpc
from opentelemetry import metrics

from shard_client.routing import http_address
from shard_core.tls import TlsIdentity, require_loopback
from shard_edge.edge import REST_DOOR, EdgePorts, NodeAddress, edge_of, private_directory
from shard_edge.view import ShardView, ViewChanges
from shard_gateway.rest import make_app
from shard_gateway.service import Shard
from shard_gateway.settings import GatewaySettings

_log = logging.getLogger(__name__)

GATEWAY_SOCKET = "gateway.sock"
XDS_SOCKET = "xds.sock"


async def serve(settings: GatewaySettings) -> None:
    identity = TlsIdentity(settings.tls_dir) if settings.tls_dir else None
    shard = Shard(
        router=(settings.router_address, settings.router_mesh_address),
        registry=(settings.registry_address, settings.registry_mesh_address),
        identity=identity,
        trust_domain=settings.trust_domain,
        timeout_s=settings.upstream_timeout_s,
    )
    changes = ViewChanges()
    # Where the nodes' gates take HTTP: the edge's endpoints (the edge makes the connections).
    view: ShardView[NodeAddress] = ShardView(
        settings,
        backend_factory=NodeAddress.of,
        address_of=http_address,
        on_change=changes.notify,
        identity=identity,
    )
    view.start()
    meter = metrics.get_meter("shard.gateway")
    app = make_app(
        shard,
        max_body_bytes=settings.max_body_bytes,
        timeout_s=settings.upstream_timeout_s,
    )
    plaintext = f"{settings.host}:{settings.port}" if settings.port is not None else None
    if plaintext:
        require_loopback(plaintext, what="a plaintext listener")
    # The gateway serves its edge only, on a Unix socket in a directory only this user may open;
    # the edge's configuration comes from an ADS server on another.
    directory = private_directory(settings.edge_dir)
    socket, xds_socket = directory / GATEWAY_SOCKET, directory / XDS_SOCKET
    edge = edge_of(
        view,
        settings,
        door=REST_DOOR,
        ports=EdgePorts(
            plaintext=plaintext,
            tls=f"{settings.tls_host}:{settings.tls_port}" if identity else None,
            mesh=None,
        ),
        trust_domain=settings.trust_domain,
        tls_dir=settings.tls_dir,
        directory=directory,
        temporary=settings.edge_dir is None,
        service_socket=socket,
        xds_socket=xds_socket,
        meter=meter,
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    socket.unlink(missing_ok=True)
    await web.UnixSite(runner, str(socket)).start()
    ads = grpc.aio.server()
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(edge.ads, ads)
    xds_socket.unlink(missing_ok=True)
    ads.add_insecure_port(f"unix:{xds_socket}")
    await ads.start()
    stop_edge = await edge.run(changes)
    for kind, address in edge.addresses().items():
        _log.info("gateway serving REST (%s) on %s", kind, address)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    _log.info("shutting down")
    # The configuration stream ends first: Envoy serves the calls in flight, then stops.
    edge.ads.close()
    await ads.stop(grace=1.0)
    await stop_edge()
    await runner.cleanup()
    await view.stop()
    await shard.close()
