"""Server interceptors every management service runs."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import aetcd.exceptions
import grpc
from grpc.aio import AbortError, ServicerContext

from shard_core.errors import ShardError, UnavailableError

_log = logging.getLogger(__name__)

_Unary = Callable[[Any, ServicerContext[Any, Any]], Awaitable[Any]]
_Streaming = Callable[[Any, ServicerContext[Any, Any]], AsyncIterator[Any]]


async def _abort(error: Exception, context: ServicerContext[Any, Any], method: str) -> None:
    if isinstance(error, aetcd.exceptions.ClientError):
        _log.warning("etcd failed in %s: %r", method, error)
        error = UnavailableError(
            "the shard's coordination store is unavailable; retry shortly",
            reason="STORE_UNAVAILABLE",
        )
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
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _guard_unary(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _guard_unary(handler.stream_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _guard_streaming(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            _guard_streaming(handler.stream_stream, method),
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
