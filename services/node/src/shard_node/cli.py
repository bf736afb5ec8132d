"""`shard-node` (or `python -m shard_node`): the node agent, set up from the environment."""

from __future__ import annotations

from shard_core.runtime import run_service
from shard_node.app import serve
from shard_node.settings import NodeSettings


def main() -> None:
    run_service("node", NodeSettings(), serve)
