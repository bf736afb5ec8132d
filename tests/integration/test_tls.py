"""TLS at the edge: the router, gateway and registry serve TLS with certificates from the mesh CA;
clients that trust the CA reach them, and plaintext is served on loopback only."""

from __future__ import annotations

import json
import socket
import ssl
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shard_client import grpc as shard_grpc
from shard_core import tls
from shard_core.pki import Authority, Workload
from shard_tool.local import LocalMesh
from tests.demo import infer_simple, simple_inputs


def test_tritonclient_reaches_the_router_over_tls_trusting_the_mesh_ca(mesh: LocalMesh) -> None:
    with triton.InferenceServerClient(
        mesh.router_tls_address, ssl=True, root_certificates=str(mesh.ca_file)
    ) as client:
        assert client.is_server_live()
        infer_simple(client)


def test_the_client_sdk_routes_over_tls(mesh: LocalMesh) -> None:
    with shard_grpc.InferenceServerClient(
        mesh.router_tls_address,
        api_key=mesh.admin_token,
        ssl=True,
        root_certificates=mesh.ca_file,
    ) as client:
        data = np.arange(16, dtype=np.int32).reshape(1, 16)
        result = client.infer("simple", simple_inputs(data, data))
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data * 2)


def test_the_gateway_serves_https_with_the_mesh_certificate(mesh: LocalMesh) -> None:
    trusted = ssl.create_default_context(cafile=str(mesh.ca_file))
    body = json.dumps({"inputs": [
        {"name": name, "datatype": "INT32", "shape": [1, 16], "data": list(range(16))}
        for name in ("INPUT0", "INPUT1")
    ]}).encode()  # fmt: skip
    request = urllib.request.Request(
        f"{mesh.gateway_tls_url}/v2/models/simple/infer",
        data=body,
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, context=trusted, timeout=10) as reply:
        answer = json.loads(reply.read())
    outputs = {o["name"]: o["data"] for o in answer["outputs"]}
    assert outputs["OUTPUT0"] == [2 * v for v in range(16)]
    # A client that does not trust the mesh CA does not get past the handshake.
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(
            f"{mesh.gateway_tls_url}/v2/health/ready",
            context=ssl.create_default_context(),
            timeout=10,
        )


async def test_the_registry_answers_over_tls_as_the_workload_it_names(mesh: LocalMesh) -> None:
    registry = Workload(trust_domain="shard.local", kind="service", name="registry")
    credentials = tls.trusting(mesh.ca_file)
    async with tls.channel(mesh.registry_tls_address, credentials, expect=registry) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    # The router's certificate is the same CA's, but it is not the registry.
    async with tls.channel(mesh.router_tls_address, credentials, expect=registry) as channel:
        with pytest.raises(Exception, match="Hostname Verification"):
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
    # Another CA's trust bundle trusts none of it.
    stranger = grpc.ssl_channel_credentials(Authority.create().bundle_pem)
    async with tls.channel(mesh.registry_tls_address, stranger) as channel:
        with pytest.raises(Exception, match="certificate"):
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )


async def test_renewed_service_certificates_serve_without_a_restart(mesh: LocalMesh) -> None:
    def served(address: str) -> int:
        """The serial of the certificate a new handshake gets (by IP address: no SNI)."""
        trusted = ssl.create_default_context(cafile=str(mesh.ca_file))
        host, port = address.rsplit(":", 1)
        with (
            socket.create_connection((host, int(port)), timeout=10) as raw,
            trusted.wrap_socket(raw, server_hostname=host) as wrapped,
        ):
            der = wrapped.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number

    def on_disk(service: str) -> x509.Certificate:
        path = mesh.state_dir / "tls" / service / "cert.pem"
        return x509.load_pem_x509_certificates(path.read_bytes())[0]

    gateway = mesh.gateway_tls_url.removeprefix("https://")
    addresses = {"router": mesh.router_tls_address, "gateway": gateway}
    before = {service: served(address) for service, address in addresses.items()}
    mesh.renew_certificates()
    for service, address in addresses.items():
        renewed = on_disk(service).serial_number
        assert renewed != before[service], service
        assert served(address) == renewed, service
    lifetime = on_disk("router").not_valid_after_utc - on_disk("router").not_valid_before_utc
    assert lifetime.total_seconds() <= 24 * 3600  # hours, renewed while the mesh runs
    # Clients that held a connection, and new ones, still work.
    with triton.InferenceServerClient(
        mesh.router_tls_address, ssl=True, root_certificates=str(mesh.ca_file)
    ) as client:
        infer_simple(client)
