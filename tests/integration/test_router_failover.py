"""A replica's node dies under load: retries and outlier ejection keep every client request
succeeding, through the router's edge (gRPC) and the gateway's (REST), each an Envoy straight to
the node gates, and the dead node stops getting requests from either within 3 s."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import tritonclient.grpc.aio as triton_aio
import tritonclient.http.aio as triton_http
from tritonclient.utils import InferenceServerException

from shard.deployment.v1 import deployment_pb2
from shard_core.envoy import ADMIN_SOCKET, admin_request
from shard_tool.local import LocalMesh
from shard_tool.publish import Publisher
from tests.demo import push_copy, target

LABELS = {"pool": "failover"}


async def _edge_failed_attempts(edge_dir: Path, address: str) -> float:
    """An edge's count of requests it could not get to the node gate at `address` (from
    Envoy's per-host counters: failed requests and failed connections)."""
    _, text = await asyncio.to_thread(admin_request, edge_dir / ADMIN_SOCKET, "/clusters")
    return sum(
        float(line.rsplit("::", 1)[1])
        for line in text.splitlines()
        if f"::{address}::" in line and line.rsplit("::", 2)[1] in ("rq_error", "cx_connect_fail")
    )


class _Load:
    """Clients sending `failover-echo` requests until the time is up, counting what they get."""

    def __init__(self, mesh: LocalMesh, *, seconds: float) -> None:
        self.mesh = mesh
        self.stop_at = time.monotonic() + seconds
        self.data = np.arange(16, dtype=np.int32).reshape(1, 16)
        self.served = 0
        self.failures: list[str] = []

    async def client(self, *, grpc: bool) -> None:
        """A tritonclient at the router (gRPC) or at the gateway (REST)."""
        api: Any = triton_aio if grpc else triton_http
        url = self.mesh.router_address if grpc else self.mesh.gateway_url.removeprefix("http://")
        async with api.InferenceServerClient(url) as client:
            inputs = []
            for name in ("INPUT0", "INPUT1"):
                tensor = api.InferInput(name, [1, 16], "INT32")
                tensor.set_data_from_numpy(self.data)
                inputs.append(tensor)
            timeout = {"client_timeout": 10} if grpc else {}
            while time.monotonic() < self.stop_at:
                try:
                    result = await client.infer("failover-echo", inputs, **timeout)
                    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), self.data * 2)
                    self.served += 1
                except InferenceServerException as error:
                    self.failures.append(f"{'gRPC' if grpc else 'REST'}: {error}")


async def test_sigkill_under_16_way_load_fails_no_request(
    mesh: LocalMesh, publisher: Publisher
) -> None:
    await asyncio.gather(
        mesh.start_node("failover-a", labels=LABELS), mesh.start_node("failover-b", labels=LABELS)
    )
    await push_copy(publisher, "failover-echo")
    await publisher.deploy(
        "failover-echo",
        [target("1", replicas=2)],
        node_selector=deployment_pb2.NodeSelector(labels=LABELS),
    )
    await publisher.wait_available("deployments/failover-echo", timeout=60)

    load = _Load(mesh, seconds=6)
    running = asyncio.gather(
        *(load.client(grpc=True) for _ in range(12)), *(load.client(grpc=False) for _ in range(4))
    )
    await asyncio.sleep(2)
    victim = mesh.nodes["failover-b"]
    watched = {
        "router's edge": (mesh.router_edge_dir, f"127.0.0.1:{victim.gate_grpc_port}"),
        "gateway's edge": (mesh.gateway_edge_dir, f"127.0.0.1:{victim.gate_http_port}"),
    }
    # The machine dies: its Triton and the agent at once (SIGKILL, nothing drains).
    for process in psutil.Process(victim.process.pid).children(recursive=True):
        process.kill()
    victim.process.kill()
    killed_at = time.monotonic()
    # Every attempt on the dead node fails: watch when the last one happened.
    attempts = dict.fromkeys(watched, 0.0)
    last_attempt_after = dict.fromkeys(attempts, 0.0)
    while not running.done():
        counts = {
            hop: await _edge_failed_attempts(edge_dir, address)
            for hop, (edge_dir, address) in watched.items()
        }
        for hop, count in counts.items():
            if count > attempts[hop]:
                attempts[hop], last_attempt_after[hop] = count, time.monotonic() - killed_at
        await asyncio.sleep(0.05)
    await running

    for hop in attempts:
        print(
            f"\n{hop}: {attempts[hop]:.0f} attempts on the dead node, "
            f"the last {last_attempt_after[hop]:.2f} s after"
        )
    assert load.failures == []
    assert load.served > 100
    for hop in attempts:
        assert attempts[hop] > 0, hop  # it was getting traffic when it died...
        assert last_attempt_after[hop] < 3.0, hop  # ...and stopped getting any within 3 s
