"""An xDS control plane for the shard's Envoys: the Aggregated Discovery Service, state of the
world (issue 15's data plane is configured through it).

The control plane publishes snapshots: every resource of every type (listeners, routes,
clusters, endpoints), under one version. Each Envoy holds one ADS stream; it subscribes to a type
(all of it, or by name), gets the snapshot's resources of that type, and answers each response
with an ACK (the version it now runs) or a NACK (`error_detail`: it rejected the configuration and
keeps serving its last good one). A NACK is logged and counted, and nothing is sent again until
a new snapshot: Envoy already keeps the last good configuration, and the control plane must not
loop on a bad one. One server feeds any number of Envoys.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

_log = logging.getLogger(__name__)

PREFIX = "type.googleapis.com/envoy.config."
LISTENER = f"{PREFIX}listener.v3.Listener"
ROUTE = f"{PREFIX}route.v3.RouteConfiguration"
CLUSTER = f"{PREFIX}cluster.v3.Cluster"
ENDPOINT = f"{PREFIX}endpoint.v3.ClusterLoadAssignment"


@dataclass(frozen=True)
class Snapshot:
    """Every resource the Envoys should run, by type URL and name, under one version."""

    version: str
    resources: Mapping[str, Mapping[str, Message]] = field(default_factory=dict)
    # A version per type, where the publisher knows which types changed: a stream sends a type
    # again only when its version moves (so a moved endpoint sends endpoints, nothing else).
    versions: Mapping[str, str] = field(default_factory=dict)

    def version_of(self, type_url: str) -> str:
        return self.versions.get(type_url, self.version)


@dataclass
class _Subscription:
    type_url: str
    names: frozenset[str] = frozenset()  # empty: every resource of the type
    sent: tuple[str, frozenset[str]] | None = None  # the version and names last sent
    nonce: str = ""


class AdsServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    def __init__(
        self,
        on_rejected: Callable[[str, str], None] = lambda _type, _why: None,
        on_acknowledged: Callable[[str], None] = lambda _node: None,
    ) -> None:
        """`on_rejected(type_url, message)` hears of every NACK, `on_acknowledged(node)` of
        every ACK."""
        self._on_acknowledged = on_acknowledged
        self._snapshot = Snapshot(version="0")
        self._changed = asyncio.Event()
        self._nonces = itertools.count(1)
        self._on_rejected = on_rejected
        self._closed = False
        self._acknowledged: dict[str, dict[str, str]] = {}

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def publish(self, snapshot: Snapshot) -> None:
        """Make `snapshot` what every stream serves; each sends what changed for it."""
        self._snapshot = snapshot
        self._changed.set()
        self._changed = asyncio.Event()

    def acknowledged(self, node: str) -> Mapping[str, str]:
        """The version of each type the Envoy `node` last accepted."""
        return self._acknowledged.get(node, {})

    def close(self) -> None:
        """End every stream (the server is stopping): each Envoy keeps its configuration and
        reconnects to whichever control plane answers next."""
        self._closed = True
        self._changed.set()

    async def StreamAggregatedResources(
        self, request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest], context: Any
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        subscriptions: dict[str, _Subscription] = {}
        wanted: asyncio.Queue[str] = asyncio.Queue()
        reading = asyncio.ensure_future(self._read(request_iterator, subscriptions, wanted))
        try:
            while not reading.done() and not self._closed:
                changed = self._changed
                while not wanted.empty():
                    response = self._response(subscriptions[wanted.get_nowait()])
                    if response is not None:
                        yield response
                snapshot_changed = asyncio.ensure_future(changed.wait())
                request_came = asyncio.ensure_future(wanted.get())
                done, _ = await asyncio.wait(
                    {snapshot_changed, request_came, reading}, return_when=asyncio.FIRST_COMPLETED
                )
                snapshot_changed.cancel()
                if request_came in done:
                    wanted.put_nowait(request_came.result())
                else:
                    request_came.cancel()
                if snapshot_changed in done:
                    for type_url in subscriptions:
                        wanted.put_nowait(type_url)
        finally:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading

    def _response(self, subscription: _Subscription) -> discovery_pb2.DiscoveryResponse | None:
        """The snapshot's resources for `subscription`, unless they were sent already."""
        snapshot = self._snapshot
        type_url = subscription.type_url
        version = snapshot.version_of(type_url)
        if subscription.sent == (version, subscription.names):
            return None
        resources = snapshot.resources.get(type_url, {})
        chosen = [
            resource
            for name, resource in sorted(resources.items())
            if not subscription.names or name in subscription.names
        ]
        subscription.sent = (version, subscription.names)
        subscription.nonce = str(next(self._nonces))
        response = discovery_pb2.DiscoveryResponse(
            version_info=version, type_url=type_url, nonce=subscription.nonce
        )
        for resource in chosen:
            packed = any_pb2.Any()
            packed.Pack(resource)
            response.resources.append(packed)
        return response

    async def _read(
        self,
        requests: AsyncIterator[discovery_pb2.DiscoveryRequest],
        subscriptions: dict[str, _Subscription],
        wanted: asyncio.Queue[str],
    ) -> None:
        node = ""
        async for request in requests:
            node = request.node.id or node  # sent on a stream's first request only
            type_url = request.type_url
            subscription = subscriptions.get(type_url)
            if subscription is None:
                subscription = subscriptions[type_url] = _Subscription(type_url)
            if request.response_nonce and request.response_nonce != subscription.nonce:
                continue  # answers a response since replaced: the newer one's answer decides
            if request.HasField("error_detail"):
                message = request.error_detail.message
                _log.warning(
                    "Envoy %s rejected %s version %s: %s",
                    request.node.id,
                    type_url,
                    subscription.sent[0] if subscription.sent else "?",
                    message,
                )
                self._on_rejected(type_url, message)
                continue  # it keeps its last good configuration; a new snapshot goes out
            if request.response_nonce:
                self._acknowledged.setdefault(node, {})[type_url] = request.version_info
                self._on_acknowledged(node)
            names = frozenset(request.resource_names)
            if names != subscription.names or subscription.sent is None:
                subscription.names = names
                wanted.put_nowait(type_url)
