"""The content-addressed blob store: streamed, verified, and nothing left by a bad upload."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import boto3
import grpc
import psutil
import pytest
from moto.server import ThreadedMotoServer

from shard.artifact.v1 import artifact_service_pb2 as api
from shard.artifact.v1 import artifact_service_pb2_grpc
from shard_client.blobs import send_all
from shard_core.errors import InvalidArgumentError, error_info
from shard_core.net import free_port
from shard_registry.artifacts import BlobStore
from shard_tool.local import LocalMesh
from tests.waiting import until

MIB = 1024 * 1024


@pytest.fixture
def artifacts(registry_channel: grpc.aio.Channel) -> artifact_service_pb2_grpc.ArtifactServiceStub:
    return artifact_service_pb2_grpc.ArtifactServiceStub(registry_channel)


def _payload(size: int, seed: int) -> bytes:
    block = hashlib.sha256(str(seed).encode()).digest()
    return (block * (size // len(block) + 1))[:size]


async def _upload_requests(
    data: bytes, *, sha256: str | None = None, size: int | None = None, chunk: int = MIB
) -> AsyncIterator[api.UploadBlobRequest]:
    yield api.UploadBlobRequest(
        header=api.UploadBlobHeader(
            sha256=sha256 or hashlib.sha256(data).hexdigest(),
            size_bytes=len(data) if size is None else size,
        )
    )
    for start in range(0, len(data), chunk):
        yield api.UploadBlobRequest(chunk=data[start : start + chunk])


async def _read(
    artifacts: artifact_service_pb2_grpc.ArtifactServiceStub, name: str, offset: int = 0
) -> bytes:
    parts = []
    async for reply in artifacts.ReadBlob(api.ReadBlobRequest(name=name, offset=offset)):
        parts.append(reply.data)
    return b"".join(parts)


def _leftover_uploads(mesh: LocalMesh) -> list[Path]:
    uploads = mesh.state_dir / "blobs" / "uploads"
    return list(uploads.iterdir()) if uploads.exists() else []


async def test_upload_then_stat_and_read_back_with_offsets(
    artifacts: artifact_service_pb2_grpc.ArtifactServiceStub,
) -> None:
    data = _payload(3 * MIB + 17, seed=1)
    sha = hashlib.sha256(data).hexdigest()

    reply = await artifacts.UploadBlob(_upload_requests(data))

    assert (reply.blob.name, reply.blob.sha256, reply.blob.size_bytes) == (
        f"blobs/{sha}",
        sha,
        len(data),
    )
    got = await artifacts.GetBlob(api.GetBlobRequest(name=f"blobs/{sha}"))
    assert got.blob.size_bytes == len(data)
    assert await _read(artifacts, f"blobs/{sha}") == data
    assert await _read(artifacts, f"blobs/{sha}", offset=MIB + 5) == data[MIB + 5 :]
    assert await _read(artifacts, f"blobs/{sha}", offset=len(data)) == b""
    # The same bytes again: accepted, still one blob.
    again = await artifacts.UploadBlob(_upload_requests(data))
    assert again.blob.sha256 == sha


@pytest.mark.parametrize(
    ("kind", "reason", "field"),
    [
        ("wrong-hash", "HASH_MISMATCH", "header.sha256"),
        ("truncated", "UPLOAD_TRUNCATED", "header.size_bytes"),
        ("too-long", "INVALID_ARGUMENT", "header.size_bytes"),
        ("bad-sha-format", "INVALID_ARGUMENT", "header.sha256"),
    ],
)
async def test_bad_uploads_are_refused_and_leave_nothing(
    mesh: LocalMesh,
    artifacts: artifact_service_pb2_grpc.ArtifactServiceStub,
    kind: str,
    reason: str,
    field: str,
) -> None:
    data = _payload(2 * MIB, seed=hash(kind) % 1000)
    claimed = hashlib.sha256(data).hexdigest()
    make: Callable[[], AsyncIterator[api.UploadBlobRequest]] = {
        "wrong-hash": lambda: _upload_requests(data, sha256=hashlib.sha256(b"other").hexdigest()),
        "truncated": lambda: _upload_requests(data, size=len(data) + 1),
        "too-long": lambda: _upload_requests(data, size=len(data) - 1),
        "bad-sha-format": lambda: _upload_requests(data, sha256="ABC"),
    }[kind]
    # A refusal can race a send still completing: the client is told to try again (UNAVAILABLE)
    # rather than given a wrong answer; the refusal itself comes through on a later attempt.
    for _ in range(10):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await send_all(artifacts.UploadBlob(None), make())
        if raised.value.code() != grpc.StatusCode.UNAVAILABLE:
            break

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(raised.value)
    assert info is not None
    assert (info.reason, info.metadata["field"]) == (reason, field)
    assert field in (raised.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await artifacts.GetBlob(api.GetBlobRequest(name=f"blobs/{claimed}"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert _leftover_uploads(mesh) == []


async def test_an_interrupted_upload_leaves_nothing(
    mesh: LocalMesh, artifacts: artifact_service_pb2_grpc.ArtifactServiceStub
) -> None:
    data = _payload(8 * MIB, seed=99)
    sent = asyncio.Event()

    async def stalls() -> AsyncIterator[api.UploadBlobRequest]:
        promised = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        async for request in _upload_requests(data[: 3 * MIB], **promised):  # type: ignore[arg-type]
            yield request
        sent.set()
        await asyncio.sleep(3600)

    call = artifacts.UploadBlob(stalls())
    await sent.wait()
    await until(lambda: bool(_leftover_uploads(mesh)), "the upload never started")
    call.cancel()
    await until(lambda: not _leftover_uploads(mesh), "the cut-off upload was left behind")


async def test_upload_must_start_with_a_header(
    artifacts: artifact_service_pb2_grpc.ArtifactServiceStub,
) -> None:
    async def headless() -> AsyncIterator[api.UploadBlobRequest]:
        yield api.UploadBlobRequest(chunk=b"data")

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await artifacts.UploadBlob(headless())
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "header" in (raised.value.details() or "")


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        (api.ReadBlobRequest(name="blobs/" + "0" * 64), grpc.StatusCode.NOT_FOUND),
        (api.ReadBlobRequest(name="blobs/xyz"), grpc.StatusCode.INVALID_ARGUMENT),
        (api.ReadBlobRequest(name="files/" + "0" * 64), grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
async def test_reading_a_missing_or_misnamed_blob(
    artifacts: artifact_service_pb2_grpc.ArtifactServiceStub,
    request_: api.ReadBlobRequest,
    code: grpc.StatusCode,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _read(artifacts, request_.name)
    assert raised.value.code() == code


async def test_a_200_mb_upload_keeps_the_registry_s_memory_flat(
    mesh: LocalMesh, artifacts: artifact_service_pb2_grpc.ArtifactServiceStub
) -> None:
    size, chunk = 200 * MIB, _payload(MIB, seed=7)
    hasher = hashlib.sha256()
    for _ in range(size // MIB):
        hasher.update(chunk)

    async def requests() -> AsyncIterator[api.UploadBlobRequest]:
        yield api.UploadBlobRequest(
            header=api.UploadBlobHeader(sha256=hasher.hexdigest(), size_bytes=size)
        )
        for _ in range(size // MIB):
            yield api.UploadBlobRequest(chunk=chunk)

    registry = psutil.Process(mesh.services["registry"].pid)
    baseline = registry.memory_info().rss
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, registry.memory_info().rss)
            done.wait(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        reply = await artifacts.UploadBlob(requests(), timeout=120)
    finally:
        done.set()
        sampler.join()
    assert reply.blob.size_bytes == size
    growth = peak - baseline
    print(f"200 MiB upload: registry RSS {baseline / MIB:.0f} MiB, peak +{growth / MIB:.1f} MiB")
    # Streaming holds a few parts in flight (8 MiB each) and what gRPC buffers ahead of a busy
    # registry (about 30 MiB on an idle machine, up to 85 on a loaded one), never the 200 MB:
    # holding the blob would grow the process by at least its size.
    assert growth < size / 2, f"registry grew by {growth / MIB:.0f} MiB during the upload"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


async def _chunks(data: bytes, size: int = MIB) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def test_s3_compatible_store_round_trips_and_refuses_bad_bytes(s3_endpoint: str) -> None:
    boto3.client(
        "s3", endpoint_url=s3_endpoint, region_name="us-east-1",
        aws_access_key_id="test", aws_secret_access_key="test",
    ).create_bucket(Bucket="shard-blobs")  # fmt: skip
    store = BlobStore.s3(
        bucket="shard-blobs",
        prefix="test",
        endpoint=s3_endpoint,
        region="us-east-1",
        access_key_id="test",
        secret_access_key="test",
        allow_http=True,
    )
    data = _payload(20 * MIB + 3, seed=5)  # several multipart parts
    sha = hashlib.sha256(data).hexdigest()

    stored = await store.put(sha, len(data), _chunks(data))

    assert stored.size_bytes == len(data)
    assert (await store.stat(sha)) == stored
    assert b"".join([chunk async for chunk in store.read(sha)]) == data
    assert b"".join([chunk async for chunk in store.read(sha, offset=10)]) == data[10:]

    other = _payload(MIB, seed=6)
    wrong = hashlib.sha256(b"not these bytes").hexdigest()
    with pytest.raises(InvalidArgumentError, match=r"header\.sha256"):
        await store.put(wrong, len(other), _chunks(other))
    objects = boto3.client(
        "s3", endpoint_url=s3_endpoint, region_name="us-east-1",
        aws_access_key_id="test", aws_secret_access_key="test",
    ).list_objects_v2(Bucket="shard-blobs").get("Contents", [])  # fmt: skip
    assert [obj["Key"] for obj in objects] == [f"test/sha256/{sha[:2]}/{sha}"]
