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


async def test_list_nodes(mesh: LocalMesh, http: aiohttp.ClientSession) -> None:
    admin = {"Authorization": f"Bearer {mesh.admin_token}"}
    async with http.get("/v1/nodes", params={"page_size": "1"}, headers=admin) as response:
        assert response.status == 200
        body = await response.json()
    assert len(body["nodes"]) == 1
    assert body["nextPageToken"]
    assert body["nodes"][0]["state"] == "NODE_STATE_ACTIVE"


async def test_list_nodes_needs_a_key(http: aiohttp.ClientSession) -> None:
    async with http.get("/v1/nodes") as response:
        assert response.status == 401
        body = await response.json()
    assert body["reason"] == "CREDENTIALS_MISSING"
    async with http.get("/v1/nodes", headers={"Authorization": "Bearer nope"}) as response:
        assert response.status == 401
        assert (await response.json())["reason"] == "BAD_CREDENTIALS"


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"page_size": "ten"}, "page_size"),
        ({"page_size": "99999999999"}, "page_size"),
        ({"page_size": "-1"}, "page_size"),
        ({"page_token": "garbage!"}, "page_token"),
    ],
)
async def test_list_nodes_bad_input_is_400_naming_the_field(
    mesh: LocalMesh, http: aiohttp.ClientSession, params: dict[str, str], field: str
) -> None:
    admin = {"Authorization": f"Bearer {mesh.admin_token}"}
    async with http.get("/v1/nodes", params=params, headers=admin) as response:
        assert response.status == 400
        body = await response.json()
    assert field in body["error"]
    assert body["reason"] == "INVALID_ARGUMENT"
