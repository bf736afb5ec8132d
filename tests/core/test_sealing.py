"""Sealed streams open only for their key and context, and only whole and unchanged."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from shard.node.v1 import node_pb2
from shard_core import sealing, taskjob
from shard_node.identity import NodeIdentity

CONTEXT = sealing.task_input_context("tasks/t1", "nodes/n1", 1_700_000_000_000)


def _header(sealed: bytes) -> bytes:
    """The magic and the stream id."""
    return sealed[: len(sealing.MAGIC) + sealing.STREAM_ID_BYTES]


def _frames(sealed: bytes) -> list[bytes]:
    body, frames = sealed[len(_header(sealed)) :], []
    while body:
        size = int.from_bytes(body[:4], "big")
        frames.append(body[: 4 + size])
        body = body[4 + size :]
    return frames


def _open(sealed: bytes, key: X25519PrivateKey, context: bytes = CONTEXT) -> bytes:
    opener = sealing.Opener(key, context)
    plain = b"".join(
        b"".join(opener.feed(sealed[i : i + 4096])) for i in range(0, len(sealed), 4096)
    )
    opener.finish()
    return plain


@pytest.fixture(scope="module")
def key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


@pytest.fixture(scope="module")
def data() -> bytes:
    return os.urandom(2 * sealing.CHUNK_BYTES + 12345)  # three frames


@pytest.fixture(scope="module")
def sealed(key: X25519PrivateKey, data: bytes) -> bytes:
    pieces = [data[i : i + 70_000] for i in range(0, len(data), 70_000)]
    return b"".join(sealing.seal(pieces, key.public_key(), CONTEXT))


def test_a_sealed_stream_opens_whole_for_its_key(
    key: X25519PrivateKey, data: bytes, sealed: bytes
) -> None:
    assert len(_frames(sealed)) == 3
    assert data not in sealed
    assert data[:64] not in sealed
    assert _open(sealed, key) == data
    empty = b"".join(sealing.seal([], key.public_key(), CONTEXT))
    assert _open(empty, key) == b""


@pytest.mark.parametrize(
    "change",
    ["flip a byte", "another key", "another task", "another expiry", "drop the last frame",
     "swap frames", "cut short", "append a frame", "splice two streams", "not sealed"],
)  # fmt: skip
def test_any_change_is_refused(
    key: X25519PrivateKey, data: bytes, sealed: bytes, change: str
) -> None:
    frames = _frames(sealed)
    target, context = key, CONTEXT
    if change == "flip a byte":
        sealed = sealed[:5000] + bytes([sealed[5000] ^ 1]) + sealed[5001:]
    elif change == "another key":
        target = X25519PrivateKey.generate()
    elif change == "another task":
        context = sealing.task_input_context("tasks/t2", "nodes/n1", 1_700_000_000_000)
    elif change == "another expiry":
        context = sealing.task_input_context("tasks/t1", "nodes/n1", 1_800_000_000_000)
    elif change == "drop the last frame":
        sealed = _header(sealed) + b"".join(frames[:-1])
    elif change == "swap frames":
        sealed = _header(sealed) + frames[1] + frames[0] + frames[2]
    elif change == "splice two streams":  # same key, same context, same data: another stream
        other = b"".join(sealing.seal([data], key.public_key(), CONTEXT))
        sealed = _header(sealed) + frames[0] + _frames(other)[1] + frames[2]
    elif change == "cut short":
        sealed = sealed[:-10]
    elif change == "append a frame":
        sealed += frames[-1]
    else:
        sealed = b"plain text, not sealed at all"
    with pytest.raises(sealing.SealError):
        _open(sealed, target, context)


def test_files_seal_and_open_owner_only(tmp_path: Path, key: X25519PrivateKey) -> None:
    source = tmp_path / "job.jsonl"
    source.write_bytes(b'{"id": "1"}\n' * 1000)
    sealing.seal_file(source, tmp_path / "sealed", key.public_key(), CONTEXT)
    sealing.open_file(tmp_path / "sealed", tmp_path / "opened", key, CONTEXT)
    assert (tmp_path / "opened").read_bytes() == source.read_bytes()
    assert (tmp_path / "opened").stat().st_mode & 0o077 == 0


def test_node_encryption_keys_are_vouched_for_by_the_identity(tmp_path: Path) -> None:
    identity = NodeIdentity.load_or_create(tmp_path / "a")
    again = NodeIdentity.load_or_create(tmp_path / "a")
    assert sealing.raw_public_key(again.encryption_key) == sealing.raw_public_key(
        identity.encryption_key
    )
    assert (tmp_path / "a" / "encryption.key").stat().st_mode & 0o077 == 0
    node = node_pb2.Node(
        name=f"nodes/{identity.node_id}",
        public_key=identity.public_key,
        encryption_key=identity.vouched_encryption_key(),
    )
    sealing.node_encryption_key(node)  # checks out
    impostor = NodeIdentity.load_or_create(tmp_path / "b")
    swapped = node_pb2.Node()
    swapped.CopyFrom(node)
    swapped.encryption_key.public_key = sealing.raw_public_key(impostor.encryption_key)
    with pytest.raises(sealing.SealError, match="not signed"):
        sealing.node_encryption_key(swapped)
    other_identity = node_pb2.Node()
    other_identity.CopyFrom(node)
    other_identity.public_key = impostor.public_key  # a key the node id is not the hash of
    with pytest.raises(sealing.SealError, match="no encryption key vouched"):
        sealing.node_encryption_key(other_identity)


def test_job_headers_must_match_the_task() -> None:
    key, owner = os.urandom(32), os.urandom(32)
    task: dict[str, Any] = {
        "task": "tasks/t1", "provider": "nodes/n1", "model": "simple", "result_key": owner
    }  # fmt: skip
    line = taskjob.header(**task, verify_key=key)
    assert taskjob.check_header(line, **task) == key
    changes = (
        ("task", "tasks/t2"), ("provider", "nodes/n2"), ("model", "other"),
        ("result_key", b""),  # results in the clear, though the owner sealed for its key
        ("result_key", os.urandom(32)),  # or to another key
    )  # fmt: skip
    for field, value in changes:
        with pytest.raises(taskjob.JobError, match=field):
            taskjob.check_header(line, **(task | {field: value}))
    for bad in (b"not json", b'{"id": "1", "inputs": []}', b"[1]", b"[" * 100_000):
        with pytest.raises(taskjob.JobError):
            taskjob.check_header(bad, **task)
