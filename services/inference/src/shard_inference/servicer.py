"""`inference.GRPCInferenceService` over the whole shard: the mesh looks like one Triton.

Requests stay serialized bytes end to end. The router reads only the model name and version
(see `wire`), picks a node, and forwards the bytes over a persistent channel; Triton's answer,
or its error status, goes back to the client unchanged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc.aio import ServicerContext
from tritonclient.grpc import service_pb2

from shard_client.routing import Balancer, EndpointTable, TrafficSplit, unknown_model
from shard_core.auth import CANARY_NODE, InferenceGuard
from shard_core.errors import NotFoundError, ShardError, UnavailableError
from shard_edge.view import CacheableVersions
from shard_inference.backends import SERVICE, NodeChannel
from shard_inference.cache import ResponseCache, cache_key
from shard_inference.callers import NO_PROXIES, Caller, Proxies, admit, deadline
from shard_inference.repository import Repository
from shard_inference.statistics import NodeStatistics, summed
from shard_inference.streams import StreamRouting
from shard_inference.verification import Verifier
from shard_inference.wire import (
    MalformedRequestError,
    model_route,
    sequence_id,
    with_id,
    with_version,
    without_id,
)

_log = logging.getLogger(__name__)

ROUTER_VERSION = version("shard-inference")
SERVER_NAME = "ai-shard"
EXTENSIONS = [
    "model_configuration",
    "model_repository",
    "parameters",
    "statistics",
    "logging",
    "trace",
]
SEQUENCE_ID = b"sequence_id"
SHARED_MEMORY = (
    "shared memory cannot cross the network: the shard's models run on other machines. "
    "Send tensors in the request (raw_input_contents) instead"
)
# How long a load waits for a ready replica when the client set no deadline.
LOAD_WAIT_S = 300.0
# Methods answered by a node's Triton: the request names a model in fields 1 and 2.
FORWARDED = ("ModelInfer", "ModelMetadata", "ModelConfig")
# Nodes asked for statistics at once by one call.
STATISTICS_PARALLEL = 16
# The share of a pinned call's time given to the node: the rest is for saying that the node,
# not the router, failed to answer.
PINNED_SHARE = 0.8

_Context = ServicerContext[bytes, bytes]


@dataclass(frozen=True, slots=True)
class CacheLookup:
    key: bytes
    ttl_s: float
    answer: bytes | None  # the cached answer, when there was one to serve


def _serialized(message: Any) -> bytes:
    data: bytes = message.SerializeToString()
    return data


class InferenceRouter:
    """Answers server-level questions itself and forwards model requests to ready nodes."""

    def __init__(
        self,
        table: EndpointTable[NodeChannel],
        *,
        split: TrafficSplit,
        max_attempts: int,
        ready: Callable[[], bool],
        repository: Repository,
        guard: InferenceGuard,
        cacheable: CacheableVersions,
        responses: ResponseCache,
        verifier: Verifier,
        on_cache: Callable[[bool], None] = lambda _: None,
        proxies: Proxies = NO_PROXIES,
        on_failure: Callable[[str], None] = lambda _: None,
        upstream_timeout_s: float = 120.0,
        stream_timeout_s: float = 3600.0,
    ) -> None:
        self._upstream_timeout_s = upstream_timeout_s
        self._stream_timeout_s = stream_timeout_s
        self._statistics = NodeStatistics()
        self._guard = guard
        self._cacheable = cacheable
        self._responses = responses
        self._verifier = verifier
        self._on_cache = on_cache  # called with True on a hit, False on a miss
        self._proxies = proxies
        self._table = table
        self._split = split
        self._balancer = Balancer(table, split, max_attempts=max_attempts, on_failure=on_failure)
        self._ready = ready
        self._repository = repository

    def handler(self) -> grpc.GenericRpcHandler[bytes, bytes]:
        handlers: dict[str, Callable[[bytes, _Context], Awaitable[bytes]]] = {
            "ServerLive": self._server_live,
            "ServerReady": self._server_ready,
            "ServerMetadata": self._server_metadata,
            "ModelReady": self._model_ready,
        }
        for name in FORWARDED:
            handlers[name] = self._forwarder(name)
        handlers |= {
            "ModelStatistics": self._model_statistics,
            "RepositoryIndex": self._repository_index,
            "RepositoryModelLoad": self._repository_load,
            "RepositoryModelUnload": self._repository_unload,
            "TraceSetting": self._settings_reader("TraceSetting"),
            "LogSettings": self._settings_reader("LogSettings"),
            "SystemSharedMemoryStatus": self._shared_memory_status,
            "CudaSharedMemoryStatus": self._shared_memory_status,
            "SystemSharedMemoryRegister": self._shared_memory_register,
            "CudaSharedMemoryRegister": self._shared_memory_register,
            "SystemSharedMemoryUnregister": self._shared_memory_unregister,
            "CudaSharedMemoryUnregister": self._shared_memory_unregister,
        }
        methods: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {
            name: grpc.unary_unary_rpc_method_handler(behaviour)
            for name, behaviour in handlers.items()
        }
        methods["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(self._stream_infer)
        return grpc.method_handlers_generic_handler(SERVICE, methods)

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
        name, model_version, _ = await self._route_fields(request, context)
        ready = bool(self._table.candidates(name, model_version))
        return _serialized(service_pb2.ModelReadyResponse(ready=ready))

    async def _model_statistics(self, request: bytes, context: _Context) -> bytes:
        """Every replica's statistics for the model (or for every model the caller may see),
        summed. Each call takes from the caller's rate limit like an inference; a node has at
        most one statistics question from this router in flight however many callers ask, and
        one call asks a few nodes at a time."""
        try:
            name, model_version = model_route(request)
        except MalformedRequestError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {error}")
        caller = await self._admit(context, name, limited=True)
        if name and not self._table.candidates(name, model_version):
            await context.abort(grpc.StatusCode.NOT_FOUND, unknown_model(name, model_version))
        routable = self._table.models()
        names = (
            [name]
            if name
            else [m for m in routable if self._guard.access.visible(caller.principal, m)]
        )
        backends = {
            route.backend.address: route.backend
            for model in names
            for version in ([model_version] if model_version else routable[model])
            for route in self._table.candidates(model, version)
        }
        # One canonical question per node, so callers cannot vary the bytes to dodge the cache.
        asked = _serialized(service_pb2.ModelStatisticsRequest(name=name, version=model_version))
        timeout = deadline(context, self._upstream_timeout_s)
        parallel = asyncio.Semaphore(STATISTICS_PARALLEL)

        async def ask(backend: NodeChannel) -> Any:
            async with parallel:
                call = backend.method("ModelStatistics")
                return await self._statistics.get(
                    backend.address, asked, lambda: call(asked, timeout=timeout)
                )

        replies = []
        for answer in await asyncio.gather(
            *(ask(b) for b in backends.values()), return_exceptions=True
        ):
            if isinstance(answer, grpc.aio.AioRpcError):
                _log.warning("statistics of a replica unavailable: %s", answer.details())
                continue
            if isinstance(answer, BaseException):
                raise answer
            reply = service_pb2.ModelStatisticsResponse()
            reply.model_stats.extend(s for s in answer.model_stats if s.name in names)
            replies.append(reply)
        return _serialized(summed(replies))

    async def _repository_index(self, request: bytes, context: _Context) -> bytes:
        """The shard's models: every deployed version, READY where a replica can serve it."""
        try:
            ready_only = service_pb2.RepositoryIndexRequest.FromString(request).ready
        except DecodeError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed request")
        principal = (await self._admit(context, "", limited=False)).principal
        routable = self._table.models()
        index = service_pb2.RepositoryIndexResponse()
        for name in sorted(set(routable) | set(self._split.models())):
            if not self._guard.access.visible(principal, name):
                continue
            versions = set(routable.get(name, ())) | set(self._split.weights(name))
            for number in sorted(versions, key=lambda v: (len(v), v)):
                ready = number in routable.get(name, ())
                if ready or not ready_only:
                    index.models.add(
                        name=name,
                        version=number,
                        state="READY" if ready else "UNAVAILABLE",
                        reason="" if ready else "no replica is ready",
                    )
        return _serialized(index)

    async def _repository_load(self, request: bytes, context: _Context) -> bytes:
        """Load deploys the model's newest version (unless it is deployed) and waits, within
        the client's deadline, until a replica is ready: Triton's load returns once it can
        serve. The caller's credentials go to the registry, which decides."""
        try:
            load = service_pb2.RepositoryModelLoadRequest.FromString(request)
        except DecodeError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed request")
        await self._repository.load(load, context)
        waited = 0.0
        while not self._table.candidates(load.model_name, ""):
            if waited > LOAD_WAIT_S:
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    f"model '{load.model_name}' is deployed but no replica became ready in "
                    f"{LOAD_WAIT_S:.0f} s: see `shard deploy explain {load.model_name}`",
                )
            await asyncio.sleep(0.1)  # the call's deadline, if it has one, may end this first
            waited += 0.1
        return b""

    async def _repository_unload(self, request: bytes, context: _Context) -> bytes:
        """Unload deletes the model's deployment (with the caller's credentials)."""
        try:
            unload = service_pb2.RepositoryModelUnloadRequest.FromString(request)
        except DecodeError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed request")
        await self._repository.unload(unload, self._split.deployment_of(unload.model_name), context)
        return b""

    async def _shared_memory_status(self, request: bytes, context: _Context) -> bytes:
        return b""  # truthfully empty: no region can be registered with a shard

    async def _shared_memory_register(self, request: bytes, context: _Context) -> bytes:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, SHARED_MEMORY)

    async def _shared_memory_unregister(self, request: bytes, context: _Context) -> bytes:
        return b""  # nothing is ever registered, so unregistering anything succeeds

    async def _route_fields(
        self, request: bytes, context: _Context, *, limited: bool = False
    ) -> tuple[str, str, Caller]:
        """The model a request names, once the caller may use it (and, for `limited` calls,
        once its rate limits and the model's have room)."""
        try:
            name, model_version = model_route(request)
        except MalformedRequestError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {error}")
        if not name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a model name is required")
        return name, model_version, await self._admit(context, name, limited=limited)

    async def _admit(self, context: _Context, name: str, *, limited: bool) -> Caller:
        """The caller, once it may use the model `name` (any caller, for no name) and, for a
        `limited` call, once its rate limit has room; otherwise the call is refused."""
        try:
            return admit(self._guard, self._proxies, context, name, limited=limited)
        except ShardError as error:
            await _abort(context, error)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _pinned(
        self, request: bytes, context: _Context, *, method: str, model: tuple[str, str], node: str
    ) -> bytes:
        """An admin's call for one node (the registry's canaries): no other replica, no
        retry, no cache, no check. A failure says whether the node or the router failed, so
        that only a node that keeps its lease and leaves canaries unanswered is judged."""
        route = next((r for r in self._table.candidates(*model) if r.node == node), None)
        if route is None:
            await _abort(
                context,
                NotFoundError(
                    f"node {node!r} serves no ready replica of {model[0]} v{model[1]}",
                    metadata={"field": CANARY_NODE},
                ),
            )
        assert route is not None
        backend = route.backend
        backend.in_flight += 1
        try:
            timeout = deadline(context, self._upstream_timeout_s) * PINNED_SHARE
            answer: bytes = await backend.method(method)(request, timeout=timeout)
            return answer
        except grpc.aio.AioRpcError as error:
            await _abort(
                context,
                UnavailableError(
                    f"node {node!r} did not answer: {error.code().name}: {error.details()}",
                    reason="NODE_UNANSWERED",
                    metadata={"node": node},
                ),
            )
        finally:
            backend.in_flight -= 1
        raise AssertionError("unreachable")  # pragma: no cover

    async def _sequence(self, method: str, request: bytes, context: _Context) -> str:
        """The Triton sequence id an inference request carries, if any."""
        if method != "ModelInfer" or SEQUENCE_ID not in request:
            return ""
        try:
            return sequence_id(request)
        except MalformedRequestError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed parameters: {error}")
        raise AssertionError("unreachable")  # pragma: no cover

    def _forwarder(self, method: str) -> Callable[[bytes, _Context], Awaitable[bytes]]:
        # Metadata and config calls cost a node as much as a small inference: limited alike.
        limited = True
        cached_method = method == "ModelInfer"

        async def forward(request: bytes, context: _Context) -> bytes:  # noqa: RET503
            name, model_version, caller = await self._route_fields(
                request, context, limited=limited
            )
            if caller.pinned_node:
                return await self._pinned(
                    request,
                    context,
                    method=method,
                    model=(name, model_version),
                    node=caller.pinned_node,
                )
            sequence = await self._sequence(method, request, context)
            plan = self._balancer.plan(name, model_version, sequence)
            if not plan.routes:
                await context.abort(grpc.StatusCode.NOT_FOUND, unknown_model(name, model_version))
            if plan.chosen:
                request = with_version(request, plan.version)  # tell the node which version won
            cached = None
            if cached_method and not sequence:
                cached = await self._cached(name, plan.version, request, caller)
                if cached is not None and cached.answer is not None:
                    return cached.answer
            last_error: grpc.aio.AioRpcError | None = None
            for route in self._balancer.attempts(plan):
                backend = route.backend
                backend.in_flight += 1
                try:
                    response: bytes = await backend.method(method)(
                        request, timeout=deadline(context, self._upstream_timeout_s)
                    )
                    self._balancer.ejection.succeeded(backend)
                    if cached is not None:
                        await self._responses.put(cached.key, response, cached.ttl_s)
                    if cached_method and not sequence:
                        self._verifier.sample(name, plan.version, request, response, route.node)
                    return response
                except grpc.aio.AioRpcError as error:
                    if error.code() != grpc.StatusCode.UNAVAILABLE:
                        await context.abort(error.code(), error.details() or "")
                    _log.warning("%s unavailable for %s: %s", route.node, name, error.details())
                    self._balancer.ejection.failed(backend)
                    last_error = error
                finally:
                    backend.in_flight -= 1
            assert last_error is not None
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"no replica of model '{name}' could be reached: {last_error.details()}",
            )

        return forward

    async def _cached(
        self, name: str, version: str, request: bytes, caller: Caller
    ) -> CacheLookup | None:
        """For a cacheable version: the cache key and, unless the caller wants a fresh answer,
        a cached answer (with this request's id)."""
        ttl_s = self._cacheable.ttl(name, version)
        if not ttl_s:
            return None
        shared, request_id = without_id(request)
        private = (
            "" if self._guard.access.public(name) else caller.principal.key or caller.principal.id
        )
        key = cache_key(name, version, shared, private)
        answer = None if caller.fresh else await self._responses.get(key)
        self._on_cache(answer is not None)
        return CacheLookup(
            key=key, ttl_s=ttl_s, answer=None if answer is None else with_id(answer, request_id)
        )

    async def _stream_infer(
        self, requests: AsyncIterator[bytes], context: _Context
    ) -> AsyncIterator[bytes]:
        """ModelStreamInfer: each request goes to a replica of its model over one upstream
        stream per node, and the answers come back on the client's stream as they arrive.
        Within one client stream, a model's requests stay on one replica (a sequence's on its
        pinned replica), so their answers keep their order."""
        stream = StreamRouting(
            self._balancer,
            context,
            lambda name: admit(self._guard, self._proxies, context, name, limited=True),
            timeout_s=self._stream_timeout_s,
        )
        try:
            async for response in stream.run(requests):
                yield response
        finally:
            stream.cancel()

    def _settings_reader(self, method: str) -> Callable[[bytes, _Context], Awaitable[bytes]]:
        async def read(request: bytes, context: _Context) -> bytes:
            return await self._settings(request, context, method)

        return read

    async def _settings(self, request: bytes, context: _Context, method: str) -> bytes:
        """TraceSetting and LogSettings: each node's provider keeps its own (the shard has no
        settings of its own to show, and nodes answer these only to their agent: the settings
        name files Triton writes). Reading answers with none; changing them is refused."""
        message_type = (
            service_pb2.TraceSettingRequest
            if method == "TraceSetting"
            else service_pb2.LogSettingsRequest
        )
        try:
            parsed = message_type.FromString(request)
        except DecodeError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed request")
        if parsed.settings:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method} can only read through the shard: each node's provider sets its own "
                "tracing and logging",
            )
        model = getattr(parsed, "model_name", "")
        await self._admit(context, model, limited=True)
        if model and not self._balancer.plan(model, "").routes:
            await context.abort(grpc.StatusCode.NOT_FOUND, unknown_model(model, ""))
        return b""


async def _abort(context: _Context, error: ShardError) -> None:
    """End the call with `error`'s code, message and details."""
    status = error.to_status()
    await context.abort(status.code, status.details, status.trailing_metadata)
