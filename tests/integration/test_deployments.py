"""Deployments on a pool of three real nodes: placement, drain, node death, unfittable
deployments, optimistic concurrency and canary traffic splits, all through the router."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import pytest_asyncio
import tritonclient.grpc as triton

from shard.deployment.v1 import deployment_pb2
from shard.deployment.v1 import deployment_service_pb2 as api
from shard.model.v1 import model_pb2
from shard.node.v1 import node_pb2, node_service_pb2, node_service_pb2_grpc
from shard_core.errors import error_info
from shard_tool.local import LocalMesh
from shard_tool.publish import Publisher
from tests.demo import MODEL_REPOSITORY, push_copy, simple_inputs, target

POOL = {"pool": "scheduling"}
SELECTOR = deployment_pb2.NodeSelector(labels=POOL)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def pool(mesh: LocalMesh) -> AsyncIterator[list[str]]:
    names = [f"pool-{index}" for index in range(3)]
    await asyncio.gather(*(mesh.start_node(name, labels=POOL) for name in names))
    yield names


async def _deployment(publisher: Publisher, name: str) -> deployment_pb2.Deployment:
    reply = await publisher.deployments.GetDeployment(api.GetDeploymentRequest(name=name))
    return reply.deployment


async def _until(check: object, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not await check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.2)


def _infer(client: triton.InferenceServerClient, model: str, version: str = "") -> str:
    data = np.arange(16, dtype=np.int32).reshape(1, 16)
    result = client.infer(model, simple_inputs(data, data), model_version=version)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data * 2)
    return str(result.get_response().model_version)


async def _node_of(mesh: LocalMesh, node_name: str) -> str:
    """The local name (pool-N) of the node with resource name `node_name`."""
    for name in mesh.nodes:
        found = await mesh.find_node(name)
        if found is not None and found.name == node_name:
            return name
    raise AssertionError(f"{node_name} is not a node this mesh started")


async def test_two_replicas_on_three_nodes_are_ready_explained_and_served(
    mesh: LocalMesh, pool: list[str], publisher: Publisher
) -> None:
    await push_copy(publisher, "pooled")
    await publisher.deploy("pooled", [target("1", replicas=2)], node_selector=SELECTOR)
    await publisher.wait_available("deployments/pooled", timeout=60)

    deployment = await _deployment(publisher, "deployments/pooled")
    (status,) = deployment.status.targets
    assert (status.desired_replicas, status.ready_replicas) == (2, 2)
    assert len(set(status.nodes)) == 2
    explained = await publisher.deployments.ExplainDeployment(
        api.ExplainDeploymentRequest(name="deployments/pooled")
    )
    assert sorted(p.node for p in explained.placements) == sorted(status.nodes)
    assert all("of" in p.message and "nodes fit" in p.message for p in explained.placements)
    placed = [d.node for d in explained.history if d.reason == "PLACED"]
    assert sorted(placed) == sorted(status.nodes)
    client = triton.InferenceServerClient(mesh.router_address)
    assert {_infer(client, "pooled") for _ in range(20)} == {"1"}


async def test_draining_a_node_moves_its_replica_first(
    mesh: LocalMesh, pool: list[str], publisher: Publisher
) -> None:
    before = (await _deployment(publisher, "deployments/pooled")).status.targets[0].nodes
    drained = before[0]
    async with mesh.admin_channel() as channel:
        nodes = node_service_pb2_grpc.NodeServiceStub(channel)
        reply = await nodes.DrainNode(
            node_service_pb2.DrainNodeRequest(name=drained, reason="maintenance")
        )
        assert reply.node.state == node_pb2.NODE_STATE_DRAINING
        try:

            async def moved() -> bool:
                status = (await _deployment(publisher, "deployments/pooled")).status.targets[0]
                return drained not in status.nodes and status.ready_replicas == 2

            await _until(moved)
            got = await nodes.GetNode(node_service_pb2.GetNodeRequest(name=drained))
            assert (got.node.state, got.node.state_reason) == (
                node_pb2.NODE_STATE_DRAINING,
                "maintenance",
            )
            history = (
                await publisher.deployments.ExplainDeployment(
                    api.ExplainDeploymentRequest(name="deployments/pooled")
                )
            ).history
            assert history[0].reason == "NODE_DRAINING"
            assert history[0].node == drained
        finally:
            await nodes.UncordonNode(node_service_pb2.UncordonNodeRequest(name=drained))
    client = triton.InferenceServerClient(mesh.router_address)
    assert {_infer(client, "pooled") for _ in range(10)} == {"1"}


async def test_a_killed_node_s_replica_is_placed_elsewhere_and_served_again(
    mesh: LocalMesh, pool: list[str], publisher: Publisher
) -> None:
    status = (await _deployment(publisher, "deployments/pooled")).status.targets[0]
    victim = status.nodes[0]
    mesh.nodes[await _node_of(mesh, victim)].process.kill()
    killed_at = time.monotonic()

    async def replaced() -> bool:
        now = (await _deployment(publisher, "deployments/pooled")).status.targets[0]
        return victim not in now.nodes and now.ready_replicas == 2

    await _until(replaced, timeout=mesh.timing.lease_ttl_s + 60)
    recovered_after = time.monotonic() - killed_at
    print(f"killed node's replica ready elsewhere after {recovered_after:.1f}s")
    history = (
        await publisher.deployments.ExplainDeployment(
            api.ExplainDeploymentRequest(name="deployments/pooled")
        )
    ).history
    lost = [d for d in history if d.reason == "NODE_LOST"]
    assert lost
    assert lost[0].node == victim
    client = triton.InferenceServerClient(mesh.router_address)
    assert {_infer(client, "pooled") for _ in range(20)} == {"1"}
    assert recovered_after < mesh.timing.lease_ttl_s + 60


async def test_a_deployment_that_fits_nowhere_says_why(
    mesh: LocalMesh, pool: list[str], publisher: Publisher
) -> None:
    await push_copy(publisher, "too-big")
    await publisher.deploy(
        "too-big",
        [target("1", replicas=1)],
        resources=deployment_pb2.Resources(memory_bytes=2**50),  # a pebibyte
        node_selector=SELECTOR,
    )

    async def unschedulable() -> bool:
        conditions = {
            c.type: c
            for c in (await _deployment(publisher, "deployments/too-big")).status.conditions
        }
        return "Unschedulable" in conditions and conditions["Unschedulable"].status

    await _until(unschedulable)
    deployment = await _deployment(publisher, "deployments/too-big")
    conditions = {c.type: c for c in deployment.status.conditions}
    assert conditions["Unschedulable"].reason == "INSUFFICIENT_MEMORY"
    assert "too little memory (need 1048576.0 GiB" in conditions["Unschedulable"].message
    assert conditions["Available"].status is False
    history = (
        await publisher.deployments.ExplainDeployment(
            api.ExplainDeploymentRequest(name="deployments/too-big")
        )
    ).history
    assert [d.action for d in history] == [deployment_pb2.PLACEMENT_ACTION_UNSCHEDULABLE]
    await publisher.deployments.DeleteDeployment(
        api.DeleteDeploymentRequest(name="deployments/too-big")
    )


async def test_a_stale_etag_is_aborted(pool: list[str], publisher: Publisher) -> None:
    current = await _deployment(publisher, "deployments/pooled")
    first = deployment_pb2.Deployment()
    first.CopyFrom(current)
    first.ClearField("status")
    update = api.UpdateDeploymentRequest(deployment=first)
    updated = await publisher.deployments.UpdateDeployment(update)
    assert updated.deployment.etag != current.etag
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await publisher.deployments.UpdateDeployment(api.UpdateDeploymentRequest(deployment=first))
    assert raised.value.code() == grpc.StatusCode.ABORTED
    assert error_info(raised.value).reason == "ETAG_MISMATCH"  # type: ignore[union-attr]


async def test_canary_weights_split_traffic(
    mesh: LocalMesh, pool: list[str], publisher: Publisher
) -> None:
    await push_copy(publisher, "canary", versions=("1", "2"))
    await publisher.deploy(
        "canary",
        [target("1", replicas=1, weight=90), target("2", replicas=1, weight=10)],
        node_selector=SELECTOR,
    )
    await publisher.wait_available("deployments/canary", timeout=60)
    client = triton.InferenceServerClient(mesh.router_address)

    served = collections.Counter(_infer(client, "canary") for _ in range(1000))
    print(f"canary 90/10 over 1000 requests: {dict(served)}")

    assert set(served) == {"1", "2"}
    assert sum(served.values()) == 1000
    # 100 expected; the binomial standard deviation is 9.5: 4 of them either side.
    assert 62 <= served["2"] <= 138, served
    # An explicit version is never split.
    assert {_infer(client, "canary", "2") for _ in range(20)} == {"2"}


@pytest.mark.parametrize(
    ("deployment", "field"),
    [
        (deployment_pb2.Deployment(model="models/pooled", targets=[target("9", 1)]),
         "deployment.targets[0].version"),
        (deployment_pb2.Deployment(model="models/pooled", targets=[target("1", -1)]),
         "deployment.targets[0].replicas"),
        (deployment_pb2.Deployment(model="models/pooled"), "deployment.targets"),
        (deployment_pb2.Deployment(model="pooled", targets=[target("1", 1)]), "deployment.model"),
        (deployment_pb2.Deployment(model="models/pooled", targets=[target("1", 1), target("1", 1)]),
         "deployment.targets[1].version"),
        (deployment_pb2.Deployment(
            model="models/pooled", targets=[target("1", 1)],
            resources=deployment_pb2.Resources(cpu_millis=-5)),
         "deployment.resources.cpu_millis"),
    ],
)  # fmt: skip
async def test_bad_deployments_name_the_field(
    pool: list[str], publisher: Publisher, deployment: deployment_pb2.Deployment, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await publisher.deployments.CreateDeployment(
            api.CreateDeploymentRequest(deployment_id="bad-one", deployment=deployment)
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
    assert error_info(raised.value).metadata["field"] == field  # type: ignore[union-attr]


async def test_a_model_has_one_deployment(pool: list[str], publisher: Publisher) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await publisher.deployments.CreateDeployment(
            api.CreateDeploymentRequest(
                deployment_id="pooled-again",
                deployment=deployment_pb2.Deployment(
                    model="models/pooled", targets=[target("1", 1)]
                ),
            )
        )
    assert raised.value.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_a_node_refuses_files_that_do_not_verify(
    mesh: LocalMesh, pool: list[str], publisher: Publisher, tmp_path: Path
) -> None:
    model_py = tmp_path / "1" / "model.py"
    model_py.parent.mkdir()
    source = (MODEL_REPOSITORY / "simple" / "1" / "model.py").read_text()
    model_py.write_text(source + "\n# a blob of its own\n")
    config = (MODEL_REPOSITORY / "simple" / "config.pbtxt").read_text()
    config = config.replace('name: "simple"', "")
    await publisher.ensure_model("tampered", model_pb2.Model())
    version = await publisher.push_version("tampered", model_py.parent, config)
    # Someone with access to the blob store flips a byte, keeping the size.
    sha = version.files[0].sha256
    stored = mesh.state_dir / "blobs" / "sha256" / sha[:2] / sha
    data = bytearray(stored.read_bytes())
    data[0] ^= 0xFF
    stored.write_bytes(bytes(data))

    await publisher.deploy("tampered", [target("1", replicas=1)], node_selector=SELECTOR)

    async def failed() -> bool:
        deployment = await _deployment(publisher, "deployments/tampered")
        nodes = deployment.status.targets[0].nodes if deployment.status.targets else []
        for name in nodes:
            node = await mesh.find_node(await _node_of(mesh, name))
            states = {m.model_name: m for m in node.models} if node else {}
            if "tampered" in states and states["tampered"].state == node_pb2.MODEL_STATE_FAILED:
                return "did not verify" in states["tampered"].reason
        return False

    await _until(failed)
    deployment = await _deployment(publisher, "deployments/tampered")
    assert deployment.status.targets[0].ready_replicas == 0
    admin = {"authorization": f"Bearer {mesh.admin_token}"}  # the model is private
    router = triton.InferenceServerClient(mesh.router_address)
    assert not router.is_model_ready("tampered", headers=admin)
    await publisher.deployments.DeleteDeployment(
        api.DeleteDeploymentRequest(name="deployments/tampered")
    )
