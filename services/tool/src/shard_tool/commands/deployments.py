"""`shard deploy`: run model versions on the shard, scale them and split traffic."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from google.protobuf import field_mask_pb2

from shard.deployment.v1 import deployment_pb2, deployment_service_pb2, deployment_service_pb2_grpc
from shard_tool.output import Column, emit, emit_data
from shard_tool.session import TIMEOUT_S, all_pages, resource_name, session

app = typer.Typer(help="Deployments: create, scale, split traffic, inspect, explain, remove.")


def _ready(d: deployment_pb2.Deployment) -> str:
    return ", ".join(
        f"v{t.version} {t.ready_replicas}/{t.desired_replicas}" for t in d.status.targets
    )


COLUMNS: list[Column] = [
    ("name", lambda d: d.name.removeprefix("deployments/")),
    ("model", lambda d: d.model.removeprefix("models/")),
    ("targets", lambda d: [f"v{t.version}x{t.replicas}@{t.weight}" for t in d.targets]),
    ("ready", _ready),
    (
        "available",
        lambda d: next((c.status for c in d.status.conditions if c.type == "Available"), "-"),
    ),
]
DECISIONS: list[Column] = [
    ("time", lambda p: p.time.ToJsonString()),
    (
        "action",
        lambda p: deployment_pb2.PlacementAction.Name(p.action).removeprefix("PLACEMENT_ACTION_"),
    ),
    ("version", lambda p: p.version),
    ("node", lambda p: p.node.removeprefix("nodes/")),
    ("reason", lambda p: p.reason),
    ("message", lambda p: p.message),
]
Name = Annotated[str, typer.Argument(help="The deployment id (or deployments/<id>).")]


def _pairs(values: list[str], option: str) -> dict[str, int]:
    """`VERSION=N` options as {version: N}."""
    pairs = {}
    for value in values:
        version, _, number = value.partition("=")
        if not version or not number.isdigit():
            raise typer.BadParameter(f"{value!r} is not VERSION=N", param_hint=option)
        pairs[version] = int(number)
    return pairs


Stub = deployment_service_pb2_grpc.DeploymentServiceStub


@app.command("create")
def create(
    ctx: typer.Context,
    model: Annotated[
        str, typer.Argument(help="The model to deploy; the deployment gets its name.")
    ],
    target: Annotated[
        list[str], typer.Option("--target", "-t", help="VERSION=REPLICAS; repeat for a canary.")
    ],
    label: Annotated[
        list[str] | None, typer.Option(help="KEY=VALUE a node must carry; repeatable.")
    ] = None,
) -> None:
    """Deploy model versions; with several targets traffic follows their replicas until split.

    Example: shard deploy create simple -t 1=2
    """
    s = session(ctx)
    replicas = _pairs(target, "--target")
    labels = {}
    for item in label or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--label")
        labels[key] = value
    deployment = deployment_pb2.Deployment(
        model=f"models/{model}",
        targets=[
            deployment_pb2.DeploymentTarget(version=v, replicas=n, weight=n)
            for v, n in replicas.items()
        ],
        node_selector=deployment_pb2.NodeSelector(labels=labels),
    )
    request = deployment_service_pb2.CreateDeploymentRequest(
        deployment_id=model, deployment=deployment
    )
    reply = s.call(
        Stub, lambda deployments: deployments.CreateDeployment(request, timeout=TIMEOUT_S)
    )
    emit(reply.deployment, COLUMNS, s.output)


async def _update(
    stub: Stub,
    name: str,
    change: dict[str, int],
    field: str,
) -> deployment_pb2.Deployment:
    """Set `field` (replicas or weight) of the named versions' targets, under the etag."""
    current = (
        await stub.GetDeployment(
            deployment_service_pb2.GetDeploymentRequest(name=name), timeout=TIMEOUT_S
        )
    ).deployment
    known = {t.version for t in current.targets}
    unknown = sorted(set(change) - known)
    if unknown:
        raise typer.BadParameter(
            f"version {', '.join(unknown)} is not a target of {name} (targets: "
            f"{', '.join(sorted(known))})"
        )
    updated = deployment_pb2.Deployment(name=name, etag=current.etag)
    for old in current.targets:
        target = updated.targets.add()
        target.CopyFrom(old)
        if old.version in change:
            setattr(target, field, change[old.version])
    request = deployment_service_pb2.UpdateDeploymentRequest(
        deployment=updated, update_mask=field_mask_pb2.FieldMask(paths=["targets"])
    )
    return (await stub.UpdateDeployment(request, timeout=TIMEOUT_S)).deployment


def _change_targets(
    ctx: typer.Context, deployment: str, values: list[str], option: str, field: str
) -> None:
    """Set `field` of the targets `values` (VERSION=N options) name, and show the result."""
    s = session(ctx)
    change = _pairs(values, option)
    name = resource_name("deployments", deployment)
    updated = s.call(Stub, lambda deployments: _update(deployments, name, change, field))
    emit(updated, COLUMNS, s.output)


@app.command("scale")
def scale(
    ctx: typer.Context,
    deployment: Name,
    replicas: Annotated[list[str], typer.Option("--replicas", "-r", help="VERSION=REPLICAS.")],
) -> None:
    """Change how many replicas versions run.

    Example: shard deploy scale simple -r 1=3
    """
    _change_targets(ctx, deployment, replicas, "--replicas", "replicas")


@app.command("split")
def split(
    ctx: typer.Context,
    deployment: Name,
    weight: Annotated[list[str], typer.Option("--weight", "-w", help="VERSION=WEIGHT.")],
) -> None:
    """Split the traffic that names no version between versions, by weight.

    Example: shard deploy split simple -w 1=90 -w 2=10
    """
    _change_targets(ctx, deployment, weight, "--weight", "weight")


@app.command("ls")
def list_deployments(ctx: typer.Context) -> None:
    """List deployments.

    Example: shard deploy ls -o json
    """
    s = session(ctx)
    request = deployment_service_pb2.ListDeploymentsRequest()
    found = s.call(
        Stub, lambda deployments: all_pages(deployments.ListDeployments, request, "deployments")
    )
    emit(found, COLUMNS, s.output)


@app.command("get")
def get(
    ctx: typer.Context,
    deployment: Name,
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Print again as it changes.")
    ] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes with --watch.")] = 2.0,
) -> None:
    """Show a deployment and how many replicas are ready.

    Example: shard deploy get simple --watch
    """
    s = session(ctx)

    request = deployment_service_pb2.GetDeploymentRequest(
        name=resource_name("deployments", deployment)
    )

    async def work() -> None:
        stub = s.registry(Stub)
        last = None
        while True:
            reply = await stub.GetDeployment(request, timeout=TIMEOUT_S)
            if reply.deployment != last:
                emit(reply.deployment, COLUMNS, s.output)
                last = reply.deployment
            if not watch:
                return
            await asyncio.sleep(interval)

    s.run(work)


@app.command("explain")
def explain(ctx: typer.Context, deployment: Name) -> None:
    """Why each replica is where it is: the scheduler's decisions, newest last.

    Example: shard deploy explain simple
    """
    s = session(ctx)
    request = deployment_service_pb2.ExplainDeploymentRequest(
        name=resource_name("deployments", deployment)
    )
    reply = s.call(
        Stub, lambda deployments: deployments.ExplainDeployment(request, timeout=TIMEOUT_S)
    )
    emit(list(reply.placements), DECISIONS, s.output)


@app.command("rm")
def remove(ctx: typer.Context, deployment: Name) -> None:
    """Delete a deployment; its replicas are unloaded.

    Example: shard deploy rm simple
    """
    s = session(ctx)
    request = deployment_service_pb2.DeleteDeploymentRequest(
        name=resource_name("deployments", deployment)
    )
    s.call(Stub, lambda deployments: deployments.DeleteDeployment(request, timeout=TIMEOUT_S))
    emit_data({"deleted": request.name}, s.output)
