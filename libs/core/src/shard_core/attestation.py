"""What a node signs to prove who it is and what it has, and how the registry checks it.

The signed bytes bind the registry's single-use nonce, the exact inventory, the time, the node id
and any hardware evidence, under a domain label so a signature made for anything else can never
pass as an attestation. Hardware evidence (a GPU's confidential-computing report, a TPM quote) is
made over `evidence_nonce`, which ties it to this challenge and this node.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shard.node.v1 import node_pb2, node_service_pb2

DOMAIN = b"shard-attestation-v1\x00"
EVIDENCE_DOMAIN = b"shard-hardware-evidence-v1\x00"


def inventory_digest(inventory: node_pb2.Inventory) -> bytes:
    return hashlib.sha256(inventory.SerializeToString(deterministic=True)).digest()


def evidence_nonce(nonce: bytes, node_id: str) -> bytes:
    """The 32 bytes a node's hardware signs into its evidence for the challenge `nonce`."""
    return hashlib.sha256(EVIDENCE_DOMAIN + nonce + node_id.encode()).digest()


def evidence_digest(evidence: Sequence[node_service_pb2.HardwareEvidence]) -> bytes:
    """What the signature covers of the evidence: nothing when there is none."""
    if not evidence:
        return b""
    digest = hashlib.sha256()
    for item in evidence:
        digest.update(hashlib.sha256(item.SerializeToString(deterministic=True)).digest())
    return digest.digest()


def signed_bytes(
    *,
    nonce: bytes,
    inventory: node_pb2.Inventory,
    time_ms: int,
    node_id: str,
    evidence: Sequence[node_service_pb2.HardwareEvidence] = (),
    certificate_request: bytes = b"",
) -> bytes:
    """The bytes an attestation's signature covers."""
    return (
        DOMAIN
        + nonce
        + inventory_digest(inventory)
        + time_ms.to_bytes(8, "big", signed=True)
        + node_id.encode()
        + evidence_digest(evidence)
        + (b"csr" + hashlib.sha256(certificate_request).digest() if certificate_request else b"")
    )


def signature_valid(
    *, public_key: bytes, signature: bytes, nonce: bytes, inventory: node_pb2.Inventory,
    time_ms: int, node_id: str, evidence: Sequence[node_service_pb2.HardwareEvidence] = (),
    certificate_request: bytes = b"",
) -> bool:  # fmt: skip
    """Whether `signature` is the node's Ed25519 signature over the attestation."""
    message = signed_bytes(
        nonce=nonce, inventory=inventory, time_ms=time_ms, node_id=node_id, evidence=evidence,
        certificate_request=certificate_request,
    )  # fmt: skip
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True
