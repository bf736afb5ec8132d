"""The task owner's side of encrypted tasks: seal a job to a chosen provider, store it, create
the task; later check the provider's signature, fetch the results and open them.

Nothing here trusts the registry with a secret or a key: the provider's encryption key is used
only once its identity key (whose hash is the node id the owner picked) has been seen to sign
it, and results are taken only with that identity key's signature over task, input and output.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from google.protobuf import duration_pb2, timestamp_pb2

from shard.artifact.v1 import artifact_service_pb2_grpc
from shard.node.v1 import node_pb2
from shard.task.v1 import task_pb2, task_service_pb2_grpc
from shard.task.v1 import task_service_pb2 as task_api
from shard_client.blobs import (
    CHUNK_BYTES,
    BlobError,
    Progress,
    download,
    no_progress,
    upload_file,
)
from shard_core import sealing, taskjob
from shard_core.identity import node_id_for

TIMEOUT_S = 30.0


class ResultError(Exception):
    """A result that is not the provider's, or does not open."""


@dataclass(kw_only=True)
class TaskSpec:
    """What the owner asks for; `provider` is the node record the owner picked."""

    task_id: str
    provider: node_pb2.Node
    model: str
    requests: Path  # JSON lines, one KServe v2 request each
    max_duration_s: float
    expire_in_s: float
    result_key: X25519PrivateKey | None  # None: results in the clear
    requirements: task_pb2.TaskRequirements = field(default_factory=task_pb2.TaskRequirements)
    on_provider_loss: task_pb2.ProviderLoss.ValueType = task_pb2.PROVIDER_LOSS_FAIL
    group: str = ""
    group_size: int = 0
    verify_key: bytes = b""
    display_name: str = ""


def _job(header: bytes, requests: Path) -> Iterator[bytes]:
    yield header
    with requests.open("rb") as file:
        yield from iter(lambda: file.read(CHUNK_BYTES), b"")


def seal_job(spec: TaskSpec, expire_time_ms: int, target: Path) -> None:
    """Seal the header and the requests to the provider's vouched-for key, bound to the task,
    the provider and the expiry."""
    name = f"tasks/{spec.task_id}"
    recipient = sealing.node_encryption_key(spec.provider)
    header = taskjob.header(
        task=name,
        provider=spec.provider.name,
        model=spec.model,
        result_key=sealing.raw_public_key(spec.result_key) if spec.result_key else b"",
        verify_key=spec.verify_key,
    )
    context = sealing.task_input_context(name, spec.provider.name, expire_time_ms)
    with target.open("wb") as out:
        for piece in sealing.seal(_job(header, spec.requests), recipient, context):
            out.write(piece)


async def submit(
    channel: grpc.aio.Channel, spec: TaskSpec, *, work_dir: Path, on_bytes: Progress = no_progress
) -> task_pb2.Task:
    """Seal the job, store it (`on_bytes` follows the upload) and create the task."""
    expire = timestamp_pb2.Timestamp()
    expire.FromMilliseconds(int((time.time() + spec.expire_in_s) * 1000))
    sealed = work_dir / f"{spec.task_id}.sealed"
    await asyncio.to_thread(seal_job, spec, expire.ToMilliseconds(), sealed)
    try:
        artifacts = artifact_service_pb2_grpc.ArtifactServiceStub(channel)
        sha256, _ = await upload_file(artifacts, sealed, on_bytes=on_bytes)
    finally:
        sealed.unlink(missing_ok=True)
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(spec.max_duration_s * 1e9))
    task = task_pb2.Task(
        provider=spec.provider.name,
        model=spec.model,
        input=f"blobs/{sha256}",
        requirements=spec.requirements,
        max_duration=duration,
        expire_time=expire,
        result_public_key=sealing.raw_public_key(spec.result_key) if spec.result_key else b"",
        plaintext_result=spec.result_key is None,
        on_provider_loss=spec.on_provider_loss,
        group=spec.group,
        group_size=spec.group_size,
        display_name=spec.display_name,
    )
    reply = await task_service_pb2_grpc.TaskServiceStub(channel).CreateTask(
        task_api.CreateTaskRequest(task_id=spec.task_id, task=task), timeout=TIMEOUT_S
    )
    return reply.task


def new_task_id(prefix: str = "t") -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


def new_verify_key() -> bytes:
    return secrets.token_bytes(taskjob.VERIFY_KEY_BYTES)


def verify_result(task: task_pb2.Task) -> None:
    """ResultError unless the result is signed by the provider's identity key, which must be the
    key whose hash is the provider's node id."""
    if task.state != task_pb2.TASK_STATE_SUCCEEDED:
        raise ResultError(f"{task.name} is {task_pb2.TaskState.Name(task.state)}, it has no result")
    try:
        owns_id = node_id_for(task.provider_public_key) == task.provider.removeprefix("nodes/")
    except ValueError:
        owns_id = False
    if not owns_id:
        raise ResultError(f"the key recorded for {task.provider} is not the one its id names")
    message = sealing.result_message(
        task.name, task.input, task.result.output, task.result_public_key
    )
    if not sealing.signed_by(task.provider_public_key, task.result.signature, message):
        raise ResultError(f"the result of {task.name} is not signed by {task.provider}")


async def fetch_result(
    channel: grpc.aio.Channel,
    task: task_pb2.Task,
    target: Path,
    *,
    key: X25519PrivateKey | None,
    on_bytes: Progress = no_progress,
) -> None:
    """Check the signature, fetch the results and open them into `target` (JSON lines). The
    signature covers the key the results are sealed to (none: in the clear), and the provider
    uses only the one the owner's sealed job named, so no registry can have changed it. Nothing
    is left at `target` unless all of it verified and opened."""
    verify_result(task)
    if not task.plaintext_result:
        if key is None:
            raise ResultError(f"the results of {task.name} are sealed: give the owner's key")
        if sealing.raw_public_key(key) != task.result_public_key:
            raise ResultError(f"the results of {task.name} are sealed to another key")
    artifacts = artifact_service_pb2_grpc.ArtifactServiceStub(channel)
    partial = target.with_name(f".{target.name}.partial")
    sealed = target.with_name(f".{target.name}.sealed")
    try:
        fetched = partial if task.plaintext_result else sealed
        try:
            await download(artifacts, task.result.output, fetched, on_bytes=on_bytes)
        except BlobError as error:
            raise ResultError(str(error)) from error
        if key is not None and not task.plaintext_result:
            context = sealing.task_output_context(task.name, task.provider, task.input)
            try:
                await asyncio.to_thread(sealing.open_file, sealed, partial, key, context)
            except sealing.SealError as error:
                raise ResultError(f"the results of {task.name} do not open: {error}") from error
        partial.replace(target)
    finally:
        sealed.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)
