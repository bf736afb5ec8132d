"""`shard-gateway` (or `python -m shard_gateway`): the gateway, set up from the environment."""

from __future__ import annotations

from shard_core.runtime import run_service
from shard_gateway.app import serve
from shard_gateway.settings import GatewaySettings


def main() -> None:
    run_service("gateway", GatewaySettings(), serve)
