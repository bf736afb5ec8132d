"""EndpointService: the router's view of the shard, streamed to clients that route themselves.

Watchers need an API key with the `inference` permission, and see only the models they may use:
every public model, and the private ones they own (all, for admins).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from shard.inference.v1 import endpoint_service_pb2 as api
from shard.inference.v1 import endpoint_service_pb2_grpc
from shard_client.routing import EndpointTable, TrafficSplit
from shard_core.auth import InferenceGuard, Permission, Principal, bearer
from shard_core.errors import ShardError, UnauthenticatedError

# Changes closer together than this go out as one snapshot.
COALESCE_S = 0.05


class ViewChanges:
    """Wakes every watcher when the view changes: each waits on the event current when it took
    its snapshot."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def notify(self) -> None:
        self.event.set()
        self.event = asyncio.Event()


class EndpointWatch(endpoint_service_pb2_grpc.EndpointServiceServicer):
    """Sends each watcher a snapshot at once and after every change of the view."""

    def __init__(
        self,
        table: EndpointTable[Any],
        split: TrafficSplit,
        changes: ViewChanges,
        guard: InferenceGuard,
    ) -> None:
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
        try:
            principal = self.guard.ring.authenticate(bearer(context.invocation_metadata()))
            if not principal.may(Permission.INFERENCE):
                raise UnauthenticatedError(
                    "watching the endpoints needs an API key with the 'inference' permission",
                    reason="CREDENTIALS_MISSING" if principal.anonymous else "PERMISSION_MISSING",
                )
        except ShardError as error:
            status = error.to_status()
            await context.abort(status.code, status.details, status.trailing_metadata)
        while True:
            changed = self.changes.event
            yield self.snapshot(principal)
            await changed.wait()
            await asyncio.sleep(COALESCE_S)
