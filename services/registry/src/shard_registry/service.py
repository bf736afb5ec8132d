"""The registry's node domain: who is in the shard, and what each node can serve.

A node's record and its model endpoints are bound to one etcd lease. Heartbeats refresh the
lease; when they stop, etcd deletes every record of the node at once, so a dead node disappears
from every view together.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from google.protobuf import timestamp_pb2
from opentelemetry import metrics

from shard.node.v1 import node_pb2, node_service_pb2
from shard_core import keys
from shard_core.errors import InvalidArgumentError, NotFoundError, require
from shard_core.etcd.lease import LeaseExpiredError, LeaseKeeper
from shard_core.etcd.store import EtcdStore
from shard_core.identity import ED25519_PUBLIC_KEY_BYTES, node_id_for

_log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
# A heartbeat that changes nothing still rewrites the record this often, to keep its time fresh.
RECORD_REFRESH_S = 30.0


@dataclass(frozen=True, kw_only=True)
class NodeTiming:
    """The liveness contract the registry gives each node."""

    heartbeat_interval_s: float
    lease_ttl_s: int


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def _ready_endpoints(node: node_pb2.Node) -> dict[str, bytes]:
    node_id = node.name.removeprefix("nodes/")
    return {
        keys.endpoint(model.model_name, model.model_version, node_id): node_pb2.ModelEndpoint(
            model_name=model.model_name,
            model_version=model.model_version,
            node=node.name,
            inference_address=node.inference_address,
        ).SerializeToString()
        for model in node.models
        if model.state == node_pb2.MODEL_STATE_READY
    }


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
    host, _, port = registration.inference_address.rpartition(":")
    if not host or not port.isdigit():
        raise InvalidArgumentError(
            f"registration.inference_address must be host:port, got "
            f"{registration.inference_address!r}",
            metadata={"field": "registration.inference_address"},
        )
    return expected


class NodeSession:
    """One connected node: its lease, its record, and the endpoints it publishes."""

    def __init__(
        self,
        *,
        store: EtcdStore,
        keeper: LeaseKeeper,
        timing: NodeTiming,
        node: node_pb2.Node,
        lease_id: int,
        clock: Callable[[], float],
    ) -> None:
        self._store = store
        self._keeper = keeper
        self._timing = timing
        self._clock = clock
        self.node = node
        self.lease_id = lease_id
        self._written_at = 0.0
        self._heartbeats = metrics.get_meter("shard.registry").create_counter(
            "shard_registry_heartbeats", description="Heartbeats received from node agents."
        )

    @property
    def node_id(self) -> str:
        return self.node.name.removeprefix("nodes/")

    async def publish(self, previous: node_pb2.Node | None) -> None:
        """Write the record and its endpoints, removing endpoints `previous` had and we don't."""
        endpoints = _ready_endpoints(self.node)
        stale = set(_ready_endpoints(previous)) - set(endpoints) if previous else set()
        puts = {keys.node(self.node_id): self.node.SerializeToString(), **endpoints}
        await self._store.commit(puts=puts, deletes=stale, lease=self.lease_id)
        self._written_at = self._clock()

    async def heartbeat(self, models: Sequence[node_pb2.ModelStatus]) -> None:
        """Refresh the lease; republish when the node's models changed or the record aged."""
        await self._keeper.refresh(self.lease_id, timeout=self._timing.heartbeat_interval_s)
        self._heartbeats.add(1)
        now = self._clock()
        changed = list(self.node.models) != list(models)
        if not changed and now - self._written_at < RECORD_REFRESH_S:
            return
        previous = self.node
        self.node = node_pb2.Node()
        self.node.CopyFrom(previous)
        del self.node.models[:]
        self.node.models.extend(models)
        self.node.heartbeat_time.CopyFrom(_timestamp(now))
        await self.publish(previous)

    async def close(self, reason: str) -> None:
        """The node left cleanly: revoke its lease, so its records go now, not at expiry."""
        await self._store.revoke_lease(self.lease_id)
        _log.info("node %s left: %s", self.node_id, reason or "no reason given")


class NodeRegistry:
    """Registers nodes, holds their leases, and answers questions about them."""

    def __init__(
        self,
        *,
        store: EtcdStore,
        keeper: LeaseKeeper,
        timing: NodeTiming,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._keeper = keeper
        self.timing = timing
        self._clock = clock
        self._registrations = metrics.get_meter("shard.registry").create_counter(
            "shard_registry_registrations", description="Node registrations accepted."
        )

    async def register(self, registration: node_service_pb2.Registration) -> NodeSession:
        """Admit a node; a node that reconnects within its lease keeps its lease and records."""
        node_id = _validate(registration)
        existing = await self._store.get(keys.node(node_id))
        previous = node_pb2.Node.FromString(existing.value) if existing else None
        lease_id = await self._reuse_lease(existing.lease) if existing else None
        if lease_id is None:
            lease_id = await self._store.grant_lease(self.timing.lease_ttl_s)
            previous = None
        now = self._clock()
        node = node_pb2.Node(
            name=f"nodes/{node_id}",
            state=node_pb2.NODE_STATE_ACTIVE,
            labels=registration.labels,
            inference_address=registration.inference_address,
            agent_version=registration.agent_version,
            triton_version=registration.triton_version,
            models=registration.models,
            register_time=_timestamp(now),
            heartbeat_time=_timestamp(now),
            public_key=registration.public_key,
        )
        session = NodeSession(
            store=self._store,
            keeper=self._keeper,
            timing=self.timing,
            node=node,
            lease_id=lease_id,
            clock=self._clock,
        )
        await session.publish(previous)
        self._registrations.add(1, {"reconnect": previous is not None})
        _log.info(
            "node %s registered at %s (lease %x%s)",
            node_id,
            registration.inference_address,
            lease_id,
            ", reconnected" if previous else "",
        )
        return session

    async def _reuse_lease(self, lease_id: int) -> int | None:
        if not lease_id:
            return None
        try:
            await self._keeper.refresh(lease_id, timeout=self.timing.heartbeat_interval_s)
        except LeaseExpiredError:
            return None
        return lease_id

    async def get(self, name: str) -> node_pb2.Node:
        require(name, "name")
        node_id = name.removeprefix("nodes/")
        if node_id == name or not node_id or "/" in node_id:
            raise InvalidArgumentError(
                f"name must be nodes/{{node}}, got {name!r}", metadata={"field": "name"}
            )
        found = await self._store.get(keys.node(node_id))
        if found is None:
            raise NotFoundError(f"node {name!r} not found", metadata={"name": name})
        return node_pb2.Node.FromString(found.value)

    async def list(self, *, page_size: int, page_token: str) -> tuple[list[node_pb2.Node], str]:
        """One page of live nodes ordered by name, and the token of the next page."""
        if page_size < 0:
            raise InvalidArgumentError(
                "page_size must not be negative", metadata={"field": "page_size"}
            )
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        entries, more = await self._store.page(
            keys.NODES, start_after=_decode_token(page_token), limit=size
        )
        nodes = [node_pb2.Node.FromString(entry.value) for entry in entries]
        next_token = _encode_token(entries[-1].key) if more and entries else ""
        return nodes, next_token


def _encode_token(last_key: str) -> str:
    return base64.urlsafe_b64encode(last_key.encode()).decode()


def _decode_token(token: str) -> str:
    if not token:
        return ""
    try:
        key = base64.urlsafe_b64decode(token.encode()).decode()
    except ValueError:
        key = ""
    if not key.startswith(keys.NODES):
        raise InvalidArgumentError(
            "page_token is not a token this API returned", metadata={"field": "page_token"}
        )
    return key
