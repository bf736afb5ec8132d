"""The client-side router: tritonclient's API, requests straight to the node Tritons."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
from collections.abc import AsyncIterator

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from shard_client import grpc as shard_grpc
from shard_client.aio import InferenceServerClient
from shard_tool.local import LocalMesh
from shard_tool.publish import Publisher
from tests.demo import push_copy, simple_inputs, target


@pytest.fixture
async def client(mesh: LocalMesh) -> AsyncIterator[InferenceServerClient]:
    async with InferenceServerClient(mesh.router_address, api_key=mesh.admin_token) as shard:
        yield shard


async def test_infers_like_triton(client: InferenceServerClient) -> None:
    rng = np.random.default_rng(3)
    a = rng.integers(-500, 500, size=(2, 16), dtype=np.int32)
    b = rng.integers(-500, 500, size=(2, 16), dtype=np.int32)
    result = await client.infer("simple", simple_inputs(a, b), request_id="r-1")
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    assert result.get_response().id == "r-1"
    assert await client.is_model_ready("simple")
    assert (await client.get_model_metadata("simple")).name == "simple"
    assert (await client.get_model_config("simple")).config.max_batch_size == 8


async def test_unknown_models_and_bad_inputs_get_triton_s_errors(
    client: InferenceServerClient,
) -> None:
    data = np.zeros((1, 16), dtype=np.int32)
    for name, version, status in (
        ("no_such_model", "", "StatusCode.NOT_FOUND"),
        ("simple", "99", "StatusCode.NOT_FOUND"),
    ):
        with pytest.raises(InferenceServerException) as raised:
            await client.infer(name, simple_inputs(data, data), model_version=version)
        assert raised.value.status() == status
        assert name in raised.value.message()
    wrong = np.zeros((1, 15), dtype=np.int32)
    with pytest.raises(InferenceServerException) as raised:
        await client.infer("simple", simple_inputs(wrong, wrong))
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "unexpected shape for input 'INPUT" in raised.value.message()
    assert not await client.is_model_ready("no_such_model")


async def test_follows_new_deployments_and_their_traffic_weights(
    client: InferenceServerClient, publisher: Publisher
) -> None:
    await push_copy(publisher, "client-split", versions=("1", "2"))
    await publisher.deploy(
        "client-split", [target("1", replicas=1, weight=3), target("2", replicas=1, weight=1)]
    )
    await publisher.wait_available("deployments/client-split", timeout=60)
    deadline = asyncio.get_running_loop().time() + 10
    while not (
        await client.is_model_ready("client-split", "1")
        and await client.is_model_ready("client-split", "2")
    ):
        assert asyncio.get_running_loop().time() < deadline, "the client never saw the replicas"
        await asyncio.sleep(0.05)

    data = np.ones((1, 16), dtype=np.int32)
    served = collections.Counter(
        [
            (await client.infer("client-split", simple_inputs(data, data)))
            .get_response()
            .model_version
            for _ in range(400)
        ]
    )
    assert set(served) == {"1", "2"}
    assert served["1"] > served["2"]  # 3:1 expected; 400 draws put 2:1 far in the tail
    explicit = await client.infer("client-split", simple_inputs(data, data), model_version="2")
    assert explicit.get_response().model_version == "2"


async def test_keeps_serving_while_the_router_is_down(
    mesh: LocalMesh, client: InferenceServerClient
) -> None:
    data = np.full((1, 16), 4, dtype=np.int32)
    mesh.services["inference"].stop()
    try:
        # No router in the path: every request goes straight to a node's Triton.
        for _ in range(20):
            result = await client.infer("simple", simple_inputs(data, data))
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data * 2)
    finally:
        await mesh.restart("inference")
    await client.infer("simple", simple_inputs(data, data))


def test_the_blocking_client_serves_many_threads(mesh: LocalMesh) -> None:
    data = np.arange(16, dtype=np.int32).reshape(1, 16)
    with shard_grpc.InferenceServerClient(mesh.router_address, api_key=mesh.admin_token) as client:
        assert client.is_server_ready()

        def infer(_: int) -> None:
            result = client.infer("simple", simple_inputs(data, data))
            np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), data * 0)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(infer, range(64)))
        with pytest.raises(InferenceServerException) as raised:
            client.infer("no_such_model", simple_inputs(data, data))
        assert raised.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as raised:
        shard_grpc.InferenceServerClient("127.0.0.1:1", api_key="x", connect_timeout=0.5)
    assert "127.0.0.1:1" in raised.value.message()


async def test_watching_the_endpoints_needs_a_key(mesh: LocalMesh) -> None:
    for key, status in (
        ("", "StatusCode.UNAUTHENTICATED"),
        ("not-a-key", "StatusCode.UNAUTHENTICATED"),
    ):
        client = InferenceServerClient(mesh.router_address, api_key=key)
        with pytest.raises(InferenceServerException) as raised:
            await client.connect(timeout=10)
        await client.close()
        assert raised.value.status() == status
        assert "refused the key" in raised.value.message()
