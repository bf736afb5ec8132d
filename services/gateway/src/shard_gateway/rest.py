"""The gateway's HTTP routes: KServe v2 health and metadata, and the node list.

This is the first slice of ModelRPC; KServe v2 inference over REST, the management API derived
from the protos' HTTP annotations, and authentication come next (see docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc
from aiohttp import web

from shard_core.auth import AUTHORIZATION
from shard_core.errors import error_info, http_status
from shard_gateway import management
from shard_gateway.service import Shard

SHARD_KEY = web.AppKey("shard", Shard)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def grpc_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Upstream gRPC failures become KServe's JSON error form with the matching HTTP status."""
    try:
        return await handler(request)
    except grpc.aio.AioRpcError as error:
        info = error_info(error)
        body = {"error": error.details() or error.code().name, "code": error.code().name}
        if info is not None:
            body["reason"] = info.reason
        return web.json_response(body, status=http_status(error.code()))


def _credentials(request: web.Request) -> list[tuple[str, str]]:
    """The caller's `Authorization` header, passed on as gRPC metadata: the service that
    answers decides what the caller may do."""
    header = request.headers.get("Authorization", "")
    return [(AUTHORIZATION, header)] if header else []


async def live(request: web.Request) -> web.Response:
    return web.json_response({"live": True})


async def ready(request: web.Request) -> web.Response:
    is_ready = await request.app[SHARD_KEY].server_ready()
    return web.json_response({"ready": is_ready}, status=200 if is_ready else 503)


async def server_metadata(request: web.Request) -> web.Response:
    return web.json_response(await request.app[SHARD_KEY].server_metadata())


async def model_ready(request: web.Request) -> web.Response:
    name, version = request.match_info["model"], request.match_info.get("version", "")
    is_ready = await request.app[SHARD_KEY].model_ready(name, version)
    return web.json_response(
        {"name": name, "version": version, "ready": is_ready}, status=200 if is_ready else 400
    )


def make_app(shard: Shard) -> web.Application:
    app = web.Application(middlewares=[grpc_errors])
    app[SHARD_KEY] = shard
    app.router.add_get("/v2/health/live", live)
    app.router.add_get("/v2/health/ready", ready)
    app.router.add_get("/v2", server_metadata)
    app.router.add_get("/v2/models/{model}/ready", model_ready)
    app.router.add_get("/v2/models/{model}/versions/{version}/ready", model_ready)
    management.add_routes(app, shard.registry_channel)
    return app
