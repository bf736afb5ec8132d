"""Placement: which node serves which replica, and why. Pure logic over one snapshot of the
shard; `control.py` reads the snapshot from etcd and writes the plan back.

Rules:
- A replica goes only to a node that is ACTIVE (not cordoned or draining), carries the
  deployment's selector labels and GPU models, does not already serve another version of the same
  model (versions of a model share its Triton name), and has room for it.
- Room is capacity minus what the node's replicas use, counting for each replica the larger of
  what its deployment requests and what the node measured after loading it. Nothing is
  overcommitted.
- Among nodes that fit, the one with the fewest replicas wins, then the one with the most free
  memory: replicas spread over the shard.
- A replica on a node that is gone is placed elsewhere in the same pass. A replica on a draining
  node is taken off only once enough replicas are READY elsewhere.
- Every placement and eviction is a `PlacementDecision` with a reason; so is a replica that fits
  nowhere, with a count of why each node refused it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from shard.deployment.v1 import deployment_pb2
from shard.model.v1 import model_pb2
from shard.node.v1 import node_pb2

GIB = 1024**3
# The order a node is checked in: a later refusal means the node came closer to fitting.
REFUSAL_ORDER = [
    "NODE_NOT_ACTIVE",
    "SELECTOR_MISMATCH",
    "ALREADY_SERVES_MODEL",
    "INSUFFICIENT_CPU",
    "INSUFFICIENT_MEMORY",
    "INSUFFICIENT_GPU",
]


@dataclass(frozen=True, kw_only=True)
class NodeView:
    """A live node as the scheduler sees it."""

    node_id: str
    state: node_pb2.NodeState.ValueType
    labels: Mapping[str, str]
    capacity: node_pb2.NodeResources
    models: Mapping[str, node_pb2.ModelStatus]

    def ready(self, model_name: str, version: str) -> bool:
        status = self.models.get(model_name)
        return (
            status is not None
            and status.model_version == version
            and status.state == node_pb2.MODEL_STATE_READY
        )


@dataclass(frozen=True, kw_only=True)
class Replica:
    """An assignment that exists: a model version a node has been told to serve."""

    node_id: str
    assignment: node_pb2.ModelAssignment


@dataclass(kw_only=True)
class Plan:
    """What one pass decided."""

    place: list[Replica] = field(default_factory=list)
    evict: list[Replica] = field(default_factory=list)
    decisions: dict[str, list[deployment_pb2.PlacementDecision]] = field(default_factory=dict)
    statuses: dict[str, deployment_pb2.DeploymentStatus] = field(default_factory=dict)

    def decide(self, deployment: str, decision: deployment_pb2.PlacementDecision) -> None:
        self.decisions.setdefault(deployment, []).append(decision)


@dataclass(kw_only=True)
class _Usage:
    cpu_millis: int = 0
    memory_bytes: int = 0
    gpus: int = 0
    replicas: int = 0


def _bytes(value: int) -> str:
    return f"{value / GIB:.1f} GiB"


class Scheduler:
    def __init__(
        self,
        *,
        nodes: Sequence[NodeView],
        deployments: Sequence[deployment_pb2.Deployment],
        versions: Mapping[str, model_pb2.ModelVersion],
        replicas: Sequence[Replica],
    ) -> None:
        self._nodes = {node.node_id: node for node in nodes}
        self._deployments = {deployment.name: deployment for deployment in deployments}
        self._versions = versions
        self._replicas = list(replicas)
        self.plan = Plan()

    # -- accounting -------------------------------------------------------------------------

    def _requests(self, deployment_name: str) -> deployment_pb2.Resources:
        deployment = self._deployments.get(deployment_name)
        return deployment.resources if deployment else deployment_pb2.Resources()

    def _usage(self, node: NodeView) -> _Usage:
        usage = _Usage()
        for replica in self._replicas:
            if replica.node_id != node.node_id:
                continue
            assignment = replica.assignment
            request = self._requests(assignment.deployment)
            measured = node.models.get(assignment.model_name)
            measured_memory = measured.memory_bytes if measured else 0
            usage.cpu_millis += request.cpu_millis
            usage.memory_bytes += max(request.memory_bytes, measured_memory)
            usage.gpus += request.gpu_count
            usage.replicas += 1
        return usage

    def _refusal(
        self, node: NodeView, deployment: deployment_pb2.Deployment
    ) -> tuple[str, str] | None:
        """Why `node` cannot take a replica of `deployment`: (REASON, detail), or None if it can."""
        if node.state != node_pb2.NODE_STATE_ACTIVE:
            return "NODE_NOT_ACTIVE", node_pb2.NodeState.Name(node.state).removeprefix(
                "NODE_STATE_"
            ).lower()
        selector = deployment.node_selector
        if any(node.labels.get(key) != value for key, value in selector.labels.items()):
            return "SELECTOR_MISMATCH", "labels do not match the node selector"
        model_name = deployment.model.removeprefix("models/")
        if any(
            replica.node_id == node.node_id and replica.assignment.model_name == model_name
            for replica in self._replicas
        ):
            return "ALREADY_SERVES_MODEL", f"already serves a replica of {model_name}"
        return self._resource_refusal(node, deployment)

    def _resource_refusal(
        self, node: NodeView, deployment: deployment_pb2.Deployment
    ) -> tuple[str, str] | None:
        request, selector = deployment.resources, deployment.node_selector
        usage = self._usage(node)
        capacity = node.capacity
        if request.cpu_millis and capacity.cpu_millis - usage.cpu_millis < request.cpu_millis:
            free = capacity.cpu_millis - usage.cpu_millis
            return "INSUFFICIENT_CPU", (
                f"too little CPU (need {request.cpu_millis}m, free {max(free, 0)}m)"
            )
        free_memory = capacity.memory_bytes - usage.memory_bytes
        if request.memory_bytes and free_memory < request.memory_bytes:
            return "INSUFFICIENT_MEMORY", (
                f"too little memory (need {_bytes(request.memory_bytes)}, "
                f"free {_bytes(max(free_memory, 0))})"
            )
        if request.gpu_count:
            usable = [
                gpu
                for gpu in capacity.gpus
                if gpu.memory_bytes >= request.gpu_memory_bytes
                and (not selector.gpu_models or gpu.model in selector.gpu_models)
            ]
            if len(usable) - usage.gpus < request.gpu_count:
                return "INSUFFICIENT_GPU", (
                    f"too few suitable free GPUs (need {request.gpu_count}, "
                    f"free {max(len(usable) - usage.gpus, 0)})"
                )
        return None

    # -- the pass ---------------------------------------------------------------------------

    def run(self) -> Plan:
        self._evict_orphans()
        for name in sorted(self._deployments):
            self._reconcile(self._deployments[name])
        return self.plan

    def _evict(self, replica: Replica, reason: str, message: str) -> None:
        self._replicas.remove(replica)
        self.plan.evict.append(replica)
        self.plan.decide(
            replica.assignment.deployment,
            deployment_pb2.PlacementDecision(
                action=deployment_pb2.PLACEMENT_ACTION_EVICTED,
                version=replica.assignment.model_version,
                node=f"nodes/{replica.node_id}",
                reason=reason,
                message=message,
            ),
        )

    def _evict_orphans(self) -> None:
        for replica in list(self._replicas):
            deployment = self._deployments.get(replica.assignment.deployment)
            if replica.node_id not in self._nodes:
                self._evict(replica, "NODE_LOST", f"node {replica.node_id} left the shard")
            elif self._nodes[replica.node_id].state == node_pb2.NODE_STATE_QUARANTINED:
                self._evict(replica, "NODE_QUARANTINED", f"node {replica.node_id} is quarantined")
            elif deployment is None:
                self._evict(replica, "DEPLOYMENT_DELETED", "the deployment was deleted")
            elif replica.assignment.model_version not in {t.version for t in deployment.targets}:
                self._evict(
                    replica,
                    "VERSION_REMOVED",
                    f"version {replica.assignment.model_version} is no longer deployed",
                )

    def _reconcile(self, deployment: deployment_pb2.Deployment) -> None:
        unschedulable: list[str] = []
        for target in deployment.targets:
            self._reconcile_target(deployment, target, unschedulable)
        self.plan.statuses[deployment.name] = self._status(deployment, unschedulable)

    def _reconcile_target(
        self,
        deployment: deployment_pb2.Deployment,
        target: deployment_pb2.DeploymentTarget,
        unschedulable: list[str],
    ) -> None:
        def mine() -> list[Replica]:
            return [
                replica
                for replica in self._replicas
                if replica.assignment.deployment == deployment.name
                and replica.assignment.model_version == target.version
            ]

        def draining(replica: Replica) -> bool:
            return self._nodes[replica.node_id].state == node_pb2.NODE_STATE_DRAINING

        staying = [replica for replica in mine() if not draining(replica)]
        # Scale down: drop the surplus, replicas that are not ready first.
        surplus = len(staying) - target.replicas
        if surplus > 0:
            staying.sort(
                key=lambda r: (
                    self._nodes[r.node_id].ready(r.assignment.model_name, target.version),
                    r.node_id,
                )
            )
            for replica in staying[:surplus]:
                self._evict(replica, "SCALED_DOWN", f"replicas reduced to {target.replicas}")
        for _ in range(target.replicas - len(staying)):
            if not self._place(deployment, target):
                unschedulable.append(target.version)
                break
        # Drain: a replica leaves a draining node once enough are ready elsewhere.
        ready_elsewhere = sum(
            1
            for replica in mine()
            if not draining(replica)
            and self._nodes[replica.node_id].ready(replica.assignment.model_name, target.version)
        )
        for replica in mine():
            if draining(replica) and ready_elsewhere >= target.replicas:
                self._evict(
                    replica, "NODE_DRAINING", f"node {replica.node_id} is draining; replaced"
                )

    def _place(
        self, deployment: deployment_pb2.Deployment, target: deployment_pb2.DeploymentTarget
    ) -> bool:
        version_name = f"{deployment.model}/versions/{target.version}"
        version = self._versions.get(version_name)
        refusals: Counter[str] = Counter()
        details: dict[str, str] = {}
        fits: list[tuple[int, int, str]] = []
        for node in self._nodes.values():
            refusal = self._refusal(node, deployment)
            if refusal is None:
                usage = self._usage(node)
                free_memory = node.capacity.memory_bytes - usage.memory_bytes
                fits.append((usage.replicas, -free_memory, node.node_id))
            else:
                refusals[refusal[0]] += 1
                details.setdefault(refusal[0], refusal[1])
        if version is None or not fits:
            if version is None:
                message = f"{version_name} does not exist"
                reason = "VERSION_NOT_FOUND"
            else:
                parts = [f"{count} {details[reason]}" for reason, count in refusals.most_common()]
                message = f"0 of {len(self._nodes)} nodes fit" + (
                    ": " + "; ".join(parts) if parts else ""
                )
                # The reason of the node that came closest to fitting: the most telling one.
                reason = max(refusals, key=REFUSAL_ORDER.index) if refusals else "NO_NODES"
            self.plan.decide(
                deployment.name,
                deployment_pb2.PlacementDecision(
                    action=deployment_pb2.PLACEMENT_ACTION_UNSCHEDULABLE,
                    version=target.version,
                    reason=reason,
                    message=message,
                ),
            )
            return False
        fits.sort()
        replicas_there, _, node_id = fits[0]
        message = (
            f"{len(fits)} of {len(self._nodes)} nodes fit; {node_id} has the fewest replicas "
            f"({replicas_there})"
        )
        assignment = node_pb2.ModelAssignment(
            model_name=deployment.model.removeprefix("models/"),
            model_version=target.version,
            config=version.config,
            files=version.files,
            deployment=deployment.name,
            reason=message,
        )
        replica = Replica(node_id=node_id, assignment=assignment)
        self._replicas.append(replica)
        self.plan.place.append(replica)
        self.plan.decide(
            deployment.name,
            deployment_pb2.PlacementDecision(
                action=deployment_pb2.PLACEMENT_ACTION_PLACED,
                version=target.version,
                node=f"nodes/{node_id}",
                reason="PLACED",
                message=message,
            ),
        )
        return True

    def _status(
        self, deployment: deployment_pb2.Deployment, unschedulable: list[str]
    ) -> deployment_pb2.DeploymentStatus:
        status = deployment_pb2.DeploymentStatus()
        available = True
        for target in deployment.targets:
            replicas = [
                replica
                for replica in self._replicas
                if replica.assignment.deployment == deployment.name
                and replica.assignment.model_version == target.version
            ]
            ready = sum(
                1
                for replica in replicas
                if self._nodes[replica.node_id].ready(replica.assignment.model_name, target.version)
            )
            available = available and ready >= target.replicas
            status.targets.add(
                version=target.version,
                desired_replicas=target.replicas,
                ready_replicas=ready,
                nodes=sorted(f"nodes/{replica.node_id}" for replica in replicas),
            )
        status.conditions.add(
            type="Available",
            status=available,
            reason="ALL_REPLICAS_READY" if available else "REPLICAS_NOT_READY",
            message="every desired replica is ready"
            if available
            else "some desired replicas are not ready yet",
        )
        failures = [
            decision
            for decision in self.plan.decisions.get(deployment.name, [])
            if decision.action == deployment_pb2.PLACEMENT_ACTION_UNSCHEDULABLE
        ]
        status.conditions.add(
            type="Unschedulable",
            status=bool(unschedulable),
            reason=failures[-1].reason if failures else "SCHEDULED",
            message="; ".join(f"version {d.version}: {d.message}" for d in failures)
            if failures
            else "every replica has a node",
        )
        return status
