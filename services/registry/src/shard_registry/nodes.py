"""The registry's node domain: who is in the shard, in what state, and what it serves.

A node's record and its model endpoints are bound to one etcd lease. Heartbeats refresh the
lease; when they stop, etcd deletes every record of the node at once, so a dead node disappears
from every view together. A node proves its identity and inventory when it registers and again
on a schedule (see `enrollment`). Its state is PENDING until its first healthy heartbeat, then
ACTIVE, or DEGRADED while its self-check fails; an operator's CORDONED or DRAINING and the
shard's QUARANTINED lie over that, in `node-admin/`, and outlast its sessions. Endpoints are
published only for model versions the node is assigned and reports READY, and only while its
state lets it take traffic.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec
from opentelemetry import metrics

from shard.node.v1 import node_pb2, node_service_pb2
from shard_core import keys
from shard_core.auth import Principal
from shard_core.errors import (
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    require,
)
from shard_core.etcd import paging
from shard_core.etcd.lease import LeaseExpiredError, LeaseKeeper
from shard_core.etcd.store import EtcdStore
from shard_core.identity import ED25519_PUBLIC_KEY_BYTES, node_id_for
from shard_core.sealing import X25519_KEY_BYTES, encryption_key_message, signed_by
from shard_registry.directory import NodeDirectory
from shard_registry.enrollment import Challenge, Enrollment, NodePolicy, verify_attestation
from shard_registry.lifecycle import (
    Actor,
    Decision,
    NodeAction,
    TransitionRefusedError,
    decide,
    overlay,
)
from shard_registry.resources import (
    RESOURCE_ID,
    VERSION_ID,
    enum_value,
    filter_terms,
    parse_name,
    timestamp,
)

_log = logging.getLogger(__name__)

# A heartbeat that changes nothing still rewrites the record this often, to keep its time fresh.
RECORD_REFRESH_S = 30.0
# One whose only news is the requests queued per model (which move with traffic) rewrites it at
# most this often: a heartbeat is not an etcd write.
PENDING_REFRESH_S = 5.0
MAX_MODELS_PER_NODE = 1000
MAX_REASON_CHARS = 1000
MAX_PROBLEMS = 20
TRANSITIONS_KEPT = 20
DNS_TIMEOUT_S = 2.0
ADDRESS = re.compile(r"[A-Za-z0-9.\-\[\]:]{1,253}:[0-9]{1,5}")
# How each change reads in a node's history.
_LABELS = {
    NodeAction.CORDON: "CORDONED",
    NodeAction.DRAIN: "DRAINING",
    NodeAction.UNCORDON: "UNCORDONED",
    NodeAction.QUARANTINE: "QUARANTINED",
}
SERVING_STATES = frozenset(
    {node_pb2.NODE_STATE_ACTIVE, node_pb2.NODE_STATE_CORDONED, node_pb2.NODE_STATE_DRAINING}
)


@dataclass(frozen=True, kw_only=True)
class NodeTiming:
    """The liveness contract the registry gives each node."""

    heartbeat_interval_s: float
    lease_ttl_s: int
    attest_interval_s: float = 300.0


def _state_name(state: node_pb2.NodeState.ValueType) -> str:
    return node_pb2.NodeState.Name(state).removeprefix("NODE_STATE_")


def capacity(inventory: node_pb2.Inventory) -> node_pb2.NodeResources:
    """What a node offers replicas, from its attested inventory: never from what it claims
    apart from it."""
    return node_pb2.NodeResources(
        cpu_millis=inventory.cpu_cores * 1000,
        memory_bytes=inventory.memory_bytes,
        gpus=[node_pb2.Gpu(model=g.model, memory_bytes=g.memory_bytes) for g in inventory.gpus],
    )


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """`host` as an IP address (an IPv4-mapped IPv6 one as IPv4), or None for a name."""
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


async def pinned_address(address: str, peer: str, field: str) -> str:
    """The address the shard will use for a Triton a node names: `address` with its host
    replaced by the peer's IP, once the host is that IP or a name that resolves to it. A node
    may only send traffic to itself, and a name is looked up once, here: what the router dials
    is the address that was checked, so a second DNS answer or a rebinding changes nothing."""
    host, _, port = address.rpartition(":")
    peer_ip = _ip(peer)
    named = _ip(host)
    if named is None and peer_ip is not None:
        try:
            infos = await asyncio.wait_for(
                asyncio.get_running_loop().getaddrinfo(host.strip("[]"), None), DNS_TIMEOUT_S
            )
        except (OSError, TimeoutError):
            infos = []
        if peer_ip in {_ip(str(info[4][0])) for info in infos}:
            named = peer_ip
    if peer_ip is None or named != peer_ip:
        raise PermissionDeniedError(
            f"{field} {address[:80]!r} is not where this node connects from ({peer})",
            reason="ADDRESS_NOT_PEER",
            metadata={"field": field},
        )
    return f"[{peer_ip}]:{port}" if peer_ip.version == 6 else f"{peer_ip}:{port}"


LABEL_KEY = re.compile(
    r"([a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?"
)
LABEL_VALUE = re.compile(r"([A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?")
MAX_LABELS = 64


def _validate_labels(labels: Mapping[str, str], field: str) -> None:
    """Labels as Kubernetes spells them: `[prefix/]name` keys, short plain values."""
    if len(labels) > MAX_LABELS:
        raise InvalidArgumentError(
            f"{field} has more than {MAX_LABELS} labels", metadata={"field": field}
        )
    for key, value in labels.items():
        if not LABEL_KEY.fullmatch(key) or not LABEL_VALUE.fullmatch(value):
            raise InvalidArgumentError(
                f"{field}: {key[:80]!r}={value[:80]!r} is not a label (keys [prefix/]name, "
                "values up to 63 letters, digits, '-', '_' or '.')",
                metadata={"field": f"{field}[{key[:80]}]"},
            )


def _admin_write(key: str, record: node_pb2.Node) -> tuple[dict[str, bytes], list[str]]:
    """The write that leaves `record` as the node's admin record: gone when it holds nothing."""
    if record.state or record.labels:
        return {key: record.SerializeToString()}, []
    return {}, [key]


def _stable(inventory: node_pb2.Inventory) -> node_pb2.Inventory:
    """The inventory without what changes on its own (free disk): what a change means."""
    stable = node_pb2.Inventory()
    stable.CopyFrom(inventory)
    stable.ClearField("disk_free_bytes")
    return stable


def _validate_models(models: Sequence[node_pb2.ModelStatus], field: str) -> None:
    """Model states come from nodes we do not trust: names must be names, sizes bounded."""
    if len(models) > MAX_MODELS_PER_NODE:
        raise InvalidArgumentError(
            f"{field} lists more than {MAX_MODELS_PER_NODE} models", metadata={"field": field}
        )
    for index, model in enumerate(models):
        where = f"{field}[{index}]"
        if not RESOURCE_ID.fullmatch(model.model_name):
            raise InvalidArgumentError(
                f"{where}.model_name {model.model_name[:80]!r} is not a model name",
                metadata={"field": f"{where}.model_name"},
            )
        if model.model_version and not VERSION_ID.fullmatch(model.model_version):
            raise InvalidArgumentError(
                f"{where}.model_version {model.model_version[:20]!r} is not a version number",
                metadata={"field": f"{where}.model_version"},
            )
        if len(model.reason) > MAX_REASON_CHARS:
            raise InvalidArgumentError(
                f"{where}.reason is longer than {MAX_REASON_CHARS} characters",
                metadata={"field": f"{where}.reason"},
            )


def validate_hello(hello: node_service_pb2.Hello) -> str:
    require(hello.node_id, "hello.node_id")
    require(hello.public_key, "hello.public_key")
    if len(hello.public_key) != ED25519_PUBLIC_KEY_BYTES:
        raise InvalidArgumentError(
            f"hello.public_key must be a raw Ed25519 key of {ED25519_PUBLIC_KEY_BYTES} "
            f"bytes, got {len(hello.public_key)}",
            metadata={"field": "hello.public_key"},
        )
    expected = node_id_for(hello.public_key)
    if hello.node_id != expected:
        raise InvalidArgumentError(
            f"hello.node_id {hello.node_id!r} does not belong to the public key",
            reason="NODE_ID_MISMATCH",
            metadata={"field": "hello.node_id"},
        )
    return expected


def _addresses(registration: node_service_pb2.Registration) -> list[tuple[str, str]]:
    """The Triton addresses a node names, by field (the HTTP one is optional)."""
    named = [("registration.inference_address", registration.inference_address)]
    if registration.http_address:
        named.append(("registration.http_address", registration.http_address))
    return named


def _validate_registration(registration: node_service_pb2.Registration) -> None:
    require(registration.inference_address, "registration.inference_address")
    for field, address in _addresses(registration):
        if not ADDRESS.fullmatch(address):
            raise InvalidArgumentError(
                f"{field} must be host:port, got {address[:80]!r}", metadata={"field": field}
            )
    require(registration.HasField("attestation"), "registration.attestation")
    _validate_models(registration.models, "registration.models")


def _check_encryption_key(node_id: str, public_key: bytes, key: node_pb2.EncryptionKey) -> None:
    """An encryption key is taken only with the identity key's signature over it."""
    field = "registration.encryption_key"
    if len(key.public_key) != X25519_KEY_BYTES:
        raise InvalidArgumentError(
            f"{field}.public_key must be a raw X25519 key of {X25519_KEY_BYTES} bytes",
            metadata={"field": f"{field}.public_key"},
        )
    if not signed_by(public_key, key.signature, encryption_key_message(node_id, key.public_key)):
        raise InvalidArgumentError(
            f"{field}.signature is not the node's signature over its encryption key",
            reason="BAD_SIGNATURE",
            metadata={"field": f"{field}.signature"},
        )


def _pending(metrics: node_pb2.NodeMetrics) -> dict[str, int]:
    """Per model, the requests the node's Triton has queued or executing."""
    return {load.model_name: load.pending for load in metrics.models}


class NodeSession:
    """One connected, attested node: its lease, its record, the endpoints it publishes."""

    def __init__(
        self,
        *,
        registry: NodeRegistry,
        node: node_pb2.Node,
        lease_id: int,
        published: dict[str, bytes],
    ) -> None:
        self._registry = registry
        self.node = node
        self.lease_id = lease_id
        self._published = published
        self._written_at = 0.0
        self._refreshed_at = registry.clock()  # the lease was granted or refreshed just now
        self._publishing = asyncio.Lock()
        self.challenge: Challenge | None = None
        self.attested = False  # an attestation was accepted since the last credential
        self.by_certificate = False  # it proves who it is by its certificate: no credential
        # The key of the certificate the last attestation asked for, issued once it is taken.
        self.certificate_key: ec.EllipticCurvePublicKey | None = None

    @property
    def node_id(self) -> str:
        return self.node.name.removeprefix("nodes/")

    def effective_state(self) -> node_pb2.NodeState.ValueType:
        admin = self._registry.directory.admin_state(self.node_id)
        return admin.state if admin is not None and admin.state else self.node.state

    def _endpoints(self) -> dict[str, bytes]:
        """Endpoints for the model versions the node is assigned and reports READY, while its
        state lets it take traffic."""
        if self.effective_state() not in SERVING_STATES:
            return {}
        assigned = self._registry.directory.assignments(self.node_id)
        pending = _pending(self.node.metrics)
        endpoints = {}
        for model in self.node.models:
            assignment = assigned.get(model.model_name)
            if (
                model.state == node_pb2.MODEL_STATE_READY
                and assignment is not None
                and assignment.model_version == model.model_version
            ):
                endpoint = node_pb2.ModelEndpoint(
                    model_name=model.model_name,
                    model_version=model.model_version,
                    node=self.node.name,
                    inference_address=self.node.inference_address,
                    http_address=self.node.http_address,
                    pending=pending.get(model.model_name, 0),
                )
                key = keys.endpoint(model.model_name, model.model_version, self.node_id)
                endpoints[key] = endpoint.SerializeToString()
        return endpoints

    async def publish(self, *, record: bool = True) -> None:
        """Write the record (when `record`) and the endpoints that appeared, delete the ones
        that went: in one transaction, so readers never see half of a change. Heartbeats and
        assignment changes publish from different tasks: one at a time, or an endpoint written
        by one could be forgotten by the other and outlive its assignment."""
        async with self._publishing:
            await self._publish(record=record)

    async def _publish(self, *, record: bool) -> None:
        endpoints = self._endpoints()
        added = {
            key: value for key, value in endpoints.items() if self._published.get(key) != value
        }
        gone = self._published.keys() - endpoints.keys()
        puts = {keys.node(self.node_id): self.node.SerializeToString()} if record else {}
        if not (puts or added or gone):
            return
        await self._registry.store.write(puts={**puts, **added}, deletes=gone, lease=self.lease_id)
        self._published = endpoints
        if record:
            self._written_at = self._registry.clock()

    async def heartbeat(self, heartbeat: node_service_pb2.Heartbeat) -> None:
        """Refresh the lease; follow the self-check (PENDING/DEGRADED -> ACTIVE and back);
        republish when something changed or the record aged."""
        _validate_models(heartbeat.models, "heartbeat.models")
        problems = [problem[:MAX_REASON_CHARS] for problem in heartbeat.problems[:MAX_PROBLEMS]]
        registry = self._registry
        ttl = registry.timing.lease_ttl_s
        # The lease is refreshed a third of its TTL after the last time, not on every
        # heartbeat; and whenever the node's record is missing from the view (deleted, say), so
        # a revoked lease ends the session at the next heartbeat.
        missing = self.node_id not in registry.directory.records.values
        if missing or registry.clock() - self._refreshed_at >= ttl / 3:
            await registry.keeper.refresh(self.lease_id, timeout=ttl / 2)
            self._refreshed_at = registry.clock()
        registry.heartbeats.add(1)
        state = node_pb2.NODE_STATE_DEGRADED if problems else node_pb2.NODE_STATE_ACTIVE
        if state != self.node.state:
            reason = "SELF_CHECK_FAILED: " + "; ".join(problems) if problems else "HEALTHY"
            await registry.record_transition(self.node_id, self.node.state, state, reason)
            self.node.state = state
        elif (
            list(self.node.models) == list(heartbeat.models)
            and list(self.node.problems) == problems
            and (
                _pending(self.node.metrics) == _pending(heartbeat.metrics)
                or registry.clock() - self._written_at < PENDING_REFRESH_S
            )
            and registry.clock() - self._written_at < RECORD_REFRESH_S
        ):
            return
        del self.node.models[:]
        self.node.models.extend(heartbeat.models)
        del self.node.problems[:]
        self.node.problems.extend(problems)
        self.node.metrics.CopyFrom(heartbeat.metrics)
        self.node.heartbeat_time.CopyFrom(timestamp(registry.clock()))
        await self.publish()

    def new_challenge(self) -> node_service_pb2.Challenge:
        self.challenge = Challenge.new(self._registry.clock)
        return node_service_pb2.Challenge(nonce=self.challenge.nonce)

    async def attest(
        self,
        attestation: node_service_pb2.Attestation,
        *,
        certificate_key: ec.EllipticCurvePublicKey | None = None,
    ) -> None:
        """Check a re-attestation; a changed inventory is recorded, one that breaks the policy
        quarantines the node. An accepted one makes a credential, and the certificate for
        `certificate_key` if it asked for one, due together."""
        registry = self._registry
        challenge, self.challenge = self.challenge, None
        verify_attestation(
            attestation=attestation,
            challenge=challenge,
            node_id=self.node_id,
            public_key=self.node.public_key,
            policy=registry.policy,
            now=registry.clock(),
            field="attestation",
        )
        inventory = attestation.inventory
        if _stable(inventory) != _stable(self.node.inventory):
            _log.warning("node %s reports a changed inventory", self.node_id)
            await registry.record_transition(
                self.node_id, self.node.state, self.node.state, "INVENTORY_CHANGED"
            )
            self.node.inventory.CopyFrom(inventory)
            self.node.capacity.CopyFrom(capacity(inventory))
        self.node.attest_time.CopyFrom(timestamp(registry.clock()))
        violations = registry.policy.violations(inventory)
        if violations:
            await registry.change_state(
                self.node.name, NodeAction.QUARANTINE, by=None, reason="; ".join(violations)
            )
        else:
            # Both before the await below: the stream's sender may run during it.
            self.certificate_key = certificate_key
            self.attested = True
        await self.publish()

    async def close(self, reason: str) -> None:
        """The node left cleanly: revoke its lease, so its records go now, not at expiry."""
        await self._registry.store.revoke_lease(self.lease_id)
        _log.info("node %s left: %s", self.node_id, reason or "no reason given")


class NodeRegistry:
    """Admits nodes, holds their leases, and answers questions about them."""

    def __init__(
        self,
        *,
        store: EtcdStore,
        keeper: LeaseKeeper,
        timing: NodeTiming,
        directory: NodeDirectory,
        policy: NodePolicy,
        enrollment: Enrollment | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.keeper = keeper
        self.timing = timing
        self.directory = directory
        self.policy = policy
        self.clock = clock
        self.enrollment = enrollment or Enrollment(store=store, clock=clock)
        meter = metrics.get_meter("shard.registry")
        self.heartbeats = meter.create_counter(
            "shard_registry_heartbeats", description="Heartbeats received from node agents."
        )
        self._registrations = meter.create_counter(
            "shard_registry_registrations", description="Node registrations accepted."
        )

    async def register(
        self,
        node_id: str,
        public_key: bytes,
        registration: node_service_pb2.Registration,
        challenge: Challenge,
        peer_host: str,
    ) -> NodeSession:
        """Admit a node that proved itself; one that reconnects within its lease keeps it."""
        _validate_registration(registration)
        verify_attestation(
            attestation=registration.attestation,
            challenge=challenge,
            node_id=node_id,
            public_key=public_key,
            policy=self.policy,
            now=self.clock(),
            field="registration.attestation",
        )
        if registration.HasField("encryption_key"):
            _check_encryption_key(node_id, public_key, registration.encryption_key)
        inventory = registration.attestation.inventory
        violations = self.policy.violations(inventory)
        if violations:
            raise PermissionDeniedError(
                "the node does not meet the shard's policy: " + "; ".join(violations),
                reason="POLICY_VIOLATION",
                metadata={"field": "registration.attestation.inventory"},
            )
        enrolled = await self.enrollment.enrolled(node_id)
        if enrolled is not None:
            await self.enrollment.seen(node_id, enrolled)
        elif self.policy.require_join_token:
            enrolled = await self.enrollment.enroll(
                node_id=node_id, public_key=public_key, token=registration.join_token
            )
        else:
            enrolled = await self.enrollment.enroll_without_token(
                node_id=node_id, public_key=public_key
            )
        # Only now, with the node's identity and enrollment checked, is any name it sent
        # looked up.
        addresses = dict(_addresses(registration))
        if not self.policy.trust_node_addresses:
            for field, address in addresses.items():
                addresses[field] = await pinned_address(address, peer_host, field)
        existing = await self.store.get(keys.node(node_id))
        lease_id = await self._reuse_lease(existing.lease) if existing else None
        reconnected = existing is not None and lease_id is not None
        published: dict[str, bytes] = {}
        if lease_id is None:
            lease_id = await self.store.grant_lease(self.timing.lease_ttl_s)
        else:
            previous = await self.store.snapshot(keys.ENDPOINTS)
            published = {
                entry.key: entry.value
                for entry in previous.entries
                if entry.key.endswith(f"/{node_id}")
            }
        now = timestamp(self.clock())
        # A node back within its lease keeps the state it had; a new one starts PENDING.
        state = (
            node_pb2.Node.FromString(existing.value).state
            if existing is not None and reconnected
            else node_pb2.NODE_STATE_PENDING
        )
        node = node_pb2.Node(
            name=f"nodes/{node_id}",
            state=state,
            claimed_labels=registration.labels,
            inference_address=addresses["registration.inference_address"],
            http_address=addresses.get("registration.http_address", ""),
            agent_version=inventory.agent_version,
            triton_version=inventory.triton_version,
            models=registration.models,
            register_time=now,
            heartbeat_time=now,
            attest_time=now,
            public_key=public_key,
            capacity=capacity(inventory),
            inventory=inventory,
            provider=enrolled.provider,
            encryption_key=registration.encryption_key,
        )
        if state == node_pb2.NODE_STATE_PENDING:
            await self.record_transition(
                node_id, node_pb2.NODE_STATE_UNSPECIFIED, state, "REGISTERED"
            )
        session = NodeSession(registry=self, node=node, lease_id=lease_id, published=published)
        await session.publish()
        self._registrations.add(1, {"reconnect": reconnected})
        _log.info(
            "node %s registered at %s (lease %x%s)",
            node_id,
            registration.inference_address,
            lease_id,
            ", reconnected" if reconnected else "",
        )
        return session

    async def _reuse_lease(self, lease_id: int) -> int | None:
        if not lease_id:
            return None
        try:
            await self.keeper.refresh(lease_id, timeout=self.timing.lease_ttl_s / 2)
        except LeaseExpiredError:
            return None
        return lease_id

    async def record_transition(
        self,
        node_id: str,
        before: node_pb2.NodeState.ValueType,
        after: node_pb2.NodeState.ValueType,
        reason: str,
    ) -> None:
        """Keep the node's last state changes, newest first (a read-modify-write that retries
        when another replica wrote in between)."""
        key = keys.node_transitions(node_id)
        transition = node_pb2.StateTransition(
            to=after, reason=reason[:MAX_REASON_CHARS], time=timestamp(self.clock())
        )
        setattr(transition, "from", before)
        for _ in range(5):
            found = await self.store.get(key)
            history = node_pb2.Node.FromString(found.value) if found else node_pb2.Node()
            kept = [transition, *history.transitions][:TRANSITIONS_KEPT]
            record = node_pb2.Node(transitions=kept)
            expect = {key: found.mod_revision if found else 0}
            if await self.store.write(puts={key: record.SerializeToString()}, expect=expect):
                _log.info(
                    "node %s: %s -> %s (%s)",
                    node_id,
                    _state_name(before),
                    _state_name(after),
                    reason,
                )
                return

    async def _complete(self, node: node_pb2.Node) -> node_pb2.Node:
        node_id = node.name.removeprefix("nodes/")
        admin = await self.store.get(keys.node_admin(node_id))
        overlay(
            node,
            node_pb2.Node.FromString(admin.value) if admin else None,
            self.directory.trusted_claims,
        )
        history = await self.store.get(keys.node_transitions(node_id))
        if history is not None:
            node.transitions.extend(node_pb2.Node.FromString(history.value).transitions)
        return node

    async def get_node(self, name: str) -> node_pb2.Node:
        (node_id,) = parse_name(name, "nodes/{}")
        found = await self.store.get(keys.node(node_id))
        if found is None:
            raise NotFoundError(f"node {name!r} not found", metadata={"name": name})
        return await self._complete(node_pb2.Node.FromString(found.value))

    async def list_nodes(
        self, *, page_size: int, page_token: str, filter_: str = ""
    ) -> tuple[list[node_pb2.Node], str]:
        """One page of live nodes ordered by name, and the token of the next page. A filter
        applies within the page, so a page can hold fewer nodes than asked for."""
        matches = parse_filter(filter_)
        entries, token = await paging.page(
            self.store, keys.NODES, page_size=page_size, page_token=page_token
        )
        nodes = []
        for entry in entries:
            node = await self._complete(node_pb2.Node.FromString(entry.value))
            if matches(node):
                nodes.append(node)
        return nodes, token

    def _actor(self, provider: str, by: Principal | None, name: str) -> Actor:
        """Who `by` is to the node run by `provider`: None is the shard itself."""
        if by is None:
            return Actor.SHARD
        if by.admin:
            return Actor.ADMIN
        if by.owns(provider):
            return Actor.PROVIDER
        raise PermissionDeniedError(
            f"{name} belongs to another principal", reason="NOT_YOURS", metadata={"name": name}
        )

    async def _decide(
        self,
        node_id: str,
        action: NodeAction,
        actor: Actor,
        by: Principal | None,
        current: node_pb2.NodeState.ValueType | None,
    ) -> Decision:
        """`lifecycle.decide`, with a refusal kept in the node's history."""
        try:
            return decide(action, actor, current)
        except TransitionRefusedError as refused:
            who = f"{actor} {by.id}" if by is not None else str(actor)
            state = current if current is not None else node_pb2.NODE_STATE_UNSPECIFIED
            await self.record_transition(
                node_id, state, state, f"REFUSED: {action} by {who}: {refused.message}"
            )
            raise

    async def change_state(
        self, name: str, action: NodeAction, *, by: Principal | None, reason: str = ""
    ) -> node_pb2.Node:
        """Cordon, drain, uncordon or quarantine a live node as `by` (None: the shard itself),
        if `lifecycle.decide` allows it. The operator state outlasts the node's sessions; it
        changes by compare-and-swap, so a provider's cordon racing the shard's quarantine
        cannot overwrite it."""
        node = await self.get_node(name)
        node_id = node.name.removeprefix("nodes/")
        actor = self._actor(node.provider, by, name)
        key = keys.node_admin(node_id)
        while True:
            found = await self.store.get(key)
            record = node_pb2.Node.FromString(found.value) if found else node_pb2.Node()
            current = record.state or None
            decision = await self._decide(node_id, action, actor, by, current)
            record.name = node.name
            record.state = decision.state or node_pb2.NODE_STATE_UNSPECIFIED
            record.state_reason = reason if decision.state else ""
            puts, deletes = _admin_write(key, record)
            expect = {key: found.mod_revision if found else 0}
            if await self.store.write(puts=puts, deletes=deletes, expect=expect):
                break
        after = await self.get_node(name)
        if after.state != node.state or decision.state is not None:
            label = _LABELS[action]
            await self.record_transition(
                node_id, node.state, after.state, f"{label}: {reason}" if reason else label
            )
            after = await self.get_node(name)
        return after

    async def set_labels(
        self, name: str, labels: Mapping[str, str], *, by: Principal
    ) -> node_pb2.Node:
        """Set what an admin states about a live node: its labels, which selectors match.
        A provider's word about its own node is a claim, so only an admin sets them."""
        if not by.admin:
            raise PermissionDeniedError(
                "only an admin sets a node's labels; a provider's are claims "
                "(the agent's SHARD_NODE_LABELS)",
                reason="ADMIN_ONLY",
                metadata={"field": "node.labels"},
            )
        _validate_labels(labels, "node.labels")
        node = await self.get_node(name)
        key = keys.node_admin(node.name.removeprefix("nodes/"))
        while True:
            found = await self.store.get(key)
            record = node_pb2.Node.FromString(found.value) if found else node_pb2.Node()
            record.name = node.name
            record.labels.clear()
            record.labels.update(labels)
            puts, deletes = _admin_write(key, record)
            expect = {key: found.mod_revision if found else 0}
            if await self.store.write(puts=puts, deletes=deletes, expect=expect):
                return await self.get_node(name)

    async def provider_of(self, name: str) -> str:
        """The principal that runs the node, from its record or else its enrollment."""
        (node_id,) = parse_name(name, "nodes/{}")
        found = await self.store.get(keys.node(node_id))
        if found is not None:
            return node_pb2.Node.FromString(found.value).provider
        enrolled = await self.enrollment.enrolled(node_id)
        if enrolled is None:
            raise NotFoundError(f"node {name!r} not found", metadata={"name": name})
        return enrolled.provider

    async def delete_node(self, name: str, *, by: Principal) -> None:
        """Remove a node: its lease (and so its records and endpoints) and its enrollment, so
        it needs a new join token to come back; and its operator state and history, unless
        `lifecycle.decide` keeps them (a quarantine only an admin may forget)."""
        (node_id,) = parse_name(name, "nodes/{}")
        found = await self.store.get(keys.node(node_id))
        actor = self._actor(await self.provider_of(name), by, name)
        admin_key = keys.node_admin(node_id)
        while True:
            admin = await self.store.get(admin_key)
            current = (node_pb2.Node.FromString(admin.value).state or None) if admin else None
            decision = await self._decide(node_id, NodeAction.DELETE, actor, by, current)
            deletes = [keys.enrolled(node_id)]
            if decision.forget:
                deletes += [admin_key, keys.node_transitions(node_id)]
            expect = {admin_key: admin.mod_revision if admin else 0}
            if await self.store.write(deletes=deletes, expect=expect):
                break
        if not decision.forget and current is not None:
            await self.record_transition(
                node_id, current, current, f"DELETED by {actor} {by.id}: the quarantine stays"
            )
        if found is not None and found.lease:
            await self.store.revoke_lease(found.lease)
        _log.info("node %s deleted", node_id)


def _state_is(state: node_pb2.NodeState.ValueType) -> Callable[[node_pb2.Node], bool]:
    return lambda node: node.state == state


def _label_is(label: str, value: str) -> Callable[[node_pb2.Node], bool]:
    return lambda node: node.labels.get(label) == value


def parse_filter(text: str) -> Callable[[node_pb2.Node], bool]:
    """`state=ACTIVE AND labels.pool=a`: conditions joined by AND, each `key=value`."""
    conditions: list[Callable[[node_pb2.Node], bool]] = []
    for key, value in filter_terms(text):
        if key == "state":
            state = enum_value(node_pb2.NodeState, "NODE_STATE_", value, "node state", "filter")
            conditions.append(_state_is(state))  # type: ignore[arg-type]
        elif key.startswith("labels."):
            conditions.append(_label_is(key.removeprefix("labels."), value))
        else:
            raise InvalidArgumentError(
                f"filter: cannot filter on {key!r}; use state or labels.<name>",
                metadata={"field": "filter"},
            )
    return lambda node: all(condition(node) for condition in conditions)
