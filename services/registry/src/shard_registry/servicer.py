"""gRPC face of the registry: translates protobuf to the node domain and back, nothing more."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from shard.node.v1 import node_service_pb2, node_service_pb2_grpc
from shard_core.errors import InvalidArgumentError
from shard_registry.service import NodeRegistry


class NodeServicer(node_service_pb2_grpc.NodeServiceServicer):
    def __init__(self, registry: NodeRegistry) -> None:
        self._registry = registry

    async def Connect(
        self,
        request_iterator: AsyncIterator[node_service_pb2.ConnectRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[node_service_pb2.ConnectResponse]:
        first = await anext(aiter(request_iterator), None)
        if first is None:
            return
        if first.WhichOneof("message") != "registration":
            raise InvalidArgumentError(
                "the first message on a Connect stream must be a registration",
                metadata={"field": "registration"},
            )
        session = await self._registry.register(first.registration)
        timing = self._registry.timing
        yield node_service_pb2.ConnectResponse(
            registered=node_service_pb2.Registered(
                name=session.node.name,
                heartbeat_interval_ms=int(timing.heartbeat_interval_s * 1000),
                lease_ttl_ms=timing.lease_ttl_s * 1000,
            )
        )
        async for request in request_iterator:
            kind = request.WhichOneof("message")
            if kind == "heartbeat":
                await session.heartbeat(request.heartbeat.models)
            elif kind == "deregistration":
                await session.close(request.deregistration.reason)
                return
            else:
                raise InvalidArgumentError(
                    "a Connect stream carries one registration, then heartbeats",
                    metadata={"field": "registration"},
                )
        # The stream ended without a goodbye: the connection broke. The node stays until its
        # lease expires, free to reconnect and keep it.

    async def GetNode(
        self,
        request: node_service_pb2.GetNodeRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> node_service_pb2.GetNodeResponse:
        return node_service_pb2.GetNodeResponse(node=await self._registry.get(request.name))

    async def ListNodes(
        self,
        request: node_service_pb2.ListNodesRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> node_service_pb2.ListNodesResponse:
        nodes, token = await self._registry.list(
            page_size=request.page_size, page_token=request.page_token
        )
        return node_service_pb2.ListNodesResponse(nodes=nodes, next_page_token=token)
