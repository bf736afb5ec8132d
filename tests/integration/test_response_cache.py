"""The response cache: identical requests to a cacheable version are answered once."""

from __future__ import annotations

import asyncio

import aiohttp
import numpy as np
import pytest
import tritonclient.grpc as triton

from shard_tool.local import LocalMesh
from shard_tool.publish import Publisher
from tests.demo import push_copy, simple_inputs, target

MODEL = "cached-echo"
TTL_S = 2


def _executions(router: triton.InferenceServerClient) -> int:
    """How many times the model ran, summed over its replicas."""
    stats = router.get_inference_statistics(MODEL)
    return sum(model.inference_count for model in stats.model_stats)


async def _lookups(mesh: LocalMesh, result: str) -> float:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{mesh.ports.router_metrics}/metrics") as response,
    ):
        text = await response.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("shard_router_cache_lookups_total") and f'result="{result}"' in line
    )


@pytest.fixture(scope="module")
async def cached_model(mesh: LocalMesh) -> str:
    async with mesh.admin_channel() as channel:
        publisher = Publisher(channel=channel)
        # No canaries: their probes would run the model behind the test's back.
        await push_copy(publisher, MODEL, response_cache_ttl_seconds=TTL_S, canaries=False)
        await publisher.deploy(MODEL, [target("1", replicas=1)])
        await publisher.wait_available(f"deployments/{MODEL}", timeout=60)
    return MODEL


async def test_a_repeated_request_is_answered_from_the_cache(
    mesh: LocalMesh, cached_model: str
) -> None:
    router = triton.InferenceServerClient(mesh.router_address)
    data = np.arange(16, dtype=np.int32).reshape(1, 16)
    hits_before = await _lookups(mesh, "hit")

    first = router.infer(MODEL, simple_inputs(data, data), request_id="first")
    ran = _executions(router)
    second = router.infer(MODEL, simple_inputs(data, data), request_id="second")
    assert _executions(router) == ran  # the model did not run again
    assert second.get_response().id == "second"  # the caller's own id on the cached answer
    assert second.get_response().raw_output_contents == first.get_response().raw_output_contents
    assert await _lookups(mesh, "hit") == hits_before + 1

    other = np.full((1, 16), 3, dtype=np.int32)
    np.testing.assert_array_equal(
        router.infer(MODEL, simple_inputs(other, other)).as_numpy("OUTPUT0"), other * 2
    )
    assert _executions(router) == ran + 1  # other inputs are another entry

    router.infer(MODEL, simple_inputs(data, data), headers={"cache-control": "no-cache"})
    assert _executions(router) == ran + 2  # asked for a fresh answer

    await asyncio.sleep(TTL_S + 0.5)
    router.infer(MODEL, simple_inputs(data, data))
    assert _executions(router) == ran + 3  # expired


async def test_the_gateway_serves_cached_answers_byte_for_byte(
    mesh: LocalMesh, cached_model: str
) -> None:
    router = triton.InferenceServerClient(mesh.router_address)
    body = {
        "inputs": [
            {"name": name, "datatype": "INT32", "shape": [1, 16], "data": [7] * 16}
            for name in ("INPUT0", "INPUT1")
        ]
    }
    path = f"/v2/models/{MODEL}/infer"
    async with aiohttp.ClientSession(base_url=mesh.gateway_url) as http:
        async with http.post(path, json=body) as response:
            assert response.status == 200
            first = await response.read()
        ran = _executions(router)
        async with http.post(path, json=body) as response:
            second = await response.read()
        assert second == first
        assert _executions(router) == ran
        async with http.post(path, json=body, headers={"Cache-Control": "no-cache"}) as response:
            assert await response.read() == first
        assert _executions(router) == ran + 1


async def test_uncacheable_versions_always_run(mesh: LocalMesh, publisher: Publisher) -> None:
    await push_copy(publisher, "uncached-echo", canaries=False)
    await publisher.deploy("uncached-echo", [target("1", replicas=1)])
    await publisher.wait_available("deployments/uncached-echo", timeout=60)
    router = triton.InferenceServerClient(mesh.router_address)
    data = np.ones((1, 16), dtype=np.int32)

    def runs() -> int:
        stats = router.get_inference_statistics("uncached-echo")
        return sum(model.inference_count for model in stats.model_stats)

    before = runs()
    for _ in range(3):
        router.infer("uncached-echo", simple_inputs(data, data))
    assert runs() == before + 3
