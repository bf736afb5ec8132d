"""What the router answers beyond inference: the repository index and statistics show each
caller only the models it may use, metadata is rate-limited like inference, and every call it
forwards to a node carries a deadline, whatever the client set."""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
import pytest
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from shard.auth.v1 import api_key_pb2, key_service_pb2_grpc
from shard.auth.v1 import key_service_pb2 as key_api
from shard.deployment.v1 import deployment_pb2
from shard.deployment.v1 import deployment_service_pb2 as deployment_api
from shard.model.v1 import model_pb2
from shard.node.v1 import node_pb2, node_service_pb2_grpc
from shard_node.identity import NodeIdentity
from shard_tool.local import LocalMesh
from shard_tool.publish import Publisher
from tests.demo import push_copy, simple_inputs, target
from tests.fake_node import FakeTriton, fake_node_serving, gate_tls

PRIVATE = "reads-private"
LABELS = {"reads": "fake"}


async def _key(
    mesh: LocalMesh, principal: str, role: api_key_pb2.Role.ValueType, rate_limit_rps: float = 0
) -> str:
    key = api_key_pb2.ApiKey(principal=principal, role=role, rate_limit_rps=rate_limit_rps)
    async with mesh.admin_channel() as channel:
        reply = await key_service_pb2_grpc.KeyServiceStub(channel).CreateApiKey(
            key_api.CreateApiKeyRequest(api_key=key)
        )
    return reply.secret


@pytest.fixture(scope="module")
async def fake(
    mesh: LocalMesh, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[FakeTriton]:
    """A node whose Triton is the test's, serving a private model of `reads-owner` alone."""
    async with mesh.admin_channel() as admin:
        publisher = Publisher(channel=admin)
        await publisher.ensure_model(
            PRIVATE,
            model_pb2.Model(visibility=model_pb2.VISIBILITY_PRIVATE, owner="reads-owner"),
        )
        await push_copy(publisher, PRIVATE, canaries=False)
        ready = node_pb2.ModelStatus(
            model_name=PRIVATE, model_version="1", state=node_pb2.MODEL_STATE_READY
        )
        state = tmp_path_factory.mktemp("reads-node")
        identity = NodeIdentity.load_or_create(state)
        async with (
            FakeTriton(tls=gate_tls(mesh, identity.node_id, state / "tls")) as fake_triton,
            fake_node_serving(
                node_service_pb2_grpc.NodeServiceStub(admin),
                identity,
                token=await mesh.join_token("reads"),
                triton=fake_triton,
                models=[ready],
                labels=LABELS,
            ),
        ):
            await publisher.deploy(
                PRIVATE,
                [target("1", replicas=1)],
                node_selector=deployment_pb2.NodeSelector(labels=LABELS),
            )
            await publisher.wait_available(f"deployments/{PRIVATE}", timeout=60)
            yield fake_triton
            await publisher.deployments.DeleteDeployment(
                deployment_api.DeleteDeploymentRequest(name=f"deployments/{PRIVATE}")
            )


def _as(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


async def test_the_index_and_statistics_show_only_models_the_caller_may_use(
    mesh: LocalMesh, fake: FakeTriton
) -> None:
    owner = await _key(mesh, "reads-owner", api_key_pb2.ROLE_OWNER)
    stranger = await _key(mesh, "reads-stranger", api_key_pb2.ROLE_DEVELOPER)
    data = np.ones((1, 16), dtype=np.int32)
    # The node's Triton runs in this test's event loop: only asyncio clients here.
    async with triton_aio.InferenceServerClient(mesh.router_address) as client:
        await client.infer(PRIVATE, simple_inputs(data, data), headers=_as(owner))

        async def indexed(headers: dict[str, str] | None) -> set[str]:
            index = await client.get_model_repository_index(headers=headers)
            return {m.name for m in index.models}

        async def counted(headers: dict[str, str] | None) -> set[str]:
            statistics = await client.get_inference_statistics(headers=headers)
            return {s.name for s in statistics.model_stats}

        def asked() -> int:
            return sum(1 for method, *_ in fake.calls if method == "ModelStatistics")

        assert PRIVATE in await indexed(_as(owner))
        assert PRIVATE in await counted(_as(owner))
        for headers in (None, _as(stranger)):
            assert "simple" in await indexed(headers)
            assert PRIVATE not in await indexed(headers)
            asked_before = asked()
            assert PRIVATE not in await counted(headers)
            # A nameless call asks only the nodes of models the caller may see.
            assert asked() == asked_before
        for headers, code in ((None, "UNAUTHENTICATED"), (_as(stranger), "PERMISSION_DENIED")):
            with pytest.raises(InferenceServerException) as refused:
                await client.get_inference_statistics(PRIVATE, headers=headers)
            assert refused.value.status() == f"StatusCode.{code}"
        with pytest.raises(InferenceServerException) as bad:
            await client.get_model_repository_index(headers={"authorization": "Bearer shard_no"})
        assert bad.value.status() == "StatusCode.UNAUTHENTICATED"


async def test_calls_to_nodes_carry_a_deadline_the_client_did_not_set(
    mesh: LocalMesh, fake: FakeTriton
) -> None:
    owner = await _key(mesh, "reads-owner", api_key_pb2.ROLE_OWNER)
    data = np.ones((1, 16), dtype=np.int32)
    async with triton_aio.InferenceServerClient(mesh.router_address) as client:
        result = await client.infer(PRIVATE, simple_inputs(data, data), headers=_as(owner))
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data * 2)
        await client.get_inference_statistics(PRIVATE, headers=_as(owner))
    for method in ("ModelInfer", "ModelStatistics"):
        remaining = [left for called, left, _ in fake.calls if called == method][-1]
        assert remaining is not None, method
        # SHARD_INFERENCE_UPSTREAM_TIMEOUT_S, its default (the grpc-timeout header rounds up)
        assert 0 < remaining <= 121


async def test_metadata_and_config_take_from_the_rate_limit(mesh: LocalMesh) -> None:
    slow = await _key(mesh, "reads-slow", api_key_pb2.ROLE_DEVELOPER, rate_limit_rps=1)
    async with triton_aio.InferenceServerClient(mesh.router_address) as client:
        for ask in (client.get_model_metadata, client.get_model_config):
            codes = []
            for _ in range(10):  # the bucket holds two seconds' worth: two calls
                try:
                    await ask("simple", headers=_as(slow))
                    codes.append("OK")
                except InferenceServerException as error:
                    codes.append(str(error.status()))
            assert "StatusCode.RESOURCE_EXHAUSTED" in codes, codes
