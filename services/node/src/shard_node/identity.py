"""The node's Ed25519 identity key, made on first start and kept, owner-only, in the state dir."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shard_core.identity import node_id_for

KEY_FILE = "identity.key"


@dataclass(frozen=True, kw_only=True)
class NodeIdentity:
    private_key: Ed25519PrivateKey
    public_key: bytes
    node_id: str

    @classmethod
    def load_or_create(cls, state_dir: Path) -> NodeIdentity:
        path = state_dir / KEY_FILE
        if path.exists():
            mode = path.stat().st_mode & 0o777
            if mode & 0o077:
                raise PermissionError(f"{path} is readable by others (mode {mode:o}); want 600")
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError(f"{path} does not hold an Ed25519 key")
        else:
            key = Ed25519PrivateKey.generate()
            state_dir.mkdir(parents=True, exist_ok=True)
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as file:
                file.write(pem)
        public = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return cls(private_key=key, public_key=public, node_id=node_id_for(public))
