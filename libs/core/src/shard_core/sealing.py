"""Sealing data to one recipient, and what encrypted tasks sign and bind.

A sealed stream is `shard-sealed-v1\\n`, then frames: a 4-byte big-endian length and one HPKE
message (RFC 9180 base mode: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305, from
`cryptography`) holding the next mebibyte of plaintext. Each message's `info` is the stream's
context (what it is bound to: task, provider, expiry), the frame's index and whether it is the
last, so frames cannot be reordered, dropped, cut short or moved to another stream or task. Only
the holder of the recipient's X25519 private key can open it; any change is refused.

Signed statements (`result_message`, `encryption_key_message`) are a fixed label and then
length-prefixed fields, so no two different statements have the same bytes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, TypeVar

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hpke, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from shard.node.v1 import node_pb2
from shard_core.identity import node_id_for

SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)
MAGIC = b"shard-sealed-v1\n"
STREAM_ID_BYTES = 16
CHUNK_BYTES = 1 << 20
# A frame holds one chunk, the encapsulated key (32 bytes) and the tag (16 bytes).
MAX_FRAME_BYTES = CHUNK_BYTES + 64
X25519_KEY_BYTES = 32

PrivateKey = TypeVar("PrivateKey", Ed25519PrivateKey, X25519PrivateKey)


class SealError(Exception):
    """Sealed bytes that do not open: tampered with, cut short, for another key or context."""


def fields(*parts: str | bytes) -> bytes:
    """Each part as a 4-byte big-endian length and its bytes (strings as UTF-8)."""
    out = bytearray()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        out += len(data).to_bytes(4, "big") + data
    return bytes(out)


def task_input_context(task: str, provider: str, expire_time_ms: int) -> bytes:
    """What a task's sealed job is bound to: the task, its provider and its expiry."""
    return b"shard-task-input-v1" + fields(task, provider, str(expire_time_ms))


def task_output_context(task: str, provider: str, task_input: str) -> bytes:
    """What a task's sealed results are bound to: the task, the provider and the job."""
    return b"shard-task-output-v1" + fields(task, provider, task_input)


def result_message(task: str, task_input: str, output: str, result_key: bytes) -> bytes:
    """What a provider signs when it completes a task: the task, its input, its output and the
    key the output is sealed to (empty: in the clear, as the owner's sealed job asked)."""
    return b"shard-task-result-v2" + fields(task, task_input, output, result_key)


def encryption_key_message(node_id: str, public_key: bytes) -> bytes:
    """What a node signs to vouch for its encryption key."""
    return b"shard-encryption-key-v1" + fields(node_id) + public_key


def signed_by(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """Whether `signature` is the Ed25519 signature of `message` by `public_key` (raw)."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def node_encryption_key(node: node_pb2.Node) -> X25519PublicKey:
    """The node's task encryption key, once checked: the identity key is the one the node id is
    the hash of, and it signed the encryption key. SealError if not."""
    node_id = node.name.removeprefix("nodes/")
    try:
        owns_id = node_id_for(node.public_key) == node_id
    except ValueError:
        owns_id = False
    key = node.encryption_key
    if not (owns_id and key.public_key):
        raise SealError(f"{node.name} has no encryption key vouched for by its identity")
    if not signed_by(
        node.public_key, key.signature, encryption_key_message(node_id, key.public_key)
    ):
        raise SealError(f"the encryption key of {node.name} is not signed by its identity key")
    try:
        return x25519_public_key(key.public_key)
    except ValueError as error:
        raise SealError(f"the encryption key of {node.name}: {error}") from error


def x25519_public_key(raw: bytes) -> X25519PublicKey:
    if len(raw) != X25519_KEY_BYTES:
        raise ValueError(f"an X25519 public key has {X25519_KEY_BYTES} bytes, not {len(raw)}")
    return X25519PublicKey.from_public_bytes(raw)


def raw_public_key(key: X25519PrivateKey | Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _info(context: bytes, stream: bytes, index: int, last: bool) -> bytes:
    return context + stream + index.to_bytes(8, "big") + (b"\x01" if last else b"\x00")


def _rechunked(data: Iterable[bytes]) -> Iterator[bytes]:
    buffer = bytearray()
    for piece in data:
        buffer += piece
        while len(buffer) >= CHUNK_BYTES:
            yield bytes(buffer[:CHUNK_BYTES])
            del buffer[:CHUNK_BYTES]
    yield bytes(buffer)


def seal(data: Iterable[bytes], recipient: X25519PublicKey, context: bytes) -> Iterator[bytes]:
    """The sealed stream of `data`, for `recipient`, bound to `context`."""
    stream = os.urandom(STREAM_ID_BYTES)
    yield MAGIC + stream
    chunks = _rechunked(data)
    current = next(chunks)
    index = 0
    for following in chunks:
        yield _frame(current, recipient, _info(context, stream, index, last=False))
        current, index = following, index + 1
    yield _frame(current, recipient, _info(context, stream, index, last=True))


def _frame(chunk: bytes, recipient: X25519PublicKey, info: bytes) -> bytes:
    message = SUITE.encrypt(chunk, recipient, info=info)
    return len(message).to_bytes(4, "big") + message


class Opener:
    """Opens a sealed stream fed in pieces of any size; `finish` checks it was complete."""

    def __init__(self, private_key: X25519PrivateKey, context: bytes) -> None:
        self._key = private_key
        self._context = context
        self._buffer = bytearray()
        self._index = 0
        self._stream = b""  # the stream id, once the header is read
        self._done = False

    def feed(self, data: bytes) -> list[bytes]:
        """The plaintext chunks `data` completes."""
        self._buffer += data
        if not self._stream:
            header = len(MAGIC) + STREAM_ID_BYTES
            if len(self._buffer) < header:
                return []
            if self._buffer[: len(MAGIC)] != MAGIC:
                raise SealError("not a sealed stream (bad header)")
            self._stream = bytes(self._buffer[len(MAGIC) : header])
            del self._buffer[:header]
        out = []
        while len(self._buffer) >= 4:
            size = int.from_bytes(self._buffer[:4], "big")
            if size > MAX_FRAME_BYTES:
                raise SealError(f"frame {self._index} is too large ({size} bytes)")
            if len(self._buffer) < 4 + size:
                break
            if self._done:
                raise SealError("bytes after the last frame")
            message = bytes(self._buffer[4 : 4 + size])
            del self._buffer[: 4 + size]
            out.append(self._open(message))
        return out

    def _open(self, message: bytes) -> bytes:
        for last in (False, True):
            try:
                plain = SUITE.decrypt(
                    message, self._key, info=_info(self._context, self._stream, self._index, last)
                )
            except InvalidTag:
                continue
            self._index += 1
            self._done = last
            return plain
        raise SealError(
            f"frame {self._index} does not open: tampered with, or sealed for another key, "
            "task or provider"
        )

    def finish(self) -> None:
        if not self._done or self._buffer:
            raise SealError("the sealed stream is cut short")


def seal_file(source: Path, target: Path, recipient: X25519PublicKey, context: bytes) -> None:
    """Seal the file `source` into `target` (owner-only)."""
    with source.open("rb") as plain, _private(target) as out:
        for piece in seal(iter(lambda: plain.read(CHUNK_BYTES), b""), recipient, context):
            out.write(piece)


def open_file(source: Path, target: Path, private_key: X25519PrivateKey, context: bytes) -> None:
    """Open the sealed file `source` into `target` (owner-only); SealError if it does not."""
    opener = Opener(private_key, context)
    with source.open("rb") as sealed, _private(target) as out:
        while piece := sealed.read(CHUNK_BYTES):
            for chunk in opener.feed(piece):
                out.write(chunk)
        opener.finish()


def _private(path: Path) -> BinaryIO:
    """`path` opened for writing, readable by its owner only."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb")


def _load_or_create(path: Path, generate: Callable[[], PrivateKey]) -> PrivateKeyTypes:
    """The private key in `path` (PEM, owner-only), made by `generate` and written there the
    first time."""
    if path.exists():
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise PermissionError(f"{path} is readable by others (mode {mode:o}); want 600")
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    fresh = generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = fresh.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(pem)
    return fresh


def signing_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 key in `path`, made the first time."""
    key = _load_or_create(path, Ed25519PrivateKey.generate)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} does not hold an Ed25519 key")
    return key


def encryption_key(path: Path) -> X25519PrivateKey:
    """The X25519 key in `path`, made the first time."""
    key = _load_or_create(path, X25519PrivateKey.generate)
    if not isinstance(key, X25519PrivateKey):
        raise ValueError(f"{path} does not hold an X25519 key")
    return key
