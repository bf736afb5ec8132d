"""A node's Triton serves the shard and nothing more: model control only for its agent, Triton
on loopback only, the shard reaching it through the node's gate."""

from __future__ import annotations

import ipaddress
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import aiohttp
import numpy as np
import psutil
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from shard.deployment.v1 import deployment_service_pb2 as deployment_api
from shard.model.v1 import model_pb2
from shard.node.v1 import node_pb2
from shard_core import pki
from shard_core.tls import TlsIdentity
from shard_node.triton import GRPC_CONTROL_HEADER
from shard_tool.local import LocalMesh
from shard_tool.publish import Publisher
from tests.demo import target


def _triton_of(mesh: LocalMesh, node: str) -> psutil.Process:
    agent = psutil.Process(mesh.nodes[node].process.pid)
    return next(p for p in agent.children(recursive=True) if p.name() == "tritonserver")


async def test_model_control_is_refused_to_anyone_but_the_agent(mesh: LocalMesh) -> None:
    node = await mesh.find_node("node-0")
    assert node is not None
    handle = mesh.nodes["node-0"]
    # Whatever other tests left on it: one model it serves.
    model = next(m.model_name for m in node.models if m.state == node_pb2.MODEL_STATE_READY)
    # Through the gate, as the router (whose calls pass the gate's check), even sending the
    # control header; and at Triton's own loopback ports, as any process on the machine.
    router = TlsIdentity(mesh.tls_path("router"))
    expect = pki.node_workload("shard.local", node.name)
    gate = triton_grpc.InferenceServerClient(
        node.inference_address,
        creds=router.channel_credentials(),
        channel_args=[("grpc.ssl_target_name_override", expect.dns)],
    )
    loopback = triton_grpc.InferenceServerClient(f"127.0.0.1:{handle.triton_grpc_port}")
    http_client = triton_http.InferenceServerClient(f"127.0.0.1:{handle.triton_http_port}")
    guess = {GRPC_CONTROL_HEADER: "guess"}
    attempts: list[Callable[[], object]] = [
        lambda: gate.unload_model(model, headers=guess),
        lambda: gate.load_model("evil", config='{"backend": "python"}', headers=guess),
        lambda: gate.get_model_repository_index(headers=guess),
        lambda: gate.update_log_settings({"log_file": "/tmp/owned"}),
        lambda: loopback.unload_model(model),
        lambda: loopback.load_model(model),
        lambda: loopback.load_model("evil", config='{"backend": "python"}'),
        loopback.get_model_repository_index,
        lambda: loopback.register_system_shared_memory("r", "/shard", 64),
        lambda: loopback.update_trace_settings(settings={"trace_file": "/tmp/owned"}),
        lambda: loopback.update_log_settings({"log_file": "/tmp/owned"}),
        lambda: http_client.unload_model(model),
        lambda: http_client.load_model(model),
        http_client.get_model_repository_index,
        lambda: http_client.update_log_settings({"log_file": "/tmp/owned"}),
    ]
    for attempt in attempts:
        with pytest.raises(InferenceServerException) as refused:
            attempt()
        assert "restricted" in refused.value.message(), refused.value.message()
    # The gate's HTTP port, as the gateway.
    gateway = TlsIdentity(mesh.tls_path("gateway"))
    async with (
        aiohttp.ClientSession(f"https://{node.http_address}") as session,
        session.post(
            f"/v2/repository/models/{model}/unload",
            ssl=gateway.client_context(),
            server_hostname=expect.dns,
            headers={"shard-node-control": "guess"},
        ) as answer,
    ):
        assert answer.status == 403
        assert "restricted" in await answer.text()
    # The node still serves.
    assert gate.is_model_ready(model)
    assert loopback.is_model_ready(model)
    assert http_client.is_model_ready(model)


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


HOSTILE = Path(__file__).resolve().parent.parent / "models" / "hostile"


async def test_hostile_model_code_learns_nothing_of_the_node(
    mesh: LocalMesh, publisher: Publisher, tmp_path: Path
) -> None:
    """A model owner's code tries to read the agent's keys, state, environment and memory and
    task files, signal it, tamper with other models, and reach the control plane: each attempt
    fails, and the report shows the code ran and tried."""
    ports = mesh.ports
    targets = [f"127.0.0.1:{port}" for port in (ports.registry, ports.etcd, ports.router)]
    config = (HOSTILE / "config.pbtxt").read_text().replace("TARGETS", ",".join(targets))
    await publisher.ensure_model("hostile", model_pb2.Model(visibility=model_pb2.VISIBILITY_PUBLIC))
    version = tmp_path / "1"
    shutil.copytree(HOSTILE / "1", version)
    await publisher.push_version("hostile", version, config)
    await publisher.deploy("hostile", [target("1", replicas=1)])
    await publisher.wait_available("deployments/hostile", timeout=60)

    trigger = triton_grpc.InferInput("TRIGGER", [1], "INT32")
    trigger.set_data_from_numpy(np.array([1], dtype=np.int32))
    result = triton_grpc.InferenceServerClient(mesh.router_address).infer("hostile", [trigger])
    report = json.loads(result.as_numpy("REPORT")[0])

    serving = next(
        name
        for name, handle in mesh.nodes.items()
        if str(handle.process.pid) == report["agent pid"]
    )  # the code found its agent...
    state = mesh.nodes[serving].state_dir
    assert (state / "identity.key").exists()  # ...and what it went for is there
    assert (state / "tasks").is_dir()
    attempts = {k: v for k, v in report.items() if k not in ("agent pid", "environment")}
    assert len(attempts) == 10 + len(targets), attempts
    succeeded = {
        name: outcome for name, outcome in attempts.items() if not outcome.startswith("denied")
    }
    assert succeeded == {}
    assert not [name for name in report["environment"] if name.startswith("SHARD_")]
    assert not (state / "repository" / "planted").exists()
    await publisher.deployments.DeleteDeployment(
        deployment_api.DeleteDeploymentRequest(name="deployments/hostile")
    )
