"""Behaviour validation: a node whose Triton answers known-answer requests wrong is quarantined
and taken out of routing; honest nodes are left alone. Canaries come from a pool owners extend,
and look like traffic; a node that spots them and lies otherwise is caught by re-running real
requests elsewhere, and one that leaves them unanswered is judged too."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from shard.auth.v1 import api_key_pb2, key_service_pb2_grpc
from shard.auth.v1 import key_service_pb2 as key_api
from shard.deployment.v1 import deployment_pb2
from shard.deployment.v1 import deployment_service_pb2 as api
from shard.model.v1 import model_pb2, model_service_pb2_grpc
from shard.model.v1 import model_service_pb2 as model_api
from shard.node.v1 import node_pb2, node_service_pb2, node_service_pb2_grpc
from shard_core.errors import error_info
from shard_core.grpc.server import GrpcServer
from shard_node.identity import NodeIdentity
from shard_node.triton import TritonProcess
from shard_tool.local import LocalMesh
from shard_tool.publish import Publisher
from tests.demo import push_copy, simple_inputs, target
from tests.fake_node import (
    Answer,
    FakeTriton,
    fake_node_serving,
    gate_tls,
    refused,
    simple_answer,
)

SERVICE = "inference.GRPCInferenceService"
METHODS = ("ServerLive", "ServerReady", "ServerMetadata", "ModelReady", "ModelMetadata",
           "ModelConfig", "ModelInfer", "ModelStatistics", "RepositoryIndex",
           "RepositoryModelLoad", "RepositoryModelUnload")  # fmt: skip


class LyingTriton:
    """A real gRPC front for a real Triton that answers every inference with wrong numbers: the
    Triton a hostile provider's agent is attached to (its model control passes through)."""

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
            control = [
                (key, value)
                for key, value in context.invocation_metadata() or ()
                if key.startswith("triton-grpc-protocol-")
            ]
            answer: bytes = await call(request, timeout=10, metadata=control)
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
        triton_url=f"127.0.0.1:{front.server.port}",
        triton_control_key=honest.control_key,
        repository=honest.model_repository,
        labels=labels,
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


VERIFIED = "verified-simple"
VERIFY_LABELS = {"verify": "fake"}


def _inputs(canary: model_pb2.Canary) -> tuple[bytes, ...]:
    return tuple(service_pb2.ModelInferRequest.FromString(canary.request).raw_input_contents)


def _canary_of(a: npt.NDArray[np.int32], b: npt.NDArray[np.int32]) -> model_pb2.Canary:
    request = service_pb2.ModelInferRequest()
    for name, data in (("INPUT0", a), ("INPUT1", b)):
        request.inputs.add(name=name, datatype="INT32", shape=list(data.shape))
        request.raw_input_contents.append(data.tobytes())
    answer = simple_answer(request)
    return model_pb2.Canary(
        request=request.SerializeToString(), response=answer.SerializeToString()
    )


async def _key(mesh: LocalMesh, principal: str, role: api_key_pb2.Role.ValueType) -> str:
    async with mesh.admin_channel() as channel:
        reply = await key_service_pb2_grpc.KeyServiceStub(channel).CreateApiKey(
            key_api.CreateApiKeyRequest(api_key=api_key_pb2.ApiKey(principal=principal, role=role))
        )
    return reply.secret


async def _state(stub: node_service_pb2_grpc.NodeServiceStub, name: str) -> node_pb2.Node:
    return (await stub.GetNode(node_service_pb2.GetNodeRequest(name=name), timeout=10)).node


class Cheat:
    """Nodes that know every canary of a version: the strongest a liar can be."""

    def __init__(self, canaries: Sequence[model_pb2.Canary]) -> None:
        self._canaries = {_inputs(canary) for canary in canaries}
        assert self._canaries

    def spots(self, request: service_pb2.ModelInferRequest) -> bool:
        return tuple(request.raw_input_contents) in self._canaries

    def liar(self, request: service_pb2.ModelInferRequest) -> service_pb2.ModelInferResponse:
        """Canaries answered right, everything else wrong."""
        answer = simple_answer(request)
        if not self.spots(request):
            answer.raw_output_contents[0] = bytes(b ^ 0x01 for b in answer.raw_output_contents[0])
        return answer

    def mute(self, request: service_pb2.ModelInferRequest) -> service_pb2.ModelInferResponse | None:
        """Everything answered but canaries."""
        return None if self.spots(request) else simple_answer(request)


async def _traffic_until_caught(
    mesh: LocalMesh, stub: node_service_pb2_grpc.NodeServiceStub, names: dict[str, str]
) -> dict[str, node_pb2.Node]:
    """Real requests through the router until the liar and the mute node are quarantined."""
    rng = np.random.default_rng(13)
    async with triton_aio.InferenceServerClient(mesh.router_address) as client:
        # Only the shard may pin a request to a node.
        data = np.ones((1, 16), dtype=np.int32)
        with pytest.raises(InferenceServerException) as pinned:
            await client.infer(
                VERIFIED,
                simple_inputs(data, data),
                headers={"shard-canary-node": names["liar"].removeprefix("nodes/")},
            )
        assert pinned.value.status() == "StatusCode.PERMISSION_DENIED"
        assert "shard-canary-node" in str(pinned.value.message())
        deadline = time.monotonic() + 90
        while True:
            a, b = (rng.integers(-1000, 1000, (1, 16), dtype=np.int32) for _ in "ab")
            await client.infer(VERIFIED, simple_inputs(a, b))
            states = {role: await _state(stub, names[role]) for role in ("liar", "mute")}
            if all(n.state == node_pb2.NODE_STATE_QUARANTINED for n in states.values()):
                return states
            assert time.monotonic() < deadline, f"not both caught: {states}"


async def test_owners_extend_the_canary_pool_and_only_they_see_it(
    mesh: LocalMesh, publisher: Publisher
) -> None:
    await push_copy(publisher, "pool-simple")
    name = "models/pool-simple/versions/1"
    sevens = np.full((1, 16), 7, dtype=np.int32)
    added = await publisher.models.AddModelVersionCanaries(
        model_api.AddModelVersionCanariesRequest(name=name, canaries=[_canary_of(sevens, sevens)])
    )
    assert len(added.model_version.canaries) == 2
    provider = await _key(mesh, "pool-provider", api_key_pb2.ROLE_PROVIDER)
    developer = await _key(mesh, "pool-developer", api_key_pb2.ROLE_DEVELOPER)
    async with grpc.aio.insecure_channel(mesh.registry_address) as channel:
        models = model_service_pb2_grpc.ModelServiceStub(channel)
        for secret in (provider, developer):
            bearer = (("authorization", f"Bearer {secret}"),)
            seen = await models.GetModelVersion(
                model_api.GetModelVersionRequest(name=name), metadata=bearer
            )
            assert seen.model_version.config  # the version, without its canaries
            assert not seen.model_version.canaries
            listed = await models.ListModelVersions(
                model_api.ListModelVersionsRequest(parent="models/pool-simple"), metadata=bearer
            )
            assert [len(v.canaries) for v in listed.model_versions] == [0]
            await refused(
                models.AddModelVersionCanaries(
                    model_api.AddModelVersionCanariesRequest(
                        name=name, canaries=[_canary_of(sevens, sevens)]
                    ),
                    metadata=bearer,
                ),
                grpc.StatusCode.PERMISSION_DENIED,
            )
    # Bad canaries are refused whole, naming the field.
    wrong_input = service_pb2.ModelInferRequest()
    wrong_input.inputs.add(name="NOT_AN_INPUT", datatype="INT32", shape=[1])
    wrong_input.raw_input_contents.append(b"\0" * 4)
    for canaries, field in (
        ([], "canaries"),
        ([model_pb2.Canary(request=b"\xff\xff", response=b"")], "canaries[0]"),
        (
            [
                _canary_of(sevens, sevens),
                model_pb2.Canary(
                    request=wrong_input.SerializeToString(),
                    response=service_pb2.ModelInferResponse().SerializeToString(),
                ),
            ],
            "canaries[1].request",
        ),
        ([_canary_of(sevens, sevens)] * 1000, "canaries"),
    ):
        error = await refused(
            publisher.models.AddModelVersionCanaries(
                model_api.AddModelVersionCanariesRequest(name=name, canaries=canaries)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        info = error_info(error)
        assert info is not None
        assert info.metadata["field"] == field, error.details()
    version = await publisher.models.GetModelVersion(model_api.GetModelVersionRequest(name=name))
    assert len(version.model_version.canaries) == 2  # nothing half-added


async def test_a_node_that_spots_canaries_and_lies_otherwise_is_caught_by_rerunning_requests(
    mesh: LocalMesh, publisher: Publisher, tmp_path: Path
) -> None:
    """Four nodes serve a model whose owner asks for every answer to be checked: two honest,
    one that answers canaries honestly and lies on everything else, one that answers
    everything but canaries. Both cheats are quarantined; the honest nodes are not."""
    await publisher.ensure_model(
        VERIFIED, model_pb2.Model(visibility=model_pb2.VISIBILITY_PUBLIC, verify_fraction=1.0)
    )
    await push_copy(publisher, VERIFIED)
    version = await publisher.models.GetModelVersion(
        model_api.GetModelVersionRequest(name=f"models/{VERIFIED}/versions/1")
    )
    cheat = Cheat(version.model_version.canaries)
    ready = node_pb2.ModelStatus(
        model_name=VERIFIED, model_version="1", state=node_pb2.MODEL_STATE_READY
    )
    answers: dict[str, Answer] = {
        "honest-a": simple_answer,
        "honest-b": simple_answer,
        "liar": cheat.liar,
        "mute": cheat.mute,
    }
    async with mesh.admin_channel() as admin, contextlib.AsyncExitStack() as stack:
        stub = node_service_pb2_grpc.NodeServiceStub(admin)
        tritons: dict[str, FakeTriton] = {}
        names: dict[str, str] = {}
        for role, answer in answers.items():
            identity = NodeIdentity.load_or_create(tmp_path / role)
            tls = gate_tls(mesh, identity.node_id, tmp_path / role / "tls")
            tritons[role] = await stack.enter_async_context(FakeTriton(answer, tls=tls))
            names[role] = await stack.enter_async_context(
                fake_node_serving(
                    stub,
                    identity,
                    token=await mesh.join_token(role),
                    triton=tritons[role],
                    models=[ready],
                    labels=VERIFY_LABELS,
                )
            )
        await publisher.deploy(
            VERIFIED,
            [target("1", replicas=4)],
            node_selector=deployment_pb2.NodeSelector(labels=VERIFY_LABELS),
        )
        try:
            await publisher.wait_available(f"deployments/{VERIFIED}", timeout=60)

            def canaries_seen(role: str) -> int:
                return sum(
                    1
                    for method, _, metadata in tritons[role].calls
                    if method == "ModelInfer" and metadata["model"] == VERIFIED
                )

            # The liar is probed and passes: canaries alone never catch it.
            deadline = time.monotonic() + 60
            while not canaries_seen("liar"):
                assert time.monotonic() < deadline, "the liar was never sent a canary"
                await asyncio.sleep(0.2)
            assert (await _state(stub, names["liar"])).state == node_pb2.NODE_STATE_ACTIVE

            states = await _traffic_until_caught(mesh, stub, names)
        finally:
            await publisher.deployments.DeleteDeployment(
                api.DeleteDeploymentRequest(name=f"deployments/{VERIFIED}")
            )
        assert states["liar"].state_reason.startswith(
            f"REDUNDANCY_MISMATCH: {VERIFIED} v1: output OUTPUT0 has other values"
        ), states["liar"].state_reason
        assert states["mute"].state_reason.startswith(f"CANARY_UNANSWERED: {VERIFIED} v1: "), (
            states["mute"].state_reason
        )
        for role in ("honest-a", "honest-b"):
            assert (await _state(stub, names[role])).state == node_pb2.NODE_STATE_ACTIVE
        # Canaries came to the nodes like traffic: over the router's one connection to each
        # node, with nothing that names them.
        for role, fake in tritons.items():
            inferences = [metadata for method, _, metadata in fake.calls if method == "ModelInfer"]
            assert len({metadata["peer"] for metadata in inferences}) == 1, role
            assert not any("shard-canary-node" in metadata for metadata in inferences)
