"""etcd goes away while the shard serves: the router keeps serving from its last known view and
says so; when etcd is back, everything picks up where it was."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import grpc
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shard_tool.local import LocalMesh
from tests.demo import infer_simple

VIEW = "shard.inference.v1.EndpointView"


async def _view_health(mesh: LocalMesh) -> int:
    async with grpc.aio.insecure_channel(mesh.router_address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=VIEW), timeout=5
        )
    return int(reply.status)


async def _stale_gauge(mesh: LocalMesh) -> float:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{mesh.ports.router_metrics}/metrics") as response,
    ):
        text = await response.text()
    line = next(line for line in text.splitlines() if line.startswith("shard_router_view_stale"))
    return float(line.rsplit(" ", 1)[1])


async def _until(check: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not await check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.2)


async def test_the_router_serves_through_an_etcd_outage(mesh: LocalMesh) -> None:
    router = triton.InferenceServerClient(mesh.router_address)
    assert await _view_health(mesh) == health_pb2.HealthCheckResponse.SERVING
    assert await _stale_gauge(mesh) == 0

    async def routable() -> bool:  # earlier tests may have moved `simple` around
        return bool(router.is_model_ready("simple"))

    await _until(routable)

    mesh.etcd.stop()
    try:

        async def stale() -> bool:
            not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
            return await _view_health(mesh) == not_serving and await _stale_gauge(mesh) == 1

        await _until(stale)
        for _ in range(20):  # still serving, from the last known view
            infer_simple(router)
        assert router.is_server_live()
    finally:
        await mesh.etcd.start()

    async def fresh() -> bool:
        serving = health_pb2.HealthCheckResponse.SERVING
        return await _view_health(mesh) == serving and await _stale_gauge(mesh) == 0

    await _until(fresh)

    async def nodes_back() -> bool:
        return all([await mesh.find_node(name) is not None for name in ("node-0", "node-1")])

    await _until(nodes_back)
    for _ in range(20):
        infer_simple(router)
