"""The node state machine: every action, actor and operator state, against a table written out
here rather than derived from the code under test."""

from __future__ import annotations

import itertools

import pytest

from shard.node.v1 import node_pb2
from shard_registry.directory import NodeDirectory
from shard_registry.lifecycle import Actor, NodeAction, TransitionRefusedError, decide

CORDONED = node_pb2.NODE_STATE_CORDONED
DRAINING = node_pb2.NODE_STATE_DRAINING
QUARANTINED = node_pb2.NODE_STATE_QUARANTINED
REFUSED = "refused"
STATES = (None, CORDONED, DRAINING, QUARANTINED)

# (action, actor, current) -> the operator state left, or REFUSED. Deleting a node forgets its
# state except where noted.
EXPECTED = {
    **{(NodeAction.CORDON, a, s): CORDONED for a in Actor for s in STATES},
    **{(NodeAction.DRAIN, a, s): DRAINING for a in Actor for s in STATES},
    **{(NodeAction.UNCORDON, a, s): None for a in Actor for s in STATES},
    **{(NodeAction.QUARANTINE, a, s): QUARANTINED for a in Actor for s in STATES},
    **{(NodeAction.DELETE, a, s): None for a in Actor for s in STATES},
    # A provider never quarantines, and never moves its node out of quarantine.
    **{(NodeAction.QUARANTINE, Actor.PROVIDER, s): REFUSED for s in STATES},
    (NodeAction.CORDON, Actor.PROVIDER, QUARANTINED): REFUSED,
    (NodeAction.DRAIN, Actor.PROVIDER, QUARANTINED): REFUSED,
    (NodeAction.UNCORDON, Actor.PROVIDER, QUARANTINED): REFUSED,
    # Nor does the shard lift what it imposed.
    (NodeAction.CORDON, Actor.SHARD, QUARANTINED): REFUSED,
    (NodeAction.DRAIN, Actor.SHARD, QUARANTINED): REFUSED,
    (NodeAction.UNCORDON, Actor.SHARD, QUARANTINED): REFUSED,
    # A provider may take a quarantined node out, but the quarantine stays with its identity.
    (NodeAction.DELETE, Actor.PROVIDER, QUARANTINED): QUARANTINED,
    (NodeAction.DELETE, Actor.SHARD, QUARANTINED): QUARANTINED,
}


@pytest.mark.parametrize(
    ("action", "actor", "current"), list(itertools.product(NodeAction, Actor, STATES))
)
def test_every_transition(
    action: NodeAction, actor: Actor, current: node_pb2.NodeState.ValueType | None
) -> None:
    expected = EXPECTED[action, actor, current]
    if expected == REFUSED:
        with pytest.raises(TransitionRefusedError) as refused:
            decide(action, actor, current)
        assert refused.value.reason in {"QUARANTINED", "NOT_ALLOWED"}
        return
    decision = decide(action, actor, current)
    assert decision.state == expected
    assert decision.forget == (action == NodeAction.DELETE and expected is None)


def _record(node_id: str, registered_ms: int) -> bytes:
    node = node_pb2.Node(name=f"nodes/{node_id}", state=node_pb2.NODE_STATE_ACTIVE)
    node.register_time.FromMilliseconds(registered_ms)
    return node.SerializeToString()


def test_a_credential_s_session_stands_while_it_is_the_node_s_latest() -> None:
    directory = NodeDirectory()
    now = 1_000.0
    # A fresh session whose record this replica has not seen yet is believed for a moment.
    assert directory.session_standing("n1", 999_000, now=now) is None
    gone = directory.session_standing("n1", 900_000, now=now)
    assert gone is not None
    assert gone.reason == "CREDENTIAL_REVOKED"
    directory.records.put("nodes/n1", _record("n1", 999_000))
    assert directory.session_standing("n1", 999_000, now=now) is None
    # A later session replaces it: the old credential stops.
    directory.records.put("nodes/n1", _record("n1", 999_500))
    replaced = directory.session_standing("n1", 999_000, now=now)
    assert replaced is not None
    assert replaced.reason == "CREDENTIAL_REVOKED"
    # Its record deleted (the node deleted or gone), its session ends at once.
    directory.records.put("nodes/n2", _record("n2", 999_900))
    assert directory.session_standing("n2", 999_900, now=now) is None
    directory.records.delete("nodes/n2")
    deleted = directory.session_standing("n2", 999_900, now=now)
    assert deleted is not None
    assert deleted.reason == "CREDENTIAL_REVOKED"
    quarantine = node_pb2.Node(name="nodes/n1", state=QUARANTINED)
    directory.admin.put("node-admin/n1", quarantine.SerializeToString())
    refused = directory.session_standing("n1", 999_500, now=now)
    assert refused is not None
    assert refused.reason == "NODE_NOT_ALLOWED"
