"""`shard`: the AI Shard command-line tool."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path
from typing import Annotated

import typer

from shard_core.logging import configure_logging
from shard_tool.local import LocalMesh, MeshPorts, MeshTiming

app = typer.Typer(
    name="shard",
    help="AI Shard: many GPU machines, one model service.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _shard() -> None:
    """AI Shard: many GPU machines, one model service."""


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "shard" / "local"


@app.command()
def up(
    state_dir: Annotated[
        Path | None,
        typer.Option(help="Directory the local mesh owns. [default: $XDG_STATE_HOME/shard/local]"),
    ] = None,
    models: Annotated[
        Path, typer.Option(help="Triton model repository the node agents serve.")
    ] = Path("infra/triton/models"),
    nodes: Annotated[int, typer.Option(min=1, max=8, help="Node agents to start.")] = 1,
    router_port: Annotated[int, typer.Option(help="KServe v2 gRPC port of the router.")] = 8001,
    gateway_port: Annotated[int, typer.Option(help="HTTP port of the gateway.")] = 8000,
    registry_port: Annotated[int, typer.Option(help="gRPC port of the registry.")] = 7070,
    etcd_port: Annotated[int, typer.Option(help="Client port of etcd.")] = 2379,
    lease_ttl: Annotated[int, typer.Option(min=2, help="Node lease TTL in seconds.")] = 10,
) -> None:
    """Start the whole shard on this machine and run it until Ctrl-C or SIGTERM.

    Starts etcd, the registry, the inference router, the gateway and node agents, each node with
    its own Triton serving the demo models, then waits until everything is ready.

    Example: shard up --router-port 8001 --gateway-port 8000
    """
    if not models.is_dir():
        raise typer.BadParameter(f"{models} is not a directory", param_hint="--models")
    configure_logging("shard", level="WARNING")
    base = MeshPorts()
    mesh = LocalMesh(
        state_dir=state_dir or _default_state_dir(),
        model_repository=models,
        ports=MeshPorts(
            etcd=etcd_port,
            etcd_peer=etcd_port + 1 if etcd_port != base.etcd else base.etcd_peer,
            registry=registry_port,
            router=router_port,
            gateway=gateway_port,
        ),
        timing=MeshTiming(lease_ttl_s=lease_ttl),
    )
    asyncio.run(_run_until_signalled(mesh, nodes))


async def _run_until_signalled(mesh: LocalMesh, nodes: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    starting = asyncio.ensure_future(mesh.start(nodes=nodes))
    stopping = asyncio.ensure_future(stop.wait())
    try:
        typer.echo("starting the local shard...")
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()
            for name, value in mesh.endpoints().items():
                typer.echo(f"  {name:<24} {value}")
            typer.echo("ready: the shard is serving; Ctrl-C stops it")
            await stopping
    finally:
        starting.cancel()
        stopping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        typer.echo("stopping...")
        mesh.stop()
        typer.echo("stopped")


def main() -> None:
    app()
