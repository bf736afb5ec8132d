"""A node agent's side of the registry's Connect stream, driven by a test: to act as a node
(a well-behaved one, a forger, one that vanishes) without a Triton."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shard.node.v1 import node_pb2, node_service_pb2, node_service_pb2_grpc
from shard_core.attestation import signed_bytes
from shard_core.errors import error_info
from shard_node.identity import NodeIdentity

INVENTORY = node_pb2.Inventory(
    cpu_model="test", cpu_cores=4, memory_bytes=8 << 30, agent_version="0.1.0"
)


def attestation(
    identity: NodeIdentity,
    nonce: bytes,
    *,
    inventory: node_pb2.Inventory = INVENTORY,
    signer: Ed25519PrivateKey | None = None,
    time_ms: int | None = None,
) -> node_service_pb2.Attestation:
    when = int(time.time() * 1000) if time_ms is None else time_ms
    message = signed_bytes(nonce=nonce, inventory=inventory, time_ms=when, node_id=identity.node_id)
    return node_service_pb2.Attestation(
        nonce=nonce,
        inventory=inventory,
        time_ms=when,
        signature=(signer or identity.private_key).sign(message),
    )


class FakeAgent:
    """A node agent's side of the Connect stream, driven by the test."""

    def __init__(self, stub: node_service_pb2_grpc.NodeServiceStub) -> None:
        self.outbox: asyncio.Queue[node_service_pb2.ConnectRequest | None] = asyncio.Queue()
        self.call = stub.Connect(self._requests())

    async def _requests(self) -> AsyncIterator[node_service_pb2.ConnectRequest]:
        while (request := await self.outbox.get()) is not None:
            yield request

    async def send(self, request: node_service_pb2.ConnectRequest) -> None:
        await self.outbox.put(request)

    async def read(self) -> node_service_pb2.ConnectResponse:
        reply = await asyncio.wait_for(self.call.read(), 10)
        assert isinstance(reply, node_service_pb2.ConnectResponse)
        return reply

    async def hello(self, identity: NodeIdentity, *, node_id: str | None = None) -> bytes:
        """Say who we are; return the registry's challenge nonce."""
        hello = node_service_pb2.Hello(
            node_id=node_id or identity.node_id, public_key=identity.public_key
        )
        await self.send(node_service_pb2.ConnectRequest(hello=hello))
        return (await self.read()).challenge.nonce

    async def register(
        self,
        identity: NodeIdentity,
        *,
        token: str,
        proof: node_service_pb2.Attestation | None = None,
        nonce: bytes | None = None,
        **fields: Any,
    ) -> node_service_pb2.ConnectResponse:
        """Hello, then a registration signing the challenge (or `proof`); the answer."""
        challenge = await self.hello(identity)
        registration = node_service_pb2.Registration(
            inference_address=fields.pop("inference_address", "127.0.0.1:1"),
            join_token=token,
            attestation=proof or attestation(identity, nonce or challenge),
            **fields,
        )
        await self.send(node_service_pb2.ConnectRequest(registration=registration))
        return await self.read()

    async def close(self) -> grpc.StatusCode:
        goodbye = node_service_pb2.Deregistration(reason="test done")
        await self.outbox.put(node_service_pb2.ConnectRequest(deregistration=goodbye))
        await self.outbox.put(None)
        # gRPC reports the status only after every message before it has been read.
        while isinstance(
            await asyncio.wait_for(self.call.read(), 10), node_service_pb2.ConnectResponse
        ):
            pass
        return await asyncio.wait_for(self.call.code(), 10)


async def refused(
    awaitable: Any, code: grpc.StatusCode, reason: str | None = None
) -> grpc.aio.AioRpcError:
    """The error `awaitable` fails with, once its code (and `reason`, when given) are checked."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await awaitable
    assert raised.value.code() == code, raised.value.details()
    if reason is not None:
        info = error_info(raised.value)
        assert info is not None
        assert info.reason == reason, raised.value.details()
    return raised.value
