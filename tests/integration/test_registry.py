"""The registry's node API over real gRPC and real etcd."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from shard.artifact.v1 import artifact_service_pb2 as artifact_api
from shard.artifact.v1 import artifact_service_pb2_grpc
from shard.auth.v1 import api_key_pb2, key_service_pb2_grpc
from shard.auth.v1 import key_service_pb2 as key_api
from shard.deployment.v1 import deployment_pb2
from shard.deployment.v1 import deployment_service_pb2 as deployment_api
from shard.node.v1 import node_pb2, node_service_pb2, node_service_pb2_grpc
from shard_core import keys
from shard_core.attestation import evidence_nonce
from shard_core.auth import bearer_interceptors
from shard_core.errors import error_info
from shard_core.etcd.store import EtcdStore
from shard_node.identity import NodeIdentity
from shard_registry.enrollment import MAX_EVIDENCE_BYTES
from shard_tool.local import LocalMesh
from shard_tool.publish import Publisher
from tests.demo import push_copy, target
from tests.fake_node import INVENTORY, FakeAgent, attestation, refused


@pytest.fixture
async def stub(mesh: LocalMesh) -> AsyncIterator[node_service_pb2_grpc.NodeServiceStub]:
    async with mesh.admin_channel() as channel:
        yield node_service_pb2_grpc.NodeServiceStub(channel)


@pytest.fixture
async def shard_etcd(mesh: LocalMesh) -> AsyncIterator[EtcdStore]:
    """The mesh's own records, as the control plane sees them."""
    store = EtcdStore(mesh.etcd.settings())
    yield store
    await store.close()


async def _read_until_closed(agent: FakeAgent) -> None:
    while True:
        await agent.read()


async def _assignments(agent: FakeAgent, *, models: set[str]) -> list[node_pb2.ModelAssignment]:
    """Read the registry's pushes until one assigns exactly `models`; return it."""
    while True:
        reply = await agent.read()
        if reply.WhichOneof("message") == "assignments":
            assigned = list(reply.assignments.models)
            if {a.model_name for a in assigned} == models:
                return assigned


async def _eventually_present(store: EtcdStore, key: str, *, present: bool) -> None:
    for _ in range(100):
        if (await store.get(key) is not None) == present:
            return
        await asyncio.sleep(0.1)
    pytest.fail(f"{key} never became {'present' if present else 'absent'}")


async def _until_unschedulable(publisher: Publisher, name: str) -> None:
    for _ in range(100):
        deployment = (
            await publisher.deployments.GetDeployment(
                deployment_api.GetDeploymentRequest(name=name)
            )
        ).deployment
        conditions = {c.type: c for c in deployment.status.conditions}
        unschedulable = conditions.get("Unschedulable")
        if unschedulable is not None and unschedulable.status:
            assert "labels do not match" in unschedulable.message, unschedulable.message
            return
        await asyncio.sleep(0.1)
    pytest.fail(f"{name} never became unschedulable")


async def _until_node(
    stub: node_service_pb2_grpc.NodeServiceStub,
    name: str,
    condition: Callable[[node_pb2.Node], bool],
    what: str,
) -> node_pb2.Node:
    """The node once `condition` holds of it (polled, with a deadline a loaded machine meets)."""
    deadline = asyncio.get_running_loop().time() + 60
    while True:
        node = (await stub.GetNode(node_service_pb2.GetNodeRequest(name=name))).node
        if condition(node):
            return node
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"{name} never {what}: {node}")
        await asyncio.sleep(0.1)


async def _until_state(
    stub: node_service_pb2_grpc.NodeServiceStub, name: str, state: node_pb2.NodeState.ValueType
) -> node_pb2.Node:
    return await _until_node(
        stub,
        name,
        lambda node: node.state == state,
        f"became {node_pb2.NodeState.Name(state)}",
    )


async def test_assigned_ready_models_become_routable_and_unassigned_ones_stop(
    mesh: LocalMesh,
    stub: node_service_pb2_grpc.NodeServiceStub,
    shard_etcd: EtcdStore,
    publisher: Publisher,
    tmp_path: Path,
) -> None:
    identity = NodeIdentity.load_or_create(tmp_path)
    pool = {"pool": f"fake-{identity.node_id[:8]}"}
    agent = FakeAgent(stub)
    reply = await agent.register(identity, token=await mesh.join_token("test"), labels=pool)
    assert reply.registered.name == f"nodes/{identity.node_id}"
    assert reply.registered.lease_ttl_ms == mesh.timing.lease_ttl_s * 1000
    got = await stub.GetNode(node_service_pb2.GetNodeRequest(name=reply.registered.name))
    assert got.node.state == node_pb2.NODE_STATE_PENDING
    assert got.node.public_key == identity.public_key
    assert got.node.inventory == INVENTORY
    # The first healthy heartbeat makes it ACTIVE, and only ACTIVE nodes get replicas.
    await agent.send(node_service_pb2.ConnectRequest(heartbeat=node_service_pb2.Heartbeat()))
    await _until_state(stub, reply.registered.name, node_pb2.NODE_STATE_ACTIVE)
    assert await _assignments(agent, models=set()) == []

    # What a node claims is not a fact: a deployment whose selector only its claimed labels
    # match waits for a node an admin labelled.
    await push_copy(publisher, "fake-echo")
    await publisher.deploy(
        "fake-echo",
        [target("1", replicas=1)],
        node_selector=deployment_pb2.NodeSelector(labels=pool),
    )
    await _until_unschedulable(publisher, "deployments/fake-echo")
    node = (await stub.GetNode(node_service_pb2.GetNodeRequest(name=reply.registered.name))).node
    assert (dict(node.labels), dict(node.claimed_labels)) == ({}, pool)
    # An admin's label is a fact: the deployment only this node may serve is assigned to it,
    # files and all.
    labelled = node_pb2.Node(name=reply.registered.name, labels=pool)
    updated = await stub.UpdateNode(node_service_pb2.UpdateNodeRequest(node=labelled))
    assert dict(updated.node.labels) == pool
    (assignment,) = await _assignments(agent, models={"fake-echo"})
    assert (assignment.model_name, assignment.model_version) == ("fake-echo", "1")
    assert {file.path for file in assignment.files} == {"model.py"}
    assert assignment.deployment == "deployments/fake-echo"
    endpoint = keys.endpoint("fake-echo", "1", identity.node_id)

    # Loading: not routable. READY: routable.
    loading = node_pb2.ModelStatus(
        model_name="fake-echo", model_version="1", state=node_pb2.MODEL_STATE_LOADING
    )
    await agent.send(
        node_service_pb2.ConnectRequest(heartbeat=node_service_pb2.Heartbeat(models=[loading]))
    )
    await asyncio.sleep(0.3)
    assert await shard_etcd.get(endpoint) is None
    ready = node_pb2.ModelStatus()
    ready.CopyFrom(loading)
    ready.state = node_pb2.MODEL_STATE_READY
    await agent.send(
        node_service_pb2.ConnectRequest(heartbeat=node_service_pb2.Heartbeat(models=[ready]))
    )
    await _eventually_present(shard_etcd, endpoint, present=True)

    # Deleting the deployment unassigns the model: it stops being routable at once, although
    # the node still says READY.
    await publisher.deployments.DeleteDeployment(
        deployment_api.DeleteDeploymentRequest(name="deployments/fake-echo")
    )
    assert await _assignments(agent, models=set()) == []
    await _eventually_present(shard_etcd, endpoint, present=False)

    # A goodbye deregisters at once: no waiting for the lease to expire.
    assert await agent.close() == grpc.StatusCode.OK
    assert await shard_etcd.get(keys.node(identity.node_id)) is None


async def test_reconnect_within_the_ttl_keeps_the_lease_and_needs_no_token(
    mesh: LocalMesh,
    stub: node_service_pb2_grpc.NodeServiceStub,
    shard_etcd: EtcdStore,
    tmp_path: Path,
) -> None:
    identity = NodeIdentity.load_or_create(tmp_path)
    first = FakeAgent(stub)
    await first.register(identity, token=await mesh.join_token("test"))
    lease = (await shard_etcd.get(keys.node(identity.node_id))).lease  # type: ignore[union-attr]
    first.call.cancel()  # the connection breaks; the node did not say goodbye

    second = FakeAgent(stub)
    await second.register(identity, token="")  # enrolled already: its key is enough

    record = await shard_etcd.get(keys.node(identity.node_id))
    assert record is not None
    assert record.lease == lease
    await second.close()


async def test_id_that_does_not_match_the_key_isrefused(
    stub: node_service_pb2_grpc.NodeServiceStub, tmp_path: Path
) -> None:
    identity = NodeIdentity.load_or_create(tmp_path / "a")
    other = NodeIdentity.load_or_create(tmp_path / "b")
    error = await refused(
        FakeAgent(stub).hello(identity, node_id=other.node_id),
        grpc.StatusCode.INVALID_ARGUMENT,
        "NODE_ID_MISMATCH",
    )
    assert error_info(error).metadata["field"] == "hello.node_id"  # type: ignore[union-attr]


async def test_a_forged_signature_isrefused(
    mesh: LocalMesh, stub: node_service_pb2_grpc.NodeServiceStub, tmp_path: Path
) -> None:
    identity = NodeIdentity.load_or_create(tmp_path / "a")
    impostor = NodeIdentity.load_or_create(tmp_path / "b")
    agent = FakeAgent(stub)
    challenge = await agent.hello(identity)
    forged = attestation(identity, challenge, signer=impostor.private_key)
    registration = node_service_pb2.Registration(
        inference_address="127.0.0.1:1", join_token=await mesh.join_token("t"), attestation=forged
    )
    await agent.send(node_service_pb2.ConnectRequest(registration=registration))
    await refused(agent.read(), grpc.StatusCode.UNAUTHENTICATED, "BAD_SIGNATURE")


async def test_hardware_evidence_is_bound_to_the_challenge_and_bounded(
    mesh: LocalMesh, stub: node_service_pb2_grpc.NodeServiceStub, tmp_path: Path
) -> None:
    identity = NodeIdentity.load_or_create(tmp_path)
    token = await mesh.join_token("t")

    async def register(proof: Callable[[bytes], node_service_pb2.Attestation]) -> FakeAgent:
        agent = FakeAgent(stub)
        registration = node_service_pb2.Registration(
            inference_address="127.0.0.1:1",
            join_token=token,
            attestation=proof(await agent.hello(identity)),
        )
        await agent.send(node_service_pb2.ConnectRequest(registration=registration))
        return agent

    def quote(nonce: bytes, report: bytes = b"") -> node_service_pb2.HardwareEvidence:
        """A TPM quote as a node makes it: over the evidence nonce of this challenge."""
        return node_service_pb2.HardwareEvidence(
            kind=node_service_pb2.EVIDENCE_KIND_TPM_QUOTE,
            evidence=report or evidence_nonce(nonce, identity.node_id),
        )

    def swapped(nonce: bytes) -> node_service_pb2.Attestation:
        """Signed over one quote, sent with another (one replayed from elsewhere)."""
        proof = attestation(identity, nonce, evidence=[quote(nonce)])
        proof.hardware_evidence[0].evidence = b"replayed quote"
        return proof

    await refused(
        (await register(swapped)).read(), grpc.StatusCode.UNAUTHENTICATED, "BAD_SIGNATURE"
    )

    def kindless(nonce: bytes) -> node_service_pb2.Attestation:
        item = node_service_pb2.HardwareEvidence(evidence=b"x")
        return attestation(identity, nonce, evidence=[item])

    error = await refused((await register(kindless)).read(), grpc.StatusCode.INVALID_ARGUMENT)
    assert error_info(error).metadata["field"] == (  # type: ignore[union-attr]
        "registration.attestation.hardware_evidence[0].kind"
    )

    def huge(nonce: bytes) -> node_service_pb2.Attestation:
        return attestation(
            identity, nonce, evidence=[quote(nonce, b"q" * (MAX_EVIDENCE_BYTES + 1))]
        )

    error = await refused((await register(huge)).read(), grpc.StatusCode.INVALID_ARGUMENT)
    assert "at most" in error.details()  # type: ignore[operator]

    agent = await register(lambda nonce: attestation(identity, nonce, evidence=[quote(nonce)]))
    assert (await agent.read()).registered.name == f"nodes/{identity.node_id}"
    assert await agent.close() == grpc.StatusCode.OK


async def test_a_replayed_nonce_isrefused(
    mesh: LocalMesh, stub: node_service_pb2_grpc.NodeServiceStub, tmp_path: Path
) -> None:
    identity = NodeIdentity.load_or_create(tmp_path)
    first = FakeAgent(stub)
    old_nonce = await first.hello(identity)
    recorded = attestation(identity, old_nonce)  # a valid answer, captured
    first.call.cancel()

    replay = FakeAgent(stub)
    await refused(
        replay.register(identity, token=await mesh.join_token("t"), proof=recorded),
        grpc.StatusCode.UNAUTHENTICATED,
        "NONCE_MISMATCH",
    )


async def test_a_stale_attestation_time_isrefused(
    mesh: LocalMesh, stub: node_service_pb2_grpc.NodeServiceStub, tmp_path: Path
) -> None:
    identity = NodeIdentity.load_or_create(tmp_path)
    agent = FakeAgent(stub)
    challenge = await agent.hello(identity)
    stale = attestation(identity, challenge, time_ms=int(time.time() * 1000) - 3_600_000)
    registration = node_service_pb2.Registration(
        inference_address="127.0.0.1:1", join_token=await mesh.join_token("t"), attestation=stale
    )
    await agent.send(node_service_pb2.ConnectRequest(registration=registration))
    await refused(agent.read(), grpc.StatusCode.UNAUTHENTICATED, "CLOCK_SKEW")


async def test_join_tokens_are_needed_single_use_and_expire(
    mesh: LocalMesh, stub: node_service_pb2_grpc.NodeServiceStub, tmp_path: Path
) -> None:
    def node(name: str) -> NodeIdentity:
        return NodeIdentity.load_or_create(tmp_path / name)

    await refused(
        FakeAgent(stub).register(node("none"), token=""),
        grpc.StatusCode.PERMISSION_DENIED,
        "JOIN_TOKEN_REQUIRED",
    )
    await refused(
        FakeAgent(stub).register(node("unknown"), token="abcdef.not-a-real-secret"),
        grpc.StatusCode.PERMISSION_DENIED,
        "JOIN_TOKEN_UNKNOWN",
    )
    token = await mesh.join_token("one use")
    first = FakeAgent(stub)
    await first.register(node("first"), token=token)
    await refused(
        FakeAgent(stub).register(node("second"), token=token),
        grpc.StatusCode.PERMISSION_DENIED,
        "JOIN_TOKEN_USED",
    )
    await first.close()
    token_id, _, secret = token.partition(".")
    await refused(
        FakeAgent(stub).register(node("guess"), token=f"{token_id}.{secret[:-2]}xx"),
        grpc.StatusCode.PERMISSION_DENIED,
        "JOIN_TOKEN_UNKNOWN",
    )
    short = await stub.CreateJoinToken(
        node_service_pb2.CreateJoinTokenRequest(
            join_token=node_service_pb2.JoinToken(ttl_seconds=1, description="short")
        )
    )
    assert short.join_token.token
    assert short.join_token.name.startswith("joinTokens/")
    await asyncio.sleep(1.2)
    await refused(
        FakeAgent(stub).register(node("late"), token=short.join_token.token),
        grpc.StatusCode.PERMISSION_DENIED,
        "JOIN_TOKEN_EXPIRED",
    )


async def test_tokens_are_stored_only_as_hashes(mesh: LocalMesh, shard_etcd: EtcdStore) -> None:
    token = await mesh.join_token("hash check")
    token_id, _, secret = token.partition(".")
    stored = await shard_etcd.get(keys.join_token(token_id))
    assert stored is not None
    assert secret.encode() not in stored.value


async def test_a_node_that_breaks_the_policy_isrefused(
    mesh: LocalMesh, stub: node_service_pb2_grpc.NodeServiceStub, tmp_path: Path
) -> None:
    identity = NodeIdentity.load_or_create(tmp_path)
    agent = FakeAgent(stub)
    challenge = await agent.hello(identity)
    phantom_gpu = node_pb2.Inventory()
    phantom_gpu.CopyFrom(INVENTORY)
    phantom_gpu.gpus.add(model="NVIDIA H100", memory_bytes=80 << 30, pci_bus_id="00000000:99:00.0")
    phantom_gpu.gpus_cross_checked = False  # NVML says a GPU that the PCI bus does not have
    registration = node_service_pb2.Registration(
        inference_address="127.0.0.1:1",
        join_token=await mesh.join_token("t"),
        attestation=attestation(identity, challenge, inventory=phantom_gpu),
    )
    await agent.send(node_service_pb2.ConnectRequest(registration=registration))
    error = await refused(agent.read(), grpc.StatusCode.PERMISSION_DENIED, "POLICY_VIOLATION")
    assert "GPU_NOT_ON_PCI_BUS" in (error.details() or "")


async def test_re_attestation_notices_a_changed_inventory_and_quarantines_a_bad_one(
    mesh: LocalMesh, stub: node_service_pb2_grpc.NodeServiceStub, tmp_path: Path
) -> None:
    identity = NodeIdentity.load_or_create(tmp_path)
    agent = FakeAgent(stub)
    reply = await agent.register(identity, token=await mesh.join_token("t"))
    name = reply.registered.name
    beating = asyncio.ensure_future(agent.heartbeats())  # challenges come slower than the TTL

    async def next_challenge() -> bytes:
        while True:
            message = await agent.read()
            if message.WhichOneof("message") == "challenge":
                return message.challenge.nonce

    bigger = node_pb2.Inventory()
    bigger.CopyFrom(INVENTORY)
    bigger.memory_bytes *= 2
    proof = attestation(identity, await next_challenge(), inventory=bigger)
    await agent.send(node_service_pb2.ConnectRequest(attestation=proof))
    # The history record comes first; the record with the new inventory follows.
    await _until_node(
        stub,
        name,
        lambda node: (
            node.inventory.memory_bytes == bigger.memory_bytes
            and node.transitions[0].reason == "INVENTORY_CHANGED"
        ),
        "recorded its changed inventory",
    )

    phantom = node_pb2.Inventory()
    phantom.CopyFrom(bigger)
    phantom.gpus.add(model="NVIDIA H100", memory_bytes=80 << 30)
    proof = attestation(identity, await next_challenge(), inventory=phantom)
    await agent.send(node_service_pb2.ConnectRequest(attestation=proof))
    # The state changes first; its history record follows.
    node = await _until_node(
        stub,
        name,
        lambda node: node.transitions[0].reason.startswith("QUARANTINED"),
        "recorded its quarantine",
    )
    assert node.state == node_pb2.NODE_STATE_QUARANTINED
    assert "GPU_NOT_ON_PCI_BUS" in node.state_reason
    beating.cancel()
    await agent.close()


async def test_delete_node_disconnects_it_and_it_needs_a_new_token(
    mesh: LocalMesh, stub: node_service_pb2_grpc.NodeServiceStub, tmp_path: Path
) -> None:
    identity = NodeIdentity.load_or_create(tmp_path)
    agent = FakeAgent(stub)
    name = (await agent.register(identity, token=await mesh.join_token("t"))).registered.name
    await stub.DeleteNode(node_service_pb2.DeleteNodeRequest(name=name))
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await stub.GetNode(node_service_pb2.GetNodeRequest(name=name))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    # Its next heartbeat finds its lease revoked: the registry ends the stream.
    await agent.send(node_service_pb2.ConnectRequest(heartbeat=node_service_pb2.Heartbeat()))
    with pytest.raises(grpc.aio.AioRpcError):
        await _read_until_closed(agent)
    await refused(
        FakeAgent(stub).register(identity, token=""),
        grpc.StatusCode.PERMISSION_DENIED,
        "JOIN_TOKEN_REQUIRED",
    )


async def test_watch_nodes_streams_arrivals_and_departures(
    mesh: LocalMesh, stub: node_service_pb2_grpc.NodeServiceStub, tmp_path: Path
) -> None:
    watch: Any = stub.WatchNodes(node_service_pb2.WatchNodesRequest())
    listed = await stub.ListNodes(node_service_pb2.ListNodesRequest())
    initial = set()
    for _ in listed.nodes:
        change = await asyncio.wait_for(watch.read(), 10)
        assert change.kind == node_service_pb2.CHANGE_KIND_UPSERTED
        initial.add(change.node.name)
    assert initial == {node.name for node in listed.nodes}

    identity = NodeIdentity.load_or_create(tmp_path)
    agent = FakeAgent(stub)
    await agent.register(identity, token=await mesh.join_token("watched"))
    name = f"nodes/{identity.node_id}"
    seen: list[int] = []
    await agent.close()
    while node_service_pb2.CHANGE_KIND_REMOVED not in seen:
        change = await asyncio.wait_for(watch.read(), 10)
        if change.node.name == name:
            seen.append(change.kind)
    assert seen[0] == node_service_pb2.CHANGE_KIND_UPSERTED
    watch.cancel()


async def test_list_nodes_filters_by_state_and_labels(
    mesh: LocalMesh, stub: node_service_pb2_grpc.NodeServiceStub
) -> None:
    active = await stub.ListNodes(node_service_pb2.ListNodesRequest(filter="state=ACTIVE"))
    assert active.nodes
    assert all(node.state == node_pb2.NODE_STATE_ACTIVE for node in active.nodes)
    one = await stub.ListNodes(
        node_service_pb2.ListNodesRequest(filter="state=ACTIVE AND labels.shard.local/name=node-0")
    )
    assert [node.labels["shard.local/name"] for node in one.nodes] == ["node-0"]
    for bad in ("state", "state=SLEEPY", "color=red"):
        await refused(
            stub.ListNodes(node_service_pb2.ListNodesRequest(filter=bad)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
        )


@pytest.mark.parametrize(
    ("hello", "field"),
    [
        (node_service_pb2.Hello(node_id="n1", public_key=b"short"), "hello.public_key"),
        (node_service_pb2.Hello(node_id="n1"), "hello.public_key"),
        (node_service_pb2.Hello(public_key=b"k" * 32), "hello.node_id"),
    ],
)
async def test_bad_hellos_name_the_field(
    stub: node_service_pb2_grpc.NodeServiceStub, hello: node_service_pb2.Hello, field: str
) -> None:
    agent = FakeAgent(stub)
    await agent.send(node_service_pb2.ConnectRequest(hello=hello))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await agent.read()
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(raised.value).metadata["field"] == field  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("field", "address"),
    [
        *(("inference_address", bad) for bad in ("", "no-port", "host:port", "a b:1")),
        # The HTTP address is optional (empty: gRPC only), but a given one must be host:port.
        *(("http_address", bad) for bad in ("no-port", "host:port", "a b:1")),
    ],
)
async def test_bad_inference_addresses_arerefused(
    mesh: LocalMesh,
    stub: node_service_pb2_grpc.NodeServiceStub,
    tmp_path: Path,
    address: str,
    field: str,
) -> None:
    fields: dict[str, Any] = {field: address}
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await FakeAgent(stub).register(NodeIdentity.load_or_create(tmp_path), token="", **fields)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    named = error_info(raised.value).metadata["field"]  # type: ignore[union-attr]
    assert named == f"registration.{field}"


async def test_stream_must_start_with_a_hello(
    stub: node_service_pb2_grpc.NodeServiceStub,
) -> None:
    agent = FakeAgent(stub)
    await agent.send(node_service_pb2.ConnectRequest(heartbeat=node_service_pb2.Heartbeat()))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await agent.read()
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "hello" in (raised.value.details() or "")


async def test_get_node_errors(stub: node_service_pb2_grpc.NodeServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.GetNode(node_service_pb2.GetNodeRequest(name="nodes/nope"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert "nodes/nope" in (missing.value.details() or "")

    for bad in ("", "nope", "nodes/", "nodes/a/b"):
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await stub.GetNode(node_service_pb2.GetNodeRequest(name=bad))
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "name" in (invalid.value.details() or "")


async def test_list_nodes_pages_through_every_node(
    mesh: LocalMesh, stub: node_service_pb2_grpc.NodeServiceStub
) -> None:
    seen: list[str] = []
    token = ""
    while True:
        page = await stub.ListNodes(
            node_service_pb2.ListNodesRequest(page_size=1, page_token=token)
        )
        assert len(page.nodes) <= 1
        seen += [node.name for node in page.nodes]
        token = page.next_page_token
        if not token:
            break
    everything = await stub.ListNodes(node_service_pb2.ListNodesRequest())
    assert seen == [node.name for node in everything.nodes]
    assert seen == sorted(seen)
    assert {node.labels["shard.local/name"] for node in everything.nodes} >= {"node-0", "node-1"}


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (node_service_pb2.ListNodesRequest(page_size=-1), "page_size"),
        (node_service_pb2.ListNodesRequest(page_token="!!not-a-token"), "page_token"),
        (node_service_pb2.ListNodesRequest(page_token="bm90LWEta2V5"), "page_token"),
    ],
)
async def test_list_nodes_rejects_bad_paging(
    stub: node_service_pb2_grpc.NodeServiceStub,
    request_: node_service_pb2.ListNodesRequest,
    field: str,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.ListNodes(request_)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (raised.value.details() or "")


async def test_calls_need_credentials_except_the_node_stream(
    mesh: LocalMesh, tmp_path: Path
) -> None:
    cordon = node_service_pb2.CordonNodeRequest(name="nodes/nany")
    async with grpc.aio.insecure_channel(mesh.registry_address) as anonymous:
        nodes = node_service_pb2_grpc.NodeServiceStub(anonymous)
        await refused(
            nodes.CordonNode(cordon), grpc.StatusCode.UNAUTHENTICATED, "CREDENTIALS_MISSING"
        )
        await refused(
            nodes.CreateJoinToken(node_service_pb2.CreateJoinTokenRequest()),
            grpc.StatusCode.UNAUTHENTICATED,
            "CREDENTIALS_MISSING",
        )
        await refused(
            nodes.CordonNode(cordon, metadata=(("authorization", "Bearer wrong"),)),
            grpc.StatusCode.UNAUTHENTICATED,
            "BAD_CREDENTIALS",
        )
        await refused(
            nodes.ListNodes(node_service_pb2.ListNodesRequest()),
            grpc.StatusCode.UNAUTHENTICATED,
            "CREDENTIALS_MISSING",
        )
        # The node agents' stream stays open: nodes prove themselves on it.
        agent = FakeAgent(nodes)
        await agent.register(
            NodeIdentity.load_or_create(tmp_path), token=await mesh.join_token("open stream")
        )
        await agent.close()


async def test_a_node_cannot_point_traffic_elsewhere(
    mesh: LocalMesh, stub: node_service_pb2_grpc.NodeServiceStub, tmp_path: Path
) -> None:
    await refused(
        FakeAgent(stub).register(
            NodeIdentity.load_or_create(tmp_path),
            token=await mesh.join_token("elsewhere"),
            inference_address="10.20.30.40:8001",
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "ADDRESS_NOT_PEER",
    )


async def _quarantine_by_policy(
    agent: FakeAgent, identity: NodeIdentity, stub: node_service_pb2_grpc.NodeServiceStub
) -> None:
    """Answer the node's next challenge with a GPU the PCI bus does not show: the shard
    quarantines it."""
    while (message := await agent.read()).WhichOneof("message") != "challenge":
        pass
    phantom = node_pb2.Inventory()
    phantom.CopyFrom(INVENTORY)
    phantom.gpus.add(model="NVIDIA H100", memory_bytes=80 << 30)
    proof = attestation(identity, message.challenge.nonce, inventory=phantom)
    await agent.send(node_service_pb2.ConnectRequest(attestation=proof))
    await _until_state(stub, f"nodes/{identity.node_id}", node_pb2.NODE_STATE_QUARANTINED)


async def test_a_provider_cannot_lift_its_own_quarantine(
    mesh: LocalMesh, stub: node_service_pb2_grpc.NodeServiceStub, tmp_path: Path
) -> None:
    async with mesh.admin_channel() as admin:
        made = await key_service_pb2_grpc.KeyServiceStub(admin).CreateApiKey(
            key_api.CreateApiKeyRequest(
                api_key=api_key_pb2.ApiKey(
                    principal="quarantined-p", role=api_key_pb2.ROLE_PROVIDER
                )
            )
        )
    async with grpc.aio.insecure_channel(
        mesh.registry_address, interceptors=bearer_interceptors(made.secret)
    ) as channel:
        provider = node_service_pb2_grpc.NodeServiceStub(channel)
        token = await provider.CreateJoinToken(node_service_pb2.CreateJoinTokenRequest())
        identity = NodeIdentity.load_or_create(tmp_path)
        agent = FakeAgent(stub)
        name = (await agent.register(identity, token=token.join_token.token)).registered.name
        beating = asyncio.ensure_future(agent.heartbeats())
        await _quarantine_by_policy(agent, identity, stub)

        # Every way out is refused to the provider, in any order, and each refusal is kept.
        for _ in range(2):
            for call in (
                lambda: provider.CordonNode(node_service_pb2.CordonNodeRequest(name=name)),
                lambda: provider.UncordonNode(node_service_pb2.UncordonNodeRequest(name=name)),
                lambda: provider.DrainNode(node_service_pb2.DrainNodeRequest(name=name)),
            ):
                await refused(call(), grpc.StatusCode.PERMISSION_DENIED, "QUARANTINED")
        node = (await stub.GetNode(node_service_pb2.GetNodeRequest(name=name))).node
        assert node.state == node_pb2.NODE_STATE_QUARANTINED
        assert [t.reason.split(":")[0] for t in node.transitions[:6]] == ["REFUSED"] * 6
        assert "drain by provider quarantined-p" in node.transitions[0].reason

        # Deleting its node and enrolling it again brings it back quarantined.
        await provider.DeleteNode(node_service_pb2.DeleteNodeRequest(name=name))
        beating.cancel()
        agent.call.cancel()
        token = await provider.CreateJoinToken(node_service_pb2.CreateJoinTokenRequest())
        again = FakeAgent(stub)
        await again.register(identity, token=token.join_token.token)
        beating = asyncio.ensure_future(again.heartbeats())
        node = (await stub.GetNode(node_service_pb2.GetNodeRequest(name=name))).node
        assert node.state == node_pb2.NODE_STATE_QUARANTINED
        await refused(
            provider.UncordonNode(node_service_pb2.UncordonNodeRequest(name=name)),
            grpc.StatusCode.PERMISSION_DENIED,
            "QUARANTINED",
        )

    # An admin lifts it.
    await stub.UncordonNode(node_service_pb2.UncordonNodeRequest(name=name))
    node = await _until_state(stub, name, node_pb2.NODE_STATE_ACTIVE)
    assert node.transitions[0].reason == "UNCORDONED"
    beating.cancel()
    await again.close()


async def test_names_are_looked_up_only_after_identity_and_token_and_then_pinned(
    mesh: LocalMesh,
    stub: node_service_pb2_grpc.NodeServiceStub,
    shard_etcd: EtcdStore,
    tmp_path: Path,
) -> None:
    identity = NodeIdentity.load_or_create(tmp_path)
    # A stranger's name is not looked up for a node that has not proved itself: the refusal is
    # about the token or the signature, never about the address.
    unresolvable = "attacker-controlled.invalid:8001"
    await refused(
        FakeAgent(stub).register(identity, token="bad.token", inference_address=unresolvable),
        grpc.StatusCode.PERMISSION_DENIED,
        "JOIN_TOKEN_UNKNOWN",
    )
    forged = attestation(identity, b"\0" * 32)
    await refused(
        FakeAgent(stub).register(identity, token="", proof=forged, inference_address=unresolvable),
        grpc.StatusCode.UNAUTHENTICATED,
        "NONCE_MISMATCH",
    )
    # A name that resolves to where the node connects from is pinned to that address.
    agent = FakeAgent(stub)
    await agent.register(
        identity,
        token=await mesh.join_token("pinned"),
        inference_address="localhost:8101",
        http_address="localhost:8100",
    )
    found = await shard_etcd.get(keys.node(identity.node_id))
    assert found is not None
    record = node_pb2.Node.FromString(found.value)
    assert (record.inference_address, record.http_address) == ("127.0.0.1:8101", "127.0.0.1:8100")
    await agent.close()


async def test_unregistered_streams_are_capped_and_oversized_messages_refused(
    mesh: LocalMesh, stub: node_service_pb2_grpc.NodeServiceStub, tmp_path: Path
) -> None:
    # Streams that say nothing hold a place each, up to the per-address cap (16).
    silent = [FakeAgent(stub) for _ in range(16)]
    identity = NodeIdentity.load_or_create(tmp_path)
    hello = node_service_pb2.Hello(node_id=identity.node_id, public_key=identity.public_key)
    for agent in silent:  # each holds its place once the registry has seen its hello
        await agent.send(node_service_pb2.ConnectRequest(hello=hello))
        await agent.read()
    flood = [FakeAgent(stub) for _ in range(200)]  # refused before they can say anything
    for agent in flood:
        await refused(agent.read(), grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_CONNECTS")
    for agent in silent:
        agent.call.cancel()
    # The places come back: a node registers (the registry frees them as the streams end).
    for _ in range(100):
        try:
            admitted = FakeAgent(stub)
            await admitted.register(identity, token=await mesh.join_token("after"))
            await admitted.close()
            break
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            await asyncio.sleep(0.1)
    else:
        pytest.fail("the registry never admitted a stream again")

    await refused(
        FakeAgent(stub).register(identity, token="", labels={"x": "y" * (5 << 20)}),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )


async def test_heartbeats_coalesce_and_are_not_an_etcd_write_each(
    mesh: LocalMesh,
    stub: node_service_pb2_grpc.NodeServiceStub,
    shard_etcd: EtcdStore,
    tmp_path: Path,
) -> None:
    identity = NodeIdentity.load_or_create(tmp_path)
    agent = FakeAgent(stub)
    await agent.register(identity, token=await mesh.join_token("flood"))
    beat = node_service_pb2.ConnectRequest(heartbeat=node_service_pb2.Heartbeat())
    await agent.send(beat)
    await _until_state(stub, f"nodes/{identity.node_id}", node_pb2.NODE_STATE_ACTIVE)
    found = await shard_etcd.get(keys.node(identity.node_id))
    assert found is not None
    watch = await shard_etcd.watch(
        keys.node(identity.node_id), start_revision=found.mod_revision + 1
    )
    for pending in range(500):  # the queue changes with every one, as under traffic
        flood = node_service_pb2.Heartbeat()
        flood.metrics.models.add(model_name="simple", pending=pending)
        await agent.send(node_service_pb2.ConnectRequest(heartbeat=flood))
    # The registry reads the stream in order: by the goodbye, it has seen every heartbeat.
    assert await agent.close() == grpc.StatusCode.OK
    writes = 0
    async for event in watch:
        if event.kind != "PUT":
            break  # the goodbye revoked the lease
        writes += 1
    assert writes <= 1, f"{writes} writes for 500 heartbeats"


async def _blob_call(channel: grpc.aio.Channel, credential: str) -> grpc.StatusCode:
    """What the registry answers a node credential reading a blob that does not exist."""
    stub = artifact_service_pb2_grpc.ArtifactServiceStub(channel)
    try:
        await stub.GetBlob(
            artifact_api.GetBlobRequest(name="blobs/" + "0" * 64),
            metadata=(("authorization", f"Bearer {credential}"),),
        )
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def _until_refused(channel: grpc.aio.Channel, credential: str) -> None:
    deadline = time.monotonic() + 10
    while await _blob_call(channel, credential) == grpc.StatusCode.NOT_FOUND:
        assert time.monotonic() < deadline, "the credential still works"
        await asyncio.sleep(0.1)
    assert await _blob_call(channel, credential) == grpc.StatusCode.UNAUTHENTICATED


async def test_node_credentials_renew_with_attestations_and_die_with_the_session(
    mesh: LocalMesh, stub: node_service_pb2_grpc.NodeServiceStub, tmp_path: Path
) -> None:
    identity = NodeIdentity.load_or_create(tmp_path)
    agent = FakeAgent(stub)
    first = (await agent.register(identity, token=await mesh.join_token("creds"))).registered
    assert first.blob_credential_expire_time.seconds > time.time()
    async with grpc.aio.insecure_channel(mesh.registry_address) as channel:
        # Authenticated: the blob is simply not there.
        assert await _blob_call(channel, first.blob_credential) == grpc.StatusCode.NOT_FOUND
        beating = asyncio.ensure_future(agent.heartbeats())
        # Each accepted attestation brings a fresh credential.
        while (message := await agent.read()).WhichOneof("message") != "challenge":
            pass
        proof = attestation(identity, message.challenge.nonce)
        await agent.send(node_service_pb2.ConnectRequest(attestation=proof))
        while (message := await agent.read()).WhichOneof("message") != "credential":
            pass
        renewed = message.credential.token
        assert renewed != first.blob_credential
        assert await _blob_call(channel, renewed) == grpc.StatusCode.NOT_FOUND
        beating.cancel()

        # A new session (the agent reconnects) ends the old session's credentials.
        agent.call.cancel()
        again = FakeAgent(stub)
        third = (await again.register(identity, token="")).registered.blob_credential
        await _until_refused(channel, renewed)
        assert await _blob_call(channel, third) == grpc.StatusCode.NOT_FOUND

        # Deleting the node ends them at once, without waiting for expiry.
        await stub.DeleteNode(node_service_pb2.DeleteNodeRequest(name=first.name))
        await _until_refused(channel, third)
        again.call.cancel()


@pytest.mark.parametrize(
    ("labels", "mask", "field"),
    [
        ({"bad key": "x"}, [], "node.labels[bad key]"),
        ({"k": "v" * 64}, [], "node.labels[k]"),
        ({f"k{i}": "v" for i in range(65)}, [], "node.labels"),
        ({"k": "v"}, ["state"], "update_mask"),
    ],
)
async def test_bad_node_updates_name_the_field(
    stub: node_service_pb2_grpc.NodeServiceStub,
    labels: dict[str, str],
    mask: list[str],
    field: str,
) -> None:
    node = node_pb2.Node(name="nodes/nwhatever", labels=labels)
    error = await refused(
        stub.UpdateNode(
            node_service_pb2.UpdateNodeRequest(
                node=node, update_mask=field_mask_pb2.FieldMask(paths=mask)
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert error_info(error).metadata["field"] == field  # type: ignore[union-attr]
