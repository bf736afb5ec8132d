"""The node's keys, made on first start and kept, owner-only, in the state dir: the Ed25519
identity key (the node id is its hash) and the X25519 key owners encrypt tasks to, vouched for
by the identity key."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from shard.node.v1 import node_pb2
from shard_core.identity import node_id_for
from shard_core.sealing import (
    encryption_key,
    encryption_key_message,
    raw_public_key,
    signing_key,
)

KEY_FILE = "identity.key"
ENCRYPTION_KEY_FILE = "encryption.key"


@dataclass(frozen=True, kw_only=True)
class NodeIdentity:
    private_key: Ed25519PrivateKey
    public_key: bytes
    node_id: str
    encryption_key: X25519PrivateKey

    @classmethod
    def load_or_create(cls, state_dir: Path) -> NodeIdentity:
        key = signing_key(state_dir / KEY_FILE)
        public = raw_public_key(key)
        return cls(
            private_key=key,
            public_key=public,
            node_id=node_id_for(public),
            encryption_key=encryption_key(state_dir / ENCRYPTION_KEY_FILE),
        )

    def vouched_encryption_key(self) -> node_pb2.EncryptionKey:
        """The encryption key's public half, signed with the identity key."""
        public = raw_public_key(self.encryption_key)
        return node_pb2.EncryptionKey(
            public_key=public,
            signature=self.private_key.sign(encryption_key_message(self.node_id, public)),
        )
