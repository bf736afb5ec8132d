"""A registry restart loses nothing: nodes reconnect with their leases, models, deployments and
assignments are where they were, and the router never stops serving."""

from __future__ import annotations

import asyncio
import time

import tritonclient.grpc as triton

from shard.deployment.v1 import deployment_service_pb2 as api
from shard.deployment.v1 import deployment_service_pb2_grpc
from shard.node.v1 import node_service_pb2, node_service_pb2_grpc
from shard_core import keys
from shard_core.etcd.store import Entry, EtcdStore
from shard_tool.local import LocalMesh
from shard_tool.publish import Publisher
from tests.demo import infer_simple


async def _node_leases(store: EtcdStore) -> dict[str, int]:
    snapshot = await store.snapshot(keys.NODES)
    return {entry.key: entry.lease for entry in snapshot.entries}


async def _settled_assignments(mesh: LocalMesh, store: EtcdStore) -> list[Entry]:
    """The assignments once the scheduler has nothing left to do after earlier tests: every
    deployment available and the same assignments over a few control periods."""
    async with mesh.admin_channel() as channel:
        publisher = Publisher(channel=channel)
        for model in ("simple", "simple_string", "simple_identity"):
            await publisher.wait_available(f"deployments/{model}", timeout=60)
    deadline = time.monotonic() + 60
    seen = (await store.snapshot(keys.ASSIGNMENTS)).entries
    while True:
        await asyncio.sleep(mesh.timing.control_period_s * 3)
        now = (await store.snapshot(keys.ASSIGNMENTS)).entries
        if now == seen:
            return list(now)
        assert time.monotonic() < deadline, "the scheduler never settled"
        seen = now


async def test_registry_restart_keeps_nodes_leases_and_deployments(mesh: LocalMesh) -> None:
    store = EtcdStore(mesh.etcd.settings())
    router = triton.InferenceServerClient(mesh.router_address)
    try:
        leases_before = await _node_leases(store)
        assignments_before = await _settled_assignments(mesh, store)
        assert leases_before
        assert assignments_before

        await mesh.restart("registry")
        # Inference never needed the registry.
        infer_simple(router)

        async with mesh.admin_channel() as channel:
            nodes = node_service_pb2_grpc.NodeServiceStub(channel)
            deadline = time.monotonic() + 30
            while True:
                listed = await nodes.ListNodes(node_service_pb2.ListNodesRequest())
                if {f"nodes/{key.removeprefix(keys.NODES)}" for key in leases_before} <= {
                    node.name for node in listed.nodes
                }:
                    break
                assert time.monotonic() < deadline, "nodes did not come back"
                await asyncio.sleep(0.2)
            deployments = deployment_service_pb2_grpc.DeploymentServiceStub(channel)
            deployment = (
                await deployments.GetDeployment(api.GetDeploymentRequest(name="deployments/simple"))
            ).deployment
        assert await _node_leases(store) == leases_before
        assignments_after = (await store.snapshot(keys.ASSIGNMENTS)).entries
        assert [(e.key, e.value) for e in assignments_after] == [
            (e.key, e.value) for e in assignments_before
        ]
        assert deployment.status.targets[0].ready_replicas >= 1
        for _ in range(20):
            infer_simple(router)
    finally:
        await store.close()
