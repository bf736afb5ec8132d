"""The registry's node domain: who is in the shard, what each node must serve and can serve.

A node's record and its model endpoints are bound to one etcd lease. Heartbeats refresh the
lease; when they stop, etcd deletes every record of the node at once, so a dead node disappears
from every view together. An endpoint is published only for a model version the node is assigned
(by the scheduler) and reports READY. Operator states (cordoned, draining) live apart from the
leased record, in `node-admin/`, so they outlast the node's sessions.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from opentelemetry import metrics

from shard.node.v1 import node_pb2, node_service_pb2
from shard_core import keys
from shard_core.errors import InvalidArgumentError, NotFoundError, require
from shard_core.etcd import paging
from shard_core.etcd.lease import LeaseExpiredError, LeaseKeeper
from shard_core.etcd.store import EtcdStore
from shard_core.identity import ED25519_PUBLIC_KEY_BYTES, node_id_for
from shard_registry.models import RESOURCE_ID, VERSION_ID, parse_name, timestamp

_log = logging.getLogger(__name__)

# A heartbeat that changes nothing still rewrites the record this often, to keep its time fresh.
RECORD_REFRESH_S = 30.0
MAX_MODELS_PER_NODE = 1000
MAX_REASON_CHARS = 1000
ADDRESS = re.compile(r"[A-Za-z0-9.\-\[\]:]{1,253}:[0-9]{1,5}")

AssignmentListener = Callable[[list[node_pb2.ModelAssignment]], None]


@dataclass(frozen=True, kw_only=True)
class NodeTiming:
    """The liveness contract the registry gives each node."""

    heartbeat_interval_s: float
    lease_ttl_s: int


class AssignmentHub:
    """Every node's assignments, mirrored from `assignments/` once for the whole registry, and
    handed to the session of each connected node when they change."""

    def __init__(self) -> None:
        self._by_node: dict[str, dict[str, node_pb2.ModelAssignment]] = {}
        self._listeners: dict[str, AssignmentListener] = {}

    def of(self, node_id: str) -> dict[str, node_pb2.ModelAssignment]:
        return self._by_node.get(node_id, {})

    def subscribe(self, node_id: str, listener: AssignmentListener) -> None:
        self._listeners[node_id] = listener
        listener(list(self.of(node_id).values()))

    def unsubscribe(self, node_id: str, listener: AssignmentListener) -> None:
        if self._listeners.get(node_id) is listener:
            del self._listeners[node_id]

    def _notify(self, node_id: str) -> None:
        listener = self._listeners.get(node_id)
        if listener is not None:
            listener(list(self.of(node_id).values()))

    @staticmethod
    def _split(key: str) -> tuple[str, str]:
        node_id, _, model = key.removeprefix(keys.ASSIGNMENTS).partition("/")
        return node_id, model

    def reset(self, entries: Mapping[str, bytes]) -> None:
        before = self._by_node
        self._by_node = {}
        for key, value in entries.items():
            node_id, model = self._split(key)
            self._by_node.setdefault(node_id, {})[model] = node_pb2.ModelAssignment.FromString(
                value
            )
        for node_id in set(before) | set(self._by_node):
            if before.get(node_id) != self._by_node.get(node_id):
                self._notify(node_id)

    def put(self, key: str, value: bytes) -> None:
        node_id, model = self._split(key)
        self._by_node.setdefault(node_id, {})[model] = node_pb2.ModelAssignment.FromString(value)
        self._notify(node_id)

    def delete(self, key: str) -> None:
        node_id, model = self._split(key)
        self._by_node.get(node_id, {}).pop(model, None)
        self._notify(node_id)


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


def _validate(registration: node_service_pb2.Registration) -> str:
    require(registration.node_id, "registration.node_id")
    require(registration.public_key, "registration.public_key")
    require(registration.inference_address, "registration.inference_address")
    if len(registration.public_key) != ED25519_PUBLIC_KEY_BYTES:
        raise InvalidArgumentError(
            f"registration.public_key must be a raw Ed25519 key of {ED25519_PUBLIC_KEY_BYTES} "
            f"bytes, got {len(registration.public_key)}",
            metadata={"field": "registration.public_key"},
        )
    expected = node_id_for(registration.public_key)
    if registration.node_id != expected:
        raise InvalidArgumentError(
            f"registration.node_id {registration.node_id!r} does not belong to the public key",
            reason="NODE_ID_MISMATCH",
            metadata={"field": "registration.node_id"},
        )
    if not ADDRESS.fullmatch(registration.inference_address):
        raise InvalidArgumentError(
            f"registration.inference_address must be host:port, got "
            f"{registration.inference_address[:80]!r}",
            metadata={"field": "registration.inference_address"},
        )
    _validate_models(registration.models, "registration.models")
    return expected


class NodeSession:
    """One connected node: its lease, its record, and the endpoints it publishes."""

    def __init__(
        self,
        *,
        registry: NodeRegistry,
        node: node_pb2.Node,
        lease_id: int,
        published: set[str],
    ) -> None:
        self._registry = registry
        self.node = node
        self.lease_id = lease_id
        self._published = published
        self._written_at = 0.0

    @property
    def node_id(self) -> str:
        return self.node.name.removeprefix("nodes/")

    def _endpoints(self) -> dict[str, bytes]:
        """Endpoints for the model versions the node is assigned and reports READY."""
        assigned = self._registry.hub.of(self.node_id)
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
                )
                key = keys.endpoint(model.model_name, model.model_version, self.node_id)
                endpoints[key] = endpoint.SerializeToString()
        return endpoints

    async def publish(self, *, record: bool = True) -> None:
        """Write the record (when `record`) and the endpoints that appeared, delete the ones
        that went: in one transaction, so readers never see half of a change."""
        endpoints = self._endpoints()
        added = {key: value for key, value in endpoints.items() if key not in self._published}
        gone = self._published - endpoints.keys()
        puts = {keys.node(self.node_id): self.node.SerializeToString()} if record else {}
        if not (puts or added or gone):
            return
        await self._registry.store.write(puts={**puts, **added}, deletes=gone, lease=self.lease_id)
        self._published = set(endpoints)
        if record:
            self._written_at = self._registry.clock()

    async def heartbeat(self, models: Sequence[node_pb2.ModelStatus]) -> None:
        """Refresh the lease; republish when the node's models changed or the record aged."""
        _validate_models(models, "heartbeat.models")
        registry = self._registry
        await registry.keeper.refresh(self.lease_id, timeout=registry.timing.lease_ttl_s / 2)
        registry.heartbeats.add(1)
        now = registry.clock()
        if list(self.node.models) == list(models) and now - self._written_at < RECORD_REFRESH_S:
            return
        del self.node.models[:]
        self.node.models.extend(models)
        self.node.heartbeat_time.CopyFrom(timestamp(now))
        await self.publish()

    async def close(self, reason: str) -> None:
        """The node left cleanly: revoke its lease, so its records go now, not at expiry."""
        await self._registry.store.revoke_lease(self.lease_id)
        _log.info("node %s left: %s", self.node_id, reason or "no reason given")


class NodeRegistry:
    """Registers nodes, holds their leases, and answers questions about them."""

    def __init__(
        self,
        *,
        store: EtcdStore,
        keeper: LeaseKeeper,
        timing: NodeTiming,
        hub: AssignmentHub,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.keeper = keeper
        self.timing = timing
        self.hub = hub
        self.clock = clock
        meter = metrics.get_meter("shard.registry")
        self.heartbeats = meter.create_counter(
            "shard_registry_heartbeats", description="Heartbeats received from node agents."
        )
        self._registrations = meter.create_counter(
            "shard_registry_registrations", description="Node registrations accepted."
        )

    async def register(self, registration: node_service_pb2.Registration) -> NodeSession:
        """Admit a node; a node that reconnects within its lease keeps its lease and records."""
        node_id = _validate(registration)
        existing = await self.store.get(keys.node(node_id))
        lease_id = await self._reuse_lease(existing.lease) if existing else None
        published: set[str] = set()
        if lease_id is None:
            lease_id = await self.store.grant_lease(self.timing.lease_ttl_s)
        elif existing is not None:
            previous = await self.store.snapshot(keys.ENDPOINTS)
            published = {
                entry.key for entry in previous.entries if entry.key.endswith(f"/{node_id}")
            }
        now = timestamp(self.clock())
        node = node_pb2.Node(
            name=f"nodes/{node_id}",
            state=node_pb2.NODE_STATE_ACTIVE,
            labels=registration.labels,
            inference_address=registration.inference_address,
            agent_version=registration.agent_version,
            triton_version=registration.triton_version,
            models=registration.models,
            register_time=now,
            heartbeat_time=now,
            public_key=registration.public_key,
            capacity=registration.capacity,
        )
        session = NodeSession(registry=self, node=node, lease_id=lease_id, published=published)
        await session.publish()
        self._registrations.add(1, {"reconnect": bool(published) or existing is not None})
        _log.info(
            "node %s registered at %s (lease %x%s)",
            node_id,
            registration.inference_address,
            lease_id,
            ", reconnected" if existing else "",
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

    async def _with_admin_state(self, node: node_pb2.Node) -> node_pb2.Node:
        admin = await self.store.get(keys.node_admin(node.name.removeprefix("nodes/")))
        if admin is not None:
            state = node_pb2.Node.FromString(admin.value)
            node.state, node.state_reason = state.state, state.state_reason
        return node

    async def get_node(self, name: str) -> node_pb2.Node:
        (node_id,) = parse_name(name, "nodes/{}")
        found = await self.store.get(keys.node(node_id))
        if found is None:
            raise NotFoundError(f"node {name!r} not found", metadata={"name": name})
        return await self._with_admin_state(node_pb2.Node.FromString(found.value))

    async def list_nodes(
        self, *, page_size: int, page_token: str
    ) -> tuple[list[node_pb2.Node], str]:
        """One page of live nodes ordered by name, and the token of the next page."""
        entries, token = await paging.page(
            self.store, keys.NODES, page_size=page_size, page_token=page_token
        )
        nodes = [
            await self._with_admin_state(node_pb2.Node.FromString(entry.value)) for entry in entries
        ]
        return nodes, token

    async def set_admin_state(
        self, name: str, state: node_pb2.NodeState.ValueType, reason: str
    ) -> node_pb2.Node:
        """Cordon or drain a node (ACTIVE lifts either); the state outlasts its sessions."""
        node = await self.get_node(name)
        key = keys.node_admin(node.name.removeprefix("nodes/"))
        if state == node_pb2.NODE_STATE_ACTIVE:
            await self.store.delete(key)
            node.state, node.state_reason = node_pb2.NODE_STATE_ACTIVE, ""
        else:
            record = node_pb2.Node(name=node.name, state=state, state_reason=reason)
            await self.store.put(key, record.SerializeToString())
            node.state, node.state_reason = state, reason
        _log.info("node %s is now %s: %s", name, node_pb2.NodeState.Name(state), reason)
        return node
