"""Node certificates from the mesh CA: asked for in an attestation, issued only once it is
accepted, naming only the node, never to a quarantined node; and the real agent keeps one."""

from __future__ import annotations

import asyncio
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from shard.node.v1 import node_pb2, node_service_pb2, node_service_pb2_grpc
from shard.task.v1 import task_service_pb2 as task_api
from shard.task.v1 import task_service_pb2_grpc
from shard_core import pki, tls
from shard_core.errors import error_info
from shard_core.tls import TlsIdentity, write_identity
from shard_node.identity import NodeIdentity
from shard_tool.local import LocalMesh
from tests.fake_node import FakeAgent, attestation, refused
from tests.waiting import until


@pytest.fixture
async def stub(mesh: LocalMesh) -> AsyncIterator[node_service_pb2_grpc.NodeServiceStub]:
    async with mesh.admin_channel() as channel:
        yield node_service_pb2_grpc.NodeServiceStub(channel)


def _workload(identity: NodeIdentity) -> pki.Workload:
    return pki.Workload(trust_domain=pki.DEFAULT_TRUST_DOMAIN, kind="node", name=identity.node_id)


async def _until(agent: FakeAgent, kind: str) -> list[node_service_pb2.ConnectResponse]:
    """Every message the registry sends up to and including the next one of `kind` (a
    loaded machine may take a while over the etcd writes an attestation makes)."""
    seen = []
    while True:
        reply = await agent.read(timeout=60)
        seen.append(reply)
        if reply.WhichOneof("message") == kind:
            return seen


async def _register(
    agent: FakeAgent, identity: NodeIdentity, token: str, request: bytes
) -> node_service_pb2.ConnectResponse:
    challenge = await agent.hello(identity)
    proof = attestation(identity, challenge, certificate_request=request)
    registration = node_service_pb2.Registration(
        inference_address="127.0.0.1:1", join_token=token, attestation=proof
    )
    await agent.send(node_service_pb2.ConnectRequest(registration=registration))
    return await agent.read()


def _leaf(certificate: node_service_pb2.NodeCertificate, mesh: LocalMesh) -> x509.Certificate:
    """The issued certificate, checked to chain to the mesh CA's bundle."""
    chain = x509.load_pem_x509_certificates(certificate.certificate_chain)
    (root,) = x509.load_pem_x509_certificates(mesh.ca_file.read_bytes())
    assert certificate.trust_bundle == mesh.ca_file.read_bytes()
    for child, parent in zip(chain, [*chain[1:], root], strict=True):
        child.verify_directly_issued_by(parent)
    return chain[0]


async def test_a_node_gets_its_certificate_after_attesting_and_renews_it(
    mesh: LocalMesh, stub: node_service_pb2_grpc.NodeServiceStub, tmp_path: Path
) -> None:
    identity = NodeIdentity.load_or_create(tmp_path)
    key = pki.new_key()
    agent = FakeAgent(stub)
    request = pki.certificate_request(key, _workload(identity))
    reply = await _register(agent, identity, await mesh.join_token("cert"), request)
    assert reply.registered.name == f"nodes/{identity.node_id}"
    # A node that proves who it is by certificate gets no bearer credential.
    assert not reply.registered.blob_credential
    beating = asyncio.ensure_future(agent.heartbeats())  # keep the lease while attesting
    issued = (await _until(agent, "certificate"))[-1].certificate
    leaf = _leaf(issued, mesh)
    assert leaf.public_key() == key.public_key()
    assert pki.workload_of(leaf) == _workload(identity)
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert lifetime.total_seconds() <= pki.DEFAULT_LIFETIME_S + 600  # hours, not months
    assert issued.expire_time.ToDatetime().timestamp() == pytest.approx(
        leaf.not_valid_after_utc.timestamp(), abs=1
    )

    # A re-attestation that asks again gets a certificate for the new key (and still no
    # bearer credential).
    challenge = (await _until(agent, "challenge"))[-1].challenge.nonce
    renewed_key = pki.new_key()
    proof = attestation(
        identity,
        challenge,
        certificate_request=pki.certificate_request(renewed_key, _workload(identity)),
    )
    await agent.send(node_service_pb2.ConnectRequest(attestation=proof))
    after = await _until(agent, "certificate")
    assert "credential" not in [m.WhichOneof("message") for m in after]
    renewed = _leaf(after[-1].certificate, mesh)
    assert renewed.public_key() == renewed_key.public_key()
    assert renewed.serial_number != leaf.serial_number
    beating.cancel()
    assert await agent.close() == grpc.StatusCode.OK


async def test_bad_certificate_requests_are_refused_and_nothing_is_made(
    mesh: LocalMesh, stub: node_service_pb2_grpc.NodeServiceStub, tmp_path: Path
) -> None:
    identity = NodeIdentity.load_or_create(tmp_path / "a")
    other = NodeIdentity.load_or_create(tmp_path / "b")
    key = pki.new_key()
    token = await mesh.join_token("bad csr")
    # A request naming another node is refused, naming the field; the node is not registered.
    error = await refused(
        _register(FakeAgent(stub), identity, token, pki.certificate_request(key, _workload(other))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "BAD_CERTIFICATE_REQUEST",
    )
    assert error_info(error).metadata["field"] == (  # type: ignore[union-attr]
        "registration.attestation.certificate_request"
    )
    await refused(
        stub.GetNode(node_service_pb2.GetNodeRequest(name=f"nodes/{identity.node_id}")),
        grpc.StatusCode.NOT_FOUND,
    )
    # The signature covers the request: one swapped on the way (for the attacker's key) fails.
    agent = FakeAgent(stub)
    challenge = await agent.hello(identity)
    proof = attestation(
        identity, challenge, certificate_request=pki.certificate_request(key, _workload(identity))
    )
    proof.certificate_request = pki.certificate_request(pki.new_key(), _workload(identity))
    registration = node_service_pb2.Registration(
        inference_address="127.0.0.1:1", join_token=token, attestation=proof
    )
    await agent.send(node_service_pb2.ConnectRequest(registration=registration))
    await refused(agent.read(), grpc.StatusCode.UNAUTHENTICATED, "BAD_SIGNATURE")
    # Garbage is refused as such, and the token is still good for the node's real attempt.
    error = await refused(
        _register(FakeAgent(stub), identity, token, b"not a request"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "BAD_CERTIFICATE_REQUEST",
    )
    assert "PEM" in (error.details() or "")
    good = FakeAgent(stub)
    reply = await _register(
        good, identity, token, pki.certificate_request(key, _workload(identity))
    )
    assert reply.registered.name == f"nodes/{identity.node_id}"
    assert await good.close() == grpc.StatusCode.OK


async def test_a_quarantined_node_gets_no_certificate(
    mesh: LocalMesh, stub: node_service_pb2_grpc.NodeServiceStub, tmp_path: Path
) -> None:
    identity = NodeIdentity.load_or_create(tmp_path)
    agent = FakeAgent(stub)
    reply = await _register(agent, identity, await mesh.join_token("q"), b"")
    name = reply.registered.name
    beating = asyncio.ensure_future(agent.heartbeats())
    await stub.QuarantineNode(
        node_service_pb2.QuarantineNodeRequest(name=name, reason="TEST: no certificate for it")
    )
    node = (await stub.GetNode(node_service_pb2.GetNodeRequest(name=name))).node
    assert node.state == node_pb2.NODE_STATE_QUARANTINED
    challenge = (await _until(agent, "challenge"))[-1].challenge.nonce
    request = pki.certificate_request(pki.new_key(), _workload(identity))
    proof = attestation(identity, challenge, certificate_request=request)
    await agent.send(node_service_pb2.ConnectRequest(attestation=proof))
    # Whatever the attestation brings comes before the next challenge: no certificate in it.
    answered = await _until(agent, "challenge")
    assert "certificate" not in [m.WhichOneof("message") for m in answered]
    beating.cancel()
    agent.call.cancel()


def test_the_agent_keeps_its_certificate_owner_only(mesh: LocalMesh) -> None:
    node = mesh.nodes["node-0"]
    directory = node.state_dir / "tls"
    leaf = x509.load_pem_x509_certificates((directory / "cert.pem").read_bytes())[0]
    workload = pki.workload_of(leaf)
    assert workload is not None
    assert workload.kind == "node"
    assert (directory / "key.pem").stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO) == 0
    leaf.verify_directly_issued_by(x509.load_pem_x509_certificates(mesh.ca_file.read_bytes())[0])


async def _node_with_certificate(
    mesh: LocalMesh, stub: node_service_pb2_grpc.NodeServiceStub, directory: Path
) -> tuple[FakeAgent, str, asyncio.Future[None]]:
    """A node registered with a certificate written to `directory`; its agent, name and
    heartbeats."""
    identity = NodeIdentity.load_or_create(directory / "identity")
    key = pki.new_key()
    agent = FakeAgent(stub)
    request = pki.certificate_request(key, _workload(identity))
    token = await mesh.join_token("calls")
    name = (await _register(agent, identity, token, request)).registered.name
    beating = asyncio.ensure_future(agent.heartbeats())
    issued = (await _until(agent, "certificate"))[-1].certificate
    write_identity(
        directory / "tls", chain=issued.certificate_chain, key=pki.key_pem(key),
        bundle=issued.trust_bundle,
    )  # fmt: skip
    return agent, name, beating


REGISTRY = pki.Workload(trust_domain=pki.DEFAULT_TRUST_DOMAIN, kind="service", name="registry")
CLAIM = task_api.ClaimTaskRequest(name="tasks/no-such-task")


def _by(mesh: LocalMesh, identity_dir: Path) -> grpc.aio.Channel:
    credentials = TlsIdentity(identity_dir).channel_credentials()
    return tls.channel(mesh.registry_mesh_address, credentials, expect=REGISTRY)


async def test_a_node_calls_by_certificate_and_loses_it_with_its_standing(
    mesh: LocalMesh, stub: node_service_pb2_grpc.NodeServiceStub, tmp_path: Path
) -> None:
    agent, name, beating = await _node_with_certificate(mesh, stub, tmp_path / "a")
    async with _by(mesh, tmp_path / "a" / "tls") as channel:
        tasks = task_service_pb2_grpc.TaskServiceStub(channel)
        # What a node may do, it does with no secret sent: past authentication to the lookup.
        await refused(tasks.ClaimTask(CLAIM, timeout=10), grpc.StatusCode.NOT_FOUND)
        # The control plane is not a node's.
        nodes = node_service_pb2_grpc.NodeServiceStub(channel)
        quarantine = node_service_pb2.QuarantineNodeRequest(name=name, reason="SELF: x")
        await refused(
            nodes.QuarantineNode(quarantine, timeout=10),
            grpc.StatusCode.PERMISSION_DENIED,
            "PERMISSION_MISSING",
        )
        # Quarantined, its certificate stops working at once, long before it expires; and it
        # stays so, whether the node keeps its record or not.
        await stub.QuarantineNode(
            node_service_pb2.QuarantineNodeRequest(name=name, reason="TEST: revoke")
        )
        await _refused_soon(
            lambda: tasks.ClaimTask(CLAIM, timeout=10),
            grpc.StatusCode.PERMISSION_DENIED,
            "NODE_NOT_ALLOWED",
        )
        beating.cancel()
        agent.call.cancel()

    # Deleted (not quarantined), a node is no node at all.
    other, other_name, other_beating = await _node_with_certificate(mesh, stub, tmp_path / "b")
    async with _by(mesh, tmp_path / "b" / "tls") as channel:
        tasks = task_service_pb2_grpc.TaskServiceStub(channel)
        await refused(tasks.ClaimTask(CLAIM, timeout=10), grpc.StatusCode.NOT_FOUND)
        await stub.DeleteNode(node_service_pb2.DeleteNodeRequest(name=other_name))
        await _refused_soon(
            lambda: tasks.ClaimTask(CLAIM, timeout=10),
            grpc.StatusCode.UNAUTHENTICATED,
            "CREDENTIAL_REVOKED",
        )
    other_beating.cancel()
    other.call.cancel()

    # A service's certificate from the same CA does not act as a node (a service's calls are
    # its callers', here anonymous); no certificate at all, or another CA's, does not get past
    # the handshake.
    async with _by(mesh, mesh.state_dir / "tls" / "router") as channel:
        await refused(
            task_service_pb2_grpc.TaskServiceStub(channel).ClaimTask(CLAIM, timeout=10),
            grpc.StatusCode.UNAUTHENTICATED,
            "CREDENTIALS_MISSING",
        )
    async with tls.channel(
        mesh.registry_mesh_address, tls.trusting(mesh.ca_file), expect=REGISTRY
    ) as channel:
        await refused(
            task_service_pb2_grpc.TaskServiceStub(channel).ClaimTask(CLAIM, timeout=10),
            grpc.StatusCode.UNAVAILABLE,
        )


async def test_a_quarantined_node_back_after_its_lease_gets_no_certificate(
    mesh: LocalMesh, stub: node_service_pb2_grpc.NodeServiceStub, tmp_path: Path
) -> None:
    agent, name, beating = await _node_with_certificate(mesh, stub, tmp_path)
    await stub.QuarantineNode(node_service_pb2.QuarantineNodeRequest(name=name, reason="TEST: q"))
    beating.cancel()
    agent.call.cancel()

    # Its lease lapses and its record goes; the quarantine stays with the node.
    async def gone() -> bool:
        return not await _exists(stub, name)

    await until(gone, "the node's record never went")
    identity = NodeIdentity.load_or_create(tmp_path / "identity")
    again = FakeAgent(stub)
    request = pki.certificate_request(pki.new_key(), _workload(identity))
    reply = await _register(again, identity, await mesh.join_token("back"), request)
    assert reply.registered.name == name
    answered = await _until(again, "tasks")  # what follows a registration
    assert "certificate" not in [m.WhichOneof("message") for m in answered]
    again.call.cancel()


async def _exists(stub: node_service_pb2_grpc.NodeServiceStub, name: str) -> bool:
    try:
        await stub.GetNode(node_service_pb2.GetNodeRequest(name=name))
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.NOT_FOUND:
            return False
        raise
    return True


async def _refused_soon(
    call: Callable[[], Awaitable[object]], code: grpc.StatusCode, reason: str
) -> None:
    """`call` is refused with `code` and `reason` once the registry's live view has caught up
    (it follows etcd a moment behind the write)."""
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        try:
            await refused(call(), code, reason)
            return
        except AssertionError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)


def test_the_real_agent_calls_the_registry_by_certificate(mesh: LocalMesh) -> None:
    log = mesh.nodes["node-0"].process.log_path.read_text()
    assert "prove who this node is by its certificate now" in log
