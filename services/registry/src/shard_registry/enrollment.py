"""Who may join the shard, and how a node proves it is who it says and has what it says.

- A node joins the first time with a one-time join token an admin made. Tokens are random,
  shown once, stored only as a SHA-256, expire, and are spent by exactly one node (an etcd
  transaction), which is then enrolled with its public key.
- Every registration, and every re-attestation after it, answers a single-use nonce the registry
  sent on that stream: the node signs the nonce, its inventory and the time with its identity
  key. A wrong signature, another stream's nonce, a stale time or a policy the inventory breaks
  is refused with its own reason.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from packaging.version import InvalidVersion, Version

from shard.node.v1 import node_pb2, node_service_pb2
from shard_core import keys
from shard_core.attestation import signature_valid
from shard_core.errors import (
    InvalidArgumentError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from shard_core.etcd import paging
from shard_core.etcd.store import Entry, EtcdStore
from shard_registry.resources import timestamp

NONCE_BYTES = 32
# Hardware evidence an attestation may carry: a few items, each the size of a report and its
# certificate chain.
MAX_EVIDENCE_ITEMS = 4
MAX_EVIDENCE_BYTES = 64 * 1024
MAX_TOKEN_TTL_S = 7 * 24 * 3600
DEFAULT_TOKEN_TTL_S = 3600


@dataclass(frozen=True, kw_only=True)
class NodePolicy:
    """What a node must be to serve in this shard."""

    min_gpu_memory_bytes: int = 0
    allowed_gpu_models: Sequence[str] = ()
    min_agent_version: str = "0"
    require_gpu_cross_check: bool = True
    require_join_token: bool = True
    max_clock_skew_s: float = 30.0
    nonce_ttl_s: float = 30.0
    trust_node_addresses: bool = False

    def violations(self, inventory: node_pb2.Inventory) -> list[str]:
        """Every way the inventory breaks this policy, as `REASON: detail`."""
        found = []
        for gpu in inventory.gpus:
            if gpu.memory_bytes < self.min_gpu_memory_bytes:
                found.append(
                    f"GPU_MEMORY_TOO_SMALL: {gpu.model} has {gpu.memory_bytes} bytes, "
                    f"the shard needs {self.min_gpu_memory_bytes}"
                )
            if self.allowed_gpu_models and gpu.model not in self.allowed_gpu_models:
                found.append(f"GPU_MODEL_NOT_ALLOWED: {gpu.model}")
        if self.require_gpu_cross_check and inventory.gpus and not inventory.gpus_cross_checked:
            found.append("GPU_NOT_ON_PCI_BUS: NVML reports GPUs the PCI bus does not show")
        try:
            if Version(inventory.agent_version) < Version(self.min_agent_version):
                found.append(f"AGENT_TOO_OLD: {inventory.agent_version} < {self.min_agent_version}")
        except InvalidVersion:
            found.append(f"AGENT_VERSION_INVALID: {inventory.agent_version[:40]!r}")
        return found


@dataclass(kw_only=True)
class Challenge:
    """A nonce sent on one stream, good for one answer within the nonce TTL."""

    nonce: bytes
    issued_at: float

    @classmethod
    def new(cls, clock: Callable[[], float]) -> Challenge:
        return cls(nonce=os.urandom(NONCE_BYTES), issued_at=clock())


def verify_attestation(
    *,
    attestation: node_service_pb2.Attestation,
    challenge: Challenge | None,
    node_id: str,
    public_key: bytes,
    policy: NodePolicy,
    now: float,
    field: str,
) -> None:
    """Refuse an attestation that does not answer `challenge` from this node, now."""
    if challenge is None or not hmac.compare_digest(attestation.nonce, challenge.nonce):
        raise UnauthenticatedError(
            f"{field}.nonce is not the nonce this stream was challenged with",
            reason="NONCE_MISMATCH",
            metadata={"field": f"{field}.nonce"},
        )
    if now - challenge.issued_at > policy.nonce_ttl_s:
        raise UnauthenticatedError(
            f"{field}: the challenge expired before it was answered",
            reason="NONCE_EXPIRED",
            metadata={"field": f"{field}.nonce"},
        )
    if abs(now - attestation.time_ms / 1000) > policy.max_clock_skew_s:
        raise UnauthenticatedError(
            f"{field}.time_ms is more than {policy.max_clock_skew_s:.0f}s from the registry's "
            "clock",
            reason="CLOCK_SKEW",
            metadata={"field": f"{field}.time_ms"},
        )
    _check_evidence(attestation.hardware_evidence, field=f"{field}.hardware_evidence")
    if not signature_valid(
        public_key=public_key,
        signature=attestation.signature,
        nonce=attestation.nonce,
        inventory=attestation.inventory,
        time_ms=attestation.time_ms,
        node_id=node_id,
        evidence=attestation.hardware_evidence,
        certificate_request=attestation.certificate_request,
    ):
        raise UnauthenticatedError(
            f"{field}.signature is not the node's signature over the challenge",
            reason="BAD_SIGNATURE",
            metadata={"field": f"{field}.signature"},
        )


def _check_evidence(evidence: Sequence[node_service_pb2.HardwareEvidence], *, field: str) -> None:
    """Refuse evidence no verifier could take: too much of it, or of no kind."""
    if len(evidence) > MAX_EVIDENCE_ITEMS:
        raise InvalidArgumentError(
            f"{field} has {len(evidence)} items; at most {MAX_EVIDENCE_ITEMS}",
            metadata={"field": field},
        )
    for index, item in enumerate(evidence):
        if item.kind == node_service_pb2.EVIDENCE_KIND_UNSPECIFIED:
            raise InvalidArgumentError(
                f"{field}[{index}].kind is required", metadata={"field": f"{field}[{index}].kind"}
            )
        if len(item.evidence) > MAX_EVIDENCE_BYTES:
            raise InvalidArgumentError(
                f"{field}[{index}].evidence is {len(item.evidence)} bytes; at most "
                f"{MAX_EVIDENCE_BYTES}",
                metadata={"field": f"{field}[{index}].evidence"},
            )


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


# An enrollment's last-seen time is rewritten at most this often (registrations stay cheap).
SEEN_PRECISION_S = 24 * 3600


class Enrollment:
    def __init__(
        self,
        *,
        store: EtcdStore,
        clock: Callable[[], float] = time.time,
        token_retention_s: float = 7 * 24 * 3600,
        enrollment_retention_s: float = 90 * 24 * 3600,
    ) -> None:
        self._store = store
        self._clock = clock
        self._token_retention_s = token_retention_s
        self._enrollment_retention_s = enrollment_retention_s

    async def create_token(
        self, request: node_service_pb2.JoinToken, provider: str
    ) -> node_service_pb2.JoinToken:
        """A join token whose node will be run by `provider`."""
        ttl = request.ttl_seconds or DEFAULT_TOKEN_TTL_S
        if not 0 < ttl <= MAX_TOKEN_TTL_S:
            raise InvalidArgumentError(
                f"join_token.ttl_seconds must be between 1 and {MAX_TOKEN_TTL_S}",
                metadata={"field": "join_token.ttl_seconds"},
            )
        token_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
        expires = self._clock() + ttl
        record = {
            "sha256": _hash(secret),
            "expire_time": expires,
            "description": request.description,
            "used_by": "",
            "provider": provider,
        }
        await self._store.put(keys.join_token(token_id), json.dumps(record).encode())
        return node_service_pb2.JoinToken(
            name=f"joinTokens/{token_id}",
            token=f"{token_id}.{secret}",
            expire_time=timestamp(expires),
            description=request.description,
        )

    async def enrolled(self, node_id: str) -> node_pb2.Node | None:
        """The node's enrollment record (its public key and provider), if it has one."""
        entry = await self._store.get(keys.enrolled(node_id))
        return node_pb2.Node.FromString(entry.value) if entry else None

    async def enroll(self, *, node_id: str, public_key: bytes, token: str) -> node_pb2.Node:
        """Spend `token` on this node, exactly once, and enroll the node."""
        field = "registration.join_token"
        token_id, _, secret = token.partition(".")
        entry = await self._store.get(keys.join_token(token_id)) if token_id and secret else None
        if not token:
            raise PermissionDeniedError(
                f"{field} is required: this node has not joined the shard before",
                reason="JOIN_TOKEN_REQUIRED",
                metadata={"field": field},
            )
        record = json.loads(entry.value) if entry else None
        if (
            entry is None
            or record is None
            or not hmac.compare_digest(record["sha256"], _hash(secret))
        ):
            raise PermissionDeniedError(
                f"{field} is not a token this shard made", reason="JOIN_TOKEN_UNKNOWN",
                metadata={"field": field},
            )  # fmt: skip
        if record["used_by"]:
            raise PermissionDeniedError(
                f"{field} was already used; ask an admin for a new one",
                reason="JOIN_TOKEN_USED",
                metadata={"field": field},
            )
        if self._clock() > record["expire_time"]:
            raise PermissionDeniedError(
                f"{field} has expired; ask an admin for a new one",
                reason="JOIN_TOKEN_EXPIRED",
                metadata={"field": field},
            )
        record["used_by"] = node_id
        enrolled = node_pb2.Node(
            name=f"nodes/{node_id}",
            public_key=public_key,
            provider=record.get("provider", ""),
            register_time=timestamp(self._clock()),
        )
        written = await self._store.write(
            puts={
                keys.join_token(token_id): json.dumps(record).encode(),
                keys.enrolled(node_id): enrolled.SerializeToString(),
            },
            expect={keys.join_token(token_id): entry.mod_revision},
        )
        if written is None:
            raise PermissionDeniedError(
                f"{field} was used by another node at the same moment",
                reason="JOIN_TOKEN_USED",
                metadata={"field": field},
            )
        return enrolled

    async def enroll_without_token(self, *, node_id: str, public_key: bytes) -> node_pb2.Node:
        """For shards that admit any node (`require_join_token` off)."""
        enrolled = node_pb2.Node(
            name=f"nodes/{node_id}", public_key=public_key, register_time=timestamp(self._clock())
        )
        await self._store.put(keys.enrolled(node_id), enrolled.SerializeToString())
        return enrolled

    async def seen(self, node_id: str, enrolled: node_pb2.Node) -> None:
        """The enrolled node registered: keep when, to the day, so that long-gone nodes'
        enrollments can be forgotten."""
        if self._clock() - enrolled.register_time.ToSeconds() < SEEN_PRECISION_S:
            return
        enrolled.register_time.CopyFrom(timestamp(self._clock()))
        await self._store.put(keys.enrolled(node_id), enrolled.SerializeToString())

    async def prune(self, live: Callable[[str], bool]) -> tuple[int, int]:
        """Forget join tokens that expired longer ago than their retention (spent or not), and
        the enrollments of nodes not `live` and not seen for the enrollment retention (they
        need a new token to come back). Returns how many of each went."""
        now = self._clock()
        tokens = enrollments = 0
        async for entry in paging.every(self._store, keys.JOIN_TOKENS):
            if json.loads(entry.value)["expire_time"] < now - self._token_retention_s:
                tokens += await self._delete(entry)
        async for entry in paging.every(self._store, keys.ENROLLED):
            enrolled = node_pb2.Node.FromString(entry.value)
            node_id = entry.key.removeprefix(keys.ENROLLED)
            stale = enrolled.register_time.ToSeconds() < now - self._enrollment_retention_s
            if stale and not live(node_id):
                enrollments += await self._delete(entry)
        return tokens, enrollments

    async def _delete(self, entry: Entry) -> int:
        done = await self._store.write(deletes=[entry.key], expect={entry.key: entry.mod_revision})
        return int(done is not None)
