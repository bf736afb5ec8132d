"""Every control-plane service serves Prometheus /metrics with its own OpenTelemetry metrics."""

from __future__ import annotations

import aiohttp
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.http as triton_http

from shard_tool.local import LocalMesh
from tests.demo import simple_inputs


@pytest.mark.parametrize(
    ("port_of", "metric"),
    [
        ("registry_metrics", "shard_registry_heartbeats_total"),
        ("router_metrics", "shard_router_routes"),
        ("router_metrics", "shard_router_view_stale"),
    ],
)
async def test_service_metrics_are_scrapeable(mesh: LocalMesh, port_of: str, metric: str) -> None:
    port = getattr(mesh.ports, port_of)
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        assert response.status == 200
        text = await response.text()
    samples = [line for line in text.splitlines() if line.startswith(metric)]
    assert samples, f"{metric} missing from /metrics"
    if metric == "shard_router_routes":
        # Two nodes, three demo models each.
        assert float(samples[0].rsplit(" ", 1)[1]) >= 6
    if metric == "shard_registry_heartbeats_total":
        assert float(samples[0].rsplit(" ", 1)[1]) > 0


@pytest.mark.parametrize(
    ("port_of", "door", "listener"),
    [("router_metrics", "grpc", "plaintext"), ("gateway_metrics", "rest", "plaintext")],
)
async def test_each_edge_s_envoy_stats_come_with_its_service_s(
    mesh: LocalMesh, port_of: str, door: str, listener: str
) -> None:
    """Envoy's own statistics (requests per listener, per model version's cluster and node)
    are scraped with the service's /metrics: no port of Envoy's is exposed."""
    data = np.ones((1, 16), dtype=np.int32)
    if door == "grpc":
        client = triton.InferenceServerClient(mesh.router_address)
        client.infer("simple", simple_inputs(data, data))
    else:
        rest = triton_http.InferenceServerClient(mesh.gateway_url.removeprefix("http://"))
        inputs = [triton_http.InferInput(name, [1, 16], "INT32") for name in ("INPUT0", "INPUT1")]
        for tensor in inputs:
            tensor.set_data_from_numpy(data)
        rest.infer("simple", inputs)
    port = getattr(mesh.ports, port_of)
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        text = await response.text()
    requests = [
        line
        for line in text.splitlines()
        if line.startswith("envoy_http_downstream_rq_total")
        and f'envoy_http_conn_manager_prefix="{listener}"' in line
    ]
    assert requests
    assert float(requests[0].rsplit(" ", 1)[1]) >= 1
    clusters = {
        line.split('envoy_cluster_name="', 1)[1].split('"', 1)[0]
        for line in text.splitlines()
        if line.startswith("envoy_cluster_upstream_rq_total")
    }
    assert any(name.startswith("m/simple/") for name in clusters), clusters


async def test_gateway_serves_metrics(mesh: LocalMesh) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{mesh.ports.gateway_metrics}/metrics") as response,
    ):
        assert response.status == 200
        assert "process_cpu_seconds_total" in await response.text()
