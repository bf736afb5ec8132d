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


def client_address(request: web.Request) -> str:
    """The caller's address: the gateway listens only for its edge (a Unix socket only this
    user may open), which appends the address it took the connection from to
    `X-Forwarded-For`, so the last hop is the client."""
    forwarded = request.headers.get("X-Forwarded-For", "")
    return forwarded.rsplit(",", 1)[-1].strip() or request.remote or ""


def upstream_metadata(request: web.Request) -> list[tuple[str, str]]:
    """The caller's credentials (the service that answers decides what the caller may do), its
    address (the router limits anonymous callers per address and trusts the gateway to name it)
    and its `Cache-Control` (for the router's response cache)."""
    credentials = authorization(request)
    metadata = [(AUTHORIZATION, credentials)] if credentials else []
    client = client_address(request)
    if client:
        metadata.append((FORWARDED_FOR, client))
    cache_control = request.headers.get("Cache-Control", "")
    if cache_control.isascii() and cache_control.isprintable() and cache_control:
        metadata.append((CACHE_CONTROL, cache_control))
    return metadata
