"""The node's gate (a real Envoy) in front of a stand-in Triton: who it lets in, what a client
certificate may ask, hostile bytes, and a renewed node certificate."""

from __future__ import annotations

import asyncio
import datetime
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import h2.connection
import h2.events
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from tritonclient.grpc import service_pb2

from shard_core import pki, tls
from shard_core.envoy import envoy_binary
from shard_core.net import free_port
from shard_node.gate import GatePorts, NodeGate
from tests.fake_node import FakeTriton
from tests.grpc_frames import field, frame, h2_post, malformed
from tests.waiting import until

SERVICE = "/inference.GRPCInferenceService"
NODE = "gatenode"


@dataclass
class Gate:
    authority: pki.Authority
    gate: NodeGate
    triton: FakeTriton
    root: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gate.ports.grpc}"

    def identity(self, kind: str, name: str, grants: Sequence[str] = ()) -> tls.TlsIdentity:
        """A certificate of this mesh's CA for `kind`/`name`."""
        key = pki.new_key()
        issued = self.authority.issue(
            key.public_key(), self.authority.workload(kind, name), lifetime_s=600, grants=grants
        )
        directory = self.root / f"{kind}-{name}-{len(grants)}"
        tls.write_identity(
            directory,
            chain=issued.chain_pem,
            key=pki.key_pem(key),
            bundle=self.authority.bundle_pem,
        )
        return tls.TlsIdentity(directory)

    def channel(self, identity: tls.TlsIdentity) -> grpc.aio.Channel:
        node = self.authority.workload("node", NODE)
        return tls.channel(self.address, identity.channel_credentials(), expect=node)


@pytest.fixture(scope="module")
async def gate(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gate]:
    root = tmp_path_factory.mktemp("gate")
    authority = pki.Authority.create()
    key = pki.new_key()
    issued = authority.issue(key.public_key(), authority.workload("node", NODE), lifetime_s=600)
    tls.write_identity(
        root / "tls", chain=issued.chain_pem, key=pki.key_pem(key), bundle=authority.bundle_pem
    )
    async with FakeTriton() as triton:
        node_gate = NodeGate(
            workload=authority.workload("node", NODE),
            state_dir=root,
            tls_dir=root / "tls",
            listen_host="127.0.0.1",
            ports=GatePorts(grpc=free_port(), http=free_port()),
            triton_grpc=triton.address,
            triton_http=None,
        )
        await node_gate.start()
        try:
            yield Gate(authority=authority, gate=node_gate, triton=triton, root=root)
        finally:
            node_gate.stop()


def _infer(model: str) -> bytes:
    request = service_pb2.ModelInferRequest(model_name=model, model_version="1", id="r")
    for name in ("INPUT0", "INPUT1"):
        request.inputs.add(name=name, datatype="INT32", shape=[1, 2])
        request.raw_input_contents.append(b"\x01\x00\x00\x00\x02\x00\x00\x00")
    return bytes(request.SerializeToString())


async def _call(channel: grpc.aio.Channel, method: str, body: bytes) -> grpc.StatusCode:
    """The status of one unary call."""
    call = channel.unary_unary(f"{SERVICE}/{method}", None, None)
    try:
        await call(body, timeout=10)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def _refused(gate: Gate, identity: tls.TlsIdentity | None) -> str:
    """The error a caller with `identity` (or with no certificate) gets at the gate."""
    node = gate.authority.workload("node", NODE)
    credentials = (
        identity.channel_credentials() if identity else tls.trusting(gate.root / "tls" / "ca.pem")
    )
    async with tls.channel(gate.address, credentials, expect=node) as channel:
        call = channel.unary_unary(f"{SERVICE}/ModelInfer", None, None)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call(_infer("simple"), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    return refused.value.details() or ""


def test_every_configuration_the_gate_takes_validates(gate: Gate, tmp_path: Path) -> None:
    for triton_http in (None, "127.0.0.1:8100"):
        shape = NodeGate(
            workload=gate.authority.workload("node", NODE),
            state_dir=tmp_path / str(triton_http),
            tls_dir=gate.root / "tls",
            listen_host="0.0.0.0",
            ports=GatePorts(grpc=8001, http=8000),
            triton_grpc="127.0.0.1:8101",
            triton_http=triton_http,
        )
        checked = subprocess.run(
            [envoy_binary(), "--mode", "validate", "-c", str(shape.write_configuration())],
            capture_output=True,
            text=True,
            check=False,
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr


async def test_the_router_and_the_gateway_pass(gate: Gate) -> None:
    for service in ("router", "gateway"):
        async with gate.channel(gate.identity("service", service)) as channel:
            assert await _call(channel, "ModelInfer", _infer("private")) == grpc.StatusCode.OK
            assert await _call(channel, "ModelStatistics", b"") == grpc.StatusCode.OK


async def test_callers_the_mesh_does_not_vouch_for_are_refused(gate: Gate) -> None:
    # No certificate at all, and plaintext.
    await _refused(gate, None)
    async with grpc.aio.insecure_channel(gate.address) as plain:
        call = plain.unary_unary(f"{SERVICE}/ServerLive", None, None)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call(b"", timeout=10)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    # Another node, the registry, and a service the gate does not know: the mesh's CA, but
    # none of the callers it takes.
    await _refused(gate, gate.identity("node", "othernode"))
    await _refused(gate, gate.identity("service", "registry"))
    # Another CA's router.
    stranger = pki.Authority.create()
    key = pki.new_key()
    issued = stranger.issue(key.public_key(), stranger.workload("service", "router"))
    tls.write_identity(
        gate.root / "stranger",
        chain=issued.chain_pem,
        key=pki.key_pem(key),
        bundle=gate.authority.bundle_pem,
    )
    await _refused(gate, tls.TlsIdentity(gate.root / "stranger"))
    # The mesh's router, expired.
    await _refused(gate, _expired_router(gate))
    assert gate.gate.process.running()


def _expired_router(gate: Gate) -> tls.TlsIdentity:
    key = pki.new_key()
    now = datetime.datetime.now(datetime.UTC)
    workload = gate.authority.workload("service", "router")
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "router")]))
        .issuer_name(gate.authority.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=2))
        .not_valid_after(now - datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(workload.uri)]), False
        )
        .sign(gate.authority._key, hashes.SHA256())
    )
    directory = gate.root / "expired"
    tls.write_identity(
        directory,
        chain=leaf.public_bytes(serialization.Encoding.PEM),
        key=pki.key_pem(key),
        bundle=gate.authority.bundle_pem,
    )
    return tls.TlsIdentity(directory)


async def test_a_client_certificate_allows_its_models_and_a_few_methods(gate: Gate) -> None:
    client = gate.identity("client", "k1", grants=[pki.model_grant("simple")])
    async with gate.channel(client) as channel:
        before = len(gate.triton.calls)
        assert await _call(channel, "ModelInfer", _infer("simple")) == grpc.StatusCode.OK
        assert gate.triton.calls[-1][2]["model"] == "simple"
        assert await _call(channel, "ModelInfer", _infer("private")) == (
            grpc.StatusCode.PERMISSION_DENIED
        )
        assert await _call(channel, "ModelInfer", _infer("simpl")) == (
            grpc.StatusCode.PERMISSION_DENIED
        )
        metadata = service_pb2.ModelMetadataRequest(name="simple").SerializeToString()
        assert await _call(channel, "ModelMetadata", metadata) == grpc.StatusCode.OK
        private = service_pb2.ModelMetadataRequest(name="private").SerializeToString()
        assert await _call(channel, "ModelMetadata", private) == grpc.StatusCode.PERMISSION_DENIED
        for method in ("ModelStatistics", "RepositoryIndex", "RepositoryModelLoad", "Nope"):
            assert await _call(channel, method, b"") == grpc.StatusCode.PERMISSION_DENIED
        # Only the allowed inference reached Triton.
        assert [c[0] for c in gate.triton.calls[before:]] == ["ModelInfer", "ModelMetadata"]


async def test_a_client_certificate_does_not_take_the_control_header_through(
    gate: Gate,
) -> None:
    router = gate.identity("service", "router")
    async with gate.channel(router) as channel:
        call = channel.unary_unary(f"{SERVICE}/ModelInfer", None, None)
        await call(
            _infer("simple"),
            timeout=10,
            metadata=(("triton-grpc-protocol-shard-node-control", "guess"),),
        )
    assert "triton-grpc-protocol-shard-node-control" not in gate.triton.calls[-1][2]


async def _raw(gate: Gate, identity: tls.TlsIdentity, body: bytes) -> tuple[str, str]:
    """POST `body` as the whole gRPC request body of ModelInfer; grpc-status and message."""
    context = identity.client_context()
    context.set_alpn_protocols(["h2"])
    node = gate.authority.workload("node", NODE)
    return await asyncio.to_thread(
        h2_post, gate.gate.ports.grpc, body, context=context, hostname=node.dns
    )


async def test_hostile_bytes_never_pass_a_client_by_the_model_check(gate: Gate) -> None:
    client = gate.identity("client", "k2", grants=[pki.model_grant("simple")])
    simple, private = field(1, b"simple"), field(1, b"private")
    invalid = "3"
    cases = {case: (body, invalid) for case, body in malformed(b"simple", b"private").items()}
    # Protobuf takes the last of repeated scalar fields: so does the gate.
    cases["allowed then private"] = (frame(simple + private), "7")
    for case, (body, status) in cases.items():
        got, message = await _raw(gate, client, body)
        assert got == status, f"{case}: {got} {message}"
        assert message, case
    # The private name first and the allowed one last: Triton reads the allowed one.
    before = len(gate.triton.calls)
    got, _ = await _raw(gate, client, frame(private + simple))
    assert got != "7"
    assert [c[2]["model"] for c in gate.triton.calls[before:]] == ["simple"]
    assert gate.gate.process.running()


async def test_a_renewed_node_certificate_serves_new_handshakes(gate: Gate) -> None:
    router = gate.identity("service", "router")

    def served_serial() -> int:
        context = router.client_context()
        node = gate.authority.workload("node", NODE)
        with (
            socket.create_connection(("127.0.0.1", gate.gate.ports.grpc), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname=node.dns) as sock,
        ):
            der = sock.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number

    before = served_serial()
    key = pki.new_key()
    issued = gate.authority.issue(
        key.public_key(), gate.authority.workload("node", NODE), lifetime_s=600
    )
    tls.write_identity(gate.root / "tls", chain=issued.chain_pem, key=pki.key_pem(key))
    await until(
        lambda: served_serial() == issued.serial,
        f"the gate still serves certificate {before:x}",
        timeout=30,
    )


async def test_no_client_can_take_the_gates_memory(tmp_path: Path, gate: Gate) -> None:
    """A client holding many large requests open (each buffered whole for its model name)
    gets its streams reset once Envoy's heap nears its cap; the gate goes on serving."""
    capped = NodeGate(
        workload=gate.authority.workload("node", NODE),
        state_dir=tmp_path,
        tls_dir=gate.root / "tls",
        listen_host="127.0.0.1",
        ports=GatePorts(grpc=free_port(), http=free_port()),
        triton_grpc=gate.triton.address,
        triton_http=None,
        max_heap_bytes=256 << 20,
    )
    await capped.start()
    try:
        client = gate.identity("client", "k3", grants=[pki.model_grant("simple")])
        context = client.client_context()
        context.set_alpn_protocols(["h2"])
        node = gate.authority.workload("node", NODE)
        reset, held = await asyncio.to_thread(
            _hold_open, capped.ports.grpc, context, node.dns, streams=60, each=15 << 20
        )
        peak_kb = _rss_kb(capped.process.pid)
        assert reset > 0, "no stream was reset"
        assert peak_kb < 700 << 10, f"Envoy holds {peak_kb} kB for {held >> 20} MiB sent"
        router = gate.identity("service", "router")
        node_address = f"127.0.0.1:{capped.ports.grpc}"
        async with tls.channel(node_address, router.channel_credentials(), expect=node) as ch:
            # Once the flood's memory is back (the overload state is refreshed four times a
            # second), requests are taken again.
            async def served() -> bool:
                return await _call(ch, "ModelInfer", _infer("simple")) == grpc.StatusCode.OK

            await until(served, "the gate did not serve again after the flood")
    finally:
        capped.stop()


def _rss_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1])


def _hold_open(
    port: int, context: ssl.SSLContext, hostname: str, *, streams: int, each: int
) -> tuple[int, int]:
    """Open `streams` ModelInfer streams and send each `each` bytes of one message, never
    ending any; how many the gate reset or answered, and the bytes sent."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=hostname) as sock,
    ):
        connection = h2.connection.H2Connection()
        connection.initiate_connection()
        left: dict[int, int] = {}
        for _ in range(streams):
            stream = connection.get_next_available_stream_id()
            connection.send_headers(stream, _headers(hostname))
            connection.send_data(stream, b"\x00" + (each + 100).to_bytes(4, "big"))
            left[stream] = each
        sock.sendall(connection.data_to_send())
        chunk, ended, sent = b"A" * 16384, 0, 0
        while any(left.values()):
            progressed = False
            for stream, remaining in left.items():
                if not remaining:
                    continue
                room = min(
                    connection.local_flow_control_window(stream),
                    connection.max_outbound_frame_size,
                    remaining,
                )
                if room > 0:
                    connection.send_data(stream, chunk[:room])
                    left[stream] -= room
                    sent += room
                    progressed = True
            sock.sendall(connection.data_to_send())
            if progressed:
                continue
            data = sock.recv(1 << 20)
            if not data:
                break
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.StreamReset | h2.events.StreamEnded):
                    left[event.stream_id] = 0
                    ended += 1
            sock.sendall(connection.data_to_send())
    return ended, sent


def _headers(hostname: str) -> list[tuple[str, str]]:
    return [
        (":method", "POST"),
        (":path", f"{SERVICE}/ModelInfer"),
        (":scheme", "https"),
        (":authority", hostname),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]


async def test_a_stalled_handshake_is_dropped_and_others_are_served(gate: Gate) -> None:
    def stall() -> bytes:
        """Connect, say nothing, and wait for the gate to hang up (b'' when it does)."""
        with socket.create_connection(("127.0.0.1", gate.gate.ports.grpc), timeout=60) as raw:
            return raw.recv(1)

    stalled = asyncio.ensure_future(asyncio.to_thread(stall))
    async with gate.channel(gate.identity("service", "router")) as channel:
        assert await _call(channel, "ModelInfer", _infer("simple")) == grpc.StatusCode.OK
    assert await stalled == b""
