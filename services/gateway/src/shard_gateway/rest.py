"""The gateway's HTTP routes: KServe v2 (health, metadata, config, inference) and, from
`management`, the REST face of every management API.

Errors take KServe's JSON form, `{"error": ...}`, with `code` and `reason` beside it and the HTTP
status of the gRPC code.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

import grpc
from aiohttp import web

from shard_core.errors import ShardError, error_info, http_status
from shard_core.limits import retry_after_header
from shard_gateway import management
from shard_gateway.callers import upstream_metadata
from shard_gateway.kserve import HEADER_LENGTH, parse_infer_request, render_infer_response
from shard_gateway.service import Shard

SHARD_KEY = web.AppKey("shard", Shard)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(
    message: str, code: grpc.StatusCode, reason: str | None, metadata: Mapping[str, str]
) -> web.Response:
    body = {"error": message, "code": code.name}
    headers = {}
    if reason is not None:
        body["reason"] = reason
    if "retry_after_s" in metadata:
        headers["Retry-After"] = retry_after_header(float(metadata["retry_after_s"]))
    return web.json_response(body, status=http_status(code), headers=headers)


@web.middleware
async def grpc_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Upstream gRPC failures, and our own refusals, become KServe's JSON error form with the
    matching HTTP status (and `Retry-After` for a rate limit)."""
    try:
        return await handler(request)
    except grpc.aio.AioRpcError as error:
        info = error_info(error)
        return _error(
            error.details() or error.code().name,
            error.code(),
            None if info is None else info.reason,
            {} if info is None else info.metadata,
        )
    except ShardError as error:
        return _error(error.message, error.code, error.reason, error.metadata)


async def live(request: web.Request) -> web.Response:
    return web.json_response({"live": True})


async def ready(request: web.Request) -> web.Response:
    is_ready = await request.app[SHARD_KEY].server_ready()
    return web.json_response({"ready": is_ready}, status=200 if is_ready else 503)


async def server_metadata(request: web.Request) -> web.Response:
    return web.json_response(await request.app[SHARD_KEY].server_metadata())


def _model(request: web.Request) -> tuple[str, str]:
    return request.match_info["model"], request.match_info.get("version", "")


async def model_ready(request: web.Request) -> web.Response:
    name, version = _model(request)
    is_ready = await request.app[SHARD_KEY].model_ready(name, version, upstream_metadata(request))
    return web.json_response(
        {"name": name, "version": version, "ready": is_ready}, status=200 if is_ready else 400
    )


async def model_metadata(request: web.Request) -> web.Response:
    name, version = _model(request)
    metadata = await request.app[SHARD_KEY].model_metadata(
        name, version, upstream_metadata(request)
    )
    return web.json_response(metadata)


async def model_config(request: web.Request) -> web.Response:
    name, version = _model(request)
    config = await request.app[SHARD_KEY].model_config(name, version, upstream_metadata(request))
    return web.json_response(config)


async def infer(request: web.Request) -> web.Response:
    """KServe v2 inference, JSON or with Triton's binary tensor data extension, as the gateway's
    edge leaves it (a malformed request, a cacheable version, a caller the router must judge):
    read here, so a malformed request is refused naming the field, then sent to the router. (The
    edge sends everything else straight to the nodes.)"""
    name, version = _model(request)
    body = await request.read()
    header_length = request.headers.get(HEADER_LENGTH)
    parsed = parse_infer_request(body, header_length, name, version)
    answer = await request.app[SHARD_KEY].infer(parsed.request, upstream_metadata(request))
    answer_body, answer_header_length = render_infer_response(answer, parsed)
    headers = {} if answer_header_length is None else {HEADER_LENGTH: str(answer_header_length)}
    content_type = (
        "application/json" if answer_header_length is None else "application/octet-stream"
    )
    return web.Response(body=answer_body, headers=headers, content_type=content_type)


def make_app(
    shard: Shard,
    *,
    max_body_bytes: int = 64 << 20,
    timeout_s: float = 10.0,
) -> web.Application:
    app = web.Application(middlewares=[grpc_errors], client_max_size=max_body_bytes)
    app[SHARD_KEY] = shard
    app.router.add_get("/v2/health/live", live)
    app.router.add_get("/v2/health/ready", ready)
    app.router.add_get("/v2", server_metadata)
    app.router.add_get("/v2/models/{model}/ready", model_ready)
    app.router.add_get("/v2/models/{model}/versions/{version}/ready", model_ready)
    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        app.router.add_get(prefix, model_metadata)
        app.router.add_get(f"{prefix}/config", model_config)
        app.router.add_post(f"{prefix}/infer", infer)
    management.add_routes(app, shard.registry_channel, timeout_s=timeout_s)
    return app
