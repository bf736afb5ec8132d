"""Moving files in and out of the shard's content-addressed blob store, in chunks, with the
hash checked on both ends: what the CLI, the publisher and the node agents share."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import TypeVar

import grpc

from shard.artifact.v1 import artifact_service_pb2 as artifact_api
from shard.artifact.v1 import artifact_service_pb2_grpc

CHUNK_BYTES = 1024 * 1024
TIMEOUT_S = 30.0
TRANSFER_TIMEOUT_S = 3600.0
Metadata = Sequence[tuple[str, str]]
Progress = Callable[[int], None]
# What gRPC's asyncio client reports when a send fails under a call the server has ended.
LOST_ANSWER = "Internal error from Core"
RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")


class BlobError(Exception):
    """A blob that could not be read, or whose bytes do not hash to its name."""


def no_progress(_: int) -> None:
    """A progress hook that does nothing."""


def file_digest(path: Path) -> tuple[str, int]:
    """SHA-256 and size of a file, read in chunks."""
    hasher = hashlib.sha256()
    size = 0
    with path.open("rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            hasher.update(chunk)
            size += len(chunk)
    return hasher.hexdigest(), size


async def _chunks(
    path: Path, sha256: str, size: int, on_bytes: Progress
) -> AsyncIterator[artifact_api.UploadBlobRequest]:
    yield artifact_api.UploadBlobRequest(
        header=artifact_api.UploadBlobHeader(sha256=sha256, size_bytes=size)
    )
    with path.open("rb") as file:
        while chunk := await asyncio.to_thread(file.read, CHUNK_BYTES):
            yield artifact_api.UploadBlobRequest(chunk=chunk)
            on_bytes(len(chunk))


async def send_all(
    call: grpc.aio.StreamUnaryCall[RequestT, ResponseT], requests: AsyncIterable[RequestT]
) -> ResponseT:
    """Send `requests` on a client-streaming `call` whose server acknowledges the first one
    (with its initial metadata) before taking more; the answer. A server that refuses the first
    request ends the call before anything else is sent, so what is raised is its own status,
    not the INTERNAL that gRPC reports for a send that fails under a closed call."""
    first = True
    async for request in requests:
        try:
            await call.write(request)
            if first:
                first = False
                await call.initial_metadata()  # taken, or the call has ended
                if call.done():
                    break
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            break  # the call has ended; awaiting it says why
    else:
        await call.done_writing()
    try:
        return await call
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.INTERNAL and LOST_ANSWER in (error.details() or ""):
            # The server ended the call while a send was still completing: gRPC reports the
            # failed send, and the server's own status is lost. Say so, as something to retry.
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                details="the server ended the call before taking everything sent, and gRPC "
                "lost its answer; try again",
                debug_error_string=error.debug_error_string(),
            ) from error
        raise


async def upload_file(
    stub: artifact_service_pb2_grpc.ArtifactServiceStub,
    path: Path,
    *,
    on_bytes: Progress = no_progress,
    metadata: Metadata = (),
) -> tuple[str, int]:
    """Store a file as a blob unless the store has it already; its SHA-256 and size."""
    sha256, size = await asyncio.to_thread(file_digest, path)
    try:
        await stub.GetBlob(
            artifact_api.GetBlobRequest(name=f"blobs/{sha256}"),
            timeout=TIMEOUT_S,
            metadata=metadata,
        )
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.NOT_FOUND:
            raise
        call = stub.UploadBlob(None, timeout=TRANSFER_TIMEOUT_S, metadata=metadata)
        await send_all(call, _chunks(path, sha256, size, on_bytes))
    else:
        on_bytes(size)  # already stored: a repeated upload resumes past it
    return sha256, size


async def download(
    stub: artifact_service_pb2_grpc.ArtifactServiceStub,
    name: str,
    path: Path,
    *,
    on_bytes: Progress = no_progress,
    metadata: Metadata = (),
) -> int:
    """Write blob `name` (`blobs/{sha256}`) to `path`, checking that its bytes hash to the
    name; the size. BlobError when the bytes do not match (a failed read raises its gRPC
    error)."""
    sha256 = name.removeprefix("blobs/")
    path.parent.mkdir(parents=True, exist_ok=True)
    hasher = hashlib.sha256()
    received = 0
    call = stub.ReadBlob(
        artifact_api.ReadBlobRequest(name=name), timeout=TRANSFER_TIMEOUT_S, metadata=metadata
    )
    with path.open("wb") as out:
        async for reply in call:
            hasher.update(reply.data)
            received += len(reply.data)
            await asyncio.to_thread(out.write, reply.data)
            on_bytes(len(reply.data))
    if hasher.hexdigest() != sha256:
        raise BlobError(f"{name} did not verify: its {received} bytes hash to {hasher.hexdigest()}")
    return received
