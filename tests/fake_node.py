"""A node agent's side of the registry's Connect stream, driven by a test: to act as a node
(a well-behaved one, a forger, one that vanishes) without a Triton."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from tritonclient.grpc import service_pb2

from shard.node.v1 import node_pb2, node_service_pb2, node_service_pb2_grpc
from shard_core.attestation import signed_bytes
from shard_core.errors import error_info
from shard_core.tls import TlsIdentity
from shard_node.identity import NodeIdentity
from shard_tool.local import LocalMesh

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
    evidence: Sequence[node_service_pb2.HardwareEvidence] = (),
    certificate_request: bytes = b"",
) -> node_service_pb2.Attestation:
    when = int(time.time() * 1000) if time_ms is None else time_ms
    message = signed_bytes(
        nonce=nonce,
        inventory=inventory,
        time_ms=when,
        node_id=identity.node_id,
        evidence=evidence,
        certificate_request=certificate_request,
    )
    return node_service_pb2.Attestation(
        nonce=nonce,
        inventory=inventory,
        time_ms=when,
        signature=(signer or identity.private_key).sign(message),
        hardware_evidence=evidence,
        certificate_request=certificate_request,
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

    async def read(self, timeout: float = 10) -> node_service_pb2.ConnectResponse:
        return await asyncio.wait_for(self.read_any(), timeout)

    async def read_any(self) -> node_service_pb2.ConnectResponse:
        """The next message, however long it takes."""
        reply = await self.call.read()
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

    async def heartbeats(self, interval_s: float = 0.5) -> None:
        """Beat until cancelled, as agents do, so the node keeps its lease."""
        while True:
            await self.send(node_service_pb2.ConnectRequest(heartbeat=node_service_pb2.Heartbeat()))
            await asyncio.sleep(interval_s)

    async def goodbye(self) -> None:
        """Deregister and end the request stream (what the registry answers is still to read)."""
        goodbye = node_service_pb2.Deregistration(reason="test done")
        await self.outbox.put(node_service_pb2.ConnectRequest(deregistration=goodbye))
        await self.outbox.put(None)

    async def close(self) -> grpc.StatusCode:
        await self.goodbye()
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


INFERENCE_SERVICE = "inference.GRPCInferenceService"
# What the node answers to a request; None: it answers UNAVAILABLE.
Answer = Callable[[service_pb2.ModelInferRequest], service_pb2.ModelInferResponse | None]


def gate_tls(mesh: LocalMesh, node_id: str, directory: Path) -> grpc.ServerCredentials:
    """What a node's gate serves with: the node's certificate from the mesh CA, taking only
    callers with certificates of the mesh's."""
    identity = TlsIdentity(mesh.issue("node", node_id, directory))
    return identity.server_credentials(require_client_certificate=True)


def simple_answer(request: service_pb2.ModelInferRequest) -> service_pb2.ModelInferResponse:
    """What Triton's `simple` answers: INPUT0 + INPUT1 and INPUT0 - INPUT1 (INT32)."""
    a, b = (np.frombuffer(raw, dtype=np.int32) for raw in request.raw_input_contents[:2])
    shape = list(request.inputs[0].shape)
    response = service_pb2.ModelInferResponse(
        model_name=request.model_name, model_version=request.model_version or "1", id=request.id
    )
    for name, values in (("OUTPUT0", a + b), ("OUTPUT1", a - b)):
        response.outputs.add(name=name, datatype="INT32", shape=shape)
        response.raw_output_contents.append(values.astype(np.int32).tobytes())
    return response


class FakeTriton:
    """A KServe v2 gRPC server on loopback that stands in for a node's Triton: it answers
    ModelInfer with `answer` and records what each call carried (method, deadline, metadata,
    with the model as `model` and the caller's connection as `peer`)."""

    def __init__(
        self,
        answer: Answer = simple_answer,
        *,
        tls: grpc.ServerCredentials | None = None,
        address: str = "127.0.0.1:0",
        register: Callable[[grpc.aio.Server], None] = lambda _: None,
    ) -> None:
        """With `tls` (a node's mesh identity), it serves mutual TLS, as a node's gate does;
        `register` adds services of its own beside."""
        self.answer = answer
        self.delay_s = 0.0  # how long ModelInfer takes to answer
        self.calls: list[tuple[str, float | None, dict[str, str]]] = []
        self._server = grpc.aio.server()
        register(self._server)
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(self._handler(name))
            for name in ("ModelInfer", "ModelStatistics", "ModelMetadata", "ModelConfig")
        }
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(INFERENCE_SERVICE, handlers),)
        )
        self.port = (
            self._server.add_secure_port(address, tls)
            if tls
            else self._server.add_insecure_port(address)
        )
        self.address = f"127.0.0.1:{self.port}"

    def _handler(self, method: str) -> Callable[[bytes, Any], Awaitable[bytes]]:
        async def handle(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            metadata = {k: str(v) for k, v in context.invocation_metadata() or ()}
            metadata["peer"] = context.peer()
            if method == "ModelInfer":
                parsed = service_pb2.ModelInferRequest.FromString(request)
                metadata["model"] = parsed.model_name
                metadata["version"] = parsed.model_version
                self.calls.append((method, context.time_remaining(), metadata))
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                answer = self.answer(parsed)
                if answer is None:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "not answering")
                return bytes(answer.SerializeToString())
            self.calls.append((method, context.time_remaining(), metadata))
            if method == "ModelStatistics":
                return bytes(self._statistics(request).SerializeToString())
            return b""

        return handle

    def _statistics(self, request: bytes) -> service_pb2.ModelStatisticsResponse:
        """Per model it was asked to infer with (or the one named), how many times."""
        asked = service_pb2.ModelStatisticsRequest.FromString(request).name
        counts: dict[str, int] = {}
        for method, _, metadata in self.calls:
            if method == "ModelInfer":
                model = metadata.get("model", "")
                counts[model] = counts.get(model, 0) + 1
        reply = service_pb2.ModelStatisticsResponse()
        for name, count in sorted(counts.items()):
            if name and name == (asked or name):
                reply.model_stats.add(name=name, version="1", inference_count=count)
        return reply

    async def __aenter__(self) -> FakeTriton:
        await self._server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._server.stop(None)


@contextlib.asynccontextmanager
async def fake_node_serving(
    stub: node_service_pb2_grpc.NodeServiceStub,
    identity: NodeIdentity,
    *,
    token: str,
    triton: FakeTriton,
    models: Sequence[node_pb2.ModelStatus],
    labels: Mapping[str, str],
) -> AsyncIterator[str]:
    """A node registered with `triton` as its Triton, reporting `models` in its heartbeats
    until the block ends; yields its name."""
    agent = FakeAgent(stub)
    reply = await agent.register(
        identity, token=token, inference_address=triton.address, models=models, labels=labels
    )
    beat = node_service_pb2.ConnectRequest(heartbeat=node_service_pb2.Heartbeat(models=models))

    async def heartbeats() -> None:
        while True:
            await agent.send(beat)
            await asyncio.sleep(0.5)

    async def answer_challenges() -> None:
        """Read what the registry sends until the stream ends; answer its attestation
        challenges, as agents do."""
        while isinstance(reply := await agent.call.read(), node_service_pb2.ConnectResponse):
            if reply.HasField("challenge"):
                proof = attestation(identity, reply.challenge.nonce)
                await agent.send(node_service_pb2.ConnectRequest(attestation=proof))

    beating = asyncio.ensure_future(heartbeats())
    reading = asyncio.ensure_future(answer_challenges())
    # The labels it claims select nothing until an admin sets them (the stub is an admin's).
    node = node_pb2.Node(name=reply.registered.name, labels=labels)
    await stub.UpdateNode(node_service_pb2.UpdateNodeRequest(node=node), timeout=10)
    try:
        yield reply.registered.name
    finally:
        beating.cancel()
        await asyncio.gather(beating, return_exceptions=True)
        # Leave as agents do, so the node is gone for the tests after this one. (Cancelling a
        # pending read would cancel the whole call, goodbye unsent: let the reader finish.)
        await agent.goodbye()
        with contextlib.suppress(grpc.aio.AioRpcError, TimeoutError):
            await asyncio.wait_for(reading, 10)
        agent.call.cancel()
