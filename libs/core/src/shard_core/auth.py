"""The admin credential that guards the control plane's writes until API keys and roles land.

A service holds only the SHA-256 of the admin token and compares in constant time; clients send
the token as `authorization: Bearer <token>` metadata. Methods not named as protected stay open
(node agents' stream, reads).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, Collection
from typing import TYPE_CHECKING, Any

import grpc

from shard_core.errors import PermissionDeniedError, ShardError, UnauthenticatedError
from shard_core.grpc.interceptors import handler_kind, with_behaviour

if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
    _UnaryUnary = grpc.aio.UnaryUnaryClientInterceptor[Any, Any]
    _UnaryStream = grpc.aio.UnaryStreamClientInterceptor[Any, Any]
    _StreamUnary = grpc.aio.StreamUnaryClientInterceptor[Any, Any]
    _StreamStream = grpc.aio.StreamStreamClientInterceptor[Any, Any]
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor
    _UnaryUnary = grpc.aio.UnaryUnaryClientInterceptor
    _UnaryStream = grpc.aio.UnaryStreamClientInterceptor
    _StreamUnary = grpc.aio.StreamUnaryClientInterceptor
    _StreamStream = grpc.aio.StreamStreamClientInterceptor

AUTHORIZATION = "authorization"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_bearer(metadata: Collection[tuple[str, Any]], expected_hash: str) -> None:
    """Refuse a call without the admin token: UNAUTHENTICATED without one, PERMISSION_DENIED
    with a wrong one."""
    values = [str(value) for key, value in metadata if key == AUTHORIZATION]
    if not values or not values[0].startswith("Bearer "):
        raise UnauthenticatedError(
            "this call needs the admin token as 'authorization: Bearer <token>'",
            reason="CREDENTIALS_MISSING",
        )
    if not hmac.compare_digest(token_hash(values[0].removeprefix("Bearer ")), expected_hash):
        raise PermissionDeniedError("the admin token is not valid", reason="BAD_CREDENTIALS")


class AdminOnlyInterceptor(_ServerInterceptor):
    """Lets the protected methods through only with the admin token."""

    def __init__(self, *, token_sha256: str, protected: Collection[str]) -> None:
        self._hash = token_sha256
        self._protected = frozenset(protected)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method not in self._protected:
            return handler
        try:
            check_bearer(handler_call_details.invocation_metadata or (), self._hash)
        except ShardError as error:
            return _refusing(handler, error)
        return handler


def _refusing(handler: Any, error: ShardError) -> Any:
    """A handler of the same shape as `handler` that refuses the call with `error`."""
    status = error.to_status()

    async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(status.code, status.details, status.trailing_metadata)

    return with_behaviour(handler, handler_kind(handler), refuse)


class _Bearer:
    def __init__(self, token: str) -> None:
        self._metadata = (AUTHORIZATION, f"Bearer {token}")

    def _details(self, details: Any) -> Any:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self._metadata)
        return details._replace(metadata=metadata)


class _BearerUnaryUnary(_Bearer, _UnaryUnary):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _BearerUnaryStream(_Bearer, _UnaryStream):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _BearerStreamUnary(_Bearer, _StreamUnary):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


class _BearerStreamStream(_Bearer, _StreamStream):
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


def bearer_interceptors(token: str) -> list[Any]:
    """Client interceptors adding `authorization: Bearer <token>` to every call on a channel.
    One per call shape: a channel files each interceptor under the first shape it matches."""
    return [
        kind(token)
        for kind in (_BearerUnaryUnary, _BearerUnaryStream, _BearerStreamUnary, _BearerStreamStream)
    ]
