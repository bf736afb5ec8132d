"""What the gateway passes upstream about its caller, as gRPC metadata."""

from __future__ import annotations

from aiohttp import web

from shard_core.auth import AUTHORIZATION, FORWARDED_FOR
from shard_core.errors import UnauthenticatedError

CACHE_CONTROL = "cache-control"


def authorization(request: web.Request) -> str:
    """The caller's `Authorization` header. Credentials travel as gRPC metadata, which takes only
    printable ASCII: others are refused here as malformed."""
    value = request.headers.get("Authorization", "")
    if not (value.isascii() and value.isprintable()):
        raise UnauthenticatedError(
            "credentials go in 'Authorization' as 'Bearer <key secret>'", reason="BAD_CREDENTIALS"
        )
    return value


def upstream_metadata(request: web.Request) -> list[tuple[str, str]]:
    """The caller's credentials (the service that answers decides what the caller may do), its
    address (the router limits anonymous callers per address and trusts the gateway to name it)
    and its `Cache-Control` (for the router's response cache)."""
    credentials = authorization(request)
    metadata = [(AUTHORIZATION, credentials)] if credentials else []
    if request.remote:
        metadata.append((FORWARDED_FOR, request.remote))
    cache_control = request.headers.get("Cache-Control", "")
    if cache_control.isascii() and cache_control.isprintable() and cache_control:
        metadata.append((CACHE_CONTROL, cache_control))
    return metadata
