"""A node's Triton serves the shard and nothing more: model control only for its agent, and
only loopback unless the provider says otherwise."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import psutil
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from shard_tool.local import LocalMesh
from tests.demo import infer_simple


def _triton_of(mesh: LocalMesh, node: str) -> psutil.Process:
    agent = psutil.Process(mesh.nodes[node].process.pid)
    return next(p for p in agent.children(recursive=True) if p.name() == "tritonserver")


async def test_model_control_is_refused_to_anyone_but_the_agent(mesh: LocalMesh) -> None:
    node = await mesh.find_node("node-0")
    assert node is not None
    grpc_client = triton_grpc.InferenceServerClient(node.inference_address)
    http_client = triton_http.InferenceServerClient(node.http_address)
    attempts: list[Callable[[], object]] = [
        lambda: grpc_client.unload_model("simple"),
        lambda: grpc_client.load_model("simple"),
        lambda: grpc_client.load_model("evil", config='{"backend": "python"}'),
        grpc_client.get_model_repository_index,
        lambda: grpc_client.register_system_shared_memory("r", "/shard", 64),
        lambda: grpc_client.update_trace_settings(settings={"trace_file": "/tmp/owned"}),
        lambda: grpc_client.update_log_settings({"log_file": "/tmp/owned"}),
        lambda: http_client.unload_model("simple"),
        lambda: http_client.load_model("simple"),
        http_client.get_model_repository_index,
        lambda: http_client.update_log_settings({"log_file": "/tmp/owned"}),
    ]
    for attempt in attempts:
        with pytest.raises(InferenceServerException) as refused:
            attempt()
        assert "restricted" in refused.value.message(), refused.value.message()
    # The node still serves, directly and through the shard.
    assert grpc_client.is_model_ready("simple")
    assert http_client.is_model_ready("simple")
    infer_simple(triton_grpc.InferenceServerClient(mesh.router_address))


def test_triton_listens_on_loopback_only(mesh: LocalMesh) -> None:
    listening = [
        c.laddr
        for c in _triton_of(mesh, "node-0").net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    ]
    assert len(listening) >= 3  # gRPC, HTTP, metrics
    for address in listening:
        ip = ipaddress.ip_address(address.ip)
        mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
        assert (mapped or ip).is_loopback, address
