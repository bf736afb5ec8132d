"""The gateway's first REST slice: KServe v2 health and metadata, and the node list."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from shard_tool.local import LocalMesh


@pytest.fixture
async def http(mesh: LocalMesh) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=mesh.gateway_url) as session:
        yield session


async def test_health(http: aiohttp.ClientSession) -> None:
    async with http.get("/v2/health/live") as live:
        assert live.status == 200
    async with http.get("/v2/health/ready") as ready:
        assert ready.status == 200
        assert (await ready.json())["ready"] is True


async def test_server_metadata_comes_from_the_router(http: aiohttp.ClientSession) -> None:
    async with http.get("/v2") as response:
        assert response.status == 200
        body = await response.json()
    assert body["name"] == "ai-shard"
    assert "model_configuration" in body["extensions"]


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/v2/models/simple/ready", 200),
        ("/v2/models/simple/versions/1/ready", 200),
        ("/v2/models/simple/versions/9/ready", 400),
        ("/v2/models/no_such_model/ready", 400),
    ],
)
async def test_model_ready(http: aiohttp.ClientSession, path: str, status: int) -> None:
    async with http.get(path) as response:
        assert response.status == status
        assert (await response.json())["ready"] is (status == 200)
