"""What the gateway asks of the shard, transport-free: the router and the registry over gRPC.

The REST layer (`rest`) only translates HTTP to these calls and their answers to JSON.
"""

from __future__ import annotations

from typing import Any

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from shard.node.v1 import node_service_pb2_grpc


class Shard:
    """The gateway's clients of the router and the registry: one channel to each."""

    def __init__(self, *, router_address: str, registry_address: str, timeout_s: float) -> None:
        self._router_channel = grpc.aio.insecure_channel(router_address)
        self._registry_channel = grpc.aio.insecure_channel(registry_address)
        self._router = service_pb2_grpc.GRPCInferenceServiceStub(self._router_channel)
        self._nodes = node_service_pb2_grpc.NodeServiceStub(self._registry_channel)
        self._timeout_s = timeout_s

    @property
    def registry_channel(self) -> grpc.aio.Channel:
        return self._registry_channel

    async def close(self) -> None:
        await self._router_channel.close(None)
        await self._registry_channel.close(None)

    async def server_ready(self) -> bool:
        reply = await self._router.ServerReady(
            service_pb2.ServerReadyRequest(), timeout=self._timeout_s
        )
        return bool(reply.ready)

    async def server_metadata(self) -> dict[str, Any]:
        reply = await self._router.ServerMetadata(
            service_pb2.ServerMetadataRequest(), timeout=self._timeout_s
        )
        return {"name": reply.name, "version": reply.version, "extensions": list(reply.extensions)}

    async def model_ready(self, name: str, version: str) -> bool:
        reply = await self._router.ModelReady(
            service_pb2.ModelReadyRequest(name=name, version=version), timeout=self._timeout_s
        )
        return bool(reply.ready)
