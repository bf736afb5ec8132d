"""The level-based control loop: read desired and observed state, plan, write the difference.

Runs on the one registry replica that leads (see `shard_core.etcd.election`). Each pass reads
the live nodes, operator node states, deployments and current assignments from etcd, lets the
`Scheduler` plan, and writes assignment changes, decisions and statuses. Writes are conditional on
the leader key, so a replica that lost leadership cannot write a stale plan. Nothing is kept
between passes that etcd does not have, so a restarted registry picks up where it left off.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping

from shard.deployment.v1 import deployment_pb2
from shard.model.v1 import model_pb2
from shard.node.v1 import node_pb2
from shard_core import keys
from shard_core.etcd.store import EtcdStore
from shard_registry.lifecycle import overlay
from shard_registry.scheduler import NodeView, Replica, Scheduler

_log = logging.getLogger(__name__)

MAX_OPS_PER_WRITE = 100  # etcd refuses transactions of more than 128 operations by default
DECISIONS_KEPT = 50


class LostLeadershipError(RuntimeError):
    pass


def _node_id(key: str, prefix: str) -> str:
    return key.removeprefix(prefix).split("/", 1)[0]


class ControlLoop:
    def __init__(
        self,
        *,
        store: EtcdStore,
        election_key: str,
        period_s: float,
        trusted_claims: frozenset[str] = frozenset(),
    ) -> None:
        self._store = store
        self._trusted_claims = trusted_claims
        self._election_key = election_key
        self._period_s = period_s
        self._sequence = time.time_ns()

    async def run(self, leader_revision: int) -> None:
        """Reconcile every period for as long as this replica leads."""
        while True:
            try:
                await self.reconcile(leader_revision)
            except LostLeadershipError:
                raise
            except Exception:
                _log.exception("reconcile pass failed; retrying next period")
            await asyncio.sleep(self._period_s)

    async def reconcile(self, leader_revision: int) -> None:
        # Decision keys follow the clock, so a replica that takes over later keeps them in order.
        self._sequence = max(self._sequence, time.time_ns())
        nodes = await self._nodes()
        deployments = [
            deployment_pb2.Deployment.FromString(entry.value)
            for entry in (await self._store.snapshot(keys.DEPLOYMENTS)).entries
        ]
        versions = await self._versions(deployments)
        replicas = [
            Replica(
                node_id=_node_id(entry.key, keys.ASSIGNMENTS),
                assignment=node_pb2.ModelAssignment.FromString(entry.value),
            )
            for entry in (await self._store.snapshot(keys.ASSIGNMENTS)).entries
        ]
        statuses = {
            entry.key.removeprefix(keys.DEPLOYMENT_STATUS): entry.value
            for entry in (await self._store.snapshot(keys.DEPLOYMENT_STATUS)).entries
        }
        plan = Scheduler(
            nodes=nodes, deployments=deployments, versions=versions, replicas=replicas
        ).run()

        placed = {keys.assignment(r.node_id, r.assignment.model_name): r for r in plan.place}
        deletes = {
            keys.assignment(r.node_id, r.assignment.model_name) for r in plan.evict
        } - placed.keys()
        puts: dict[str, bytes] = {
            key: replica.assignment.SerializeToString() for key, replica in placed.items()
        }
        for name, status in plan.statuses.items():
            deployment_id = name.removeprefix("deployments/")
            previous = statuses.pop(deployment_id, None)
            serialized = self._with_transition_times(status, previous).SerializeToString()
            if serialized != previous:
                puts[keys.deployment_status(deployment_id)] = serialized
            for decision in self._new_decisions(plan.decisions.get(name, []), previous):
                self._sequence += 1
                puts[keys.decision(deployment_id, self._sequence)] = decision.SerializeToString()
        for gone in statuses:  # deployments deleted since their status was written
            deletes.add(keys.deployment_status(gone))
            history = await self._store.snapshot(keys.decisions(gone))
            deletes.update(entry.key for entry in history.entries)
        await self._write(puts, deletes, leader_revision)
        for name in plan.decisions:
            await self._trim_decisions(name.removeprefix("deployments/"), leader_revision)

    async def _nodes(self) -> list[NodeView]:
        admin = {
            entry.key.removeprefix(keys.NODE_ADMIN): node_pb2.Node.FromString(entry.value)
            for entry in (await self._store.snapshot(keys.NODE_ADMIN)).entries
        }
        views = []
        for entry in (await self._store.snapshot(keys.NODES)).entries:
            node_id = entry.key.removeprefix(keys.NODES)
            node = overlay(
                node_pb2.Node.FromString(entry.value), admin.get(node_id), self._trusted_claims
            )
            views.append(
                NodeView(
                    node_id=node_id,
                    state=node.state,
                    labels=dict(node.labels),
                    capacity=node.capacity,
                    models={status.model_name: status for status in node.models},
                )
            )
        return views

    async def _versions(
        self, deployments: Iterable[deployment_pb2.Deployment]
    ) -> dict[str, model_pb2.ModelVersion]:
        found = {}
        for deployment in deployments:
            model_id = deployment.model.removeprefix("models/")
            for target in deployment.targets:
                entry = await self._store.get(keys.version(model_id, target.version))
                if entry is not None:
                    found[f"{deployment.model}/versions/{target.version}"] = (
                        model_pb2.ModelVersion.FromString(entry.value)
                    )
        return found

    def _with_transition_times(
        self, status: deployment_pb2.DeploymentStatus, previous: bytes | None
    ) -> deployment_pb2.DeploymentStatus:
        """Keep a condition's transition time unless its status changed."""
        before = {}
        if previous is not None:
            before = {
                c.type: c for c in deployment_pb2.DeploymentStatus.FromString(previous).conditions
            }
        now = time.time_ns()
        for condition in status.conditions:
            old = before.get(condition.type)
            if old is not None and old.status == condition.status:
                condition.last_transition_time.CopyFrom(old.last_transition_time)
            else:
                condition.last_transition_time.FromNanoseconds(now)
        return status

    def _new_decisions(
        self, decisions: list[deployment_pb2.PlacementDecision], previous: bytes | None
    ) -> list[deployment_pb2.PlacementDecision]:
        """Placements and evictions always; an unschedulable replica only when its reason is new,
        so an unfittable deployment does not write a decision every pass."""
        old_message = ""
        if previous is not None:
            for condition in deployment_pb2.DeploymentStatus.FromString(previous).conditions:
                if condition.type == "Unschedulable" and condition.status:
                    old_message = condition.message
        now = time.time_ns()
        kept = []
        for decision in decisions:
            if (
                decision.action == deployment_pb2.PLACEMENT_ACTION_UNSCHEDULABLE
                and f"version {decision.version}: {decision.message}" in old_message
            ):
                continue
            decision.time.FromNanoseconds(now)
            kept.append(decision)
        return kept

    async def _write(
        self, puts: Mapping[str, bytes], deletes: Iterable[str], leader_revision: int
    ) -> None:
        ops: list[tuple[str, bytes | None]] = [*puts.items(), *((key, None) for key in deletes)]
        for start in range(0, len(ops), MAX_OPS_PER_WRITE):
            batch = ops[start : start + MAX_OPS_PER_WRITE]
            written = await self._store.write(
                puts={key: value for key, value in batch if value is not None},
                deletes=[key for key, value in batch if value is None],
                expect={self._election_key: leader_revision},
            )
            if written is None:
                raise LostLeadershipError("the leader key changed; another replica leads")

    async def _trim_decisions(self, deployment_id: str, leader_revision: int) -> None:
        entries = (await self._store.snapshot(keys.decisions(deployment_id))).entries
        if len(entries) > DECISIONS_KEPT:
            old = [entry.key for entry in entries[: len(entries) - DECISIONS_KEPT]]
            await self._write({}, old, leader_revision)
