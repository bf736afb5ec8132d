"""Encrypted tasks: an owner's sealed batch job for one chosen provider node.

A task lives under `tasks/{id}`. While it is open (PENDING or RUNNING) a copy sits under
`open-tasks/{node}/{id}`, written in the same transaction: the provider's session pushes those
to the node, and the sweeper walks them. A claim is `task-claims/{id}`, created in the claiming
transaction only if absent and bound to the claiming node's lease, so exactly one claim wins and
a node that dies takes its claims with it. The sweeper (run by the leading replica) expires
tasks nobody claimed by `expire_time` and tasks running past `max_duration`, fails or requeues
the running tasks whose claim is gone, and gives each finished redundancy group its verdict.
Every change is a compare-and-swap on the task's revision, so the sweeper, claims, completions
and cancellations never overwrite each other; and everything is in etcd, so a registry restart
loses nothing.

The registry never sees a job or a result in the clear: it checks what it can without reading
them (the provider is ACTIVE, meets the requirements and serves the model; the blobs exist; the
provider's signature over task, input and output) and compares redundant outputs by their
keyed digests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from opentelemetry import metrics

from shard.node.v1 import node_pb2
from shard.task.v1 import task_pb2
from shard_core import keys
from shard_core.auth import Principal
from shard_core.errors import (
    AbortedError,
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    require,
)
from shard_core.etcd import paging
from shard_core.etcd.store import EtcdStore
from shard_core.sealing import X25519_KEY_BYTES, result_message, signed_by
from shard_registry.access import caller, require_visible
from shard_registry.artifacts import BlobStore, blob_sha256
from shard_registry.directory import NodeDirectory
from shard_registry.models import ModelRegistry
from shard_registry.resources import (
    RESOURCE_ID,
    check_id,
    clear_output_only,
    enum_value,
    filter_terms,
    parse_name,
    seconds,
    timestamp,
)

_log = logging.getLogger(__name__)

Task = task_pb2.Task
PENDING, RUNNING = task_pb2.TASK_STATE_PENDING, task_pb2.TASK_STATE_RUNNING
SUCCEEDED, FAILED = task_pb2.TASK_STATE_SUCCEEDED, task_pb2.TASK_STATE_FAILED
EXPIRED, CANCELLED = task_pb2.TASK_STATE_EXPIRED, task_pb2.TASK_STATE_CANCELLED
OPEN = frozenset({PENDING, RUNNING})

MAX_DURATION_S = 24 * 3600
MAX_AHEAD_S = 7 * 24 * 3600
MAX_ATTEMPTS = 3
MAX_GROUP_SIZE = 16
MAX_REASON_CHARS = 1000
MAX_DISPLAY_NAME_CHARS = 200
DIGEST_BYTES = 32
CAS_RETRIES = 10
FORGET_BATCH = 100
NODE_PREFIX = "nodes/"


def _state_name(state: task_pb2.TaskState.ValueType) -> str:
    return task_pb2.TaskState.Name(state).removeprefix("TASK_STATE_")


def _deadline(task: Task) -> float:
    """When a running task has run for `max_duration`."""
    return seconds(task.start_time) + task.max_duration.ToNanoseconds() / 1e9


def _node_caller(task: Task | None = None) -> str:
    """The node id of the calling node agent; refused for anyone else, and for another node
    than `task`'s provider."""
    principal = caller()
    if not principal.id.startswith(NODE_PREFIX):
        raise PermissionDeniedError(
            "only node agents claim and complete tasks", reason="NOT_A_NODE"
        )
    if task is not None and task.provider != principal.id:
        raise PermissionDeniedError(
            f"{task.name} is addressed to another node", reason="NOT_YOURS",
            metadata={"name": task.name},
        )  # fmt: skip
    return principal.id.removeprefix(NODE_PREFIX)


def _check_requirements(node: node_pb2.Node, wanted: task_pb2.TaskRequirements) -> None:
    have = node.capacity
    fitting = [g for g in have.gpus if g.memory_bytes >= wanted.gpu_memory_bytes]
    shortfalls = [
        ("gpus", wanted.gpus > len(fitting), f"{wanted.gpus} GPUs", f"{len(fitting)} fit"),
        ("memory_bytes", wanted.memory_bytes > have.memory_bytes,
         f"{wanted.memory_bytes} bytes of memory", f"{have.memory_bytes}"),
        ("cpu_millis", wanted.cpu_millis > have.cpu_millis,
         f"{wanted.cpu_millis} CPU millis", f"{have.cpu_millis}"),
    ]  # fmt: skip
    for field, short, want, has in shortfalls:
        if short:
            raise FailedPreconditionError(
                f"task.requirements.{field}: {node.name} cannot give {want} (it has {has})",
                reason="REQUIREMENTS_NOT_MET",
                metadata={"field": f"task.requirements.{field}"},
            )


def _validate(task_id: str, task: Task, now: float) -> None:
    check_id(task_id, "task_id")
    parse_name(task.provider, "nodes/{}", "task.provider")
    require(task.model, "task.model")
    if not RESOURCE_ID.fullmatch(task.model):
        raise InvalidArgumentError(
            f"task.model {task.model[:80]!r} is not a model name (its Triton name, `simple`)",
            metadata={"field": "task.model"},
        )
    blob_sha256(task.input, "task.input")
    duration = task.max_duration.ToNanoseconds() / 1e9
    if not 0 < duration <= MAX_DURATION_S:
        raise InvalidArgumentError(
            f"task.max_duration must be more than 0 and at most {MAX_DURATION_S} s",
            metadata={"field": "task.max_duration"},
        )
    expire = seconds(task.expire_time)
    if not now < expire <= now + MAX_AHEAD_S:
        raise InvalidArgumentError(
            "task.expire_time must be in the future and at most 7 days ahead",
            metadata={"field": "task.expire_time"},
        )
    if task.plaintext_result == bool(task.result_public_key):
        raise InvalidArgumentError(
            "give task.result_public_key, or set task.plaintext_result for results in the "
            "clear (one of them)",
            metadata={"field": "task.result_public_key"},
        )
    if task.result_public_key and len(task.result_public_key) != X25519_KEY_BYTES:
        raise InvalidArgumentError(
            f"task.result_public_key must be a raw X25519 key of {X25519_KEY_BYTES} bytes",
            metadata={"field": "task.result_public_key"},
        )
    for field in ("gpus", "gpu_memory_bytes", "memory_bytes", "cpu_millis"):
        if getattr(task.requirements, field) < 0:
            raise InvalidArgumentError(
                f"task.requirements.{field} must not be negative",
                metadata={"field": f"task.requirements.{field}"},
            )
    if task.on_provider_loss not in task_pb2.ProviderLoss.values():
        raise InvalidArgumentError(
            "task.on_provider_loss is not a known value",
            metadata={"field": "task.on_provider_loss"},
        )
    if task.group:
        check_id(task.group, "task.group")
        if not 2 <= task.group_size <= MAX_GROUP_SIZE:
            raise InvalidArgumentError(
                f"task.group_size must be between 2 and {MAX_GROUP_SIZE} for a group",
                metadata={"field": "task.group_size"},
            )
    elif task.group_size:
        raise InvalidArgumentError(
            "task.group_size needs task.group", metadata={"field": "task.group"}
        )
    if len(task.display_name) > MAX_DISPLAY_NAME_CHARS:
        raise InvalidArgumentError(
            f"task.display_name is longer than {MAX_DISPLAY_NAME_CHARS} characters",
            metadata={"field": "task.display_name"},
        )


def _reason(text: str, field: str) -> str:
    require(text, field)
    if len(text) > MAX_REASON_CHARS:
        raise InvalidArgumentError(
            f"{field} is longer than {MAX_REASON_CHARS} characters", metadata={"field": field}
        )
    return text


def verdict(members: Iterable[Task]) -> task_pb2.Verification.ValueType:
    """A finished group's verdict: its successful outputs all agree, differ, or are too few."""
    digests = [t.result.output_digest for t in members if t.state == SUCCEEDED]
    if len(digests) < 2:
        return task_pb2.VERIFICATION_INCONCLUSIVE
    if len(set(digests)) == 1:
        return task_pb2.VERIFICATION_VERIFIED
    return task_pb2.VERIFICATION_DISPUTED


@dataclass(frozen=True, kw_only=True)
class _Read:
    task: Task
    revision: int


class TaskRegistry:
    def __init__(
        self,
        *,
        store: EtcdStore,
        directory: NodeDirectory,
        models: ModelRegistry,
        blobs: BlobStore,
        max_open_per_owner: int = 1000,
        retention_s: float = 30 * 24 * 3600,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._max_open_per_owner = max_open_per_owner
        self._retention_s = retention_s
        self._directory = directory
        self._models = models
        self._blobs = blobs
        self._clock = clock
        meter = metrics.get_meter("shard.registry")
        self._finished = meter.create_counter(
            "shard_registry_tasks_finished", description="Tasks that ended, by final state."
        )
        self._claims = meter.create_counter(
            "shard_registry_task_claims", description="Task claims that won."
        )

    # -- owners -----------------------------------------------------------------------------

    async def create(self, task_id: str, task: Task) -> Task:
        now = self._clock()
        _validate(task_id, task, now)
        owner = caller()
        node_id = task.provider.removeprefix(NODE_PREFIX)
        if await self._blobs.stat(blob_sha256(task.input, "task.input")) is None:
            raise NotFoundError(
                f"task.input {task.input} is not in the blob store; upload it first",
                metadata={"field": "task.input"},
            )
        try:
            require_visible(await self._models.get_model(f"models/{task.model}"))
        except NotFoundError as error:
            raise NotFoundError(error.message, metadata={"field": "task.model"}) from error
        provider = await self._check_provider(node_id, task)
        await self._check_quota(owner)
        record = Task()
        record.CopyFrom(task)
        clear_output_only(record)
        record.name = f"tasks/{task_id}"
        record.owner = owner.id
        record.provider_public_key = provider.public_key
        record.create_time.CopyFrom(timestamp(now))
        if task.group:
            record.verification = task_pb2.VERIFICATION_PENDING
        self._enter(record, PENDING, "CREATED: waiting for the provider to claim it", now)
        data = record.SerializeToString()
        for _ in range(CAS_RETRIES):
            puts = {keys.task(task_id): data, keys.open_task(node_id, task_id): data}
            expect = {keys.task(task_id): 0}
            if task.group:
                group, group_revision = await self._joined_group(record, owner)
                puts[keys.task_group(task.group)] = group.SerializeToString()
                expect[keys.task_group(task.group)] = group_revision
            revision = await self._store.write(puts=puts, expect=expect)
            if revision is not None:
                break
            if await self._store.get(keys.task(task_id)) is not None:
                raise AlreadyExistsError(
                    f"{record.name} already exists", metadata={"name": record.name}
                )
        else:
            raise AbortedError(f"group {task.group} kept changing; try again")
        record.etag = str(revision)
        _log.info("task %s created for %s by %s", record.name, task.provider, owner.id)
        return record

    async def _check_provider(self, node_id: str, task: Task) -> node_pb2.Node:
        node = self._directory.node(node_id)
        if node is None:
            raise FailedPreconditionError(
                f"task.provider {task.provider} is not connected to the shard",
                reason="PROVIDER_UNAVAILABLE",
                metadata={"field": "task.provider"},
            )
        if node.state != node_pb2.NODE_STATE_ACTIVE:
            raise FailedPreconditionError(
                f"task.provider {task.provider} is "
                f"{node_pb2.NodeState.Name(node.state).removeprefix('NODE_STATE_')}, not ACTIVE",
                reason="PROVIDER_NOT_ACTIVE",
                metadata={"field": "task.provider"},
            )
        if not node.encryption_key.public_key:
            raise FailedPreconditionError(
                f"task.provider {task.provider} has no encryption key (an older agent)",
                reason="NO_ENCRYPTION_KEY",
                metadata={"field": "task.provider"},
            )
        _check_requirements(node, task.requirements)
        if not any(
            m.model_name == task.model and m.state == node_pb2.MODEL_STATE_READY
            for m in node.models
        ):
            raise FailedPreconditionError(
                f"task.model {task.model} is not served by {task.provider}; pick a provider "
                "that serves it",
                reason="MODEL_NOT_SERVED",
                metadata={"field": "task.model"},
            )
        return node

    async def _check_quota(self, owner: Principal) -> None:
        """A principal's open tasks are bounded: one owner cannot flood the queues."""
        if owner.admin:
            return
        open_tasks = await self._store.snapshot(keys.OPEN_TASKS)
        mine = sum(Task.FromString(entry.value).owner == owner.id for entry in open_tasks.entries)
        if mine >= self._max_open_per_owner:
            raise ResourceExhaustedError(
                f"{owner.id} has {mine} open tasks, the most allowed; wait for some to finish",
                reason="TOO_MANY_OPEN_TASKS",
            )

    async def _joined_group(self, task: Task, owner: Principal) -> tuple[task_pb2.TaskGroup, int]:
        """The task's group with the task added, and the revision it must still be at."""
        found = await self._store.get(keys.task_group(task.group))
        group = task_pb2.TaskGroup(group=task.group, owner=owner.id, size=task.group_size)
        if found is not None:
            group = task_pb2.TaskGroup.FromString(found.value)
        if not owner.owns(group.owner):
            raise PermissionDeniedError(
                f"group {task.group} belongs to another principal", reason="NOT_YOURS",
                metadata={"field": "task.group"},
            )  # fmt: skip
        if len(group.tasks) >= group.size or group.size != task.group_size:
            raise FailedPreconditionError(
                f"group {task.group} takes {group.size} tasks and has {len(group.tasks)}",
                reason="GROUP_FULL",
                metadata={"field": "task.group"},
            )
        if task.provider in group.providers:
            raise InvalidArgumentError(
                f"task.provider {task.provider} already runs a task of group {task.group}: "
                "redundancy needs different providers",
                metadata={"field": "task.provider"},
            )
        group.tasks.append(task.name)
        group.providers.append(task.provider)
        return group, found.mod_revision if found is not None else 0

    async def get(self, name: str) -> Task:
        (task_id,) = parse_name(name, "tasks/{}")
        read = await self._read(task_id)
        if not self._may_see(read.task, caller()):
            raise PermissionDeniedError(
                f"{name} belongs to another principal", reason="NOT_YOURS", metadata={"name": name}
            )
        return read.task

    def _may_see(self, task: Task, principal: Principal) -> bool:
        if principal.owns(task.owner) or principal.id == task.provider:
            return True
        node = self._directory.node(task.provider.removeprefix(NODE_PREFIX))
        return node is not None and bool(node.provider) and node.provider == principal.id

    async def list(
        self, *, page_size: int, page_token: str, filter_text: str
    ) -> tuple[list[Task], str]:
        wanted = _parse_filter(filter_text)
        entries, token = await paging.page(
            self._store, keys.TASKS, page_size=page_size, page_token=page_token
        )
        principal = caller()
        found = []
        for entry in entries:
            task = Task.FromString(entry.value)
            task.etag = str(entry.mod_revision)
            if wanted(task) and self._may_see(task, principal):
                found.append(task)
        return found, token

    async def cancel(self, name: str, reason: str) -> Task:
        (task_id,) = parse_name(name, "tasks/{}")
        if len(reason) > MAX_REASON_CHARS:
            raise InvalidArgumentError(
                f"reason is longer than {MAX_REASON_CHARS} characters", metadata={"field": "reason"}
            )

        def change(task: Task, now: float) -> None:
            if not caller().owns(task.owner):
                raise PermissionDeniedError(
                    f"{name} belongs to another principal", reason="NOT_YOURS",
                    metadata={"name": name},
                )  # fmt: skip
            if task.state not in OPEN:
                raise FailedPreconditionError(
                    f"{name} is already {_state_name(task.state)}", reason="TASK_FINISHED",
                    metadata={"name": name},
                )  # fmt: skip
            self._enter(task, CANCELLED, f"CANCELLED: {reason or 'by its owner'}", now)

        return await self._update(task_id, change)

    # -- provider nodes ---------------------------------------------------------------------

    async def claim(self, name: str) -> Task:
        """Exactly once: the task becomes RUNNING and the claim appears in one transaction that
        requires the claim to be absent; the claim lives on the node's lease."""
        (task_id,) = parse_name(name, "tasks/{}")
        node_id = _node_caller()
        for _ in range(CAS_RETRIES):
            read = await self._read(task_id)
            task = read.task
            _node_caller(task)
            if task.state != PENDING:
                raise FailedPreconditionError(
                    f"{name} is {_state_name(task.state)}: only a PENDING task can be claimed",
                    reason="NOT_PENDING",
                    metadata={"name": name},
                )
            now = self._clock()
            if now > seconds(task.expire_time):
                raise FailedPreconditionError(
                    f"{name} expired before it was claimed", reason="EXPIRED",
                    metadata={"name": name},
                )  # fmt: skip
            record = await self._store.get(keys.node(node_id))
            if record is None or not record.lease:
                raise FailedPreconditionError(
                    f"nodes/{node_id} is not registered; connect before claiming",
                    reason="NODE_NOT_REGISTERED",
                )
            task.attempts += 1
            task.start_time.CopyFrom(timestamp(now))
            self._enter(task, RUNNING, f"CLAIMED: attempt {task.attempts}", now)
            claim = keys.task_claim(task_id)
            written = await self._write(
                task, read.revision, extra={claim: node_id.encode()}, expect={claim: 0},
                leases={claim: record.lease},
            )  # fmt: skip
            if written is not None:
                self._claims.add(1)
                _log.info("task %s claimed by %s", name, node_id)
                return written
        raise AbortedError(f"{name} kept changing during the claim; try again")

    async def complete(
        self, name: str, state: task_pb2.TaskState.ValueType, result: task_pb2.TaskResult,
        reason: str, attempt: int = 0,
    ) -> Task:  # fmt: skip
        """The provider's report on the attempt it runs (`attempt`; 0: whichever)."""
        (task_id,) = parse_name(name, "tasks/{}")
        if state == SUCCEEDED:
            blob_sha256(result.output, "result.output")
        elif state == FAILED:
            _reason(reason, "reason")
        else:
            raise InvalidArgumentError(
                "state must be TASK_STATE_SUCCEEDED or TASK_STATE_FAILED",
                metadata={"field": "state"},
            )
        node_id = _node_caller()
        if state == SUCCEEDED and await self._blobs.stat(blob_sha256(result.output)) is None:
            raise NotFoundError(
                f"result.output {result.output} is not in the blob store; upload it first",
                metadata={"field": "result.output"},
            )
        claim = await self._store.get(keys.task_claim(task_id))

        def change(task: Task, now: float) -> None:
            _node_caller(task)
            if task.state != RUNNING or claim is None or claim.value.decode() != node_id:
                raise FailedPreconditionError(
                    f"{name} is {_state_name(task.state)}, not running on nodes/{node_id}",
                    reason="NOT_RUNNING_HERE",
                    metadata={"name": name},
                )
            if attempt and attempt != task.attempts:
                raise FailedPreconditionError(
                    f"{name} runs attempt {task.attempts}; attempt {attempt} was given up",
                    reason="STALE_ATTEMPT",
                    metadata={"field": "attempt"},
                )
            if now > _deadline(task):
                self._enter(task, EXPIRED, "DEADLINE: it ran longer than max_duration", now)
            elif state == FAILED and reason.startswith("PROVIDER_LOST"):
                self._provider_lost(task, reason, now)
            elif state == FAILED:
                self._enter(task, FAILED, reason, now)
            else:
                self._check_result(task, result)
                task.result.CopyFrom(result)
                done = result.failed_requests
                self._enter(
                    task, SUCCEEDED,
                    f"COMPLETED: {result.succeeded_requests} requests answered, {done} failed", now,
                )  # fmt: skip

        return await self._update(task_id, change)

    def _check_result(self, task: Task, result: task_pb2.TaskResult) -> None:
        message = result_message(task.name, task.input, result.output, task.result_public_key)
        if not signed_by(task.provider_public_key, result.signature, message):
            raise InvalidArgumentError(
                "result.signature is not the provider's signature over the task, its input and "
                "its output",
                reason="BAD_SIGNATURE",
                metadata={"field": "result.signature"},
            )
        if task.group and len(result.output_digest) != DIGEST_BYTES:
            raise InvalidArgumentError(
                f"result.output_digest must be {DIGEST_BYTES} bytes for a task of a group",
                metadata={"field": "result.output_digest"},
            )
        for field in ("succeeded_requests", "failed_requests"):
            if getattr(result, field) < 0:
                raise InvalidArgumentError(
                    f"result.{field} must not be negative", metadata={"field": f"result.{field}"}
                )

    # -- the sweeper ------------------------------------------------------------------------

    async def sweep(self) -> None:
        """One pass: expire, fail or requeue what must be, and judge finished groups."""
        now = self._clock()
        open_tasks = await self._store.snapshot(keys.OPEN_TASKS)
        claims = {
            entry.key.removeprefix(keys.TASK_CLAIMS)
            for entry in (await self._store.snapshot(keys.TASK_CLAIMS)).entries
        }
        for entry in open_tasks.entries:
            task = Task.FromString(entry.value)
            task_id = task.name.removeprefix("tasks/")
            lost = task.state == RUNNING and task_id not in claims
            overdue = (task.state == PENDING and now > seconds(task.expire_time)) or (
                task.state == RUNNING and now > _deadline(task)
            )
            if overdue:
                await self._update(task_id, self._sweeping)
            elif lost:  # unless a claim appeared since the snapshot
                await self._update(task_id, self._sweeping, expect={keys.task_claim(task_id): 0})
        await self._judge_groups()
        await self._forget(now - self._retention_s)

    async def _forget(self, before: float) -> None:
        """Delete the records of tasks that ended before `before` (their blobs stay)."""
        ended, _ = await self._store.page(keys.TASK_ENDS, start_after="", limit=FORGET_BATCH)
        for entry in ended:
            end_ms, task_id = entry.key.removeprefix(keys.TASK_ENDS).split("/", 1)
            if int(end_ms) / 1000 >= before:
                return
            await self._store.write(deletes=[keys.task(task_id), entry.key])

    def _sweeping(self, task: Task, now: float) -> None:
        """What the sweeper does to one task, decided on its latest revision."""
        if task.state == PENDING and now > seconds(task.expire_time):
            self._enter(task, EXPIRED, "NOT_CLAIMED: nobody claimed it by its expire_time", now)
        elif task.state == RUNNING and now > _deadline(task):
            self._enter(task, EXPIRED, "DEADLINE: it ran longer than max_duration", now)
        elif task.state == RUNNING:
            self._provider_lost(task, "PROVIDER_LOST: the provider's lease expired", now)

    async def _judge_groups(self) -> None:
        now = self._clock()
        for entry in (await self._store.snapshot(keys.TASK_GROUPS)).entries:
            group = task_pb2.TaskGroup.FromString(entry.value)
            reads = [await self._read(name.removeprefix("tasks/")) for name in group.tasks]
            full = len(reads) >= group.size
            # A group that never filled is judged once no task could still join it in time.
            given_up = now > max(seconds(r.task.expire_time) for r in reads)
            if not (full or given_up) or any(r.task.state in OPEN for r in reads):
                continue
            result = verdict(r.task for r in reads)
            puts, expect = {}, {entry.key: entry.mod_revision}
            for read in reads:
                read.task.verification = result
                read.task.etag = ""
                key = keys.task(read.task.name.removeprefix("tasks/"))
                puts[key] = read.task.SerializeToString()
                expect[key] = read.revision
            if await self._store.write(puts=puts, deletes=[entry.key], expect=expect) is not None:
                _log.info("task group %s: %s", group.group, task_pb2.Verification.Name(result))

    # -- shared -----------------------------------------------------------------------------

    def _provider_lost(self, task: Task, reason: str, now: float) -> None:
        """The owner's choice: back to PENDING for the same provider (while attempts and time
        are left), or FAILED."""
        requeue = (
            task.on_provider_loss == task_pb2.PROVIDER_LOSS_REQUEUE
            and task.attempts < MAX_ATTEMPTS
            and now < seconds(task.expire_time)
        )
        if requeue:
            task.ClearField("start_time")
            self._enter(task, PENDING, f"REQUEUED: {reason}", now)
        else:
            self._enter(task, FAILED, reason, now)

    @staticmethod
    def _enter(task: Task, state: task_pb2.TaskState.ValueType, reason: str, now: float) -> None:
        task.state = state
        task.state_reason = reason
        task.transitions.append(
            task_pb2.TaskTransition(state=state, reason=reason, time=timestamp(now))
        )
        if state not in OPEN:
            task.end_time.CopyFrom(timestamp(now))

    async def _read(self, task_id: str) -> _Read:
        found = await self._store.get(keys.task(task_id))
        if found is None:
            name = f"tasks/{task_id}"
            raise NotFoundError(f"task {name} not found", metadata={"name": name})
        task = Task.FromString(found.value)
        task.etag = str(found.mod_revision)
        return _Read(task=task, revision=found.mod_revision)

    async def _update(
        self,
        task_id: str,
        change: Callable[[Task, float], None],
        *,
        expect: dict[str, int] | None = None,
    ) -> Task:
        """Read, change, and write back only if nobody wrote in between (again if someone did)
        and the keys in `expect` are as expected (else leave the task as it is)."""
        for attempt in range(CAS_RETRIES):
            read = await self._read(task_id)
            before = read.task.SerializeToString()
            change(read.task, self._clock())
            if read.task.SerializeToString() == before:
                return read.task
            written = await self._write(read.task, read.revision, expect=expect)
            if written is not None:
                return written
            latest = await self._read(task_id)
            if latest.revision == read.revision:  # an expectation in `expect` failed
                return latest.task
            await asyncio.sleep(0.01 * attempt)
        raise AbortedError(f"tasks/{task_id} kept changing; try again")

    async def _write(
        self,
        task: Task,
        revision: int,
        *,
        extra: dict[str, bytes] | None = None,
        expect: dict[str, int] | None = None,
        leases: dict[str, int] | None = None,
    ) -> Task | None:
        """Write the task, its open copy (or, once it ends, no open copy and no claim)."""
        task_id = task.name.removeprefix("tasks/")
        node_id = task.provider.removeprefix(NODE_PREFIX)
        task.etag = ""
        data = task.SerializeToString()
        puts = {keys.task(task_id): data, **(extra or {})}
        deletes = []
        if task.state in OPEN:
            puts[keys.open_task(node_id, task_id)] = data
        else:
            deletes = [keys.open_task(node_id, task_id), keys.task_claim(task_id)]
            puts[keys.task_end(task.end_time.ToMilliseconds(), task_id)] = b""
        if task.state == PENDING:
            deletes.append(keys.task_claim(task_id))  # a requeue releases the lost claim

        async def commit() -> Task | None:
            written = await self._store.write(
                puts=puts,
                deletes=deletes,
                expect={keys.task(task_id): revision, **(expect or {})},
                leases=leases,
            )
            if written is None:
                return None
            task.etag = str(written)
            if task.state not in OPEN:
                self._finished.add(1, {"state": _state_name(task.state)})
                _log.info("task %s %s: %s", task.name, _state_name(task.state), task.state_reason)
            return task

        # Once the write is sent, its count and log must follow even if the caller goes away
        # meanwhile: a node cancels its completion call when the push the write caused (its
        # task is no longer open) reaches it before the answer does.
        return await asyncio.shield(commit())


def _field_is(field: str, value: object) -> Callable[[Task], bool]:
    return lambda task: bool(getattr(task, field) == value)


def _parse_filter(text: str) -> Callable[[Task], bool]:
    """`owner=alice AND state=RUNNING`: owner, provider, state, group."""
    conditions = []
    for key, value in filter_terms(text):
        if key == "state":
            state = enum_value(task_pb2.TaskState, "TASK_STATE_", value, "task state", "filter")
            conditions.append(_field_is("state", state))
        elif key in ("owner", "group"):
            conditions.append(_field_is(key, value))
        elif key == "provider":
            node = value if value.startswith(NODE_PREFIX) else f"{NODE_PREFIX}{value}"
            conditions.append(_field_is("provider", node))
        else:
            raise InvalidArgumentError(
                f"filter: cannot filter on {key!r}; use owner, provider, state or group",
                metadata={"field": "filter"},
            )
    return lambda task: all(condition(task) for condition in conditions)
