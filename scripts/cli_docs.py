"""docs/cli.md, generated from the `shard` app itself: `generate` writes it, `check` fails when
the committed file differs (CI runs it through the tests)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from typer.cli import get_docs_for_click

from shard_tool.cli import app

DOCS = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def render() -> str:
    command = typer.main.get_command(app)
    ctx = typer.Context(command, info_name="shard")
    docs = get_docs_for_click(obj=command, ctx=ctx, name="shard", title="`shard` command line")
    return docs.strip() + "\n"


def main() -> None:
    if sys.argv[1:] == ["check"]:
        if not DOCS.exists() or DOCS.read_text() != render():
            sys.exit("docs/cli.md is stale: run `python scripts/cli_docs.py generate`")
        print("docs/cli.md is up to date")
    elif sys.argv[1:] == ["generate"]:
        DOCS.write_text(render())
        print(f"wrote {DOCS}")
    else:
        sys.exit("usage: cli_docs.py generate|check")


if __name__ == "__main__":
    main()
