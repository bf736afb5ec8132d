"""EndpointService: the router's view of the shard, streamed to clients that route themselves.

Watchers need an API key with the `inference` permission, and see only the models they may use:
every public model, and the private ones they own (all, for admins). A watcher that sends a
certificate request also gets a client certificate for the node Tritons, which the registry
issues to its key for the models in its view: renewed at half its life, and again whenever those
models change, for as long as the key still authenticates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc

from shard.auth.v1 import key_service_pb2
from shard.inference.v1 import endpoint_service_pb2 as api
from shard.inference.v1 import endpoint_service_pb2_grpc
from shard_client.routing import EndpointTable, TrafficSplit
from shard_core.auth import InferenceGuard, Permission, Principal, bearer
from shard_core.errors import InvalidArgumentError, ShardError, UnauthenticatedError, error_info
from shard_core.pki import MAX_GRANTS
from shard_edge.view import ViewChanges

_log = logging.getLogger(__name__)

# Has the registry issue a client certificate: (certificate request, models, the caller's
# `authorization` metadata).
Issuer = Callable[[bytes, Sequence[str], str], Awaitable[key_service_pb2.ClientCertificate]]
MAX_CERTIFICATE_REQUEST_BYTES = 8192
# The registry's refusals that end a watch: the key, or the certificate request, is bad.
ENDS_THE_STREAM = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT}
# While the registry cannot issue (it is away), snapshots go without a certificate; asked again
# this often.
RETRY_CERTIFICATE_S = 5.0

# Changes closer together than this go out as one snapshot.
COALESCE_S = 0.05


class EndpointWatch(endpoint_service_pb2_grpc.EndpointServiceServicer):
    """Sends each watcher a snapshot at once and after every change of the view."""

    def __init__(
        self,
        table: EndpointTable[Any],
        split: TrafficSplit,
        changes: ViewChanges,
        guard: InferenceGuard,
        issue: Issuer | None = None,
    ) -> None:
        self.issue = issue
        self.table = table
        self.split = split
        self.changes = changes
        self.guard = guard

    def _usable(self, principal: Principal, model_name: str) -> bool:
        try:
            self.guard.access.check(principal, model_name)
        except ShardError:
            return False
        return True

    def snapshot(self, principal: Principal) -> api.WatchEndpointsResponse:
        """The view as `principal` may see it."""
        return api.WatchEndpointsResponse(
            endpoints=[
                endpoint
                for endpoint in self.table.endpoints()
                if self._usable(principal, endpoint.model_name)
            ],
            splits=[
                api.TrafficSplit(model_name=model, weights=weights)
                for model, weights in sorted(self.split.all_weights().items())
                if self._usable(principal, model)
            ],
        )

    async def WatchEndpoints(
        self, request: api.WatchEndpointsRequest, context: Any
    ) -> AsyncIterator[api.WatchEndpointsResponse]:
        token = bearer(context.invocation_metadata())
        try:
            principal = self._watcher(token)
            if len(request.certificate_request) > MAX_CERTIFICATE_REQUEST_BYTES:
                raise InvalidArgumentError(
                    f"certificate_request is over {MAX_CERTIFICATE_REQUEST_BYTES} bytes",
                    metadata={"field": "certificate_request"},
                )
        except ShardError as error:
            status = error.to_status()
            await context.abort(status.code, status.details, status.trailing_metadata)
        granted: list[str] | None = None  # the models of the last certificate sent
        renew_at = float("inf")
        while True:
            changed = self.changes.event
            snapshot = self.snapshot(principal)
            if request.certificate_request:
                models = sorted({endpoint.model_name for endpoint in snapshot.endpoints})
                if models != granted or time.time() >= renew_at:
                    certificate, renew_at = await self._certificate(request, models, token, context)
                    granted = models
                    if certificate is not None:
                        snapshot.client_certificate.CopyFrom(certificate)
            yield snapshot
            wait = None if renew_at == float("inf") else max(renew_at - time.time(), 0.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), wait)
            await asyncio.sleep(COALESCE_S)

    def _watcher(self, token: str) -> Principal:
        principal = self.guard.ring.authenticate(token)
        if not principal.may(Permission.INFERENCE):
            raise UnauthenticatedError(
                "watching the endpoints needs an API key with the 'inference' permission",
                reason="CREDENTIALS_MISSING" if principal.anonymous else "PERMISSION_MISSING",
            )
        return principal

    async def _certificate(
        self, request: api.WatchEndpointsRequest, models: list[str], token: str, context: Any
    ) -> tuple[key_service_pb2.ClientCertificate | None, float]:
        """A certificate from the registry for a key that still authenticates, and when to ask
        again (at half its life). Models the registry will not grant (made private since the
        view was read, say) are left out, and at most `MAX_GRANTS` are asked for: the client
        routes the rest through the router. None from a registry without a mesh CA (a
        development mesh, whose nodes take plaintext on loopback), or while the registry is
        away (asked again shortly). Only a key that no longer authenticates, or a request the
        CA refuses, ends the stream."""
        try:
            self._watcher(token)
        except ShardError as error:
            status = error.to_status()
            await context.abort(status.code, status.details, status.trailing_metadata)
        if self.issue is None:
            return None, float("inf")
        wanted = models[:MAX_GRANTS]
        while True:
            try:
                certificate = await self.issue(request.certificate_request, wanted, token)
            except grpc.aio.AioRpcError as error:
                field = _field(error)
                if field.startswith("models[") and field.endswith("]"):
                    del wanted[int(field[len("models[") : -1])]
                    continue
                if error.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    return None, float("inf")
                if error.code() in ENDS_THE_STREAM:
                    await context.abort(
                        error.code(), error.details() or "", tuple(error.trailing_metadata() or ())
                    )
                _log.warning("no client certificate from the registry now: %s", error.details())
                return None, time.time() + RETRY_CERTIFICATE_S
            expires = certificate.expire_time.ToSeconds()
            return certificate, time.time() + (expires - time.time()) / 2


def _field(error: grpc.aio.AioRpcError) -> str:
    info = error_info(error)
    return info.metadata.get("field", "") if info is not None else ""
