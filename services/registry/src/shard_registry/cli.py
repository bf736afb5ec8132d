"""`shard-registry` (or `python -m shard_registry`): the registry, set up from the environment."""

from __future__ import annotations

from shard_core.runtime import run_service
from shard_registry.app import serve
from shard_registry.settings import RegistrySettings


def main() -> None:
    # Required settings come from the environment, which mypy cannot see.
    run_service("registry", RegistrySettings(), serve)  # type: ignore[call-arg]
