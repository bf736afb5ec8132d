"""Server interceptors every management service runs."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import aetcd.exceptions
import grpc
from grpc.aio import AbortError, ServicerContext

from shard_core.errors import ShardError
from shard_core.etcd.store import StoreUnavailableError

_log = logging.getLogger(__name__)

_Unary = Callable[[Any, ServicerContext[Any, Any]], Awaitable[Any]]
_Streaming = Callable[[Any, ServicerContext[Any, Any]], AsyncIterator[Any]]


async def _abort(error: Exception, context: ServicerContext[Any, Any], method: str) -> None:
    if isinstance(error, aetcd.exceptions.ClientError):  # from aetcd's client, used directly
        error = StoreUnavailableError(type(error).__name__)
    if isinstance(error, StoreUnavailableError):
        _log.warning("etcd failed in %s: %r", method, error.__cause__ or error)
    if isinstance(error, ShardError):
        status = error.to_status()
        await context.abort(status.code, status.details, status.trailing_metadata)
    _log.exception("unexpected error in %s", method, exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error")


if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor


class ErrorInterceptor(_ServerInterceptor):
    """Turn `ShardError` into `google.rpc.Status` with `ErrorInfo`, etcd failures into
    UNAVAILABLE, and anything else into INTERNAL.

    Unknown exceptions never reach the client: it gets a generic message and the traceback goes to
    the log.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        kind = handler_kind(handler)
        behaviour = getattr(handler, kind)
        guard = _guard_unary if kind.endswith("_unary") else _guard_streaming
        return with_behaviour(handler, kind, guard(behaviour, method))


_HANDLERS = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


def handler_kind(handler: Any) -> str:
    """Which of the four call shapes a method handler serves."""
    return next(kind for kind in _HANDLERS if getattr(handler, kind) is not None)


def with_behaviour(handler: Any, kind: str, behaviour: Any) -> Any:
    """A handler like `handler` (shape and (de)serializers) that runs `behaviour` instead."""
    return _HANDLERS[kind](
        behaviour,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _guard_unary(behaviour: _Unary, method: str) -> _Unary:
    async def guarded(request: Any, context: ServicerContext[Any, Any]) -> Any:
        try:
            return await behaviour(request, context)
        except AbortError:
            raise
        except Exception as error:
            await _abort(error, context, method)

    return guarded


def _guard_streaming(behaviour: _Streaming, method: str) -> _Streaming:
    async def guarded(request: Any, context: ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        try:
            async for response in behaviour(request, context):
                yield response
        except AbortError:
            raise
        except Exception as error:
            await _abort(error, context, method)

    return guarded
