"""Placement rules of the scheduler, as pure logic over one snapshot of the shard."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from shard.deployment.v1 import deployment_pb2
from shard.model.v1 import model_pb2
from shard.node.v1 import node_pb2
from shard_registry.scheduler import GIB, NodeView, Plan, Replica, Scheduler

ACTIVE = node_pb2.NODE_STATE_ACTIVE
READY = node_pb2.MODEL_STATE_READY


def node(
    node_id: str,
    *,
    memory_gib: float = 16,
    cpus: int = 8,
    gpus: Sequence[tuple[str, float]] = (),
    state: node_pb2.NodeState.ValueType = ACTIVE,
    labels: Mapping[str, str] | None = None,
    models: Sequence[node_pb2.ModelStatus] = (),
) -> NodeView:
    return NodeView(
        node_id=node_id,
        state=state,
        labels=dict(labels or {}),
        capacity=node_pb2.NodeResources(
            cpu_millis=cpus * 1000,
            memory_bytes=int(memory_gib * GIB),
            gpus=[node_pb2.Gpu(model=m, memory_bytes=int(g * GIB)) for m, g in gpus],
        ),
        models={status.model_name: status for status in models},
    )


def status(model: str, version: str = "1", memory_gib: float = 0) -> node_pb2.ModelStatus:
    return node_pb2.ModelStatus(
        model_name=model, model_version=version, state=READY, memory_bytes=int(memory_gib * GIB)
    )


def deployment(
    model: str,
    replicas: int | Mapping[str, int],
    *,
    memory_gib: float = 0,
    gpus: int = 0,
    gpu_memory_gib: float = 0,
    labels: Mapping[str, str] | None = None,
    gpu_models: Sequence[str] = (),
) -> deployment_pb2.Deployment:
    per_version = {"1": replicas} if isinstance(replicas, int) else dict(replicas)
    return deployment_pb2.Deployment(
        name=f"deployments/{model}",
        model=f"models/{model}",
        targets=[
            deployment_pb2.DeploymentTarget(version=v, replicas=n) for v, n in per_version.items()
        ],
        resources=deployment_pb2.Resources(
            memory_bytes=int(memory_gib * GIB),
            gpu_count=gpus,
            gpu_memory_bytes=int(gpu_memory_gib * GIB),
        ),
        node_selector=deployment_pb2.NodeSelector(
            labels=dict(labels or {}), gpu_models=list(gpu_models)
        ),
    )


def replica(node_id: str, model: str, version: str = "1") -> Replica:
    return Replica(
        node_id=node_id,
        assignment=node_pb2.ModelAssignment(
            model_name=model, model_version=version, deployment=f"deployments/{model}"
        ),
    )


def plan(
    nodes: Sequence[NodeView],
    deployments: Sequence[deployment_pb2.Deployment],
    replicas: Sequence[Replica] = (),
) -> Plan:
    versions = {
        f"{d.model}/versions/{t.version}": model_pb2.ModelVersion(config="backend: 'python'")
        for d in deployments
        for t in d.targets
    }
    return Scheduler(
        nodes=nodes, deployments=deployments, versions=versions, replicas=replicas
    ).run()


def placed(result: Plan) -> list[tuple[str, str]]:
    return sorted((r.node_id, r.assignment.model_version) for r in result.place)


def condition(result: Plan, name: str, kind: str) -> deployment_pb2.Condition:
    return next(c for c in result.statuses[f"deployments/{name}"].conditions if c.type == kind)


def test_replicas_spread_one_per_node_onto_the_least_loaded() -> None:
    nodes = [node("a"), node("b"), node("c")]
    result = plan(nodes, [deployment("other", 1), deployment("m", 2)], [replica("a", "other")])
    assert placed(result) == [("b", "1"), ("c", "1")]
    assert all("fewest replicas" in r.assignment.reason for r in result.place)


def test_never_two_versions_of_a_model_on_one_node() -> None:
    result = plan([node("a"), node("b")], [deployment("m", {"1": 1, "2": 2})])
    assert len(result.place) == 2
    assert len({r.node_id for r in result.place}) == 2
    assert condition(result, "m", "Unschedulable").status is True


def test_memory_counts_what_nodes_measured_and_is_never_overcommitted() -> None:
    # Node a measured 10 GiB for a model that requested nothing: 6 GiB is all it has left.
    nodes = [
        node("a", memory_gib=16, models=[status("big", memory_gib=10)]),
        node("b", memory_gib=16),
    ]
    result = plan(
        nodes,
        [deployment("big", 1), deployment("m", 2, memory_gib=8)],
        [replica("a", "big")],
    )
    assert placed(result) == [("b", "1")]
    unschedulable = condition(result, "m", "Unschedulable")
    assert unschedulable.status is True
    assert unschedulable.reason == "INSUFFICIENT_MEMORY"  # a's refusal, the closest to fitting
    assert "too little memory (need 8.0 GiB, free 6.0 GiB)" in unschedulable.message


def test_unschedulable_says_why_for_every_node() -> None:
    nodes = [
        node("small", memory_gib=2),
        node("cordoned", state=node_pb2.NODE_STATE_CORDONED),
        node("other-pool", labels={"pool": "b"}),
    ]
    result = plan(nodes, [deployment("m", 1, memory_gib=4, labels={"pool": "a"})])
    assert result.place == []
    message = condition(result, "m", "Unschedulable").message
    assert "0 of 3 nodes fit" in message
    assert "cordoned" in message
    assert "labels do not match" in message
    (decision,) = result.decisions["deployments/m"]
    assert decision.action == deployment_pb2.PLACEMENT_ACTION_UNSCHEDULABLE


def test_gpus_must_be_free_big_enough_and_of_an_allowed_model() -> None:
    nodes = [
        node("small-gpu", gpus=[("T4", 16)]),
        node("wrong-model", gpus=[("L4", 80)]),
        node("right", gpus=[("H100", 80), ("H100", 80)]),
    ]
    wanted = deployment("m", 3, gpus=2, gpu_memory_gib=40, gpu_models=["H100", "T4"])
    result = plan(nodes, [wanted])
    assert placed(result) == [("right", "1")]
    assert "too few suitable free GPUs" in condition(result, "m", "Unschedulable").message


def test_a_lost_node_s_replica_is_placed_elsewhere_in_the_same_pass() -> None:
    replicas = [replica("a", "m"), replica("b", "m")]
    result = plan([node("b"), node("c")], [deployment("m", 2)], replicas)
    assert [(r.node_id, r.assignment.model_name) for r in result.evict] == [("a", "m")]
    assert placed(result) == [("c", "1")]
    reasons = [d.reason for d in result.decisions["deployments/m"]]
    assert reasons == ["NODE_LOST", "PLACED"]


def test_draining_node_keeps_its_replica_until_the_replacement_is_ready() -> None:
    draining = node("a", state=node_pb2.NODE_STATE_DRAINING, models=[status("m")])
    first = plan([draining, node("b")], [deployment("m", 1)], [replica("a", "m")])
    assert placed(first) == [("b", "1")]
    assert first.evict == []

    ready = node("b", models=[status("m")])
    second = plan([draining, ready], [deployment("m", 1)], [replica("a", "m"), replica("b", "m")])
    assert [r.node_id for r in second.evict] == ["a"]
    assert second.decisions["deployments/m"][0].reason == "NODE_DRAINING"


def test_scale_down_removes_replicas_that_are_not_ready_first() -> None:
    nodes = [node("a", models=[status("m")]), node("b"), node("c", models=[status("m")])]
    result = plan(nodes, [deployment("m", 2)], [replica(n, "m") for n in "abc"])
    assert [r.node_id for r in result.evict] == ["b"]
    target = result.statuses["deployments/m"].targets[0]
    assert (target.desired_replicas, target.ready_replicas) == (2, 2)
    assert condition(result, "m", "Available").status is True


def test_removed_versions_and_deleted_deployments_are_evicted() -> None:
    result = plan(
        [node("a"), node("b")],
        [deployment("m", {"2": 0})],
        [replica("a", "m", "1"), replica("b", "gone")],
    )
    assert {r.assignment.model_name for r in result.evict} == {"m", "gone"}
    assert [d.reason for d in result.decisions["deployments/m"]] == ["VERSION_REMOVED"]
    assert [d.reason for d in result.decisions["deployments/gone"]] == ["DEPLOYMENT_DELETED"]
