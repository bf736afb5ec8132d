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
from shard_core.etcd.store import EtcdStore
from shard_core.settings import EtcdSettings
from shard_tool.local import LocalMesh
from tests.demo import infer_simple


async def _node_leases(store: EtcdStore) -> dict[str, int]:
    snapshot = await store.snapshot(keys.NODES)
    return {entry.key: entry.lease for entry in snapshot.entries}


async def test_registry_restart_keeps_nodes_leases_and_deployments(mesh: LocalMesh) -> None:
    store = EtcdStore(EtcdSettings(etcd_port=mesh.ports.etcd))
    router = triton.InferenceServerClient(mesh.router_address)
    try:
        leases_before = await _node_leases(store)
        assignments_before = (await store.snapshot(keys.ASSIGNMENTS)).entries
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
