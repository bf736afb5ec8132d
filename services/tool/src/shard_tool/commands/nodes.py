"""`shard node`: the machines in the shard."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from shard.node.v1 import node_pb2, node_service_pb2, node_service_pb2_grpc
from shard_tool.output import Column, emit, emit_data, emit_one
from shard_tool.session import TIMEOUT_S, all_pages, resource_name, session

app = typer.Typer(
    help="Nodes: list, inspect, cordon, drain, quarantine and remove machines; join tokens."
)
token_app = typer.Typer(help="Join tokens for enrolling new nodes.")
app.add_typer(token_app, name="token")

COLUMNS: list[Column] = [
    ("name", lambda n: n.name.removeprefix("nodes/")),
    ("state", lambda n: node_pb2.NodeState.Name(n.state).removeprefix("NODE_STATE_")),
    ("provider", lambda n: n.provider),
    ("address", lambda n: n.inference_address),
    ("gpus", lambda n: len(n.inventory.gpus)),
    ("cpus", lambda n: n.inventory.cpu_cores),
    ("memory", lambda n: f"{n.inventory.memory_bytes / 2**30:.0f} GiB"),
    # Whether owners can seal tasks to it (an agent that registered an encryption key).
    ("tasks", lambda n: "yes" if n.encryption_key.public_key else "no"),
    ("models", lambda n: sorted({m.model_name for m in n.models})),
    ("labels", lambda n: dict(n.labels)),
]
# One node, in full: what it claims shown apart from what an admin set or the shard measured.
DETAIL: list[Column] = [
    *COLUMNS,
    ("claimed labels", lambda n: dict(n.claimed_labels)),
    ("claimed gpus", lambda n: [g.model for g in n.inventory.gpus]),
]
Name = Annotated[str, typer.Argument(help="The node id (or nodes/<id>).")]
Stub = node_service_pb2_grpc.NodeServiceStub


@app.command("ls")
def list_nodes(
    ctx: typer.Context,
    filter_: Annotated[
        str, typer.Option("--filter", help="e.g. 'state=ACTIVE', 'labels.pool=a'.")
    ] = "",
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Print again as nodes change.")
    ] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes with --watch.")] = 2.0,
) -> None:
    """List the nodes.

    Example: shard node ls --filter state=ACTIVE -o json
    """
    s = session(ctx)

    async def work() -> None:
        stub = s.registry(Stub)
        while True:
            request = node_service_pb2.ListNodesRequest(filter=filter_)
            nodes = await all_pages(stub.ListNodes, request, "nodes")
            emit(nodes, COLUMNS, s.output)
            if not watch:
                return
            await asyncio.sleep(interval)
            typer.echo("")

    s.run(work)


@app.command("get")
def get_node(ctx: typer.Context, node: Name) -> None:
    """Show one node.

    Example: shard node get nk3gbxs7 -o yaml
    """
    s = session(ctx)
    request = node_service_pb2.GetNodeRequest(name=resource_name("nodes", node))
    reply = s.call(Stub, lambda nodes: nodes.GetNode(request, timeout=TIMEOUT_S))
    emit_one(reply.node, DETAIL, s.output)


@app.command("label")
def label(
    ctx: typer.Context,
    node: Name,
    labels: Annotated[
        list[str] | None, typer.Argument(help="key=value labels to set; key- removes one.")
    ] = None,
) -> None:
    """Set a node's labels, as an admin: the facts deployments' node selectors match.

    What the node's agent reports (SHARD_NODE_LABELS) is a claim, shown apart; it selects
    nothing until an admin sets it here.

    Example: shard node label nk3gbxs7 pool=a100 rack=4 old-
    """
    s = session(ctx)
    name = resource_name("nodes", node)
    changes = list(labels or [])
    for change in changes:
        if "=" not in change and not change.endswith("-"):
            raise typer.BadParameter(
                f"{change!r} is neither key=value nor key-", param_hint="LABELS"
            )

    async def work() -> node_pb2.Node:
        stub = s.registry(Stub)
        current = await stub.GetNode(node_service_pb2.GetNodeRequest(name=name), timeout=TIMEOUT_S)
        wanted = dict(current.node.labels)
        for change in changes:
            if change.endswith("-") and "=" not in change:
                wanted.pop(change[:-1], None)
            else:
                key, _, value = change.partition("=")
                wanted[key] = value
        update = node_service_pb2.UpdateNodeRequest(node=node_pb2.Node(name=name, labels=wanted))
        return (await stub.UpdateNode(update, timeout=TIMEOUT_S)).node

    emit_one(s.run(work), DETAIL, s.output)


@app.command("cordon")
def cordon(
    ctx: typer.Context,
    node: Name,
    reason: Annotated[str, typer.Option(help="Why, for the record.")] = "",
) -> None:
    """Stop placing new replicas on a node; what it serves stays.

    Example: shard node cordon nk3gbxs7 --reason "disk replacement"
    """
    s = session(ctx)
    request = node_service_pb2.CordonNodeRequest(name=resource_name("nodes", node), reason=reason)
    reply = s.call(Stub, lambda nodes: nodes.CordonNode(request, timeout=TIMEOUT_S))
    emit(reply.node, COLUMNS, s.output)


@app.command("uncordon")
def uncordon(ctx: typer.Context, node: Name) -> None:
    """Let the scheduler place replicas on a node again.

    Example: shard node uncordon nk3gbxs7
    """
    s = session(ctx)
    request = node_service_pb2.UncordonNodeRequest(name=resource_name("nodes", node))
    reply = s.call(Stub, lambda nodes: nodes.UncordonNode(request, timeout=TIMEOUT_S))
    emit(reply.node, COLUMNS, s.output)


@app.command("quarantine")
def quarantine(
    ctx: typer.Context,
    node: Name,
    reason: Annotated[
        str, typer.Option(help="Why, as UPPER_SNAKE: details, kept in the node's history.")
    ],
) -> None:
    """Take a node out of service: no traffic, its replicas move, and only an admin's
    uncordon brings it back (its provider cannot). Admins only.

    Example: shard node quarantine nk3gbxs7 --reason "WRONG_ANSWERS: reported by a customer"
    """
    s = session(ctx)
    request = node_service_pb2.QuarantineNodeRequest(
        name=resource_name("nodes", node), reason=reason
    )
    reply = s.call(Stub, lambda nodes: nodes.QuarantineNode(request, timeout=TIMEOUT_S))
    emit(reply.node, COLUMNS, s.output)


@app.command("drain")
def drain(
    ctx: typer.Context,
    node: Name,
    reason: Annotated[str, typer.Option(help="Why, for the record.")] = "",
) -> None:
    """Cordon a node and move its replicas elsewhere.

    Example: shard node drain nk3gbxs7 --reason "maintenance"
    """
    s = session(ctx)
    request = node_service_pb2.DrainNodeRequest(name=resource_name("nodes", node), reason=reason)
    reply = s.call(Stub, lambda nodes: nodes.DrainNode(request, timeout=TIMEOUT_S))
    emit(reply.node, COLUMNS, s.output)


@app.command("rm")
def remove(ctx: typer.Context, node: Name) -> None:
    """Remove a node from the shard (it must enroll again with a new join token).

    Example: shard node rm nk3gbxs7
    """
    s = session(ctx)
    request = node_service_pb2.DeleteNodeRequest(name=resource_name("nodes", node))
    s.call(Stub, lambda nodes: nodes.DeleteNode(request, timeout=TIMEOUT_S))
    emit_data({"deleted": request.name}, s.output)


@token_app.command("create")
def create_token(
    ctx: typer.Context,
    ttl: Annotated[int, typer.Option(min=1, help="Seconds the token stays valid.")] = 3600,
    description: Annotated[str, typer.Option(help="What the token is for.")] = "",
) -> None:
    """Make a one-time join token; the secret is shown once.

    Example: shard node token create --ttl 600 --description "rack 4"
    """
    s = session(ctx)
    request = node_service_pb2.CreateJoinTokenRequest(
        join_token=node_service_pb2.JoinToken(ttl_seconds=ttl, description=description)
    )
    created = s.call(Stub, lambda nodes: nodes.CreateJoinToken(request, timeout=TIMEOUT_S))
    token = created.join_token
    emit_data(
        {"name": token.name, "token": token.token, "expire_time": token.expire_time.ToJsonString()},
        s.output,
    )
