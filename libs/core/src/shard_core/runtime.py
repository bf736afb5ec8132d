"""The one way a service process starts: logging, telemetry, then its asyncio main."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from shard_core.logging import configure_logging
from shard_core.settings import ServiceSettings
from shard_core.telemetry import setup_telemetry

S = TypeVar("S", bound=ServiceSettings)


def run_service(name: str, settings: S, serve: Callable[[S], Coroutine[Any, Any, None]]) -> None:
    """Run `serve(settings)` as the service `name` until it returns (on SIGTERM or SIGINT)."""
    configure_logging(name, level=settings.log_level, json_lines=settings.log_json)
    setup_telemetry(name, metrics_host=settings.metrics_host, metrics_port=settings.metrics_port)
    asyncio.run(serve(settings))
