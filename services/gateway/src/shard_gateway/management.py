"""The management REST API, derived from the protos' `google.api.http` annotations.

(Being built: see the module's tests in tests/integration/test_gateway_management.py.)
"""

from __future__ import annotations

import grpc
from aiohttp import web


def add_routes(app: web.Application, registry: grpc.aio.Channel) -> None:
    """Add a REST route for every annotated RPC of the registry's services."""
