"""A node's operator states and who may move it between them, and what is fact about a node:
the one place that decides.

Over a node's own state (PENDING, ACTIVE, DEGRADED, which its heartbeats drive) lies at most one
operator state, kept in `node-admin/{node}` so it outlasts the node's sessions: CORDONED and
DRAINING, which the node's provider (or an admin) sets and lifts, and QUARANTINED, which only the
shard (a failed canary, a broken policy) or an admin imposes and only an admin lifts. Every verb
that changes a node (cordon, drain, uncordon, quarantine, delete) asks `decide`, so no sequence
of verbs walks around a rule another verb enforces: a provider's cordon of a quarantined node is
refused like its uncordon, and deleting it keeps the quarantine for when it comes back.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from shard.node.v1 import node_pb2
from shard_core.errors import PermissionDeniedError

QUARANTINED = node_pb2.NODE_STATE_QUARANTINED


class NodeAction(enum.StrEnum):
    CORDON = "cordon"
    DRAIN = "drain"
    UNCORDON = "uncordon"
    QUARANTINE = "quarantine"
    DELETE = "delete"


class Actor(enum.StrEnum):
    """Who asks: an admin, the node's own provider, or the shard itself (canaries, policy)."""

    ADMIN = "admin"
    PROVIDER = "provider"
    SHARD = "shard"


# The operator state each action leaves; None lifts it.
_TARGET: dict[NodeAction, node_pb2.NodeState.ValueType | None] = {
    NodeAction.CORDON: node_pb2.NODE_STATE_CORDONED,
    NodeAction.DRAIN: node_pb2.NODE_STATE_DRAINING,
    NodeAction.UNCORDON: None,
    NodeAction.QUARANTINE: QUARANTINED,
    NodeAction.DELETE: None,
}


@dataclass(frozen=True, kw_only=True)
class Decision:
    """What an allowed action leaves: the operator state (None: none), and for a deletion
    whether the node's operator state and history go with it."""

    state: node_pb2.NodeState.ValueType | None
    forget: bool = False


class TransitionRefusedError(PermissionDeniedError):
    """An action the actor may not take on a node in its current state."""


def decide(
    action: NodeAction, actor: Actor, current: node_pb2.NodeState.ValueType | None
) -> Decision:
    """The outcome of `actor` taking `action` on a node whose operator state is `current`
    (None: it has none), or TransitionRefusedError saying why not."""
    if action == NodeAction.QUARANTINE and actor == Actor.PROVIDER:
        raise TransitionRefusedError(
            "only the shard or an admin quarantines a node", reason="NOT_ALLOWED"
        )
    if current == QUARANTINED and actor != Actor.ADMIN:
        if action == NodeAction.DELETE:
            # The provider may take its node out of the shard, but the quarantine stays with the
            # node's identity: if it enrolls again, it comes back quarantined.
            return Decision(state=QUARANTINED)
        if action != NodeAction.QUARANTINE:
            raise TransitionRefusedError(
                f"the node is quarantined; only an admin may {action} it", reason="QUARANTINED"
            )
    if action == NodeAction.DELETE:
        return Decision(state=None, forget=True)
    return Decision(state=_TARGET[action])


def overlay(
    node: node_pb2.Node, admin: node_pb2.Node | None, trusted_claims: frozenset[str]
) -> node_pb2.Node:
    """`node` (its record as its session wrote it) with what was set over it: the operator
    state an admin or the shard imposed, and as `labels` the facts an admin set, plus the
    labels the node claims whose keys the shard's policy trusts. Everything that decides by a
    node's state or labels (the scheduler, filters, credentials) reads it through this."""
    if admin is not None and admin.state:
        node.state, node.state_reason = admin.state, admin.state_reason
    labels = {k: v for k, v in node.claimed_labels.items() if k in trusted_claims}
    labels.update(admin.labels if admin is not None else {})
    node.labels.clear()
    node.labels.update(labels)
    return node
