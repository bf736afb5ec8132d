"""Every control-plane service serves Prometheus /metrics with its own OpenTelemetry metrics."""

from __future__ import annotations

import aiohttp
import pytest

from shard_tool.local import LocalMesh


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


async def test_gateway_serves_metrics(mesh: LocalMesh) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{mesh.ports.gateway_metrics}/metrics") as response,
    ):
        assert response.status == 200
        assert "process_cpu_seconds_total" in await response.text()
