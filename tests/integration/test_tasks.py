"""Encrypted tasks on the real shard: real etcd, the mesh's two node agents with their own
Tritons, the registry restarted, nodes killed; and a test-driven node (`FakeAgent`) where the
test must decide what the provider does (race its claims, forge its signature, vanish)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import AsyncIterator, Collection
from pathlib import Path
from typing import Any, TypeAlias

import aiohttp
import grpc
import psutil
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from google.protobuf import duration_pb2, timestamp_pb2

from shard.artifact.v1 import artifact_service_pb2_grpc
from shard.auth.v1 import api_key_pb2, key_service_pb2, key_service_pb2_grpc
from shard.deployment.v1 import deployment_pb2
from shard.node.v1 import node_pb2, node_service_pb2, node_service_pb2_grpc
from shard.task.v1 import task_pb2, task_service_pb2_grpc
from shard.task.v1 import task_service_pb2 as task_api
from shard_client import tasks
from shard_client.blobs import upload_file
from shard_core import sealing
from shard_core.auth import NodeCredentials, bearer_interceptors
from shard_core.errors import error_info
from shard_node.identity import NodeIdentity
from shard_tool.local import LocalMesh
from shard_tool.publish import Publisher
from tests.demo import push_copy, target
from tests.fake_node import FakeAgent, refused

TaskStub = task_service_pb2_grpc.TaskServiceStub
State: TypeAlias = task_pb2.TaskState.ValueType
# The providers of these tests, and their model (a copy of `simple`): their own, so what other
# tests do to the mesh's nodes and deployments does not matter here.
PROVIDERS = ("task-a", "task-b")
MODEL = "task-simple"
UNDEPLOYED = "task-undeployed"
SIMPLE_READY = node_pb2.ModelStatus(
    model_name=MODEL, model_version="1", state=node_pb2.MODEL_STATE_READY
)
FINAL = {
    task_pb2.TASK_STATE_SUCCEEDED,
    task_pb2.TASK_STATE_FAILED,
    task_pb2.TASK_STATE_EXPIRED,
    task_pb2.TASK_STATE_CANCELLED,
}
MARKER = "do-not-leak-7f3a"


@pytest.fixture(scope="module", autouse=True)
async def providers(mesh: LocalMesh) -> None:
    """Two node agents with their own Tritons, serving MODEL."""
    labels = {"pool": "tasks"}
    await asyncio.gather(*(mesh.start_node(name, labels=labels) for name in PROVIDERS))
    async with mesh.admin_channel() as channel:
        publisher = Publisher(channel=channel)
        await push_copy(publisher, MODEL)
        await push_copy(publisher, UNDEPLOYED)
        await publisher.deploy(
            MODEL, [target("1", replicas=2)],
            node_selector=deployment_pb2.NodeSelector(labels=labels),
        )  # fmt: skip
        await publisher.wait_available(f"deployments/{MODEL}", timeout=60)


@pytest.fixture(scope="module")
async def owner_secret(mesh: LocalMesh) -> str:
    """A developer's key: what a task owner has."""
    async with mesh.admin_channel() as channel:
        reply = await key_service_pb2_grpc.KeyServiceStub(channel).CreateApiKey(
            key_service_pb2.CreateApiKeyRequest(
                api_key=api_key_pb2.ApiKey(principal="task-owner", role=api_key_pb2.ROLE_DEVELOPER)
            )
        )
    return reply.secret


@pytest.fixture
async def owner(mesh: LocalMesh, owner_secret: str) -> AsyncIterator[grpc.aio.Channel]:
    interceptors = bearer_interceptors(owner_secret)
    async with grpc.aio.insecure_channel(mesh.registry_address, interceptors=interceptors) as c:
        yield c


async def _node(mesh: LocalMesh, name: str) -> node_pb2.Node:
    node = await mesh.find_node(name)
    assert node is not None, name
    return node


def _requests(path: Path, count: int, *, bad: int = 0) -> Path:
    """`count` requests for `simple` (INPUT0 = i, INPUT1 = 1), then `bad` it refuses."""
    with path.open("w") as out:
        for i in range(count):
            a, b = [i] * 16, [1] * 16
            out.write(json.dumps({"id": f"{MARKER}-{i}", "inputs": [
                {"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "data": a},
                {"name": "INPUT1", "shape": [1, 16], "datatype": "INT32", "data": b},
            ]}) + "\n")  # fmt: skip
        for i in range(bad):
            out.write(json.dumps({"id": f"bad-{i}", "inputs": [{"name": "NOPE"}]}) + "\n")
    return path


def _spec(node: node_pb2.Node, requests: Path, **fields: Any) -> tasks.TaskSpec:
    return tasks.TaskSpec(
        task_id=fields.pop("task_id", tasks.new_task_id("test")),
        provider=node,
        model=fields.pop("model", MODEL),
        requests=requests,
        max_duration_s=fields.pop("max_duration_s", 60),
        expire_in_s=fields.pop("expire_in_s", 120),
        result_key=fields.pop("result_key", None),
        **fields,
    )


async def _until(
    channel: grpc.aio.Channel, name: str, states: Collection[State], timeout: float = 60
) -> task_pb2.Task:
    stub = TaskStub(channel)
    deadline = time.monotonic() + timeout
    while True:
        try:
            task = (await stub.GetTask(task_api.GetTaskRequest(name=name))).task
        except grpc.aio.AioRpcError as error:  # the registry or its store is coming back
            if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
        else:
            if task.state in states:
                return task
            assert time.monotonic() < deadline, task
        await asyncio.sleep(0.1)


def _blob_path(mesh: LocalMesh, name: str) -> Path:
    sha = name.removeprefix("blobs/")
    return mesh.state_dir / "blobs" / "sha256" / sha[:2] / sha


def _node_key(mesh: LocalMesh, name: str) -> X25519PrivateKey:
    return sealing.encryption_key(mesh.nodes[name].state_dir / "encryption.key")


async def _sealed_for(
    owner: grpc.aio.Channel,
    spec: tasks.TaskSpec,
    tmp_path: Path,
    *,
    tamper: bool = False,
    headless: bool = False,
) -> tuple[str, timestamp_pb2.Timestamp]:
    """Seal a job as the client does (or, `headless`, the requests file alone), optionally flip
    a byte, store it: its blob and expiry."""
    expire = timestamp_pb2.Timestamp()
    expire.FromMilliseconds(int((time.time() + spec.expire_in_s) * 1000))
    sealed = tmp_path / f"{spec.task_id}.sealed"
    if headless:
        context = sealing.task_input_context(
            f"tasks/{spec.task_id}", spec.provider.name, expire.ToMilliseconds()
        )
        recipient = sealing.node_encryption_key(spec.provider)
        sealing.seal_file(spec.requests, sealed, recipient, context)
    else:
        tasks.seal_job(spec, expire.ToMilliseconds(), sealed)
    if tamper:
        data = bytearray(sealed.read_bytes())
        data[len(data) // 2] ^= 0x01
        sealed.write_bytes(data)
    sha, _ = await upload_file(artifact_service_pb2_grpc.ArtifactServiceStub(owner), sealed)
    return f"blobs/{sha}", expire


def _task(
    provider: str, blob: str, expire: timestamp_pb2.Timestamp, **fields: Any
) -> task_pb2.Task:
    duration = duration_pb2.Duration(seconds=fields.pop("max_duration_s", 60))
    return task_pb2.Task(
        provider=provider, model=MODEL, input=blob, max_duration=duration,
        expire_time=expire, plaintext_result=True, **fields,
    )  # fmt: skip


def _doctored_results_do_not_verify(done: task_pb2.Task) -> None:
    """A result whose output, signature or provider key was swapped does not verify."""
    forged = task_pb2.Task()
    forged.CopyFrom(done)
    forged.result.output = done.input
    with pytest.raises(tasks.ResultError, match="not signed"):
        tasks.verify_result(forged)
    forged.CopyFrom(done)
    forged.result.signature = Ed25519PrivateKey.generate().sign(b"anything")
    with pytest.raises(tasks.ResultError, match="not signed"):
        tasks.verify_result(forged)
    forged.CopyFrom(done)
    forged.provider_public_key = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    with pytest.raises(tasks.ResultError, match="id names"):
        tasks.verify_result(forged)


async def _nobody_else_reads(
    mesh: LocalMesh, owner: grpc.aio.Channel, done: task_pb2.Task, tmp_path: Path
) -> None:
    """Neither the job nor the results are readable in the store; nobody else opens them."""
    stored_input = _blob_path(mesh, done.input).read_bytes()
    stored_output = _blob_path(mesh, done.result.output).read_bytes()
    assert MARKER.encode() not in stored_input
    assert MARKER.encode() not in stored_output
    other = tmp_path / "other"
    input_context = sealing.task_input_context(
        done.name, done.provider, done.expire_time.ToMilliseconds()
    )
    with pytest.raises(sealing.SealError):
        sealing.open_file(
            _blob_path(mesh, done.input), other, _node_key(mesh, "task-b"), input_context
        )
    sealing.open_file(_blob_path(mesh, done.input), other, _node_key(mesh, "task-a"), input_context)
    assert MARKER in other.read_text()  # its provider can
    stranger = X25519PrivateKey.generate()
    with pytest.raises(tasks.ResultError, match="sealed to another key"):
        await tasks.fetch_result(owner, done, tmp_path / "x", key=stranger)
    assert not (tmp_path / "x").exists()
    output_context = sealing.task_output_context(done.name, done.provider, done.input)
    with pytest.raises(sealing.SealError):
        sealing.open_file(_blob_path(mesh, done.result.output), other, stranger, output_context)


async def test_a_sealed_batch_runs_on_its_provider_and_only_the_owner_reads_it(
    mesh: LocalMesh, owner: grpc.aio.Channel, tmp_path: Path
) -> None:
    first = await _node(mesh, "task-a")
    key = X25519PrivateKey.generate()
    spec = _spec(first, _requests(tmp_path / "requests.jsonl", 40, bad=1), result_key=key)
    sent: list[int] = []
    created = await tasks.submit(owner, spec, work_dir=tmp_path, on_bytes=sent.append)
    assert created.state == task_pb2.TASK_STATE_PENDING
    assert created.owner == "task-owner"
    assert created.provider_public_key == first.public_key
    assert sum(sent) == _blob_path(mesh, created.input).stat().st_size  # the progress hook
    done = await _until(owner, created.name, FINAL)
    assert done.state == task_pb2.TASK_STATE_SUCCEEDED, done.state_reason
    assert [t.state for t in done.transitions] == [
        task_pb2.TASK_STATE_PENDING, task_pb2.TASK_STATE_RUNNING, task_pb2.TASK_STATE_SUCCEEDED
    ]  # fmt: skip
    assert (done.result.succeeded_requests, done.result.failed_requests) == (40, 1)
    assert done.attempts == 1
    assert done.start_time.seconds
    assert done.end_time.seconds

    tasks.verify_result(done)
    out = tmp_path / "results.jsonl"
    await tasks.fetch_result(owner, done, out, key=key)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 41
    for i, line in enumerate(lines[:40]):
        outputs = {o["name"]: o["data"] for o in line["outputs"]}
        assert line["id"] == f"{MARKER}-{i}"
        assert outputs["OUTPUT0"] == [i + 1] * 16
        assert outputs["OUTPUT1"] == [i - 1] * 16
    assert lines[40]["id"] == "bad-0"
    assert lines[40]["error"]

    await _nobody_else_reads(mesh, owner, done, tmp_path)

    _doctored_results_do_not_verify(done)

    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{mesh.ports.registry_metrics}/metrics") as reply,
    ):
        metric = "shard_registry_tasks_finished_total"
        finished = [
            line for line in (await reply.text()).splitlines()
            if line.startswith(metric) and 'state="SUCCEEDED"' in line
        ]  # fmt: skip
    assert finished, "no finished tasks counted"
    listed = await TaskStub(owner).ListTasks(
        task_api.ListTasksRequest(filter=f"provider={first.name} AND state=SUCCEEDED")
    )
    assert done.name in {t.name for t in listed.tasks}
    assert all(t.state == task_pb2.TASK_STATE_SUCCEEDED for t in listed.tasks)


@pytest.mark.parametrize(
    "case",
    ["sealed for another provider", "tampered", "blob replaced", "results redirected",
     "not a job"],
)  # fmt: skip
async def test_jobs_that_do_not_verify_are_refused_by_the_provider(
    mesh: LocalMesh, owner: grpc.aio.Channel, tmp_path: Path, case: str
) -> None:
    first, second = await _node(mesh, "task-a"), await _node(mesh, "task-b")
    requests = _requests(tmp_path / "requests.jsonl", 3)
    if case == "not a job":  # no header; the first line is JSON nested past any parser
        requests.write_bytes(b"[" * 200_000 + b"\n" + requests.read_bytes())
    # The owner seals for its own key; the task (as a registry could make it) asks for results
    # in the clear.
    owner_key = X25519PrivateKey.generate() if case == "results redirected" else None
    spec = _spec(first, requests, result_key=owner_key)
    blob, expire = await _sealed_for(
        owner, spec, tmp_path, tamper=case == "tampered", headless=case == "not a job"
    )
    provider = second.name if case == "sealed for another provider" else first.name
    if case == "blob replaced":  # the store hands out other bytes under the blob's name
        path = _blob_path(mesh, blob)
        data = bytearray(path.read_bytes())
        data[-1] ^= 0x01
        path.write_bytes(bytes(data))
    created = await TaskStub(owner).CreateTask(
        task_api.CreateTaskRequest(task_id=spec.task_id, task=_task(provider, blob, expire))
    )
    done = await _until(owner, created.task.name, FINAL)
    assert done.state == task_pb2.TASK_STATE_FAILED
    expected = {"blob replaced": "INPUT_UNVERIFIED", "results redirected": "BAD_JOB",
                "not a job": "BAD_JOB"}.get(case, "DECRYPT_FAILED")  # fmt: skip
    assert done.state_reason.startswith(expected), done.state_reason


@pytest.fixture
async def fake_node(
    mesh: LocalMesh, tmp_path: Path
) -> AsyncIterator[tuple[FakeAgent, NodeIdentity, str]]:
    """A registered, ACTIVE node that says it serves `simple`, run by the test: the agent, its
    identity and its credential."""
    identity = NodeIdentity.load_or_create(tmp_path / "fake-node")
    async with grpc.aio.insecure_channel(mesh.registry_address) as channel:
        agent = FakeAgent(node_service_pb2_grpc.NodeServiceStub(channel))
        registered = await agent.register(
            identity, token=await mesh.join_token("fake task node"),
            encryption_key=identity.vouched_encryption_key(), models=[SIMPLE_READY],
        )  # fmt: skip
        beat = node_service_pb2.ConnectRequest(
            heartbeat=node_service_pb2.Heartbeat(models=[SIMPLE_READY])
        )

        async def heartbeats() -> None:
            while True:
                await agent.send(beat)
                await asyncio.sleep(0.5)

        beating = asyncio.ensure_future(heartbeats())
        name = f"nodes/{identity.node_id}"
        async with mesh.admin_channel() as admin:
            nodes = node_service_pb2_grpc.NodeServiceStub(admin)
            for _ in range(100):
                node = (await nodes.GetNode(node_service_pb2.GetNodeRequest(name=name))).node
                if node.state == node_pb2.NODE_STATE_ACTIVE:
                    break
                await asyncio.sleep(0.1)
        try:
            yield agent, identity, registered.registered.blob_credential
        finally:
            beating.cancel()
            agent.call.cancel()
            async with mesh.admin_channel() as admin:
                await node_service_pb2_grpc.NodeServiceStub(admin).DeleteNode(
                    node_service_pb2.DeleteNodeRequest(name=name)
                )


async def _offered(agent: FakeAgent, name: str) -> task_pb2.Task:
    """Read the node's stream until its open tasks include `name`."""
    while True:
        reply = await agent.read()
        if reply.WhichOneof("message") == "tasks":
            found = [t for t in reply.tasks.tasks if t.name == name]
            if found:
                return found[0]


def _as(credential: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {credential}"),)


async def _fake_task(
    mesh: LocalMesh, owner: grpc.aio.Channel, tmp_path: Path, identity: NodeIdentity, **fields: Any
) -> task_pb2.Task:
    async with mesh.admin_channel() as admin:
        node = (
            await node_service_pb2_grpc.NodeServiceStub(admin).GetNode(
                node_service_pb2.GetNodeRequest(name=f"nodes/{identity.node_id}")
            )
        ).node
    spec = _spec(
        node, _requests(tmp_path / "r.jsonl", 2), expire_in_s=fields.pop("expire_in_s", 120)
    )
    blob, expire = await _sealed_for(owner, spec, tmp_path)
    reply = await TaskStub(owner).CreateTask(
        task_api.CreateTaskRequest(
            task_id=spec.task_id, task=_task(node.name, blob, expire, **fields)
        )
    )
    return reply.task


async def test_exactly_one_claim_wins_and_forged_results_are_refused(
    mesh: LocalMesh, owner: grpc.aio.Channel, tmp_path: Path,
    fake_node: tuple[FakeAgent, NodeIdentity, str],
) -> None:  # fmt: skip
    agent, identity, credential = fake_node
    created = await _fake_task(mesh, owner, tmp_path, identity)
    offered = await _offered(agent, created.name)  # pushed on the node's stream
    assert offered.state == task_pb2.TASK_STATE_PENDING
    stub = TaskStub(owner)
    claims = await asyncio.gather(
        *(stub.ClaimTask(task_api.ClaimTaskRequest(name=created.name), metadata=_as(credential))
          for _ in range(8)),
        return_exceptions=True,
    )  # fmt: skip
    won = [c for c in claims if isinstance(c, task_api.ClaimTaskResponse)]
    lost = [c for c in claims if isinstance(c, grpc.aio.AioRpcError)]
    assert len(won) == 1
    assert len(lost) == 7
    assert {(e.code(), error_info(e).reason) for e in lost} == {  # type: ignore[union-attr]
        (grpc.StatusCode.FAILED_PRECONDITION, "NOT_PENDING")
    }
    assert won[0].task.state == task_pb2.TASK_STATE_RUNNING
    assert won[0].task.attempts == 1

    # Another node may not claim it, nor an owner's key.
    first = await _node(mesh, "task-a")
    # (A credential for it, made as the registry would: the test knows the admin token.)
    others, _ = NodeCredentials(mesh.admin_token, lambda *_: None).issue(
        first.name.removeprefix("nodes/"), first.register_time.ToMilliseconds()
    )
    claim = task_api.ClaimTaskRequest(name=created.name)
    await refused(
        stub.ClaimTask(claim, metadata=_as(others)), grpc.StatusCode.PERMISSION_DENIED, "NOT_YOURS"
    )
    await refused(stub.ClaimTask(claim), grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_MISSING")

    # Results signed by anyone but the provider, or over other bytes, are refused.
    output = tmp_path / "output.jsonl"
    output.write_text('{"id": "x"}\n')
    artifacts = artifact_service_pb2_grpc.ArtifactServiceStub(owner)
    sha, _ = await upload_file(artifacts, output, metadata=_as(credential))
    result_name = f"blobs/{sha}"
    message = sealing.result_message(created.name, created.input, result_name, b"")
    for signature in (
        Ed25519PrivateKey.generate().sign(message),
        identity.private_key.sign(
            sealing.result_message(created.name, created.input, created.input, b"")
        ),
        # Over the right output, but saying the results went to a key of the signer's choice.
        identity.private_key.sign(
            sealing.result_message(created.name, created.input, result_name, os.urandom(32))
        ),
        b"",
    ):
        complete = task_api.CompleteTaskRequest(
            name=created.name, state=task_pb2.TASK_STATE_SUCCEEDED,
            result=task_pb2.TaskResult(output=result_name, signature=signature),
        )  # fmt: skip
        error = await refused(
            stub.CompleteTask(complete, metadata=_as(credential)),
            grpc.StatusCode.INVALID_ARGUMENT, "BAD_SIGNATURE",
        )  # fmt: skip
        assert error_info(error).metadata["field"] == "result.signature"  # type: ignore[union-attr]
    complete = task_api.CompleteTaskRequest(
        name=created.name, state=task_pb2.TASK_STATE_SUCCEEDED, attempt=2,
        result=task_pb2.TaskResult(
            output=result_name, signature=identity.private_key.sign(message)
        ),
    )  # fmt: skip
    # A report on another attempt than the one running is stale.
    await refused(
        stub.CompleteTask(complete, metadata=_as(credential)),
        grpc.StatusCode.FAILED_PRECONDITION, "STALE_ATTEMPT",
    )  # fmt: skip
    complete.attempt = 1
    done = (await stub.CompleteTask(complete, metadata=_as(credential))).task
    assert done.state == task_pb2.TASK_STATE_SUCCEEDED
    tasks.verify_result(done)
    await refused(
        stub.CompleteTask(complete, metadata=_as(credential)),
        grpc.StatusCode.FAILED_PRECONDITION, "NOT_RUNNING_HERE",
    )  # fmt: skip


async def test_a_lost_provider_fails_or_requeues_its_tasks_as_the_owner_chose(
    mesh: LocalMesh, owner: grpc.aio.Channel, tmp_path: Path,
    fake_node: tuple[FakeAgent, NodeIdentity, str],
) -> None:  # fmt: skip
    agent, identity, credential = fake_node
    stub = TaskStub(owner)
    choices = {
        task_pb2.PROVIDER_LOSS_FAIL: task_pb2.TASK_STATE_FAILED,
        task_pb2.PROVIDER_LOSS_REQUEUE: task_pb2.TASK_STATE_PENDING,
    }
    made = {}
    for choice in choices:
        task = await _fake_task(mesh, owner, tmp_path, identity, on_provider_loss=choice)
        await stub.ClaimTask(task_api.ClaimTaskRequest(name=task.name), metadata=_as(credential))
        made[choice] = task.name
    agent.call.cancel()  # the node vanishes: no goodbye, its lease runs out
    lost_at = time.monotonic()
    for choice, state in choices.items():
        task = await _until(owner, made[choice], {state}, timeout=30)
        assert "PROVIDER_LOST" in task.state_reason
    assert time.monotonic() - lost_at < mesh.timing.lease_ttl_s + 10
    requeued = await _until(
        owner, made[task_pb2.PROVIDER_LOSS_REQUEUE], {task_pb2.TASK_STATE_PENDING}
    )
    assert requeued.state_reason.startswith("REQUEUED")
    assert requeued.attempts == 1


async def test_a_provider_killed_mid_task_leaves_it_failed_not_running(
    mesh: LocalMesh, owner: grpc.aio.Channel, publisher: Publisher, tmp_path: Path
) -> None:
    labels = {"pool": "task-doomed"}
    await mesh.start_node("task-doomed", labels=labels)
    await push_copy(publisher, "task-echo")
    await publisher.deploy(
        "task-echo", [target("1", replicas=1)],
        node_selector=deployment_pb2.NodeSelector(labels=labels),
    )  # fmt: skip
    await publisher.wait_available("deployments/task-echo", timeout=60)
    victim = mesh.nodes["task-doomed"]
    node = await _node(mesh, "task-doomed")
    spec = _spec(node, _requests(tmp_path / "many.jsonl", 20_000), model="task-echo")
    task = await tasks.submit(owner, spec, work_dir=tmp_path)
    await _until(owner, task.name, {task_pb2.TASK_STATE_RUNNING})
    # The machine dies mid-batch: its Triton and the agent at once.
    for process in psutil.Process(victim.process.pid).children(recursive=True):
        process.kill()
    victim.process.kill()
    killed_at = time.monotonic()
    failed = await _until(owner, task.name, FINAL, timeout=30)
    assert failed.state == task_pb2.TASK_STATE_FAILED, failed.state_reason
    assert failed.state_reason.startswith("PROVIDER_LOST")
    # Within the node's lease and a sweep or two.
    assert time.monotonic() - killed_at < mesh.timing.lease_ttl_s + 5


async def test_tasks_expire_unclaimed_and_past_their_duration(
    mesh: LocalMesh, owner: grpc.aio.Channel, tmp_path: Path,
    fake_node: tuple[FakeAgent, NodeIdentity, str],
) -> None:  # fmt: skip
    _, identity, credential = fake_node
    unclaimed = await _fake_task(mesh, owner, tmp_path, identity, expire_in_s=1)
    overdue = await _fake_task(mesh, owner, tmp_path, identity, max_duration_s=1)
    await TaskStub(owner).ClaimTask(
        task_api.ClaimTaskRequest(name=overdue.name), metadata=_as(credential)
    )
    expired = await _until(owner, unclaimed.name, FINAL, timeout=30)
    assert (expired.state, expired.state_reason.split(":")[0]) == (
        task_pb2.TASK_STATE_EXPIRED, "NOT_CLAIMED"
    )  # fmt: skip
    stopped = await _until(owner, overdue.name, FINAL, timeout=30)
    assert (stopped.state, stopped.state_reason.split(":")[0]) == (
        task_pb2.TASK_STATE_EXPIRED, "DEADLINE"
    )  # fmt: skip

    # A real provider stops a batch that outlives max_duration.
    first = await _node(mesh, "task-a")
    spec = _spec(first, _requests(tmp_path / "many.jsonl", 20_000), max_duration_s=0.5)
    long = await tasks.submit(owner, spec, work_dir=tmp_path)
    ended = await _until(owner, long.name, FINAL)
    assert ended.state == task_pb2.TASK_STATE_EXPIRED, ended.state_reason


async def test_redundant_tasks_are_verified_or_disputed(
    mesh: LocalMesh, owner: grpc.aio.Channel, tmp_path: Path,
    fake_node: tuple[FakeAgent, NodeIdentity, str],
) -> None:  # fmt: skip
    requests = _requests(tmp_path / "r.jsonl", 5)
    verify_key = tasks.new_verify_key()
    names = []
    for node_name in ("task-a", "task-b"):
        spec = _spec(
            await _node(mesh, node_name), requests, group="agree", group_size=2,
            verify_key=verify_key, task_id=f"agree-{node_name}",
        )  # fmt: skip
        names.append((await tasks.submit(owner, spec, work_dir=tmp_path)).name)
    for name in names:
        judged = await _until(owner, name, FINAL)
        assert judged.state == task_pb2.TASK_STATE_SUCCEEDED, judged.state_reason
    for _ in range(100):
        verdicts = {(await _until(owner, n, FINAL)).verification for n in names}
        if task_pb2.VERIFICATION_PENDING not in verdicts:  # the tasks are read one at a time
            break
        await asyncio.sleep(0.1)
    assert verdicts == {task_pb2.VERIFICATION_VERIFIED}

    # A provider that answers differently is caught.
    _, identity, credential = fake_node
    honest_spec = _spec(
        await _node(mesh, "task-a"), requests, group="differ", group_size=2,
        verify_key=verify_key, task_id="differ-honest",
    )  # fmt: skip
    honest = await tasks.submit(owner, honest_spec, work_dir=tmp_path)
    cheat = await _fake_task(mesh, owner, tmp_path, identity, group="differ", group_size=2)
    stub = TaskStub(owner)
    await stub.ClaimTask(task_api.ClaimTaskRequest(name=cheat.name), metadata=_as(credential))
    output = tmp_path / "made-up.jsonl"
    output.write_text('{"id": "made up"}\n')
    sha, _ = await upload_file(
        artifact_service_pb2_grpc.ArtifactServiceStub(owner), output, metadata=_as(credential)
    )
    signature = identity.private_key.sign(
        sealing.result_message(cheat.name, cheat.input, f"blobs/{sha}", b"")
    )
    await stub.CompleteTask(
        task_api.CompleteTaskRequest(
            name=cheat.name, state=task_pb2.TASK_STATE_SUCCEEDED,
            result=task_pb2.TaskResult(
                output=f"blobs/{sha}", signature=signature, output_digest=os.urandom(32)
            ),
        ),
        metadata=_as(credential),
    )  # fmt: skip
    await _until(owner, honest.name, FINAL)
    for _ in range(100):
        verdicts = {(await _until(owner, n, FINAL)).verification for n in (honest.name, cheat.name)}
        if task_pb2.VERIFICATION_PENDING not in verdicts:  # the tasks are read one at a time
            break
        await asyncio.sleep(0.1)
    assert verdicts == {task_pb2.VERIFICATION_DISPUTED}


async def test_tasks_survive_a_registry_restart_and_cancel_stops_them(
    mesh: LocalMesh, owner: grpc.aio.Channel, tmp_path: Path
) -> None:
    second = await _node(mesh, "task-b")
    requests = _requests(tmp_path / "r.jsonl", 5)
    accepted = [
        (await tasks.submit(owner, _spec(second, requests), work_dir=tmp_path)).name
        for _ in range(3)
    ]
    await mesh.restart("registry")
    channel = owner  # it reconnects to the new registry
    if True:
        for name in accepted:
            done = await _until(channel, name, FINAL)
            assert done.state == task_pb2.TASK_STATE_SUCCEEDED, done

        # Cancelling a running batch stops it; a finished task cannot be cancelled.
        spec = _spec(second, _requests(tmp_path / "many.jsonl", 20_000))
        long = await tasks.submit(channel, spec, work_dir=tmp_path)
        await _until(channel, long.name, {task_pb2.TASK_STATE_RUNNING})
        stub = TaskStub(channel)
        cancelled = await stub.CancelTask(task_api.CancelTaskRequest(name=long.name, reason="test"))
        assert cancelled.task.state == task_pb2.TASK_STATE_CANCELLED
        assert cancelled.task.state_reason == "CANCELLED: test"
        await refused(
            stub.CancelTask(task_api.CancelTaskRequest(name=accepted[0])),
            grpc.StatusCode.FAILED_PRECONDITION, "TASK_FINISHED",
        )  # fmt: skip


# It waits for a 20,000-request run and an etcd outage: minutes on a loaded machine.
@pytest.mark.timeout(600)
async def test_a_run_that_ends_while_etcd_is_down_is_reported_when_it_returns(
    mesh: LocalMesh, owner: grpc.aio.Channel, tmp_path: Path
) -> None:
    provider = await _node(mesh, "task-b")
    spec = _spec(provider, _requests(tmp_path / "many.jsonl", 20_000), max_duration_s=120)
    task = await tasks.submit(owner, spec, work_dir=tmp_path)
    await _until(owner, task.name, {task_pb2.TASK_STATE_RUNNING})
    registry_log = mesh.services["registry"].log_path
    # The run ends during the outage: storing its results, or reporting them, is refused.
    refused_report = re.compile(
        r"etcd failed in /shard\.(artifact\.v1\.ArtifactService/UploadBlob"
        r"|task\.v1\.TaskService/CompleteTask)"
    )
    mesh.etcd.stop()
    try:
        # Callers are told the store is away, by code and reason, on reads and writes alike.
        stub = TaskStub(owner)
        for call in (
            lambda: stub.ListTasks(task_api.ListTasksRequest(page_size=10), timeout=30),
            lambda: stub.GetTask(task_api.GetTaskRequest(name=task.name), timeout=30),
            lambda: stub.CancelTask(task_api.CancelTaskRequest(name="tasks/none"), timeout=30),
        ):
            error = await refused(call(), grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE")
            assert "etcd" in (error.details() or "")
        deadline = time.monotonic() + 90
        while not refused_report.search(registry_log.read_text()):
            assert time.monotonic() < deadline, "the agent never tried to report its run"
            await asyncio.sleep(0.2)
    finally:
        await mesh.etcd.start()
    done = await _until(owner, task.name, FINAL, timeout=90)
    assert done.state == task_pb2.TASK_STATE_SUCCEEDED, done.state_reason
    assert done.result.succeeded_requests == 20_000


@pytest.mark.parametrize(
    ("change", "code", "field"),
    [
        ({"task_id": "Bad Id"}, grpc.StatusCode.INVALID_ARGUMENT, "task_id"),
        ({"provider": "n1"}, grpc.StatusCode.INVALID_ARGUMENT, "task.provider"),
        ({"model": ""}, grpc.StatusCode.INVALID_ARGUMENT, "task.model"),
        ({"input": "blobs/xyz"}, grpc.StatusCode.INVALID_ARGUMENT, "task.input"),
        ({"input": "blobs/" + "0" * 64}, grpc.StatusCode.NOT_FOUND, "task.input"),
        ({"max_duration_s": 0}, grpc.StatusCode.INVALID_ARGUMENT, "task.max_duration"),
        ({"max_duration_s": 10**6}, grpc.StatusCode.INVALID_ARGUMENT, "task.max_duration"),
        ({"expire_in_s": -5}, grpc.StatusCode.INVALID_ARGUMENT, "task.expire_time"),
        ({"plaintext_result": False}, grpc.StatusCode.INVALID_ARGUMENT, "task.result_public_key"),
        ({"result_public_key": b"short"}, grpc.StatusCode.INVALID_ARGUMENT,
         "task.result_public_key"),
        ({"requirements": task_pb2.TaskRequirements(cpu_millis=-1)},
         grpc.StatusCode.INVALID_ARGUMENT, "task.requirements.cpu_millis"),
        ({"group_size": 2}, grpc.StatusCode.INVALID_ARGUMENT, "task.group"),
        ({"group": "g", "group_size": 1}, grpc.StatusCode.INVALID_ARGUMENT, "task.group_size"),
        ({"on_provider_loss": 9}, grpc.StatusCode.INVALID_ARGUMENT, "task.on_provider_loss"),
        ({"provider": "nodes/nowhere"}, grpc.StatusCode.FAILED_PRECONDITION, "task.provider"),
        ({"requirements": task_pb2.TaskRequirements(gpus=1)},
         grpc.StatusCode.FAILED_PRECONDITION, "task.requirements.gpus"),
        ({"requirements": task_pb2.TaskRequirements(memory_bytes=1 << 60)},
         grpc.StatusCode.FAILED_PRECONDITION, "task.requirements.memory_bytes"),
        ({"model": "no-such-model"}, grpc.StatusCode.NOT_FOUND, "task.model"),
        ({"model": UNDEPLOYED}, grpc.StatusCode.FAILED_PRECONDITION, "task.model"),
    ],
)  # fmt: skip
async def test_bad_tasks_are_refused_naming_the_field(
    mesh: LocalMesh, owner: grpc.aio.Channel, tmp_path: Path,
    change: dict[str, Any], code: grpc.StatusCode, field: str,
) -> None:  # fmt: skip
    first = await _node(mesh, "task-a")
    blob, _ = await _sealed_for(owner, _spec(first, _requests(tmp_path / "r.jsonl", 1)), tmp_path)
    task_id = change.pop("task_id", tasks.new_task_id("bad"))
    expire = timestamp_pb2.Timestamp()
    expire.FromSeconds(int(time.time() + change.pop("expire_in_s", 60)))
    task = _task(first.name, blob, expire, max_duration_s=change.pop("max_duration_s", 60))
    for name, value in change.items():
        if name == "requirements":
            task.requirements.CopyFrom(value)
        else:
            setattr(task, name, value)
    error = await refused(
        TaskStub(owner).CreateTask(task_api.CreateTaskRequest(task_id=task_id, task=task)), code
    )
    info = error_info(error)
    assert info is not None
    assert info.metadata["field"] == field, error.details()
    assert field.rsplit(".", maxsplit=1)[-1] in (error.details() or "")
    listed = await TaskStub(owner).ListTasks(task_api.ListTasksRequest(page_size=1000))
    assert f"tasks/{task_id}" not in {t.name for t in listed.tasks}  # nothing half-made
