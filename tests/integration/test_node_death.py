"""A node that dies stops getting traffic once its lease expires."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import tritonclient.grpc as triton

from shard.deployment.v1 import deployment_service_pb2 as deployment_api
from shard.node.v1.node_pb2 import NODE_STATE_ACTIVE, NODE_STATE_PENDING
from shard.node.v1.node_service_pb2 import ListNodesRequest
from shard.node.v1.node_service_pb2_grpc import NodeServiceStub
from shard_node.triton import TritonProcess
from shard_tool.local import LocalMesh
from shard_tool.publish import Publisher
from tests.demo import infer_simple, target

NODE = "doomed"


def _inference_count(client: triton.InferenceServerClient) -> int:
    stats = client.get_inference_statistics("simple")
    return sum(model.inference_count for model in stats.model_stats)


async def test_sigkilled_node_stops_being_routed_to_after_its_lease_ttl(
    mesh: LocalMesh, spare_triton: TritonProcess, publisher: Publisher
) -> None:
    node = await mesh.start_node(
        NODE,
        triton_url=spare_triton.grpc_url,
        repository=spare_triton.model_repository,
        triton_control_key=spare_triton.control_key,
    )
    # A replica of `simple` on every live node, the new one included.
    before = await publisher.deployments.GetDeployment(
        deployment_api.GetDeploymentRequest(name="deployments/simple")
    )
    live = await NodeServiceStub(publisher.channel).ListNodes(ListNodesRequest())
    # Other tests' nodes may linger (quarantined, say): only those that can take a replica.
    able = [n for n in live.nodes if n.state in (NODE_STATE_PENDING, NODE_STATE_ACTIVE)]
    await publisher.deploy("simple", [target("1", replicas=len(able))])
    await publisher.wait_available("deployments/simple", timeout=60)
    try:
        await _killed_node_gets_no_traffic(mesh, spare_triton, node.process.pid)
    finally:
        await publisher.deploy("simple", list(before.deployment.targets))


async def _killed_node_gets_no_traffic(
    mesh: LocalMesh, spare_triton: TritonProcess, pid: int
) -> None:
    router = triton.InferenceServerClient(mesh.router_address)
    doomed_triton = triton.InferenceServerClient(spare_triton.grpc_url)

    # While the node lives, the router sends it a share of the traffic.
    before = _inference_count(doomed_triton)
    for _ in range(60):
        infer_simple(router)
    assert _inference_count(doomed_triton) > before

    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    while await mesh.find_node(NODE) is not None:
        assert time.monotonic() - killed_at < mesh.timing.lease_ttl_s + 2, "lease never expired"
        await asyncio.sleep(0.1)
    gone_after = time.monotonic() - killed_at
    assert gone_after <= mesh.timing.lease_ttl_s + 1

    # The node's Triton is still up and would answer: only the routing keeps traffic away.
    await asyncio.sleep(0.5)  # the router's watch delivers the deletion
    assert spare_triton.process.running()
    settled = _inference_count(doomed_triton)
    for _ in range(60):
        infer_simple(router)
    assert _inference_count(doomed_triton) == settled
