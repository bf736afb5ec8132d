"""KServe v2 over HTTP at the gateway: Triton's own HTTP clients work unchanged."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import numpy as np
import pytest
import tritonclient.http as triton_http
import tritonclient.http.aio as triton_http_aio
from tritonclient.utils import InferenceServerException

from shard_tool.local import LocalMesh
from tests.waiting import until


def _host(mesh: LocalMesh) -> str:
    return mesh.gateway_url.removeprefix("http://")


@pytest.fixture
def client(mesh: LocalMesh) -> triton_http.InferenceServerClient:
    return triton_http.InferenceServerClient(_host(mesh))


@pytest.fixture
async def http(mesh: LocalMesh) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=mesh.gateway_url) as session:
        yield session


def _inputs(
    a: np.ndarray[Any, Any], b: np.ndarray[Any, Any], *, binary: bool, datatype: str = "INT32"
) -> list[triton_http.InferInput]:
    tensors = []
    for name, data in (("INPUT0", a), ("INPUT1", b)):
        tensor = triton_http.InferInput(name, list(data.shape), datatype)
        tensor.set_data_from_numpy(data, binary_data=binary)
        tensors.append(tensor)
    return tensors


@pytest.mark.parametrize(("binary_in", "binary_out"), [(True, True), (False, False), (True, False)])
def test_infer_with_json_and_binary_tensors(
    client: triton_http.InferenceServerClient, binary_in: bool, binary_out: bool
) -> None:
    rng = np.random.default_rng(5)
    a = rng.integers(-1000, 1000, size=(2, 16), dtype=np.int32)
    b = rng.integers(-1000, 1000, size=(2, 16), dtype=np.int32)
    outputs = [
        triton_http.InferRequestedOutput(name, binary_data=binary_out)
        for name in ("OUTPUT0", "OUTPUT1")
    ]
    result = client.infer(
        "simple", _inputs(a, b, binary=binary_in), outputs=outputs, request_id="http-1"
    )
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    assert result.get_response()["id"] == "http-1"
    assert result.get_response()["model_version"] == "1"


@pytest.mark.parametrize("binary", [True, False])
def test_strings_travel_both_ways(client: triton_http.InferenceServerClient, binary: bool) -> None:
    a = np.array([[str(v).encode() for v in range(16)]], dtype=object)
    b = np.array([[b"7"] * 16], dtype=object)
    result = client.infer("simple_string", _inputs(a, b, binary=binary, datatype="BYTES"))
    assert [int(v) for v in result.as_numpy("OUTPUT0")[0]] == [v + 7 for v in range(16)]


async def test_the_asyncio_client_works_unchanged(mesh: LocalMesh) -> None:
    data = np.arange(16, dtype=np.int32).reshape(1, 16)
    async with triton_http_aio.InferenceServerClient(_host(mesh)) as client:
        assert await client.is_server_ready()
        assert await client.is_model_ready("simple")
        result = await client.infer("simple", _inputs(data, data, binary=True))
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data * 2)


def test_rest_inference_goes_straight_to_the_nodes(
    mesh: LocalMesh, client: triton_http.InferenceServerClient
) -> None:
    """With the router paused, the gateway still answers: its requests go to the node Tritons."""
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    router = mesh.services["inference"].pid
    os.kill(router, signal.SIGSTOP)
    try:
        for binary in (True, False):
            result = client.infer("simple", _inputs(a, a, binary=binary), request_id="direct")
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a * 2)
            assert result.get_response()["id"] == "direct"
    finally:
        os.kill(router, signal.SIGCONT)


def test_metadata_and_config(client: triton_http.InferenceServerClient) -> None:
    metadata = client.get_model_metadata("simple")
    assert metadata["name"] == "simple"
    assert metadata["versions"] == ["1"]
    assert {t["name"]: t["shape"] for t in metadata["inputs"]} == {
        "INPUT0": [-1, 16],
        "INPUT1": [-1, 16],
    }
    config = client.get_model_config("simple")
    assert config["max_batch_size"] == 8
    assert client.get_server_metadata()["name"] == "ai-shard"


def test_errors_name_the_model_or_tensor(client: triton_http.InferenceServerClient) -> None:
    data = np.zeros((1, 16), dtype=np.int32)
    with pytest.raises(InferenceServerException) as raised:
        client.infer("no_such_model", _inputs(data, data, binary=True))
    assert "no_such_model" in raised.value.message()
    wrong = np.zeros((1, 15), dtype=np.int32)
    with pytest.raises(InferenceServerException) as raised:
        client.infer("simple", _inputs(wrong, wrong, binary=False))
    assert "unexpected shape for input 'INPUT" in raised.value.message()


@pytest.mark.parametrize(
    ("body", "headers", "field"),
    [
        (b"{not json", {}, "body"),
        (b"[]", {}, "body"),
        (json.dumps({"inputs": []}).encode(), {}, "inputs"),
        (
            json.dumps(
                {"inputs": [{"name": "INPUT0", "datatype": "INT99", "shape": [1]}]}
            ).encode(),
            {},
            "inputs[0].datatype",
        ),
        (
            json.dumps(
                {"inputs": [{"name": "INPUT0", "datatype": "INT32", "shape": [1, 2], "data": [1]}]}
            ).encode(),
            {},
            "inputs[0].data",
        ),
        (
            json.dumps(
                {"inputs": [{"name": "INPUT0", "datatype": "INT32", "shape": [1], "data": ["x"]}]}
            ).encode(),
            {},
            "inputs[0].data",
        ),
        (
            json.dumps(
                {
                    "inputs": [
                        {
                            "name": "INPUT0",
                            "datatype": "INT32",
                            "shape": [1],
                            "parameters": {"binary_data_size": 400},
                        }
                    ]
                }
            ).encode()
            + b"1234",
            {"Inference-Header-Content-Length": "REPLACE"},
            "inputs[0].parameters.binary_data_size",
        ),
        (b"{}", {"Inference-Header-Content-Length": "999"}, "Inference-Header-Content-Length"),
    ],
)
async def test_malformed_requests_are_400_naming_the_field(
    http: aiohttp.ClientSession, body: bytes, headers: dict[str, str], field: str
) -> None:
    if headers.get("Inference-Header-Content-Length") == "REPLACE":
        headers = {"Inference-Header-Content-Length": str(len(body) - 4)}
    async with http.post("/v2/models/simple/infer", data=body, headers=headers) as response:
        assert response.status == 400
        error = await response.json()
    assert error["error"].startswith(field), error
    assert error["code"] == "INVALID_ARGUMENT"


async def test_bodies_over_the_limit_are_refused(http: aiohttp.ClientSession) -> None:
    async with http.post("/v2/models/simple/infer", data=b" " * (65 << 20)) as response:
        assert response.status == 413
        error = await response.json()
    assert error["code"] == "RESOURCE_EXHAUSTED"
    assert error["error"]


async def test_rest_inference_goes_straight_to_a_node_through_the_edge(
    mesh: LocalMesh, http: aiohttp.ClientSession
) -> None:
    """The gateway's edge (its Envoy) sends well-formed REST inference to a node's gate itself;
    a malformed request reaches the Python gateway, which names the field."""
    log = mesh.gateway_edge_dir / "access.log"
    body = {
        "id": "direct-1",
        "inputs": [
            {"name": name, "datatype": "INT32", "shape": [1, 16], "data": list(range(16))}
            for name in ("INPUT0", "INPUT1")
        ],
    }
    async with http.post("/v2/models/simple/infer", json=body) as response:
        assert response.status == 200
        assert (await response.json())["id"] == "direct-1"
    async with http.post("/v2/models/simple/infer", data=b"{not json") as response:
        assert response.status == 400
    # A JSON header too large for the edge to read (64 KiB) is the gateway's, and still served.
    padded = json.dumps({**body, "id": "padded"}).encode() + b" " * (65 << 10)
    async with http.post("/v2/models/simple/infer", data=padded) as response:
        assert response.status == 200
        assert (await response.json())["id"] == "padded"

    def entries() -> list[dict[str, Any]]:
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text().splitlines()]

    def infer_entries() -> list[dict[str, Any]]:
        return [
            e
            for e in entries()
            if e["method"].startswith("/v2/models/simple/") and e["method"].endswith("/infer")
        ]

    def seen() -> bool:
        logged = infer_entries()
        direct = [
            e for e in logged if str(e["route"]).startswith("m/simple/") and e["http_status"] == 200
        ]
        routed = {e["http_status"] for e in logged if e["route"] == "gateway"}
        return any(str(e["node"]).startswith("spiffe://") for e in direct) and {200, 400} <= routed

    # (Other tests' calls share the log: each kind is looked for, not counted.)
    await until(seen, "the edge's log lacks a direct call or the gateway's two")
