"""What every command shares: the resolved context, the output format, channels to the shard,
and turning failures into one clear line and an exit code (0 ok, 1 failed, 2 usage)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import grpc
import typer

# typer 0.29 carries its own click; its usage errors are not re-exported (hence the pin).
from typer._click.exceptions import NoArgsIsHelpError, UsageError
from typer.core import TyperGroup

from shard_core import tls
from shard_core.auth import bearer_interceptors
from shard_tool.config import ConfigError, Context, Overrides, resolve
from shard_tool.output import Format

T = TypeVar("T")
S = TypeVar("S")

FAILED = 1
USAGE = 2
# The deadline of every unary call the CLI makes.
TIMEOUT_S = 10.0
# Hints for the codes a user can act on.
HINTS = {
    grpc.StatusCode.UNAUTHENTICATED: "set a key with `shard context add --key` or SHARD_KEY",
    grpc.StatusCode.PERMISSION_DENIED: "the key's role does not allow this; ask an admin",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the shard did not answer in time; try again",
}


@dataclass(kw_only=True)
class Session:
    overrides: Overrides
    output: Format = Format.TABLE
    debug: bool = False
    _context: Context | None = None
    _channels: dict[str, grpc.aio.Channel] = field(default_factory=dict)

    @property
    def context(self) -> Context:
        if self._context is None:
            try:
                self._context = resolve(self.overrides)
            except ConfigError as error:
                fail(str(error))
        return self._context

    def channel(self, address: str) -> grpc.aio.Channel:
        """A channel to `address` that carries the context's key on every call."""
        channel = self._channels.get(address)
        if channel is None:
            try:
                secret = self.context.secret()
            except OSError as error:
                fail(f"cannot read the key file: {error}")
            interceptors = bearer_interceptors(secret) if secret else None
            try:
                credentials = (
                    tls.trusting(Path(self.context.ca_file) if self.context.ca_file else None)
                    if self.context.tls
                    else None
                )
                channel = tls.channel(address, credentials, interceptors=interceptors)
            except (OSError, ValueError) as error:
                fail(f"cannot connect to {address}: {error}")
            self._channels[address] = channel
        return channel

    def registry(self, stub: Callable[[grpc.aio.Channel], T]) -> T:
        return stub(self.channel(self.context.registry))

    def call(self, stub: Callable[[grpc.aio.Channel], S], rpc: Callable[[S], Awaitable[T]]) -> T:
        """Run `rpc` on a registry stub of type `stub` (see `run` for failures)."""

        async def work() -> T:
            return await rpc(self.registry(stub))

        return self.run(work)

    def run(self, work: Callable[[], Awaitable[T]]) -> T:
        """Run a command's calls; failures become one line on stderr and exit code 1."""

        async def main() -> T:
            try:
                return await work()
            finally:
                for channel in self._channels.values():
                    await channel.close(None)
                self._channels.clear()

        try:
            return asyncio.run(main())
        except grpc.aio.AioRpcError as error:
            if self.debug:
                raise
            fail(self._explain(error))
        except KeyboardInterrupt:
            raise typer.Exit(130) from None

    def _explain(self, error: grpc.aio.AioRpcError) -> str:
        code = error.code()
        if code == grpc.StatusCode.UNAVAILABLE:
            addresses = " or ".join(self._channels) or self.context.registry
            return (
                f"cannot reach the shard at {addresses}: {error.details()} "
                "(is it running? `shard up` starts a local one; --registry/--router pick another)"
            )
        message = f"{error.details() or code.name} ({code.name})"
        hint = HINTS.get(code)
        return f"{message}; {hint}" if hint else message


async def all_pages(list_call: Any, request: Any, field: str) -> list[Any]:
    """Every item of a paged List call (AIP-158), page after page."""
    items: list[Any] = []
    while True:
        reply = await list_call(request, timeout=TIMEOUT_S)
        items.extend(getattr(reply, field))
        if not reply.next_page_token:
            return items
        request.page_token = reply.next_page_token


def resource_name(collection: str, given: str) -> str:
    """`{collection}/{id}` from an id or from the whole name: commands take either."""
    prefix = f"{collection}/"
    return given if given.startswith(prefix) else f"{prefix}{given}"


def fail(message: str, *, code: int = FAILED) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def session(ctx: typer.Context) -> Session:
    found: Any = ctx.find_root().obj
    if not isinstance(found, Session):  # pragma: no cover (the root callback always sets it)
        sys.exit("internal error: no session")
    return found


class OneLineErrors(TyperGroup):
    """The root command: usage errors become one line on stderr with exit code 2 (typer would
    draw a multi-line panel), so scripts and people read the same thing."""

    def main(  # type: ignore[override]
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NoArgsIsHelpError as error:
            # typer's rich help prints itself (to stdout, as `--help` does) and returns "".
            if error.ctx is not None and (text := error.ctx.get_help()):
                typer.echo(text, err=True)
            result = USAGE
        except UsageError as error:
            where = error.ctx.command_path if error.ctx else "shard"
            typer.echo(f"error: {error.format_message()} (see `{where} --help`)", err=True)
            result = USAGE
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            result = FAILED
        if not standalone_mode:
            return result
        sys.exit(result if isinstance(result, int) else 0)
