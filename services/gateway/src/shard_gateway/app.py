"""Assembles and runs the gateway process."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web
from opentelemetry import metrics

from shard_client.routing import http_address
from shard_core.tls import TlsIdentity, require_loopback
from shard_edge.view import ShardView
from shard_gateway.direct import DirectInference, NodeHttp
from shard_gateway.rest import make_app
from shard_gateway.service import Shard
from shard_gateway.settings import GatewaySettings

_log = logging.getLogger(__name__)


async def serve(settings: GatewaySettings) -> None:
    identity = TlsIdentity(settings.tls_dir) if settings.tls_dir else None
    shard = Shard(
        router=(settings.router_address, settings.router_mesh_address),
        registry=(settings.registry_address, settings.registry_mesh_address),
        identity=identity,
        trust_domain=settings.trust_domain,
        timeout_s=settings.upstream_timeout_s,
    )
    view: ShardView[NodeHttp] = ShardView(
        settings,
        backend_factory=NodeHttp.opener(identity, settings.trust_domain),
        on_backend_removed=NodeHttp.close_later,
        address_of=http_address,
        identity=identity,
    )
    view.start()
    failed_attempts = metrics.get_meter("shard.gateway").create_counter(
        "shard_gateway_failed_attempts",
        description="REST requests a node's Triton could not be reached for (each retried "
        "elsewhere if the retry budget allowed), by node Triton HTTP address.",
    )
    direct = DirectInference(
        view,
        max_attempts=settings.max_attempts,
        timeout_s=settings.upstream_timeout_s,
        on_failure=lambda address: failed_attempts.add(1, {"address": address}),
    )
    app = make_app(
        shard,
        direct,
        max_body_bytes=settings.max_body_bytes,
        timeout_s=settings.upstream_timeout_s,
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    if settings.port is not None:
        require_loopback(f"{settings.host}:{settings.port}", what="a plaintext listener")
        await web.TCPSite(runner, settings.host, settings.port).start()
        _log.info("gateway serving HTTP on %s:%d", settings.host, settings.port)
    if settings.tls_dir is not None:
        assert identity is not None
        context = identity.ssl_context()
        await web.TCPSite(runner, settings.tls_host, settings.tls_port, ssl_context=context).start()
        _log.info("gateway serving HTTPS on %s:%d", settings.tls_host, settings.tls_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    _log.info("shutting down")
    await runner.cleanup()
    await view.stop()
    await shard.close()
