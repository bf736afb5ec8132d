"""What a node signs to prove who it is and what it has, and how the registry checks it.

The signed bytes bind the registry's single-use nonce, the exact inventory, the time and the node
id, under a domain label so a signature made for anything else can never pass as an attestation.
"""

from __future__ import annotations

import hashlib

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shard.node.v1 import node_pb2

DOMAIN = b"shard-attestation-v1\x00"


def inventory_digest(inventory: node_pb2.Inventory) -> bytes:
    return hashlib.sha256(inventory.SerializeToString(deterministic=True)).digest()


def signed_bytes(
    *, nonce: bytes, inventory: node_pb2.Inventory, time_ms: int, node_id: str
) -> bytes:
    """The bytes an attestation's signature covers."""
    return (
        DOMAIN
        + nonce
        + inventory_digest(inventory)
        + time_ms.to_bytes(8, "big", signed=True)
        + node_id.encode()
    )


def signature_valid(
    *, public_key: bytes, signature: bytes, nonce: bytes, inventory: node_pb2.Inventory,
    time_ms: int, node_id: str,
) -> bool:  # fmt: skip
    """Whether `signature` is the node's Ed25519 signature over the attestation."""
    message = signed_bytes(nonce=nonce, inventory=inventory, time_ms=time_ms, node_id=node_id)
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True
