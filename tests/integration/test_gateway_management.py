"""The gateway's management REST API, made from the protos' HTTP annotations, and its OpenAPI
document: checked by hand, then by schemathesis against the live gateway."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import hypothesis
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from shard_gateway.management import bindings
from shard_tool.local import LocalMesh

# Operations schemathesis may call: every read, and creations of models (removed afterwards) and
# join tokens (which expire). Nothing that changes the demo models, the nodes or existing keys.
FUZZED_WRITES = {"ModelService_CreateModel", "NodeService_CreateJoinToken"}


@pytest.fixture
async def http(mesh: LocalMesh) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=mesh.gateway_url) as session:
        yield session


@pytest.fixture
def admin(mesh: LocalMesh) -> dict[str, str]:
    return {"Authorization": f"Bearer {mesh.admin_token}"}


async def _call(
    http: aiohttp.ClientSession, method: str, path: str, status: int, **kwargs: Any
) -> Any:
    async with http.request(method, path, **kwargs) as response:
        body = await response.json()
        assert response.status == status, body
        return body


async def test_list_nodes(http: aiohttp.ClientSession, admin: dict[str, str]) -> None:
    body = await _call(http, "GET", "/v1/nodes", 200, params={"page_size": "1"}, headers=admin)
    assert len(body["nodes"]) == 1
    assert body["nextPageToken"]
    # Whatever its state (another test may have quarantined the first node by name).
    assert body["nodes"][0]["state"].startswith("NODE_STATE_")
    name = body["nodes"][0]["name"]
    fetched = await _call(http, "GET", f"/v1/{name}", 200, headers=admin)
    assert fetched["node"]["name"] == name


async def test_list_nodes_needs_a_key(http: aiohttp.ClientSession) -> None:
    body = await _call(http, "GET", "/v1/nodes", 401)
    assert body["reason"] == "CREDENTIALS_MISSING"
    body = await _call(http, "GET", "/v1/nodes", 401, headers={"Authorization": "Bearer nope"})
    assert body["reason"] == "BAD_CREDENTIALS"


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ([("page_size", "ten")], "page_size"),
        ([("page_size", "99999999999")], "page_size"),
        ([("page_size", "-1")], "page_size"),
        ([("page_token", "garbage!")], "page_token"),
        ([("page_size", "1"), ("page_size", "2")], "page_size"),
        ([("no_such_field", "1")], "no_such_field"),
    ],
)
async def test_list_nodes_bad_input_is_400_naming_the_field(
    http: aiohttp.ClientSession,
    admin: dict[str, str],
    params: list[tuple[str, str]],
    field: str,
) -> None:
    body = await _call(http, "GET", "/v1/nodes", 400, params=params, headers=admin)
    assert field in body["error"]
    assert body["code"] == "INVALID_ARGUMENT"
    assert body["reason"] == "INVALID_ARGUMENT"


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (b"{not json", "body"),
        (b'{"description": 5}', "description"),
        (b'{"visibility": "VISIBILITY_SOMETIMES"}', "visibility"),
        (b'{"visibility": 5}', "visibility"),
        (b'{"noSuchField": 1}', "noSuchField"),
        (b'{"labels": {"team": 1}}', "labels"),
        (b'["a model"]', "model"),
    ],
)
async def test_a_body_that_does_not_fit_is_400_naming_the_field(
    http: aiohttp.ClientSession, admin: dict[str, str], data: bytes, field: str
) -> None:
    body = await _call(
        http, "POST", "/v1/models", 400, params={"model_id": "never-made"}, data=data, headers=admin
    )
    assert field in body["error"]
    assert body["reason"] == "INVALID_ARGUMENT"


async def test_input_grpc_cannot_carry_is_refused_not_a_server_error(
    http: aiohttp.ClientSession, admin: dict[str, str]
) -> None:
    huge = b'{"rateLimitRps": 1' + b"0" * 400 + b"}"
    body = await _call(
        http, "POST", "/v1/models", 400, params={"model_id": "never-made"}, data=huge, headers=admin
    )
    assert body["reason"] == "INVALID_ARGUMENT"
    body = await _call(http, "GET", "/v1/nodes", 401, headers={"Authorization": "Bearer é"})
    assert body["reason"] == "BAD_CREDENTIALS"


async def test_a_model_over_rest(http: aiohttp.ClientSession, admin: dict[str, str]) -> None:
    model_id = f"rest-{secrets.token_hex(4)}"
    path = f"/v1/models/{model_id}"
    created = await _call(
        http,
        "POST",
        "/v1/models",
        200,
        params={"model_id": model_id},
        json={"description": "first", "visibility": "VISIBILITY_PUBLIC", "labels": {"team": "a"}},
        headers=admin,
    )
    model = created["model"]
    assert model["name"] == f"models/{model_id}"
    assert model["owner"] == "admin"
    assert model["labels"] == {"team": "a"}
    assert model["createTime"].endswith("Z")
    again = await _call(
        http, "POST", "/v1/models", 409, params={"model_id": model_id}, json={}, headers=admin
    )
    assert again["code"] == "ALREADY_EXISTS"
    assert (await _call(http, "GET", path, 200, headers=admin))["model"] == model

    # Only the masked fields change; a mask takes proto names or JSON's camelCase.
    change = {"description": "second", "visibility": "VISIBILITY_PRIVATE"}
    for mask, rate, expected_rate in (
        ("description", 5, 0),
        ("description,rate_limit_rps", 5, 5),
        ("labels,rateLimitRps", 7, 7),
    ):
        updated = await _call(
            http,
            "PATCH",
            path,
            200,
            params={"update_mask": mask},
            json={**change, "rateLimitRps": rate},
            headers=admin,
        )
        assert updated["model"]["description"] == "second"
        assert updated["model"]["rateLimitRps"] == expected_rate
        assert updated["model"]["visibility"] == "VISIBILITY_PUBLIC"
    assert updated["model"]["labels"] == {}
    stale = await _call(
        http,
        "PATCH",
        path,
        409,
        params={"updateMask": "description"},
        json={"description": "late", "etag": model["etag"]},
        headers=admin,
    )
    assert stale["code"] == "ABORTED"
    assert stale["reason"] == "ETAG_MISMATCH"
    refused = await _call(
        http, "PATCH", path, 400, params={"update_mask": "create_time"}, json={}, headers=admin
    )
    assert "update_mask" in refused["error"]
    # Without a mask, a PATCH changes the fields its body carries and nothing else.
    partial = await _call(http, "PATCH", path, 200, json={"description": "third"}, headers=admin)
    assert partial["model"]["description"] == "third"
    assert partial["model"]["visibility"] == "VISIBILITY_PUBLIC"
    assert partial["model"]["rateLimitRps"] == 7
    nothing = await _call(
        http, "PATCH", path, 400, json={"name": f"models/{model_id}"}, headers=admin
    )
    assert "update" in nothing["error"]

    listed = await _call(http, "GET", "/v1/models", 200, params={"page_size": 1000}, headers=admin)
    assert f"models/{model_id}" in {found["name"] for found in listed["models"]}
    assert await _call(http, "DELETE", path, 200, headers=admin) == {}
    gone = await _call(http, "GET", path, 404, headers=admin)
    assert gone["reason"] == "NOT_FOUND"


async def test_api_keys_over_rest(http: aiohttp.ClientSession, admin: dict[str, str]) -> None:
    created = await _call(
        http,
        "POST",
        "/v1/keys",
        200,
        json={"principal": "rest-developer", "role": "ROLE_DEVELOPER", "displayName": "rest"},
        headers=admin,
    )
    name, secret = created["apiKey"]["name"], created["secret"]
    developer = {"Authorization": f"Bearer {secret}"}
    listed = await _call(http, "GET", "/v1/keys", 200, headers=developer)
    assert [key["name"] for key in listed["apiKeys"]] == [name]
    refused = await _call(
        http, "POST", "/v1/models", 403, params={"model_id": "x"}, json={}, headers=developer
    )
    assert refused["reason"] == "PERMISSION_MISSING"

    revoked = await _call(http, "POST", f"/v1/{name}:revoke", 200, headers=developer)
    assert revoked["apiKey"]["revokeTime"]
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        async with http.get("/v1/keys", headers=developer) as response:
            if response.status == 401:
                assert (await response.json())["reason"] == "KEY_REVOKED"
                break
        assert asyncio.get_running_loop().time() < deadline, "the revoked key still works"
        await asyncio.sleep(0.05)


async def test_the_document_lists_every_route(http: aiohttp.ClientSession) -> None:
    document = await _call(http, "GET", "/openapi.json", 200)
    listed = {
        (method.upper(), path)
        for path, operations in document["paths"].items()
        for method in operations
    }
    assert listed == {(binding.http_method, binding.path) for binding in bindings()}
    assert ("GET", "/v1/models/{model}/versions/{version}") in listed
    assert ("POST", "/v1/keys/{key}:revoke") in listed
    assert document["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    node = document["components"]["schemas"]["shard.node.v1.Node"]["properties"]
    assert node["registerTime"]["format"] == "date-time"
    assert node["publicKey"]["format"] == "byte"
    assert node["labels"]["additionalProperties"] == {"type": "string"}


def _fuzz(gateway_url: str, admin_token: str) -> None:
    """Schemathesis against the live gateway, from its own document."""
    schema = schemathesis.openapi.from_url(f"{gateway_url}/openapi.json").include(
        lambda context: (
            context.operation.method.upper() == "GET"
            or context.operation.definition.raw["operationId"] in FUZZED_WRITES
        )
    )
    headers = {"Authorization": f"Bearer {admin_token}"}
    checks = [not_a_server_error, response_schema_conformance, status_code_conformance]
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result
        operations.append(result.ok())
    assert len(operations) > 10
    for operation in operations:

        @hypothesis.given(case=operation.as_strategy())
        @hypothesis.settings(
            max_examples=10,
            deadline=None,
            database=None,
            suppress_health_check=list(hypothesis.HealthCheck),
            phases=[hypothesis.Phase.generate],
        )
        def check(case: schemathesis.Case[Any]) -> None:
            case.call_and_validate(base_url=gateway_url, headers=headers, checks=checks)

        check()


async def test_schemathesis_finds_no_server_errors_and_no_schema_violations(
    mesh: LocalMesh, http: aiohttp.ClientSession, admin: dict[str, str]
) -> None:
    before = await _call(http, "GET", "/v1/models", 200, params={"page_size": 1000}, headers=admin)
    try:
        await asyncio.to_thread(_fuzz, mesh.gateway_url, mesh.admin_token)
    finally:
        after = await _call(
            http, "GET", "/v1/models", 200, params={"page_size": 1000}, headers=admin
        )
        kept = {model["name"] for model in before["models"]}
        for model in after["models"]:
            if model["name"] not in kept:
                await _call(http, "DELETE", f"/v1/{model['name']}", 200, headers=admin)
