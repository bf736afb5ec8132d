"""A replica's node dies under load: retries and outlier ejection keep every client request
succeeding, and the dead node stops getting requests within 3 s."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from shard.deployment.v1 import deployment_pb2
from shard_tool.local import LocalMesh
from shard_tool.publish import Publisher
from tests.demo import push_copy, target

LABELS = {"pool": "failover"}
FAILED_ATTEMPTS = "shard_router_failed_attempts_total"


async def _failed_attempts(mesh: LocalMesh, address: str) -> float:
    """The router's count of requests it could not get to the Triton at `address`."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{mesh.ports.router_metrics}/metrics") as response,
    ):
        text = await response.text()
    label = f'address="{address}"'
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(FAILED_ATTEMPTS) and label in line
    )


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

    data = np.arange(16, dtype=np.int32).reshape(1, 16)
    served, failures = 0, []
    stop_at = time.monotonic() + 6

    async def client() -> None:
        nonlocal served
        async with triton_aio.InferenceServerClient(mesh.router_address) as router:
            inputs = []
            for name in ("INPUT0", "INPUT1"):
                tensor = triton_aio.InferInput(name, [1, 16], "INT32")
                tensor.set_data_from_numpy(data)
                inputs.append(tensor)
            while time.monotonic() < stop_at:
                try:
                    result = await router.infer("failover-echo", inputs, client_timeout=10)
                    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data * 2)
                    served += 1
                except InferenceServerException as error:
                    failures.append(str(error))

    load = asyncio.gather(*(client() for _ in range(16)))
    await asyncio.sleep(2)
    victim = mesh.nodes["failover-b"]
    address = f"127.0.0.1:{victim.triton_grpc_port}"
    victim.process.kill()  # the agent and, with it, its Triton
    killed_at = time.monotonic()
    # The router's every attempt on the dead node fails: watch when the last one happened.
    attempts, last_attempt_after = 0.0, 0.0
    while not load.done():
        count = await _failed_attempts(mesh, address)
        if count > attempts:
            attempts, last_attempt_after = count, time.monotonic() - killed_at
        await asyncio.sleep(0.05)
    await load

    print(f"\n{attempts:.0f} attempts on the dead node, the last {last_attempt_after:.2f} s after")
    assert failures == []
    assert served > 100
    assert attempts > 0  # it was getting traffic when it died...
    assert last_attempt_after < 3.0  # ...and stopped getting any within 3 s
