"""The content-addressed blob store: model files and task payloads, by SHA-256.

Blobs live in any object store obstore speaks: a local directory by default, S3 or anything
S3-compatible when configured. An upload streams into a temporary object while it is hashed;
only when its size and SHA-256 match what the uploader declared is it moved to its final name,
`sha256/{first two hex digits}/{sha256}`. A wrong hash, a wrong size or an interrupted upload
leaves nothing behind. Nothing is ever held whole in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import uuid
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import obstore
from obstore.store import LocalStore, ObjectStore, S3Store

from shard_core.errors import InvalidArgumentError, NotFoundError

SHA256 = re.compile(r"[0-9a-f]{64}")
PART_BYTES = 8 * 1024 * 1024
READ_CHUNK_BYTES = 1024 * 1024
UPLOADS = "uploads/"


@dataclass(frozen=True, kw_only=True)
class StoredBlob:
    sha256: str
    size_bytes: int

    @property
    def name(self) -> str:
        return f"blobs/{self.sha256}"


def blob_sha256(name: str, field: str = "name") -> str:
    """The SHA-256 in a blob resource name, `blobs/{sha256}`."""
    sha = name.removeprefix("blobs/")
    if sha == name or not SHA256.fullmatch(sha):
        raise InvalidArgumentError(
            f"{field} must be blobs/{{sha256}} with 64 lowercase hex digits, got {name!r}",
            metadata={"field": field},
        )
    return sha


def _path(sha: str) -> str:
    return f"sha256/{sha[:2]}/{sha}"


class BlobStore:
    def __init__(self, store: ObjectStore) -> None:
        self._store = store

    @classmethod
    def local(cls, root: Path) -> BlobStore:
        root.mkdir(parents=True, exist_ok=True)
        return cls(LocalStore(prefix=root.resolve()))

    @classmethod
    def s3(
        cls,
        *,
        bucket: str,
        prefix: str,
        endpoint: str | None,
        region: str,
        access_key_id: str | None,
        secret_access_key: str | None,
        allow_http: bool,
    ) -> BlobStore:
        config: dict[str, str] = {"region": region}
        if endpoint:
            config["endpoint"] = endpoint
        if access_key_id and secret_access_key:
            config |= {"access_key_id": access_key_id, "secret_access_key": secret_access_key}
        return cls(
            S3Store(
                bucket,
                prefix=prefix or None,
                config=config,  # type: ignore[arg-type]
                client_options={"allow_http": allow_http},
            )
        )

    async def stat(self, sha: str) -> StoredBlob | None:
        try:
            meta = await obstore.head_async(self._store, _path(sha))
        except FileNotFoundError:
            return None
        return StoredBlob(sha256=sha, size_bytes=meta["size"])

    async def put(self, sha: str, size: int, chunks: AsyncIterable[bytes]) -> StoredBlob:
        """Store the bytes of `chunks` as blob `sha`, refusing them unless they hash to `sha` and
        add up to `size` bytes."""
        if not SHA256.fullmatch(sha):
            raise InvalidArgumentError(
                "header.sha256 must be 64 lowercase hex digits",
                metadata={"field": "header.sha256"},
            )
        if size < 0:
            raise InvalidArgumentError(
                "header.size_bytes must not be negative", metadata={"field": "header.size_bytes"}
            )
        hasher = hashlib.sha256()
        received = 0

        async def verified() -> AsyncIterator[bytes]:
            nonlocal received
            async for chunk in chunks:
                received += len(chunk)
                if received > size:
                    raise InvalidArgumentError(
                        f"more bytes arrived than header.size_bytes ({size})",
                        metadata={"field": "header.size_bytes"},
                    )
                hasher.update(chunk)
                yield chunk

        existing = await self.stat(sha)
        temporary = f"{UPLOADS}{uuid.uuid4().hex}"
        stored = False
        try:
            if existing is not None:
                async for _ in verified():  # verify what is sent, but keep the one copy
                    pass
            elif size == 0:
                async for _ in verified():
                    pass
                await obstore.put_async(self._store, temporary, b"")
                stored = True
            else:
                await obstore.put_async(
                    self._store, temporary, verified(), chunk_size=PART_BYTES, max_concurrency=2
                )
                stored = True
            if received != size:
                raise InvalidArgumentError(
                    f"upload truncated: {received} of header.size_bytes ({size}) bytes arrived",
                    reason="UPLOAD_TRUNCATED",
                    metadata={"field": "header.size_bytes"},
                )
            if hasher.hexdigest() != sha:
                raise InvalidArgumentError(
                    f"the bytes hash to {hasher.hexdigest()}, not header.sha256 {sha}",
                    reason="HASH_MISMATCH",
                    metadata={"field": "header.sha256"},
                )
            if stored:
                await obstore.rename_async(self._store, temporary, _path(sha))
                stored = False
        finally:
            if stored:
                with contextlib.suppress(Exception):
                    await obstore.delete_async(self._store, temporary)
        return StoredBlob(sha256=sha, size_bytes=size)

    async def delete(self, sha: str) -> None:
        """Remove blob `sha` (garbage collection); a blob already gone is no error."""
        with contextlib.suppress(FileNotFoundError):
            await obstore.delete_async(self._store, _path(sha))

    async def forget_abandoned_uploads(self, older_than: float) -> int:
        """Delete temporary objects of uploads that began before `older_than` (epoch seconds)
        and never finished: what a registry killed mid-upload leaves. Returns how many."""
        abandoned = []
        async for batch in obstore.list(self._store, prefix=UPLOADS):
            abandoned += [
                meta["path"] for meta in batch if meta["last_modified"].timestamp() < older_than
            ]
        for path in abandoned:
            with contextlib.suppress(FileNotFoundError):
                await obstore.delete_async(self._store, path)
        return len(abandoned)

    async def read(self, sha: str, *, offset: int = 0) -> AsyncIterator[bytes]:
        """The blob's bytes from `offset`, in chunks of about a mebibyte."""
        blob = await self.stat(sha)
        if blob is None:
            raise NotFoundError(f"blob blobs/{sha} not found", metadata={"name": f"blobs/{sha}"})
        if not 0 <= offset <= blob.size_bytes:
            raise InvalidArgumentError(
                f"offset must be between 0 and the blob's size {blob.size_bytes}",
                metadata={"field": "offset"},
            )
        if offset == blob.size_bytes:
            return
        result = await obstore.get_async(
            self._store, _path(sha), options={"range": {"offset": offset}}
        )
        async for chunk in result.stream(min_chunk_size=READ_CHUNK_BYTES):
            yield bytes(chunk)
