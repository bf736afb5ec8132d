"""The domain error model shared by every service.

Domain code raises a `ShardError` subclass; the gRPC layer turns it into a `google.rpc.Status`
whose details carry an `ErrorInfo` with the error's UPPER_SNAKE reason, so clients can act on the
reason without parsing messages. REST maps the same errors to HTTP codes with the same reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "shard.ai"


class ShardError(Exception):
    """A failure the caller can understand and act on."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    reason: str = "UNKNOWN"

    def __init__(
        self, message: str, *, reason: str | None = None, metadata: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata = dict(metadata or {})

    def to_status(self) -> grpc.Status:
        """The error as a gRPC status with a `google.rpc.ErrorInfo` detail."""
        info = error_details_pb2.ErrorInfo(
            reason=self.reason, domain=ERROR_DOMAIN, metadata=self.metadata
        )
        detail = any_pb2.Any()
        detail.Pack(info)
        status = status_pb2.Status(code=self.code.value[0], message=self.message, details=[detail])
        converted: grpc.Status = rpc_status.to_status(status)
        return converted


class InvalidArgumentError(ShardError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"


class NotFoundError(ShardError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"


class AlreadyExistsError(ShardError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "ALREADY_EXISTS"


class FailedPreconditionError(ShardError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class AbortedError(ShardError):
    code = grpc.StatusCode.ABORTED
    reason = "ABORTED"


class PermissionDeniedError(ShardError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class UnauthenticatedError(ShardError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class ResourceExhaustedError(ShardError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RESOURCE_EXHAUSTED"


class UnavailableError(ShardError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"


class DeadlineExceededError(ShardError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The `ErrorInfo` a failed call carries, or None when it has none."""
    trailing: Sequence[tuple[str, bytes]] = getattr(error, "trailing_metadata", tuple)() or ()
    for key, value in trailing:
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    return info
    return None


def require(value: object, field: str) -> None:
    """Raise INVALID_ARGUMENT naming `field` when a required field is empty."""
    if not value:
        raise InvalidArgumentError(
            f"{field} is required", reason="FIELD_REQUIRED", metadata={"field": field}
        )


# How gRPC codes map to HTTP statuses (google.rpc.Code's documented mapping).
_HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def http_status(code: grpc.StatusCode) -> int:
    """The HTTP status for a gRPC status code; 500 for the internal ones."""
    return _HTTP_STATUS.get(code, 500)
