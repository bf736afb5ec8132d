"""What grows with use is bounded: keys per principal and their rates, blob bytes per
principal and per upload, and old keys, join tokens, enrollments and unreferenced blobs are
forgotten. The domain on real etcd and a real blob store, with limits small enough to reach
and a clock the test moves; then the same limits through the registry's gRPC API."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from shard.artifact.v1 import artifact_service_pb2 as artifact_api
from shard.artifact.v1 import artifact_service_pb2_grpc
from shard.auth.v1 import api_key_pb2, key_service_pb2_grpc
from shard.auth.v1 import key_service_pb2 as key_api
from shard.model.v1 import model_pb2
from shard.node.v1 import node_service_pb2
from shard.task.v1 import task_pb2
from shard_core import keys
from shard_core.auth import BOOTSTRAP_ADMIN, ROLE_PERMISSIONS, KeyRing, Principal
from shard_core.errors import InvalidArgumentError, ResourceExhaustedError
from shard_core.etcd.store import EtcdStore
from shard_registry.apikeys import KeyLimits, KeyRegistry
from shard_registry.artifacts import BlobStore
from shard_registry.blob_ledger import BlobLedger, BlobLimits
from shard_registry.enrollment import Enrollment
from shard_registry.resources import timestamp
from shard_tool.local import LocalMesh
from tests.fake_node import refused

DAY = 24 * 3600.0


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def _principal(name: str, role: api_key_pb2.Role.ValueType) -> Principal:
    return Principal(id=name, role=role, permissions=ROLE_PERMISSIONS[role])


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def test_old_keys_are_forgotten_everywhere(store: EtcdStore) -> None:
    clock = Clock()
    ring = KeyRing(clock=clock)
    registry = KeyRegistry(store, ring, limits=KeyLimits(retention_s=DAY), clock=clock)
    key = api_key_pb2.ApiKey(principal="old", role=api_key_pb2.ROLE_DEVELOPER)
    revoked, _ = await registry.create(key, BOOTSTRAP_ADMIN)
    await registry.revoke(revoked.name, BOOTSTRAP_ADMIN)
    kept, secret = await registry.create(key, BOOTSTRAP_ADMIN)
    expiring = api_key_pb2.ApiKey()
    expiring.CopyFrom(key)
    expiring.expire_time.CopyFrom(timestamp(clock.now + 60))
    expired, _ = await registry.create(expiring, BOOTSTRAP_ADMIN)

    assert await registry.prune() == 0  # within the retention, a revoked key is still shown
    clock.now += DAY + 120
    assert await registry.prune() == 2
    names = {e.key for e in (await store.snapshot(keys.API_KEYS)).entries}
    assert names == {f"keys/{kept.name.removeprefix('keys/')}"}
    assert ring.authenticate(f"Bearer {secret}").id == "old"
    assert ring.active_keys("old") == 1
    assert expired.name not in names


async def test_join_tokens_and_enrollments_of_nodes_long_gone_are_forgotten(
    store: EtcdStore,
) -> None:
    clock = Clock()
    enrollment = Enrollment(
        store=store, clock=clock, token_retention_s=DAY, enrollment_retention_s=30 * DAY
    )
    spent = await enrollment.create_token(node_service_pb2.JoinToken(ttl_seconds=3600), "p")
    unused = await enrollment.create_token(node_service_pb2.JoinToken(ttl_seconds=3600), "p")
    gone = await enrollment.enroll(node_id="ngone", public_key=b"k" * 32, token=spent.token)
    back = await enrollment.enroll_without_token(node_id="nback", public_key=b"k" * 32)
    live = await enrollment.enroll_without_token(node_id="nlive", public_key=b"k" * 32)
    assert gone.register_time.seconds > 0

    assert await enrollment.prune(live=lambda node: node == "nlive") == (0, 0)
    clock.now += 20 * DAY
    await enrollment.seen("nback", back)  # it registered again meanwhile
    clock.now += 11 * DAY
    assert await enrollment.prune(live=lambda node: node == "nlive") == (2, 1)
    assert await store.get(keys.join_token(unused.name.removeprefix("joinTokens/"))) is None
    assert await store.get(keys.enrolled("ngone")) is None
    assert await store.get(keys.enrolled("nback")) is not None
    assert await store.get(keys.enrolled("nlive")) is not None
    assert live.public_key


async def test_blob_bytes_are_charged_capped_and_collected(
    store: EtcdStore, tmp_path: Path
) -> None:
    clock = Clock()
    blobs = BlobStore.local(tmp_path / "blobs")
    ledger = BlobLedger(
        store=store,
        blobs=blobs,
        limits=BlobLimits(max_blob_bytes=1000, quota_bytes=1500, gc_grace_s=DAY),
        clock=clock,
    )
    alice = _principal("alice", api_key_pb2.ROLE_DEVELOPER)
    bob = _principal("bob", api_key_pb2.ROLE_DEVELOPER)
    with pytest.raises(InvalidArgumentError) as too_big:
        ledger.check_size(1001)
    assert too_big.value.reason == "BLOB_TOO_LARGE"
    with pytest.raises(InvalidArgumentError):
        ledger.check_size(-1)  # a negative size would refund its sender

    async def upload(who: Principal, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if await ledger.reserve(who, sha, len(data)):
            await blobs.put(sha, len(data), _one(data))
            assert await ledger.hold(who, sha, len(data))
        return sha

    kept = await upload(alice, b"k" * 600)
    orphan = await upload(alice, b"o" * 600)
    await upload(alice, b"o" * 600)  # the same blob again is not charged twice
    assert await ledger.usage("alice") == 1200
    # Reservations count: an upload in flight holds its bytes until it ends.
    with pytest.raises(ResourceExhaustedError) as over:
        await ledger.reserve(alice, "1" * 64, 400)
    assert over.value.reason == "QUOTA_EXCEEDED"
    shared = await upload(bob, b"o" * 600)  # bob stores the same bytes: both are charged
    assert shared == orphan
    assert await ledger.usage("bob") == 600

    # A model version refers to one blob; nothing refers to the other.
    version = model_pb2.ModelVersion(files=[model_pb2.ModelFile(path="m", sha256=kept)])
    await store.put(keys.version("m", "1"), version.SerializeToString())
    task = task_pb2.Task(input=f"blobs/{'0' * 64}")
    await store.put(keys.task("t"), task.SerializeToString())
    abandoned = tmp_path / "blobs" / "uploads" / "crashed"
    abandoned.parent.mkdir(parents=True, exist_ok=True)
    abandoned.write_bytes(b"half")

    assert await ledger.collect() == 0  # within the grace period nothing goes
    clock.now += DAY + 60
    assert await ledger.collect() == 1
    assert await blobs.stat(orphan) is None
    assert await blobs.stat(kept) is not None
    assert not abandoned.exists()
    assert await ledger.usage("alice") == 600
    assert await ledger.usage("bob") == 0
    assert await ledger.reserve(alice, "1" * 64, 900)  # room again


async def _create_key(channel: grpc.aio.Channel, secret: str, **fields: object) -> str:
    reply = await key_service_pb2_grpc.KeyServiceStub(channel).CreateApiKey(
        key_api.CreateApiKeyRequest(api_key=api_key_pb2.ApiKey(**fields)),  # type: ignore[arg-type]
        metadata=(("authorization", f"Bearer {secret}"),),
    )
    return reply.secret


async def test_keys_reach_no_further_than_their_creator(mesh: LocalMesh) -> None:
    developer = api_key_pb2.ROLE_DEVELOPER
    async with grpc.aio.insecure_channel(mesh.registry_address) as channel:
        first = await _create_key(
            channel, mesh.admin_token, principal="capped", role=developer, rate_limit_rps=5
        )
        error = await refused(
            _create_key(channel, first, principal="capped", role=developer, rate_limit_rps=6),
            grpc.StatusCode.PERMISSION_DENIED,
            "RATE_ABOVE_YOURS",
        )
        assert "api_key.rate_limit_rps" in (error.details() or "")
        # A key that names no rate gets its creator's, not the shard's default.
        second = await _create_key(channel, first, principal="capped", role=developer)
        keys_stub = key_service_pb2_grpc.KeyServiceStub(channel)
        listed = await keys_stub.ListApiKeys(
            key_api.ListApiKeysRequest(), metadata=(("authorization", f"Bearer {second}"),)
        )
        assert {k.rate_limit_rps for k in listed.api_keys} == {5}

        # At most 100 working keys a principal (SHARD_REGISTRY_MAX_KEYS_PER_PRINCIPAL).
        made = 2
        while made < 100:
            await _create_key(channel, first, principal="capped", role=developer)
            made += 1
        await refused(
            _create_key(channel, first, principal="capped", role=developer),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "TOO_MANY_KEYS",
        )


def _held_upload(
    stub: artifact_service_pb2_grpc.ArtifactServiceStub, secret: str, size: int
) -> grpc.aio.StreamUnaryCall[artifact_api.UploadBlobRequest, artifact_api.UploadBlobResponse]:
    """An upload that declares `size` bytes, sends one and waits: its reservation stands until
    it is cancelled."""

    async def requests() -> AsyncIterator[artifact_api.UploadBlobRequest]:
        header = artifact_api.UploadBlobHeader(sha256="0" * 64, size_bytes=size)
        yield artifact_api.UploadBlobRequest(header=header)
        yield artifact_api.UploadBlobRequest(chunk=b"x")
        await asyncio.Event().wait()

    return stub.UploadBlob(requests(), metadata=(("authorization", f"Bearer {secret}"),))


async def _until_usage(store: EtcdStore, principal: str, used: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        found = await store.get(keys.blob_usage(principal))
        if (json.loads(found.value)["bytes"] if found else 0) == used:
            return
        assert time.monotonic() < deadline, f"{principal} never used {used} bytes"
        await asyncio.sleep(0.1)


async def test_uploads_are_capped_and_charged_before_their_first_byte(mesh: LocalMesh) -> None:
    store = EtcdStore(mesh.etcd.settings())  # the mesh's own records
    async with grpc.aio.insecure_channel(mesh.registry_address) as channel:
        secret = await _create_key(
            channel, mesh.admin_token, principal="uploader", role=api_key_pb2.ROLE_DEVELOPER
        )
        stub = artifact_service_pb2_grpc.ArtifactServiceStub(channel)
        # The test mesh holds a principal to 1 GiB of blobs, 768 MiB an upload.
        await refused(
            _held_upload(stub, secret, 800 << 20),
            grpc.StatusCode.INVALID_ARGUMENT,
            "BLOB_TOO_LARGE",
        )
        first = _held_upload(stub, secret, 600 << 20)
        await _until_usage(store, "uploader", 600 << 20)
        error = await refused(
            _held_upload(stub, secret, 600 << 20),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "QUOTA_EXCEEDED",
        )
        assert "quota" in (error.details() or "")
        # A broken upload gives its bytes back.
        first.cancel()
        await _until_usage(store, "uploader", 0)
        third = _held_upload(stub, secret, 600 << 20)
        await _until_usage(store, "uploader", 600 << 20)
        third.cancel()
        await _until_usage(store, "uploader", 0)
    await store.close()
