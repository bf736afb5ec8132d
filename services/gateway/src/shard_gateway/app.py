"""Assembles and runs the gateway process."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from shard_gateway.rest import make_app
from shard_gateway.service import Shard
from shard_gateway.settings import GatewaySettings

_log = logging.getLogger(__name__)


async def serve(settings: GatewaySettings) -> None:
    shard = Shard(
        router_address=settings.router_address,
        registry_address=settings.registry_address,
        timeout_s=settings.upstream_timeout_s,
    )
    app = make_app(
        shard, max_body_bytes=settings.max_body_bytes, timeout_s=settings.upstream_timeout_s
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    _log.info("gateway serving HTTP on %s:%d", settings.host, settings.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    _log.info("shutting down")
    await runner.cleanup()
    await shard.close()
