"""A node's self-check and supervision: live metrics in heartbeats, and a Triton that dies is
restarted, its models loaded again, the node DEGRADED and out of routing meanwhile."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import psutil
import tritonclient.grpc as triton

from shard.deployment.v1 import deployment_pb2
from shard.node.v1 import node_pb2
from shard_tool.local import LocalMesh
from shard_tool.publish import Publisher
from tests.demo import push_copy, simple_inputs, target


async def _until(check: object, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not await check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


async def test_heartbeats_carry_live_metrics_and_the_inventory(mesh: LocalMesh) -> None:
    node = await mesh.find_node("node-0")
    assert node is not None
    assert node.inventory.cpu_cores >= 1
    assert node.inventory.memory_bytes > 0
    assert node.inventory.disk_bytes > 0
    assert node.inventory.triton_version
    assert node.capacity.memory_bytes == node.inventory.memory_bytes
    assert node.metrics.memory_used_bytes > 0
    # Triton's own metrics: one pending-request gauge per loaded model. (Which models node-0
    # holds depends on what other tests deployed and scaled on the session's mesh.)
    ready = {m.model_name for m in node.models if m.state == node_pb2.MODEL_STATE_READY}
    assert ready
    assert ready <= {load.model_name for load in node.metrics.models}
    assert [t.to for t in node.transitions][-1] == node_pb2.NODE_STATE_PENDING


async def test_a_killed_triton_is_restarted_and_its_node_degraded_meanwhile(
    mesh: LocalMesh, publisher: Publisher
) -> None:
    labels = {"pool": "phoenix"}
    handle = await mesh.start_node("phoenix", labels=labels)
    await push_copy(publisher, "phoenix-echo")
    await publisher.deploy(
        "phoenix-echo",
        [target("1", replicas=1)],
        node_selector=deployment_pb2.NodeSelector(labels=labels),
    )
    await publisher.wait_available("deployments/phoenix-echo", timeout=60)
    router = triton.InferenceServerClient(mesh.router_address)
    data = np.ones((1, 16), dtype=np.int32)
    router.infer("phoenix-echo", simple_inputs(data, data))

    agent = psutil.Process(handle.process.pid)
    (server,) = [p for p in agent.children() if p.name() == "tritonserver"]
    server.kill()

    async def degraded() -> bool:
        node = await mesh.find_node("phoenix")
        return node is not None and node.state == node_pb2.NODE_STATE_DEGRADED

    await _until(degraded)
    node = await mesh.find_node("phoenix")
    assert node is not None
    assert any(p.startswith(("TRITON_DOWN", "TRITON_RESTARTED")) for p in node.problems)

    async def recovered() -> bool:
        node = await mesh.find_node("phoenix")
        if node is None:
            return False
        ready = any(
            m.model_name == "phoenix-echo" and m.state == node_pb2.MODEL_STATE_READY
            for m in node.models
        )
        return (
            ready
            and node.state == node_pb2.NODE_STATE_ACTIVE
            and router.is_model_ready("phoenix-echo")
        )

    await _until(recovered, timeout=90)
    result = router.infer("phoenix-echo", simple_inputs(data, data))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data * 2)
    node = await mesh.find_node("phoenix")
    assert node is not None
    reasons = [t.reason for t in node.transitions]  # newest first
    failed = next(i for i, r in enumerate(reasons) if r.startswith("SELF_CHECK_FAILED: TRITON"))
    assert "HEALTHY" in reasons[:failed]
