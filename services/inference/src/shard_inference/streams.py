"""ModelStreamInfer through the shard: one client stream fanned out over streams to the nodes.

Each request is routed like a unary one, then written to a stream the router keeps open to the
chosen node for as long as the client's stream lasts; every node's answers flow back onto the
client's stream as they arrive. A model's requests stay on one replica for the client's stream
(a sequence's on its pinned replica), so their answers keep their order. Per-request problems
(an unknown model, a malformed request, a replica that failed) come back as the stream's
`error_message` responses, as Triton sends them, and the stream goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import grpc
from tritonclient.grpc import service_pb2

from shard_client.routing import Balancer, Route, unknown_model
from shard_core.errors import ShardError
from shard_inference.backends import NodeChannel
from shard_inference.callers import deadline
from shard_inference.wire import MalformedRequestError, model_route, sequence_id, with_version

_log = logging.getLogger(__name__)

SEQUENCE_ID = b"sequence_id"
# Answers buffered for a client that reads slowly before the nodes' streams are held back.
MAX_BUFFERED = 256
_Context = grpc.aio.ServicerContext[bytes, bytes]


def error_response(message: str) -> bytes:
    data: bytes = service_pb2.ModelStreamInferResponse(error_message=message).SerializeToString()
    return data


class _Producer(enum.Enum):
    """Markers on the answer queue: a producer (the reader or a node's stream) began or ended."""

    STARTED = enum.auto()
    ENDED = enum.auto()


@dataclass(eq=False)
class _Upstream:
    route: Route[NodeChannel]
    call: grpc.aio.StreamStreamCall[bytes, bytes]


class StreamRouting:
    """The routing of one client stream."""

    def __init__(
        self,
        balancer: Balancer[NodeChannel],
        context: _Context,
        admit: Callable[[str], object],
        *,
        timeout_s: float,
    ) -> None:
        self._timeout_s = timeout_s
        self._balancer = balancer
        self._context = context
        self._admit = admit  # raises a ShardError for a request of a model it refuses
        self._answers: asyncio.Queue[bytes | _Producer] = asyncio.Queue(MAX_BUFFERED)
        self._upstreams: dict[str, _Upstream] = {}
        self._sticky: dict[tuple[str, str], str] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, requests: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        producers = 1
        self._start(self._read(requests))
        while producers:
            answer = await self._answers.get()
            if answer is _Producer.STARTED:
                producers += 1
            elif answer is _Producer.ENDED:
                producers -= 1
            else:
                yield answer

    def cancel(self) -> None:
        for upstream in self._upstreams.values():
            upstream.call.cancel()
        for task in self._tasks:
            task.cancel()

    def _start(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _read(self, requests: AsyncIterator[bytes]) -> None:
        try:
            async for request in requests:
                await self._send(request)
        finally:
            for upstream in list(self._upstreams.values()):
                with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    await upstream.call.done_writing()
            await self._answers.put(_Producer.ENDED)

    async def _send(self, request: bytes) -> None:
        try:
            name, model_version = model_route(request)
            sequence = sequence_id(request) if SEQUENCE_ID in request else ""
        except MalformedRequestError as error:
            await self._answers.put(error_response(f"malformed request: {error}"))
            return
        if not name:
            await self._answers.put(error_response("a model name is required"))
            return
        try:
            self._admit(name)
        except ShardError as error:
            await self._answers.put(error_response(error.message))
            return
        plan = self._balancer.plan(name, model_version, sequence)
        if not plan.routes:
            await self._answers.put(error_response(unknown_model(name, model_version)))
            return
        if plan.chosen:
            request = with_version(request, plan.version)
        route = plan.routes[0] if sequence else self._sticky_route(name, plan.version, plan.routes)
        upstream = await self._upstream(route)
        try:
            await upstream.call.write(request)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as error:
            # The node's stream ended: its pump reports why; this request was not sent.
            _log.warning("stream to %s closed: %s", route.node, error)
            await self._answers.put(
                error_response(f"replica {route.node} of model '{name}' failed; resend")
            )

    def _sticky_route(
        self, name: str, version: str, routes: list[Route[NodeChannel]]
    ) -> Route[NodeChannel]:
        address = self._sticky.get((name, version))
        usable = self._balancer.ejection.usable
        for route in self._balancer.table.candidates(name, version):
            if route.backend.address == address and usable(route.backend):
                return route
        self._sticky[(name, version)] = routes[0].backend.address
        return routes[0]

    async def _upstream(self, route: Route[NodeChannel]) -> _Upstream:
        address = route.backend.address
        upstream = self._upstreams.get(address)
        if upstream is None:
            stream = route.backend.stream("ModelStreamInfer")
            call = stream(timeout=deadline(self._context, self._timeout_s))
            upstream = self._upstreams[address] = _Upstream(route, call)
            await self._answers.put(_Producer.STARTED)
            self._start(self._pump(upstream))
        return upstream

    async def _pump(self, upstream: _Upstream) -> None:
        try:
            async for answer in upstream.call:
                await self._answers.put(answer)
            self._balancer.ejection.succeeded(upstream.route.backend)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:
                if error.code() == grpc.StatusCode.UNAVAILABLE:
                    self._balancer.ejection.failed(upstream.route.backend)
                await self._answers.put(
                    error_response(
                        f"replica {upstream.route.node} failed, its answers still due are lost: "
                        f"{error.details()}"
                    )
                )
        finally:
            address = upstream.route.backend.address
            if self._upstreams.get(address) is upstream:
                del self._upstreams[address]
            await self._answers.put(_Producer.ENDED)
