"""The registry's live view of every node: records, operator states, assignments and open
tasks, mirrored from etcd once for the whole process and handed to whoever needs them.

Sessions subscribe for their own node (new assignments to push, a state that stops or allows
traffic); `WatchNodes` callers subscribe to every node change.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

from shard.node.v1 import node_pb2, node_service_pb2
from shard.task.v1 import task_pb2
from shard_core import keys
from shard_core.errors import PermissionDeniedError, ShardError, UnauthenticatedError
from shard_registry.lifecycle import overlay

NodeListener = Callable[[], None]
# None tells a watcher it fell too far behind and must start again.
ChangeQueue = asyncio.Queue[node_service_pb2.WatchNodesResponse | None]
WATCH_BACKLOG = 1000
# How long a node's fresh session is believed before this replica's view shows its record.
MIRROR_GRACE_S = 10.0

UPSERTED = node_service_pb2.CHANGE_KIND_UPSERTED
REMOVED = node_service_pb2.CHANGE_KIND_REMOVED


class _Prefix:
    """One mirrored prefix: key suffix -> value, calling back with the node id of each change."""

    def __init__(self, prefix: str, changed: Callable[[str], None]) -> None:
        self.prefix = prefix
        self.values: dict[str, bytes] = {}
        self._changed = changed

    def _node_id(self, key: str) -> str:
        return key.removeprefix(self.prefix).split("/", 1)[0]

    def reset(self, entries: Mapping[str, bytes]) -> None:
        before = self.values
        self.values = {key.removeprefix(self.prefix): value for key, value in entries.items()}
        for suffix in set(before) | set(self.values):
            if before.get(suffix) != self.values.get(suffix):
                self._changed(suffix.split("/", 1)[0])

    def put(self, key: str, value: bytes) -> None:
        self.values[key.removeprefix(self.prefix)] = value
        self._changed(self._node_id(key))

    def delete(self, key: str) -> None:
        self.values.pop(key.removeprefix(self.prefix), None)
        self._changed(self._node_id(key))


class NodeDirectory:
    def __init__(self, *, trusted_claims: frozenset[str] = frozenset()) -> None:
        self.trusted_claims = trusted_claims  # claimed label keys the policy takes as facts
        self.records = _Prefix(keys.NODES, self._changed)
        self.admin = _Prefix(keys.NODE_ADMIN, self._changed)
        self.assignment_records = _Prefix(keys.ASSIGNMENTS, self._changed)
        self.open_task_records = _Prefix(keys.OPEN_TASKS, self._changed)
        self._listeners: dict[str, NodeListener] = {}
        self._watchers: set[ChangeQueue] = set()
        self._last: dict[str, node_pb2.Node] = {}
        # Sessions this view saw end, by node: their start (ms), kept for a grace period.
        self._ended: dict[str, int] = {}

    # -- what sessions ask ------------------------------------------------------------------

    def assignments(self, node_id: str) -> dict[str, node_pb2.ModelAssignment]:
        prefix = f"{node_id}/"
        return {
            suffix.removeprefix(prefix): node_pb2.ModelAssignment.FromString(value)
            for suffix, value in self.assignment_records.values.items()
            if suffix.startswith(prefix)
        }

    def open_tasks(self, node_id: str) -> list[task_pb2.Task]:
        """The node's PENDING and RUNNING tasks, by name."""
        prefix = f"{node_id}/"
        return [
            task_pb2.Task.FromString(value)
            for suffix, value in sorted(self.open_task_records.values.items())
            if suffix.startswith(prefix)
        ]

    def admin_state(self, node_id: str) -> node_pb2.Node | None:
        value = self.admin.values.get(node_id)
        return node_pb2.Node.FromString(value) if value is not None else None

    def quarantined(self, node_id: str) -> bool:
        """Whether the node is quarantined: what the shard or an admin set, which outlives the
        node's record (a node whose lease lapsed comes back quarantined)."""
        admin = self.admin_state(node_id)
        return admin is not None and admin.state == node_pb2.NODE_STATE_QUARANTINED

    def node(self, node_id: str) -> node_pb2.Node | None:
        """The node's record with what admins and the shard set laid over it."""
        value = self.records.values.get(node_id)
        if value is None:
            return None
        return overlay(
            node_pb2.Node.FromString(value), self.admin_state(node_id), self.trusted_claims
        )

    def session_standing(self, node_id: str, session_ms: int, *, now: float) -> ShardError | None:
        """Whether the node's session that began at `session_ms` still stands, for a
        credential issued on it: None if so, or why not. A session stands while it is the
        node's latest and the node is not quarantined. A record this view has not seen yet is
        given `MIRROR_GRACE_S` from the session's start: the view follows etcd a moment behind
        the replica that wrote it."""
        if self.quarantined(node_id):
            return PermissionDeniedError(
                f"node {node_id} is quarantined", reason="NODE_NOT_ALLOWED"
            )
        node = self.node(node_id)
        if node is None:
            ended = self._ended.get(node_id)
            if now - session_ms / 1000 <= MIRROR_GRACE_S and (ended is None or session_ms > ended):
                return None
            return UnauthenticatedError(
                f"node {node_id} is no longer in the shard", reason="CREDENTIAL_REVOKED"
            )
        if session_ms < node.register_time.ToMilliseconds():
            return UnauthenticatedError(
                f"node {node_id} registered again since this credential was issued; use the "
                "new one",
                reason="CREDENTIAL_REVOKED",
            )
        return None

    def _session_ended(self, node_id: str, session_ms: int) -> None:
        """Remember a session that ended while its credentials are in their grace period."""
        self._ended[node_id] = session_ms
        oldest = session_ms - MIRROR_GRACE_S * 1000
        for other, started in list(self._ended.items()):
            if started < oldest:
                del self._ended[other]

    def subscribe(self, node_id: str, listener: NodeListener) -> None:
        self._listeners[node_id] = listener
        listener()

    def unsubscribe(self, node_id: str, listener: NodeListener) -> None:
        if self._listeners.get(node_id) == listener:
            del self._listeners[node_id]

    # -- watchers ---------------------------------------------------------------------------

    def watch(self) -> ChangeQueue:
        """A queue of changes that starts with every current node."""
        queue: ChangeQueue = asyncio.Queue(maxsize=WATCH_BACKLOG + len(self.records.values))
        for node_id in sorted(self.records.values):
            node = self.node(node_id)
            if node is not None:
                queue.put_nowait(node_service_pb2.WatchNodesResponse(kind=UPSERTED, node=node))
        self._watchers.add(queue)
        return queue

    def unwatch(self, queue: ChangeQueue) -> None:
        self._watchers.discard(queue)

    def _changed(self, node_id: str) -> None:
        listener = self._listeners.get(node_id)
        if listener is not None:
            listener()
        node = self.node(node_id)
        if node is not None:
            if self._last.get(node_id) == node:
                return
            self._last[node_id] = node
            change = node_service_pb2.WatchNodesResponse(kind=UPSERTED, node=node)
        else:
            gone = self._last.pop(node_id, None)
            if gone is None:
                return
            self._session_ended(node_id, gone.register_time.ToMilliseconds())
            change = node_service_pb2.WatchNodesResponse(kind=REMOVED, node=gone)
        for queue in list(self._watchers):
            try:
                queue.put_nowait(change)
            except asyncio.QueueFull:
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(None)
                self._watchers.discard(queue)
