"""The registry's node API over real gRPC and real etcd."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from shard.deployment.v1 import deployment_pb2
from shard.deployment.v1 import deployment_service_pb2 as deployment_api
from shard.node.v1 import node_pb2, node_service_pb2, node_service_pb2_grpc
from shard_core import keys
from shard_core.errors import error_info
from shard_core.etcd.store import EtcdStore
from shard_core.settings import EtcdSettings
from shard_node.identity import NodeIdentity
from shard_tool.local import LocalMesh
from shard_tool.publish import Publisher
from tests.demo import push_copy, target

READY_SIMPLE = node_pb2.ModelStatus(
    model_name="simple", model_version="1", state=node_pb2.MODEL_STATE_READY
)


def _registration(identity: NodeIdentity, **overrides: object) -> node_service_pb2.ConnectRequest:
    fields: dict[str, object] = {
        "node_id": identity.node_id,
        "public_key": identity.public_key,
        "inference_address": "127.0.0.1:1",
        "models": [READY_SIMPLE],
        "labels": {"test": "registry"},
    }
    fields.update(overrides)
    return node_service_pb2.ConnectRequest(
        registration=node_service_pb2.Registration(**fields)  # type: ignore[arg-type]
    )


@pytest.fixture
async def stub(mesh: LocalMesh) -> AsyncIterator[node_service_pb2_grpc.NodeServiceStub]:
    async with grpc.aio.insecure_channel(mesh.registry_address) as channel:
        yield node_service_pb2_grpc.NodeServiceStub(channel)


@pytest.fixture
async def shard_etcd(mesh: LocalMesh) -> AsyncIterator[EtcdStore]:
    """The mesh's own records, as the control plane sees them."""
    store = EtcdStore(EtcdSettings(etcd_port=mesh.ports.etcd))
    yield store
    await store.close()


class FakeAgent:
    """A node agent's side of the Connect stream, driven by the test."""

    def __init__(self, stub: node_service_pb2_grpc.NodeServiceStub) -> None:
        self.outbox: asyncio.Queue[node_service_pb2.ConnectRequest | None] = asyncio.Queue()
        self.call = stub.Connect(self._requests())

    async def _requests(self) -> AsyncIterator[node_service_pb2.ConnectRequest]:
        while (request := await self.outbox.get()) is not None:
            yield request

    async def send(self, request: node_service_pb2.ConnectRequest) -> None:
        await self.outbox.put(request)

    async def read(self) -> node_service_pb2.ConnectResponse:
        reply = await asyncio.wait_for(self.call.read(), 10)
        assert isinstance(reply, node_service_pb2.ConnectResponse)
        return reply

    async def close(self) -> grpc.StatusCode:
        goodbye = node_service_pb2.Deregistration(reason="test done")
        await self.outbox.put(node_service_pb2.ConnectRequest(deregistration=goodbye))
        await self.outbox.put(None)
        # gRPC reports the status only after every message before it has been read.
        while isinstance(
            await asyncio.wait_for(self.call.read(), 10), node_service_pb2.ConnectResponse
        ):
            pass
        return await asyncio.wait_for(self.call.code(), 10)


async def _refused(
    stub: node_service_pb2_grpc.NodeServiceStub, first: node_service_pb2.ConnectRequest
) -> grpc.aio.AioRpcError:
    agent = FakeAgent(stub)
    await agent.send(first)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await agent.read()
    return raised.value


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


async def test_assigned_ready_models_become_routable_and_unassigned_ones_stop(
    stub: node_service_pb2_grpc.NodeServiceStub,
    shard_etcd: EtcdStore,
    publisher: Publisher,
    tmp_path: Path,
) -> None:
    identity = NodeIdentity.load_or_create(tmp_path)
    pool = {"pool": f"fake-{identity.node_id[:8]}"}
    agent = FakeAgent(stub)
    await agent.send(_registration(identity, models=[], labels=pool))
    reply = await agent.read()
    assert reply.registered.name == f"nodes/{identity.node_id}"
    assert reply.registered.lease_ttl_ms == 3000
    got = await stub.GetNode(node_service_pb2.GetNodeRequest(name=reply.registered.name))
    assert got.node.state == node_pb2.NODE_STATE_ACTIVE
    assert got.node.public_key == identity.public_key
    assert await _assignments(agent, models=set()) == []

    # A deployment that only this node may serve is assigned to it, files and all.
    await push_copy(publisher, "fake-echo")
    await publisher.deploy(
        "fake-echo",
        [target("1", replicas=1)],
        node_selector=deployment_pb2.NodeSelector(labels=pool),
    )
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


async def test_reconnect_within_the_ttl_keeps_the_lease(
    stub: node_service_pb2_grpc.NodeServiceStub, shard_etcd: EtcdStore, tmp_path: Path
) -> None:
    identity = NodeIdentity.load_or_create(tmp_path)
    first = FakeAgent(stub)
    await first.send(_registration(identity))
    await first.read()
    lease = (await shard_etcd.get(keys.node(identity.node_id))).lease  # type: ignore[union-attr]
    first.call.cancel()  # the connection breaks; the node did not say goodbye

    second = FakeAgent(stub)
    await second.send(_registration(identity))
    await second.read()

    record = await shard_etcd.get(keys.node(identity.node_id))
    assert record is not None
    assert record.lease == lease
    await second.close()


async def test_id_that_does_not_match_the_key_is_refused(
    stub: node_service_pb2_grpc.NodeServiceStub, tmp_path: Path
) -> None:
    identity = NodeIdentity.load_or_create(tmp_path / "a")
    other = NodeIdentity.load_or_create(tmp_path / "b")

    error = await _refused(stub, _registration(identity, node_id=other.node_id))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "registration.node_id" in (error.details() or "")
    info = error_info(error)
    assert info is not None
    assert info.reason == "NODE_ID_MISMATCH"
    assert info.metadata["field"] == "registration.node_id"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"public_key": b"short"}, "registration.public_key"),
        ({"public_key": b""}, "registration.public_key"),
        ({"node_id": ""}, "registration.node_id"),
        ({"inference_address": ""}, "registration.inference_address"),
        ({"inference_address": "no-port"}, "registration.inference_address"),
    ],
)
async def test_bad_registrations_name_the_field(
    stub: node_service_pb2_grpc.NodeServiceStub,
    tmp_path: Path,
    overrides: dict[str, object],
    field: str,
) -> None:
    identity = NodeIdentity.load_or_create(tmp_path)

    error = await _refused(stub, _registration(identity, **overrides))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (error.details() or "")
    info = error_info(error)
    assert info is not None
    assert info.metadata["field"] == field


async def test_stream_must_start_with_a_registration(
    stub: node_service_pb2_grpc.NodeServiceStub,
) -> None:
    error = await _refused(
        stub, node_service_pb2.ConnectRequest(heartbeat=node_service_pb2.Heartbeat())
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "registration" in (error.details() or "")


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
