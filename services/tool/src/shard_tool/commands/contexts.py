"""`shard context`: named places to connect to, kept in the config file."""

from __future__ import annotations

from typing import Annotated

import typer

from shard_tool import config
from shard_tool.output import Format, emit_data
from shard_tool.session import fail, session

app = typer.Typer(help="Contexts: where the CLI connects and with which key.")


def _load() -> config.Config:
    try:
        return config.load()
    except config.ConfigError as error:
        fail(str(error))


@app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="The context's name.")],
    registry: Annotated[str, typer.Option(help="Registry gRPC address.")] = "127.0.0.1:7070",
    router: Annotated[str, typer.Option(help="Router gRPC address.")] = "127.0.0.1:8001",
    key_file: Annotated[str, typer.Option(help="File holding the API key secret.")] = "",
    key: Annotated[str, typer.Option(help="The API key secret itself.")] = "",
    tls: Annotated[bool, typer.Option(help="Connect with TLS.")] = False,
    ca_file: Annotated[str, typer.Option(help="CA bundle for TLS.")] = "",
    use: Annotated[bool, typer.Option(help="Make it the current context.")] = False,
) -> None:
    """Add (or replace) a context.

    Example: shard context add prod --registry shard.example:7070 --key-file ~/.key --tls --use
    """
    found = _load()
    found.contexts[name] = config.Context(
        registry=registry, router=router, key=key, key_file=key_file, tls=tls, ca_file=ca_file
    )
    if use or not found.current_context:
        found.current_context = name
    path = config.save(found)
    typer.echo(f"context {name!r} saved in {path}")


@app.command("use")
def use(name: Annotated[str, typer.Argument(help="The context to use from now on.")]) -> None:
    """Switch the current context.

    Example: shard context use local
    """
    found = _load()
    if name not in found.contexts:
        fail(f"no context named {name!r} (see `shard context list`)")
    found.current_context = name
    config.save(found)
    typer.echo(f"using context {name!r}")


@app.command("list")
def list_contexts(ctx: typer.Context) -> None:
    """List the contexts; the current one is marked.

    Example: shard context list -o json
    """
    found = _load()
    rows = [
        {
            "name": name,
            "current": name == found.current_context,
            "registry": c.registry,
            "router": c.router,
        }
        for name, c in sorted(found.contexts.items())
    ]
    s = session(ctx)
    if s.output is not Format.TABLE:
        emit_data(rows, s.output)
        return
    for row in rows:
        mark = "*" if row["current"] else " "
        typer.echo(
            f"{mark} {row['name']:<16} registry {row['registry']:<22} router {row['router']}"
        )


@app.command("current")
def current() -> None:
    """Print the current context's name.

    Example: shard context current
    """
    found = _load()
    if not found.current_context:
        fail("no current context (add one with `shard context add NAME --use`)")
    typer.echo(found.current_context)
