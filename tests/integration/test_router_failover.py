"""A replica's node dies under load: retries and outlier ejection keep every client request
succeeding."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from shard.deployment.v1 import deployment_pb2
from shard_tool.local import LocalMesh
from shard_tool.publish import Publisher
from tests.demo import push_copy, target

LABELS = {"pool": "failover"}


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
    mesh.nodes["failover-b"].process.kill()  # the agent and, with it, its Triton
    await load

    assert failures == []
    assert served > 100
