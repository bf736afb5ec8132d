"""Triton's own client against the router: the shard must look like one Triton."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import psutil
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
import tritonclient.http as triton_http
from google.protobuf import json_format
from tritonclient.utils import InferenceServerException

from shard.model.v1 import model_pb2
from shard.node.v1.node_pb2 import MODEL_STATE_READY
from shard.node.v1.node_service_pb2 import ListNodesRequest
from shard.node.v1.node_service_pb2_grpc import NodeServiceStub
from shard_tool.local import LOCAL_NAME_LABEL, LocalMesh
from shard_tool.publish import Publisher
from tests.demo import push_copy, simple_inputs, target

ACCUMULATOR = Path(__file__).resolve().parent.parent / "models" / "accumulator"


@pytest.fixture
def client(mesh: LocalMesh) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(mesh.router_address)


@pytest.fixture
def direct(mesh: LocalMesh) -> triton.InferenceServerClient:
    """A client of one node's Triton, bypassing the router: the reference answers."""
    port = mesh.nodes["node-0"].triton_grpc_port
    return triton.InferenceServerClient(f"127.0.0.1:{port}")


def _bytes_input(name: str, data: npt.NDArray[Any]) -> triton.InferInput:
    tensor = triton.InferInput(name, list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    return tensor


def test_simple_returns_sums_and_differences(client: triton.InferenceServerClient) -> None:
    rng = np.random.default_rng(7)
    a = rng.integers(-1000, 1000, size=(3, 16), dtype=np.int32)
    b = rng.integers(-1000, 1000, size=(3, 16), dtype=np.int32)

    result = client.infer("simple", simple_inputs(a, b))

    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)


def test_simple_string_computes_on_decimal_strings(client: triton.InferenceServerClient) -> None:
    a = np.arange(16, dtype=np.int64).reshape(1, 16) * 37
    b = np.full((1, 16), -5, dtype=np.int64)
    as_bytes = np.vectorize(lambda v: str(v).encode(), otypes=[object])

    result = client.infer(
        "simple_string",
        [_bytes_input("INPUT0", as_bytes(a)), _bytes_input("INPUT1", as_bytes(b))],
    )

    assert result.as_numpy("OUTPUT0").tolist() == as_bytes(a + b).tolist()
    assert result.as_numpy("OUTPUT1").tolist() == as_bytes(a - b).tolist()


def test_simple_identity_round_trips_arbitrary_bytes(client: triton.InferenceServerClient) -> None:
    data = np.array([[b"", b"\x00\xff binary", "ünïcode".encode(), b"x" * 4096]], dtype=object)

    result = client.infer("simple_identity", [_bytes_input("INPUT0", data)])

    assert result.as_numpy("OUTPUT0").tolist() == data.tolist()


async def test_aio_client_works_unchanged(mesh: LocalMesh) -> None:
    a = np.ones((1, 16), dtype=np.int32)
    async with triton_aio.InferenceServerClient(mesh.router_address) as client:
        inputs = []
        for name in ("INPUT0", "INPUT1"):
            tensor = triton_aio.InferInput(name, [1, 16], "INT32")
            tensor.set_data_from_numpy(a)
            inputs.append(tensor)
        result = await client.infer("simple", inputs, model_version="1")
        assert await client.is_model_ready("simple")
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a * 2)


def test_unknown_model_is_not_found_naming_the_model(client: triton.InferenceServerClient) -> None:
    a = np.zeros((1, 16), dtype=np.int32)
    with pytest.raises(InferenceServerException) as raised:
        client.infer("no_such_model", simple_inputs(a, a))
    assert raised.value.status() == "StatusCode.NOT_FOUND"
    assert "'no_such_model'" in raised.value.message()


def test_unknown_version_is_not_found_naming_it(client: triton.InferenceServerClient) -> None:
    a = np.zeros((1, 16), dtype=np.int32)
    with pytest.raises(InferenceServerException) as raised:
        client.infer("simple", simple_inputs(a, a), model_version="42")
    assert raised.value.status() == "StatusCode.NOT_FOUND"
    assert "'simple' version 42" in raised.value.message()


def test_bad_input_gets_triton_s_own_error(
    client: triton.InferenceServerClient, direct: triton.InferenceServerClient
) -> None:
    right_shape = np.zeros((1, 16), dtype=np.int32)
    wrong_shape = np.zeros((1, 3), dtype=np.int32)
    errors = []
    for server in (client, direct):
        with pytest.raises(InferenceServerException) as raised:
            server.infer("simple", simple_inputs(right_shape, wrong_shape))
        errors.append((raised.value.status(), raised.value.message()))
    assert errors[0] == errors[1]
    assert errors[0][0] == "StatusCode.INVALID_ARGUMENT"
    assert "'INPUT1'" in errors[0][1]


def test_server_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata.name == "ai-shard"
    assert metadata.version


@pytest.mark.parametrize("model", ["simple", "simple_string", "simple_identity"])
def test_model_metadata_and_config_match_direct_triton(
    client: triton.InferenceServerClient, direct: triton.InferenceServerClient, model: str
) -> None:
    assert client.is_model_ready(model)
    assert client.is_model_ready(model, "1")
    assert json_format.MessageToDict(client.get_model_metadata(model)) == json_format.MessageToDict(
        direct.get_model_metadata(model)
    )
    assert json_format.MessageToDict(client.get_model_config(model)) == json_format.MessageToDict(
        direct.get_model_config(model)
    )


def test_model_ready_is_false_for_unknown_models(client: triton.InferenceServerClient) -> None:
    assert not client.is_model_ready("no_such_model")
    assert not client.is_model_ready("simple", "42")


def test_metadata_of_unknown_model_is_not_found(client: triton.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as raised:
        client.get_model_metadata("no_such_model")
    assert raised.value.status() == "StatusCode.NOT_FOUND"


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\x0a\xff", "malformed request"),  # a name field longer than the message
        (b"\x0a\x02\xff\xfe", "not UTF-8"),
        (b"", "model name is required"),
    ],
)
async def test_malformed_requests_are_invalid_argument(
    mesh: LocalMesh, payload: bytes, message: str
) -> None:
    async with grpc.aio.insecure_channel(mesh.router_address) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer", None, None)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await infer(payload, timeout=5)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (raised.value.details() or "")


async def test_statistics_are_summed_over_every_replica(
    mesh: LocalMesh, registry_channel: grpc.aio.Channel, client: triton.InferenceServerClient
) -> None:
    a = np.ones((1, 16), dtype=np.int32)
    for _ in range(10):
        client.infer("simple", simple_inputs(a, a))
    # Each serving node's own Triton, on loopback (the shard reaches it through its gate).
    serving = [
        f"127.0.0.1:{mesh.nodes[node.labels[LOCAL_NAME_LABEL]].triton_grpc_port}"
        for node in (await NodeServiceStub(registry_channel).ListNodes(ListNodesRequest())).nodes
        if any(m.model_name == "simple" and m.state == MODEL_STATE_READY for m in node.models)
    ]
    direct = [
        triton.InferenceServerClient(address).get_inference_statistics("simple").model_stats
        for address in serving
    ]
    assert len(serving) >= 2
    via_router = client.get_inference_statistics("simple").model_stats
    (stats,) = via_router
    assert stats.name == "simple"
    assert stats.inference_count == sum(s.inference_count for d in direct for s in d)
    assert stats.inference_stats.success.count == sum(
        s.inference_stats.success.count for d in direct for s in d
    )
    assert stats.inference_count >= 10
    everything = client.get_inference_statistics().model_stats
    assert {s.name for s in everything} >= {"simple", "simple_string", "simple_identity"}
    with pytest.raises(InferenceServerException) as raised:
        client.get_inference_statistics("no_such_model")
    assert raised.value.status() == "StatusCode.NOT_FOUND"


def test_repository_index_lists_the_shard_s_models(client: triton.InferenceServerClient) -> None:
    index = client.get_model_repository_index()
    ready = {(m.name, m.version, m.state) for m in index.models}
    assert {
        ("simple", "1", "READY"),
        ("simple_string", "1", "READY"),
        ("simple_identity", "1", "READY"),
    } <= ready


def test_repository_load_and_unload_need_admin_credentials(
    mesh: LocalMesh, client: triton.InferenceServerClient
) -> None:
    for headers in (None, {"authorization": "Bearer not-the-admin-token"}):
        for change in (client.load_model, client.unload_model):
            with pytest.raises(InferenceServerException) as raised:
                change("simple", headers=headers)
            assert raised.value.status() == "StatusCode.PERMISSION_DENIED"
            assert "admin credentials" in raised.value.message()
    assert client.is_model_ready("simple")


async def test_repository_load_deploys_and_unload_undeploys(
    mesh: LocalMesh, publisher: Publisher, client: triton.InferenceServerClient
) -> None:
    await push_copy(publisher, "loadable", versions=("1", "2"))
    admin = {"authorization": f"Bearer {mesh.admin_token}"}

    # Triton's load returns once the model can serve: the newest version, through the shard.
    client.load_model("loadable", headers=admin, client_timeout=60)
    assert client.is_model_ready("loadable")
    assert client.get_model_metadata("loadable").versions == ["2"]
    data = np.ones((1, 16), dtype=np.int32)
    result = client.infer("loadable", simple_inputs(data, data))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data * 2)
    client.load_model("loadable", headers=admin, client_timeout=60)  # loading again is fine

    client.unload_model("loadable", headers=admin)
    deadline = asyncio.get_running_loop().time() + 30
    while client.is_model_ready("loadable"):
        assert asyncio.get_running_loop().time() < deadline, "the unloaded model stayed ready"
        await asyncio.sleep(0.1)
    with pytest.raises(InferenceServerException) as raised:
        client.unload_model("loadable", headers=admin)
    assert raised.value.status() == "StatusCode.NOT_FOUND"


def test_repository_load_refuses_what_the_shard_cannot_do(
    mesh: LocalMesh, client: triton.InferenceServerClient
) -> None:
    admin = {"authorization": f"Bearer {mesh.admin_token}"}
    with pytest.raises(InferenceServerException) as raised:
        client.load_model("simple", headers=admin, config='{"max_batch_size": 4}')
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "parameters" in raised.value.message()
    with pytest.raises(InferenceServerException) as raised:
        client.load_model("no_such_model", headers=admin)
    assert raised.value.status() == "StatusCode.NOT_FOUND"


def test_shared_memory_explains_it_cannot_cross_the_network(
    client: triton.InferenceServerClient,
) -> None:
    assert not client.get_system_shared_memory_status().regions
    assert not client.get_cuda_shared_memory_status().regions
    with pytest.raises(InferenceServerException) as raised:
        client.register_system_shared_memory("region", "/shm-key", 1024)
    assert raised.value.status() == "StatusCode.FAILED_PRECONDITION"
    assert "cannot cross the network" in raised.value.message()
    client.unregister_system_shared_memory()


def test_trace_and_log_settings_are_the_providers_and_read_as_none(
    client: triton.InferenceServerClient, direct: triton.InferenceServerClient
) -> None:
    assert client.get_log_settings(as_json=True) == {}
    assert client.get_trace_settings(as_json=True) == {}
    assert client.get_trace_settings("simple", as_json=True) == {}
    # A node's Triton answers them only to its agent: they name files Triton writes.
    for read in (direct.get_log_settings, direct.get_trace_settings):
        with pytest.raises(InferenceServerException) as restricted:
            read()
        assert "restricted" in restricted.value.message()
    changes: list[Callable[[], object]] = [
        lambda: client.update_log_settings({"log_verbose_level": 1}),
        lambda: client.update_trace_settings(settings={"trace_rate": "1"}),
    ]
    for change in changes:
        with pytest.raises(InferenceServerException) as raised:
            change()
        assert raised.value.status() == "StatusCode.PERMISSION_DENIED"
        assert "provider" in raised.value.message()
    with pytest.raises(InferenceServerException) as raised:
        client.get_trace_settings("no_such_model")
    assert raised.value.status() == "StatusCode.NOT_FOUND"


class _Answers:
    """Collects a stream's answers: (request id, result or error)."""

    def __init__(self) -> None:
        self.results: dict[str, Any] = {}
        self.errors: list[str] = []
        self.done = threading.Event()
        self.expected = 0

    def __call__(self, result: Any, error: InferenceServerException | None) -> None:
        if error is not None:
            self.errors.append(error.message())
        else:
            self.results[result.get_response().id] = result
        if len(self.results) + len(self.errors) >= self.expected:
            self.done.set()


def test_stream_infer_matches_direct_triton(
    client: triton.InferenceServerClient, direct: triton.InferenceServerClient
) -> None:
    rng = np.random.default_rng(11)
    requests = {
        f"r{i}": (
            rng.integers(-99, 99, size=(1, 16), dtype=np.int32),
            rng.integers(-99, 99, size=(1, 16), dtype=np.int32),
        )
        for i in range(20)
    }
    outputs = {}
    for target_client in (client, direct):
        answers = _Answers()
        answers.expected = len(requests) + 2
        target_client.start_stream(callback=answers)
        for request_id, (a, b) in requests.items():
            target_client.async_stream_infer("simple", simple_inputs(a, b), request_id=request_id)
            if request_id == "r10":  # per-request errors come back on the stream, which goes on
                target_client.async_stream_infer("no_such_model", simple_inputs(a, b))
                target_client.async_stream_infer("simple", simple_inputs(a, b), model_version="7")
        assert answers.done.wait(30)
        target_client.stop_stream()
        assert len(answers.errors) == 2, answers.errors
        assert all("no_such_model" in e or "unknown model" in e for e in answers.errors[:1])
        outputs[target_client] = {
            request_id: (r.as_numpy("OUTPUT0"), r.as_numpy("OUTPUT1"))
            for request_id, r in answers.results.items()
        }
    assert outputs[client].keys() == set(requests)
    for request_id, (a, b) in requests.items():
        total, difference = outputs[client][request_id]
        np.testing.assert_array_equal(total, a + b)
        np.testing.assert_array_equal(difference, a - b)
        np.testing.assert_array_equal(total, outputs[direct][request_id][0])


async def test_aio_stream_infer_mixes_models_on_one_stream(mesh: LocalMesh) -> None:
    data = np.arange(16, dtype=np.int32).reshape(1, 16)
    strings = np.vectorize(lambda v: str(v).encode(), otypes=[object])(data)

    async def requests() -> Any:
        for i in range(10):
            yield {
                "model_name": "simple",
                "inputs": simple_inputs(data, data),
                "request_id": f"s{i}",
            }
            yield {
                "model_name": "simple_string",
                "inputs": [_bytes_input("INPUT0", strings), _bytes_input("INPUT1", strings)],
                "request_id": f"t{i}",
            }

    async with triton_aio.InferenceServerClient(mesh.router_address) as client:
        answers = {}
        async for result, error in client.stream_infer(requests(), stream_timeout=30):
            assert error is None, error
            answers[result.get_response().id] = result
            if len(answers) == 20:
                break
    for i in range(10):
        np.testing.assert_array_equal(answers[f"s{i}"].as_numpy("OUTPUT0"), data * 2)
        assert answers[f"t{i}"].as_numpy("OUTPUT0")[0][3] == b"6"


async def test_a_sequence_stays_on_one_replica(
    mesh: LocalMesh, publisher: Publisher, client: triton.InferenceServerClient
) -> None:
    await publisher.push_directory(ACCUMULATOR, visibility=model_pb2.VISIBILITY_PUBLIC)
    await publisher.deploy("accumulator", [target("1", replicas=2)])
    await publisher.wait_available("deployments/accumulator", timeout=60)

    rest = triton_http.InferenceServerClient(mesh.gateway_url.removeprefix("http://"))
    # Interleaved sequences, each summed on its own replica: with two replicas and no affinity,
    # some step would land where the sequence's state is not. Through the router (gRPC), then
    # through the gateway (REST), which routes straight to the node Tritons.
    for api, sequences in ((triton, range(1001, 1009)), (triton_http, range(2001, 2009))):
        shard = client if api is triton else rest
        expected = dict.fromkeys(sequences, 0)
        for step in range(6):
            for seq in expected:
                expected[seq] += step + seq
                tensor = api.InferInput("INPUT0", [1, 1], "INT32")
                tensor.set_data_from_numpy(np.array([[step + seq]], dtype=np.int32))
                result = shard.infer(
                    "accumulator",
                    [tensor],
                    sequence_id=seq,
                    sequence_start=step == 0,
                    sequence_end=step == 5,
                )
                assert int(result.as_numpy("OUTPUT0")[0][0]) == expected[seq]


def test_the_edge_serves_on_while_its_control_plane_is_away(
    mesh: LocalMesh, client: triton.InferenceServerClient
) -> None:
    """With the router paused (its ADS server and Python path stopped), its edge keeps its last
    configuration and answers inference straight from the nodes; a call only the router can
    answer waits for it."""
    data = np.ones((1, 16), dtype=np.int32)
    router = psutil.Process(mesh.services["inference"].pid)
    router.suspend()
    try:
        for _ in range(5):
            result = client.infer("simple", simple_inputs(data, data))
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data * 2)
        with pytest.raises(InferenceServerException) as raised:
            client.get_model_repository_index(client_timeout=1)
        assert raised.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    finally:
        router.resume()
    assert client.get_model_repository_index(client_timeout=10) is not None
