"""How the CLI prints: readable tables by default, `-o json` and `-o yaml` for scripts.

Machine output is the proto3 JSON mapping with the protos' own field names, so scripts see the
same stable names as the API.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Sequence
from typing import Any

import typer
import yaml
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table


class Format(enum.StrEnum):
    TABLE = "table"
    JSON = "json"
    YAML = "yaml"


Column = tuple[str, Callable[[Any], object]]


def as_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def emit(
    items: Sequence[Message] | Message,
    columns: Sequence[Column],
    output: Format,
) -> None:
    """Print one message or a list: as a table of `columns`, or whole as JSON or YAML."""
    many = not isinstance(items, Message)
    messages: list[Message] = [items] if isinstance(items, Message) else list(items)
    if output is not Format.TABLE:
        data: Any = [as_dict(m) for m in messages] if many else as_dict(messages[0])
        emit_data(data, output)
        return
    table = Table(box=None, pad_edge=False, header_style="bold")
    for title, _ in columns:
        table.add_column(title.upper())
    for message in messages:
        table.add_row(*(_cell(value(message)) for _, value in columns))
    Console(soft_wrap=True).print(table)


def emit_one(message: Message, fields: Sequence[Column], output: Format) -> None:
    """Print one message in full: `field: value` lines (nothing cut at any width), or whole as
    JSON or YAML."""
    if output is not Format.TABLE:
        emit(message, fields, output)
        return
    emit_data({title: _cell(value(message)) for title, value in fields}, output)


def emit_data(data: Any, output: Format) -> None:
    """Print plain data (dicts and lists) in a machine format, or as `key: value` lines."""
    if output is Format.JSON:
        typer.echo(json.dumps(data, indent=2, sort_keys=True))
    elif output is Format.YAML:
        typer.echo(yaml.safe_dump(data, sort_keys=True).rstrip())
    elif isinstance(data, dict):
        for key, value in data.items():
            typer.echo(f"{key}: {value}")
    else:
        typer.echo(str(data))


def _cell(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "-"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in sorted(value.items())) or "-"
    text = str(value)
    return text if text else "-"


def transfer_progress(*, quiet: bool) -> Progress:
    """A progress bar for bytes moving to or from the shard (hidden for machine output)."""
    return Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        disable=quiet,
        transient=True,
    )
