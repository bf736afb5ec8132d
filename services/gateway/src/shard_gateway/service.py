"""What the gateway asks of the shard, transport-free: the router and the registry over gRPC.

The REST layer (`rest`) only translates HTTP to these calls and their answers to JSON. Every
call carries the caller's credentials: the service that answers decides what the caller may do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf import json_format
from tritonclient.grpc import service_pb2, service_pb2_grpc

from shard_core import tls
from shard_core.pki import Workload

Credentials = Sequence[tuple[str, str]]


class Shard:
    """The gateway's clients of the router and the registry: one channel to each."""

    def __init__(
        self,
        *,
        router: tuple[str, str | None],
        registry: tuple[str, str | None],
        identity: tls.TlsIdentity | None,
        trust_domain: str,
        timeout_s: float,
    ) -> None:
        """`router` and `registry`: each one's loopback plaintext address and mutual-TLS
        address. Callers' keys travel on these channels: mutual TLS with the gateway's
        `identity` to the mutual-TLS address when both are given, else plaintext, to loopback
        only."""
        options = [("grpc.max_receive_message_length", 64 << 20)]

        def peer(
            name: str, addresses: tuple[str, str | None], options: Sequence[tuple[str, int]] = ()
        ) -> grpc.aio.Channel:
            return tls.peer_channel(
                addresses[0],
                mesh_address=addresses[1],
                identity=identity,
                expect=Workload(trust_domain=trust_domain, kind="service", name=name),
                options=options,
            )

        self._router_channel = peer("router", router, options)
        self._registry_channel = peer("registry", registry)
        self._router = service_pb2_grpc.GRPCInferenceServiceStub(self._router_channel)
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

    async def model_ready(self, name: str, version: str, credentials: Credentials) -> bool:
        reply = await self._router.ModelReady(
            service_pb2.ModelReadyRequest(name=name, version=version),
            timeout=self._timeout_s,
            metadata=credentials,
        )
        return bool(reply.ready)

    async def model_metadata(
        self, name: str, version: str, credentials: Credentials
    ) -> dict[str, Any]:
        """Triton's HTTP form of the metadata (shapes as numbers)."""
        reply = await self._router.ModelMetadata(
            service_pb2.ModelMetadataRequest(name=name, version=version),
            timeout=self._timeout_s,
            metadata=credentials,
        )

        def tensors(found: Any) -> list[dict[str, Any]]:
            return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in found]

        return {
            "name": reply.name,
            "versions": list(reply.versions),
            "platform": reply.platform,
            "inputs": tensors(reply.inputs),
            "outputs": tensors(reply.outputs),
        }

    async def model_config(
        self, name: str, version: str, credentials: Credentials
    ) -> dict[str, Any]:
        reply = await self._router.ModelConfig(
            service_pb2.ModelConfigRequest(name=name, version=version),
            timeout=self._timeout_s,
            metadata=credentials,
        )
        return json_format.MessageToDict(reply.config, preserving_proto_field_name=True)

    async def infer(
        self, request: service_pb2.ModelInferRequest, credentials: Credentials
    ) -> service_pb2.ModelInferResponse:
        reply: service_pb2.ModelInferResponse = await self._router.ModelInfer(
            request, timeout=self._timeout_s, metadata=credentials
        )
        return reply
