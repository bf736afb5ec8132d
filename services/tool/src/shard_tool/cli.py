"""`shard`: the AI Shard command-line tool."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from pathlib import Path
from typing import Annotated, Any

import typer

from shard_core.logging import configure_logging
from shard_tool import config
from shard_tool.commands import contexts, deployments, infer, keys, models, nodes, tasks
from shard_tool.local import LocalMesh, MeshPorts, MeshTiming
from shard_tool.output import Format, emit_data
from shard_tool.session import OneLineErrors, Session, fail, session

app = typer.Typer(
    name="shard",
    help="AI Shard: many GPU machines, one model service.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    cls=OneLineErrors,
)
app.add_typer(contexts.app, name="context")
app.add_typer(nodes.app, name="node")
app.add_typer(models.app, name="model")
app.add_typer(deployments.app, name="deploy")
app.add_typer(keys.app, name="key")
app.add_typer(tasks.app, name="task")
app.command("infer")(infer.infer)


@app.callback()
def _shard(
    ctx: typer.Context,
    context: Annotated[
        str | None,
        typer.Option(envvar="SHARD_CONTEXT", help="Context to use instead of the current one."),
    ] = None,
    registry: Annotated[
        str | None, typer.Option(envvar="SHARD_REGISTRY", help="Registry gRPC address.")
    ] = None,
    router: Annotated[
        str | None, typer.Option(envvar="SHARD_ROUTER", help="Router gRPC address.")
    ] = None,
    key: Annotated[
        str | None, typer.Option(envvar="SHARD_KEY", help="API key secret.", show_default=False)
    ] = None,
    output: Annotated[Format, typer.Option("--output", "-o", help="Output format.")] = Format.TABLE,
    debug: Annotated[bool, typer.Option(help="Show tracebacks of failures.")] = False,
) -> None:
    """AI Shard: many GPU machines, one model service.

    Connects where the current context says (`shard context`), unless flags or SHARD_*
    variables say otherwise.
    """
    ctx.obj = Session(
        overrides=config.Overrides(context=context, registry=registry, router=router, key=key),
        output=output,
        debug=debug,
    )


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
    router_tls_port: Annotated[int, typer.Option(help="The router's TLS port.")] = 8444,
    gateway_tls_port: Annotated[int, typer.Option(help="The gateway's HTTPS port.")] = 8443,
    registry_tls_port: Annotated[int, typer.Option(help="The registry's TLS port.")] = 7443,
    registry_mesh_port: Annotated[
        int, typer.Option(help="The registry's mutual-TLS port (node agents).")
    ] = 7444,
    router_mesh_port: Annotated[
        int, typer.Option(help="The router's mutual-TLS port (the mesh's services).")
    ] = 8445,
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
            registry_tls=registry_tls_port,
            registry_mesh=registry_mesh_port,
            router_tls=router_tls_port,
            router_mesh=router_mesh_port,
            gateway_tls=gateway_tls_port,
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
            _save_local_context(mesh)
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


def _save_local_context(mesh: LocalMesh) -> None:
    """A ready `local` context for the mesh (current unless another one is)."""
    try:
        found = config.load()
    except config.ConfigError as error:
        typer.echo(f"  no CLI context written: {error}", err=True)
        return
    found.contexts["local"] = config.Context(
        registry=mesh.registry_tls_address,
        router=mesh.router_tls_address,
        key_file=str(mesh.state_dir / "admin-token"),
        tls=True,
        ca_file=str(mesh.ca_file),
    )
    found.current_context = found.current_context or "local"
    path = config.save(found)
    typer.echo(f"  {'CLI context':<24} local ({path})")


def _mesh_state(state_dir: Path | None) -> tuple[Path, dict[str, Any]]:
    """The state file `shard up` wrote: its directory and what it says."""
    directory = state_dir or _default_state_dir()
    state_file = directory / "mesh.json"
    if not state_file.exists():
        fail(f"no local shard has run in {directory} (start one with `shard up`)")
    state: dict[str, Any] = json.loads(state_file.read_text())
    return directory, state


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process, but it exists
    return True


StateDir = Annotated[
    Path | None,
    typer.Option(help="Directory of the local mesh. [default: $XDG_STATE_HOME/shard/local]"),
]


@app.command()
def status(ctx: typer.Context, state_dir: StateDir = None) -> None:
    """Show whether the local shard runs, and its processes.

    Example: shard status -o json
    """
    directory, state = _mesh_state(state_dir)
    running = _alive(state.get("launcher_pid", 0))
    report = {
        "state_dir": str(directory),
        "running": running,
        "ports": state.get("ports", {}),
        "processes": {
            name: {"pid": pid, "alive": _alive(pid)}
            for name, pid in state.get("processes", {}).items()
        },
    }
    emit_data(report, session(ctx).output)
    if not running:
        raise typer.Exit(1)


@app.command()
def down(state_dir: StateDir = None) -> None:
    """Stop the local shard that `shard up` started.

    Example: shard down
    """
    _, state = _mesh_state(state_dir)
    launcher = state.get("launcher_pid", 0)
    if not _alive(launcher):
        fail("the local shard is not running")
    os.kill(launcher, signal.SIGTERM)
    typer.echo(f"stopping the local shard (pid {launcher})")


def main() -> None:
    app()
