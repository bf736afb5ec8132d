"""`inference.GRPCInferenceService` over the whole shard: the mesh looks like one Triton.

Requests stay serialized bytes end to end. The router reads only the model name and version
(see `wire`), picks a node, and forwards the bytes over a persistent channel; Triton's answer,
or its error status, goes back to the client unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from importlib.metadata import version
from typing import Any

import grpc
from grpc.aio import ServicerContext
from tritonclient.grpc import service_pb2

from shard_inference.backends import SERVICE, NodeChannel
from shard_inference.routing import EndpointTable, TrafficSplit, pick_order
from shard_inference.wire import MalformedRequestError, model_route, with_version

_log = logging.getLogger(__name__)

ROUTER_VERSION = version("shard-inference")
SERVER_NAME = "ai-shard"
EXTENSIONS = ["model_configuration", "parameters"]
# Methods answered by a node's Triton: the request names a model in fields 1 and 2.
FORWARDED = ("ModelInfer", "ModelMetadata", "ModelConfig")

_Context = ServicerContext[bytes, bytes]


def _serialized(message: Any) -> bytes:
    data: bytes = message.SerializeToString()
    return data


def _unknown_model(name: str, model_version: str) -> str:
    if model_version:
        return f"Request for unknown model: '{name}' version {model_version} is not found"
    return f"Request for unknown model: '{name}' is not found"


class InferenceRouter:
    """Answers server-level questions itself and forwards model requests to ready nodes."""

    def __init__(
        self,
        table: EndpointTable[NodeChannel],
        *,
        split: TrafficSplit,
        max_attempts: int,
        ready: Callable[[], bool],
    ) -> None:
        self._table = table
        self._split = split
        self._max_attempts = max_attempts
        self._ready = ready

    def handler(self) -> grpc.GenericRpcHandler[bytes, bytes]:
        handlers: dict[str, Callable[[bytes, _Context], Awaitable[bytes]]] = {
            "ServerLive": self._server_live,
            "ServerReady": self._server_ready,
            "ServerMetadata": self._server_metadata,
            "ModelReady": self._model_ready,
        }
        for name in FORWARDED:
            handlers[name] = self._forwarder(name)
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                name: grpc.unary_unary_rpc_method_handler(behaviour)
                for name, behaviour in handlers.items()
            },
        )

    async def _server_live(self, request: bytes, context: _Context) -> bytes:
        return _serialized(service_pb2.ServerLiveResponse(live=True))

    async def _server_ready(self, request: bytes, context: _Context) -> bytes:
        return _serialized(service_pb2.ServerReadyResponse(ready=self._ready()))

    async def _server_metadata(self, request: bytes, context: _Context) -> bytes:
        return _serialized(
            service_pb2.ServerMetadataResponse(
                name=SERVER_NAME, version=ROUTER_VERSION, extensions=EXTENSIONS
            )
        )

    async def _model_ready(self, request: bytes, context: _Context) -> bytes:
        name, model_version = await self._route_fields(request, context)
        ready = bool(self._table.candidates(name, model_version))
        return _serialized(service_pb2.ModelReadyResponse(ready=ready))

    async def _route_fields(self, request: bytes, context: _Context) -> tuple[str, str]:
        try:
            name, model_version = model_route(request)
        except MalformedRequestError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {error}")
        if not name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a model name is required")
        return name, model_version

    def _forwarder(self, method: str) -> Callable[[bytes, _Context], Awaitable[bytes]]:
        async def forward(request: bytes, context: _Context) -> bytes:  # noqa: RET503
            name, model_version = await self._route_fields(request, context)
            if not model_version:
                # Follow the deployment's traffic split, and tell the node which version won.
                model_version = self._table.choose_version(name, self._split.weights(name))
                if model_version:
                    request = with_version(request, model_version)
            routes = pick_order(self._table.candidates(name, model_version), self._max_attempts)
            if not routes:
                await context.abort(grpc.StatusCode.NOT_FOUND, _unknown_model(name, model_version))
            last_error: grpc.aio.AioRpcError | None = None
            for route in routes:
                backend = route.backend
                backend.in_flight += 1
                try:
                    response: bytes = await backend.method(method)(
                        request, timeout=context.time_remaining()
                    )
                    return response
                except grpc.aio.AioRpcError as error:
                    if error.code() != grpc.StatusCode.UNAVAILABLE:
                        await context.abort(error.code(), error.details() or "")
                    _log.warning("%s unavailable for %s: %s", route.node, name, error.details())
                    last_error = error
                finally:
                    backend.in_flight -= 1
            assert last_error is not None
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"no replica of model '{name}' could be reached: {last_error.details()}",
            )

        return forward
