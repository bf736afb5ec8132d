"""Node identity: a node's id is derived from its Ed25519 public key, so it cannot be chosen."""

from __future__ import annotations

import base64
import hashlib

ED25519_PUBLIC_KEY_BYTES = 32


def node_id_for(public_key: bytes) -> str:
    """The node id that belongs to `public_key`: `n` and 32 lowercase base32 characters."""
    if len(public_key) != ED25519_PUBLIC_KEY_BYTES:
        raise ValueError(f"an Ed25519 public key has {ED25519_PUBLIC_KEY_BYTES} bytes")
    digest = hashlib.sha256(public_key).digest()[:20]
    return "n" + base64.b32encode(digest).decode().lower()
