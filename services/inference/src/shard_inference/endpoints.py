"""EndpointService: the router's view of the shard, streamed to clients that route themselves."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from shard.inference.v1 import endpoint_service_pb2 as api
from shard.inference.v1 import endpoint_service_pb2_grpc
from shard_client.routing import EndpointTable, TrafficSplit

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
        self, table: EndpointTable[Any], split: TrafficSplit, changes: ViewChanges
    ) -> None:
        self.table = table
        self.split = split
        self.changes = changes

    def snapshot(self) -> api.WatchEndpointsResponse:
        return api.WatchEndpointsResponse(
            endpoints=self.table.endpoints(),
            splits=[
                api.TrafficSplit(model_name=model, weights=weights)
                for model, weights in sorted(self.split.all_weights().items())
            ],
        )

    async def WatchEndpoints(
        self, request: api.WatchEndpointsRequest, context: Any
    ) -> AsyncIterator[api.WatchEndpointsResponse]:
        while True:
            changed = self.changes.event
            yield self.snapshot()
            await changed.wait()
            await asyncio.sleep(COALESCE_S)
