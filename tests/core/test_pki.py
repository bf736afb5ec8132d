"""The mesh CA and the TLS credentials every service builds from it, against real gRPC TLS."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shard_core import pki
from shard_core.errors import InvalidArgumentError
from shard_core.grpc.server import GrpcServer, server_options
from shard_core.pki import Authority, Workload
from shard_core.tls import TlsIdentity, channel, is_loopback, peer_channel, write_identity
from tests.waiting import until

REGISTRY = Workload(trust_domain=pki.DEFAULT_TRUST_DOMAIN, kind="service", name="registry")
NODE = Workload(trust_domain=pki.DEFAULT_TRUST_DOMAIN, kind="node", name="nabc")


def _identity(ca: Authority, workload: Workload, directory: Path) -> TlsIdentity:
    key = pki.new_key()
    issued = ca.issue(key.public_key(), workload, addresses=["127.0.0.1"])
    write_identity(directory, chain=issued.chain_pem, key=pki.key_pem(key), bundle=ca.bundle_pem)
    return TlsIdentity(directory)


@contextlib.asynccontextmanager
async def _serving(tls: TlsIdentity, **options: Any) -> AsyncIterator[GrpcServer]:
    """A real gRPC server (health only) with a TLS listener on a free loopback port."""
    server = GrpcServer(
        address=None,
        tls=tls,
        tls_address="127.0.0.1:0",
        services=[],
        register=lambda s: None,
        **options,
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Authority, int]]:
    """A real gRPC server with health, serving TLS as the registry; the CA and its TLS port."""
    ca = Authority.create()
    tls = _identity(ca, REGISTRY, tmp_path / "registry")
    async with _serving(tls) as server:
        yield ca, server.tls_port


async def _check(address: str, credentials: grpc.ChannelCredentials, expect: Workload) -> None:
    async with channel(address, credentials, expect=expect) as ch:
        await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)


async def test_a_client_trusting_the_mesh_ca_reaches_the_service_it_expects(
    served: tuple[Authority, int], tmp_path: Path
) -> None:
    ca, port = served
    trust = grpc.ssl_channel_credentials(ca.bundle_pem)
    await _check(f"127.0.0.1:{port}", trust, REGISTRY)
    # The same CA's certificate for another workload is not the registry.
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _check(f"127.0.0.1:{port}", trust, NODE)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "Hostname Verification" in (raised.value.details() or "")
    # Another CA's client trusts nothing this server shows.
    stranger = grpc.ssl_channel_credentials(Authority.create().bundle_pem)
    with pytest.raises(grpc.aio.AioRpcError):
        await _check(f"127.0.0.1:{port}", stranger, REGISTRY)
    # Plaintext to a TLS-only port gets no answer, and no plaintext channel leaves loopback.
    with pytest.raises(grpc.aio.AioRpcError):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as plain:
            await health_pb2_grpc.HealthStub(plain).Check(
                health_pb2.HealthCheckRequest(), timeout=3
            )
    with pytest.raises(ValueError, match="loopback"):
        channel("10.1.2.3:7070", None)


async def test_mutual_tls_refuses_clients_without_a_good_certificate(tmp_path: Path) -> None:
    ca = Authority.create()
    async with _serving(
        _identity(ca, REGISTRY, tmp_path / "registry"), require_client_certificate=True
    ) as server:
        address = f"127.0.0.1:{server.tls_port}"
        node = _identity(ca, NODE, tmp_path / "node")
        await _check(address, node.channel_credentials(), REGISTRY)
        stranger = _identity(Authority.create(), NODE, tmp_path / "x")
        refused = {
            "no certificate": grpc.ssl_channel_credentials(ca.bundle_pem),
            "another CA's": stranger.channel_credentials(),
            "expired": _expired(ca, tmp_path / "old").channel_credentials(),
        }
        for why, credentials in refused.items():
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await _check(address, credentials, REGISTRY)
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE, why


def _expired(ca: Authority, directory: Path) -> TlsIdentity:
    """A certificate the CA signed that ran out yesterday."""
    key = pki.new_key()
    yesterday = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nabc")]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(yesterday - datetime.timedelta(hours=1))
        .not_valid_after(yesterday)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(NODE.dns)]), critical=False)
        .sign(ca._key, hashes.SHA256())
    )
    write_identity(
        directory,
        chain=leaf.public_bytes(serialization.Encoding.PEM),
        key=pki.key_pem(key),
        bundle=ca.bundle_pem,
    )
    return TlsIdentity(directory)


async def test_renewed_files_serve_new_handshakes_without_a_restart(tmp_path: Path) -> None:
    ca = Authority.create()
    tls = _identity(ca, REGISTRY, tmp_path / "registry")
    async with _serving(tls) as server:
        first = x509.load_pem_x509_certificates(tls.material().chain)[0]
        _identity(ca, REGISTRY, tmp_path / "registry")  # renewed in place
        renewed = x509.load_pem_x509_certificates(tls.material().chain)[0]
        assert renewed.serial_number != first.serial_number
        served = await asyncio.to_thread(_served_serial, server.tls_port, ca)
        assert served == renewed.serial_number


def _served_serial(port: int, ca: Authority) -> int:
    context = ssl.create_default_context(cadata=ca.bundle_pem.decode())
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=REGISTRY.dns) as wrapped,
    ):
        der = wrapped.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def _csr(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, *extensions: x509.ExtensionType
) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_a_csr_contributes_only_its_key_and_asks_for_nothing_else() -> None:
    ca = Authority.create()
    key = pki.new_key()
    issued = ca.sign_request(pki.certificate_request(key, NODE), NODE, field="csr", lifetime_s=3600)
    leaf = x509.load_pem_x509_certificates(issued.chain_pem)[0]
    assert pki.workload_of(leaf) == NODE
    assert leaf.public_key() == key.public_key()
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    lifetime = leaf.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    assert lifetime <= datetime.timedelta(hours=1)
    leaf.verify_directly_issued_by(ca.certificate)

    other = Workload(trust_domain=NODE.trust_domain, kind="node", name="nother")
    hostile = {
        "another node": pki.certificate_request(key, other),
        "a CA": _csr(key, x509.BasicConstraints(ca=True, path_length=None)),
        "a wildcard": _csr(key, x509.SubjectAlternativeName([x509.DNSName("*.node.shard.local")])),
        "a DNS name": _csr(key, x509.SubjectAlternativeName([x509.DNSName("registry.example")])),
        "an RSA key": _csr(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        "garbage": b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE "
        b"REQUEST-----\n",
        "a signature by another key": _swap_key(pki.certificate_request(key, NODE)),
        "a duplicated extension": _duplicated_extension(key),
    }
    for why, request in hostile.items():
        with pytest.raises(InvalidArgumentError) as raised:
            ca.sign_request(request, NODE, field="attestation.certificate_request", lifetime_s=60)
        assert raised.value.reason == "BAD_CERTIFICATE_REQUEST", why
        assert raised.value.metadata["field"] == "attestation.certificate_request", why
    with pytest.raises(ValueError, match="lifetime"):
        ca.issue(key.public_key(), NODE, lifetime_s=pki.MAX_LIFETIME_S + 1)


def _swap_key(request_pem: bytes) -> bytes:
    """The same request with another public key in it: its signature no longer verifies."""
    request = x509.load_pem_x509_csr(request_pem)
    der = bytearray(request.public_bytes(serialization.Encoding.DER))
    theirs = request.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    mine = (
        pki.new_key()
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    at = bytes(der).index(theirs)
    der[at : at + len(theirs)] = mine
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)


def test_an_operator_ca_with_an_intermediate_issues_chains_to_its_root(tmp_path: Path) -> None:
    root = Authority.create(trust_domain="example.org")
    intermediate_key = pki.new_key()
    # An operator's intermediate is a CA certificate: make one with the root's key.
    now = datetime.datetime.now(datetime.UTC)
    intermediate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "intermediate")]))
        .issuer_name(root.certificate.subject)
        .public_key(intermediate_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(root._key, hashes.SHA256())
    )
    (tmp_path / "cert.pem").write_bytes(intermediate.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(pki.key_pem(intermediate_key))
    (tmp_path / "roots.pem").write_bytes(root.bundle_pem)
    operator = Authority.load(
        certificate=tmp_path / "cert.pem",
        key=tmp_path / "key.pem",
        bundle=tmp_path / "roots.pem",
        trust_domain="example.org",
    )
    key = pki.new_key()
    chain = x509.load_pem_x509_certificates(
        operator.issue(key.public_key(), operator.workload("node", "n1")).chain_pem
    )
    assert [c.subject for c in chain[1:]] == [intermediate.subject]  # the root is not sent
    chain[0].verify_directly_issued_by(intermediate)
    intermediate.verify_directly_issued_by(root.certificate)
    (tmp_path / "leaf.pem").write_bytes(chain[0].public_bytes(serialization.Encoding.PEM))
    (tmp_path / "leaf-key.pem").write_bytes(pki.key_pem(key))
    with pytest.raises(ValueError, match="not a CA"):
        Authority.load(certificate=tmp_path / "leaf.pem", key=tmp_path / "leaf-key.pem")
    with pytest.raises(ValueError, match="does not match"):
        Authority.load(certificate=tmp_path / "cert.pem", key=tmp_path / "leaf-key.pem")


def test_workload_names_and_loopback() -> None:
    assert Workload.parse("spiffe://shard.local/node/nabc") == NODE
    for bad in ("https://shard.local/node/nabc", "spiffe://shard.local/admin/x", "spiffe://a/node"):
        assert Workload.parse(bad) is None
    assert is_loopback("127.0.0.1:1")
    assert is_loopback("[::1]:1")
    assert is_loopback("localhost:1")
    assert not is_loopback("0.0.0.0:7070")
    assert not is_loopback("10.0.0.1:1")


async def test_a_client_that_stalls_the_handshake_is_dropped_and_others_are_served(
    tmp_path: Path,
) -> None:
    ca = Authority.create()
    async with _serving(
        _identity(ca, REGISTRY, tmp_path / "registry"),
        options=server_options(handshake_timeout_ms=1_000),
    ) as server:
        # Many connections that never say a word (nor finish a handshake they started).
        stalled = []
        for index in range(100):
            connection = socket.create_connection(("127.0.0.1", server.tls_port), timeout=30)
            if index % 2:
                connection.sendall(b"\x16\x03\x01\x00\xff")  # a ClientHello that never ends
            stalled.append(connection)
        # Meanwhile a real client is served.
        await _check(
            f"127.0.0.1:{server.tls_port}", grpc.ssl_channel_credentials(ca.bundle_pem), REGISTRY
        )
        # And the server hangs up on every staller (each read ends: EOF or a reset).
        for connection in stalled:
            with connection:
                try:
                    ended = await asyncio.to_thread(connection.recv, 1024)
                except ConnectionResetError:
                    ended = b""
                assert ended == b""


def _duplicated_extension(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A CSR that holds one extension twice: the builder, given its extensions whole, does not
    check; parsing them refuses."""
    twice = x509.Extension(
        x509.oid.ExtensionOID.BASIC_CONSTRAINTS, False, x509.BasicConstraints(False, None)
    )
    builder = x509.CertificateSigningRequestBuilder(
        subject_name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]),
        extensions=[twice, twice],
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


async def test_a_mesh_channel_presents_its_renewed_certificate_and_checks_its_peer(
    tmp_path: Path,
) -> None:
    """Service to service: mutual TLS that checks the peer, and that moves to the caller's
    renewed certificate for new calls on the stubs it already made."""
    ca = Authority.create()
    seen: list[int] = []

    async def whoami(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        pem = next(iter(context.auth_context()["x509_pem_cert"]))
        seen.append(x509.load_pem_x509_certificate(pem).serial_number)
        return b""

    def register(server: grpc.aio.Server) -> None:
        handler = grpc.unary_unary_rpc_method_handler(whoami)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("test.WhoAmI", {"Ask": handler}),)
        )

    server = GrpcServer(
        address=None,
        tls=_identity(ca, REGISTRY, tmp_path / "registry"),
        tls_address="127.0.0.1:0",
        require_client_certificate=True,
        services=["test.WhoAmI"],
        register=register,
    )
    await server.start()
    router = Workload(trust_domain=pki.DEFAULT_TRUST_DOMAIN, kind="service", name="router")
    identity = _identity(ca, router, tmp_path / "router")
    address = f"127.0.0.1:{server.tls_port}"
    try:
        async with peer_channel(
            "127.0.0.1:1", mesh_address=address, identity=identity, expect=REGISTRY
        ) as mesh:
            ask = mesh.unary_unary("/test.WhoAmI/Ask", None, None)
            await ask(b"", timeout=5)
            first = x509.load_pem_x509_certificates(identity.material().chain)[0]
            _identity(ca, router, tmp_path / "router")  # renewed in place

            async def renewed_presented() -> bool:  # the files are looked at once a second
                await ask(b"", timeout=5)
                return seen[-1] != seen[0]

            await until(renewed_presented, "the renewed certificate was never presented")
            assert seen[0] == first.serial_number
            assert seen[-1] != seen[0]
        # A peer that is not the one expected is refused.
        async with peer_channel(
            "127.0.0.1:1", mesh_address=address, identity=identity, expect=NODE
        ) as wrong:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await wrong.unary_unary("/test.WhoAmI/Ask", None, None)(b"", timeout=5)
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        # Without an identity, plaintext, and only to loopback.
        with pytest.raises(ValueError, match="loopback"):
            peer_channel("10.1.2.3:7070", mesh_address=address, identity=None, expect=REGISTRY)
    finally:
        await server.stop()
