"""The registry's task domain on real etcd, with limits small enough to reach and a clock the
test moves: one principal's open tasks are bounded, and finished tasks are forgotten after the
retention time."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import NamedTuple

import grpc
import pytest
from google.protobuf import duration_pb2

from shard.auth.v1 import api_key_pb2
from shard.model.v1 import model_pb2
from shard.node.v1 import node_pb2
from shard.task.v1 import task_pb2
from shard_core import keys
from shard_core.auth import BOOTSTRAP_ADMIN, ROLE_PERMISSIONS, Principal, current_principal
from shard_core.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from shard_core.etcd.store import EtcdStore
from shard_node.identity import NodeIdentity
from shard_registry.artifacts import BlobStore
from shard_registry.directory import NodeDirectory
from shard_registry.models import ModelRegistry
from shard_registry.resources import timestamp
from shard_registry.tasks import TaskRegistry

READY = node_pb2.MODEL_STATE_READY
OWNER = Principal(
    id="quota-owner",
    role=api_key_pb2.ROLE_DEVELOPER,
    permissions=ROLE_PERMISSIONS[api_key_pb2.ROLE_DEVELOPER],
)


async def _one_chunk(data: bytes) -> AsyncIterator[bytes]:
    yield data


class Fixture(NamedTuple):
    tasks: TaskRegistry
    task: task_pb2.Task
    providers: list[str]


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def registry(store: EtcdStore, tmp_path: Path, clock: Clock) -> Fixture:
    """A task registry allowing 2 open tasks per owner and keeping finished ones for an hour,
    three nodes that could run them, and a task for the first."""
    blobs = BlobStore.local(tmp_path / "blobs")
    job = b"sealed bytes, as far as the registry can tell"
    sha = hashlib.sha256(job).hexdigest()
    await blobs.put(sha, len(job), _one_chunk(job))
    models = ModelRegistry(store=store, blobs=blobs)
    public = model_pb2.Model(visibility=model_pb2.VISIBILITY_PUBLIC)
    await models.create_model("quota-model", public)
    directory = NodeDirectory()
    nodes = []
    for index in range(3):
        identity = NodeIdentity.load_or_create(tmp_path / f"node-{index}")
        node = node_pb2.Node(
            name=f"nodes/{identity.node_id}",
            state=node_pb2.NODE_STATE_ACTIVE,
            public_key=identity.public_key,
            encryption_key=identity.vouched_encryption_key(),
            models=[node_pb2.ModelStatus(model_name="quota-model", state=READY)],
        )
        directory.records.put(keys.node(identity.node_id), node.SerializeToString())
        nodes.append(node.name)
    tasks = TaskRegistry(
        store=store, directory=directory, models=models, blobs=blobs, max_open_per_owner=2,
        retention_s=3600, clock=clock,
    )  # fmt: skip
    task = task_pb2.Task(
        provider=nodes[0],
        model="quota-model",
        input=f"blobs/{sha}",
        max_duration=duration_pb2.Duration(seconds=60),
        expire_time=timestamp(clock.now + 60),
        plaintext_result=True,
    )
    return Fixture(tasks=tasks, task=task, providers=nodes)


async def test_an_owner_has_at_most_its_quota_of_open_tasks(
    registry: Fixture,
) -> None:
    tasks, task = registry.tasks, registry.task
    token = current_principal.set(OWNER)
    try:
        first = await tasks.create("q1", task)
        await tasks.create("q2", task)
        with pytest.raises(ResourceExhaustedError) as refused:
            await tasks.create("q3", task)
        assert refused.value.reason == "TOO_MANY_OPEN_TASKS"
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        await tasks.cancel(first.name, "make room")
        third = await tasks.create("q3", task)
        assert third.state == task_pb2.TASK_STATE_PENDING
    finally:
        current_principal.reset(token)


async def test_finished_tasks_are_forgotten_after_the_retention_time(
    registry: Fixture, store: EtcdStore, clock: Clock
) -> None:
    tasks, task = registry.tasks, registry.task
    token = current_principal.set(OWNER)
    try:
        done = await tasks.cancel((await tasks.create("r1", task)).name, "done with it")
        kept = await tasks.create("r2", task)
        clock.now += 1800
        await tasks.sweep()
        assert (await tasks.get(done.name)).state == task_pb2.TASK_STATE_CANCELLED
        clock.now += 3000  # r1 ended 4800 s ago, r2 (expired by the first sweep) 3000 s ago
        await tasks.sweep()
        with pytest.raises(NotFoundError):
            await tasks.get(done.name)
        assert [
            e.key.rsplit("/", 1)[1] for e in (await store.snapshot(keys.TASK_ENDS)).entries
        ] == ["r2"]
        # The open one expired meanwhile (unclaimed past its expire_time): kept for its hour.
        expired = await tasks.get(kept.name)
        assert expired.state == task_pb2.TASK_STATE_EXPIRED
    finally:
        current_principal.reset(token)


async def test_concurrent_creates_never_overfill_a_group_or_share_a_provider(
    registry: Fixture,
) -> None:
    token = current_principal.set(BOOTSTRAP_ADMIN)  # no quota in the way
    try:
        grouped = []
        # Four at once into a group of two: three providers, the first one twice.
        for index, provider in enumerate([*registry.providers, registry.providers[0]]):
            member = task_pb2.Task()
            member.CopyFrom(registry.task)
            member.provider, member.group, member.group_size = provider, "g", 2
            grouped.append(registry.tasks.create(f"g{index}", member))
        results = await asyncio.gather(*grouped, return_exceptions=True)
        made = [r for r in results if isinstance(r, task_pb2.Task)]
        assert len(made) == 2, results
        assert len({t.provider for t in made}) == 2
        refused = [r for r in results if not isinstance(r, task_pb2.Task)]
        assert all(isinstance(r, FailedPreconditionError | InvalidArgumentError) for r in refused)
    finally:
        current_principal.reset(token)
