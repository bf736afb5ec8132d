"""Behaviour validation: a node whose Triton answers known-answer requests wrong is quarantined
and taken out of routing; honest nodes are left alone."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2

from shard.deployment.v1 import deployment_pb2
from shard.deployment.v1 import deployment_service_pb2 as api
from shard.node.v1 import node_pb2
from shard_core.grpc.server import GrpcServer
from shard_node.triton import TritonProcess
from shard_tool.local import LocalMesh
from shard_tool.publish import Publisher
from tests.demo import push_copy, target

SERVICE = "inference.GRPCInferenceService"
METHODS = ("ServerLive", "ServerReady", "ServerMetadata", "ModelReady", "ModelMetadata",
           "ModelConfig", "ModelInfer", "ModelStatistics", "RepositoryIndex")  # fmt: skip


class LyingTriton:
    """A real gRPC front for a real Triton that answers every inference with wrong numbers."""

    def __init__(self, upstream: str) -> None:
        self._channel = grpc.aio.insecure_channel(upstream)
        self.lies = 0
        self.server = GrpcServer(
            address="127.0.0.1:0", services=[SERVICE], register=self._register, interceptors=()
        )

    def _register(self, server: grpc.aio.Server) -> None:
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(self._forward(name)) for name in METHODS
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))

    def _forward(self, method: str) -> Callable[[bytes, Any], Awaitable[bytes]]:
        call = self._channel.unary_unary(f"/{SERVICE}/{method}", None, None)

        async def forward(request: bytes, context: Any) -> bytes:
            answer: bytes = await call(request, timeout=10)
            if method != "ModelInfer":
                return answer
            response = service_pb2.ModelInferResponse.FromString(answer)
            for index, contents in enumerate(response.raw_output_contents):
                response.raw_output_contents[index] = bytes(b ^ 0x01 for b in contents)
            self.lies += 1
            lie: bytes = response.SerializeToString()
            return lie

        return forward


@pytest.fixture
async def liar(spare_triton: TritonProcess) -> AsyncIterator[tuple[TritonProcess, LyingTriton]]:
    front = LyingTriton(spare_triton.grpc_url)
    await front.server.start()
    yield spare_triton, front
    await front.server.stop()


async def test_a_node_that_answers_wrong_is_quarantined_and_unrouted(
    mesh: LocalMesh, publisher: Publisher, liar: tuple[TritonProcess, LyingTriton]
) -> None:
    honest, front = liar
    labels = {"pool": "liars"}
    await mesh.start_node(
        "liar",
        triton_url=honest.grpc_url,
        triton_control_key=honest.control_key,
        repository=honest.model_repository,
        labels=labels,
        advertise_address=f"127.0.0.1:{front.server.port}",
    )
    await push_copy(publisher, "lie-echo")
    await publisher.deploy(
        "lie-echo",
        [target("1", replicas=1)],
        node_selector=deployment_pb2.NodeSelector(labels=labels),
    )

    deadline = time.monotonic() + 60
    while True:
        node = await mesh.find_node("liar")
        if node is not None and node.state == node_pb2.NODE_STATE_QUARANTINED:
            break
        assert time.monotonic() < deadline, "the lying node was never quarantined"
        await asyncio.sleep(0.2)

    assert front.lies >= 1
    assert node.state_reason.startswith("CANARY_FAILED: lie-echo v1: output OUTPUT0")
    assert node.transitions[0].reason.startswith("QUARANTINED: CANARY_FAILED")
    # Out of routing, and its replica taken away.
    router = triton.InferenceServerClient(mesh.router_address)
    deadline = time.monotonic() + 30
    while router.is_model_ready("lie-echo"):
        assert time.monotonic() < deadline, "the quarantined node is still routed to"
        await asyncio.sleep(0.2)
    deadline = time.monotonic() + 30
    while True:
        history = (
            await publisher.deployments.ExplainDeployment(
                api.ExplainDeploymentRequest(name="deployments/lie-echo")
            )
        ).history
        if any(d.reason == "NODE_QUARANTINED" for d in history):
            break
        assert time.monotonic() < deadline, "the quarantined node kept its replica"
        await asyncio.sleep(0.2)
    # The honest nodes serving the demo models, probed all along, are untouched.
    for name in ("node-0", "node-1"):
        honest_node = await mesh.find_node(name)
        assert honest_node is not None
        assert honest_node.state == node_pb2.NODE_STATE_ACTIVE
