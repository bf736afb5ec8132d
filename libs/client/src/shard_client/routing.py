"""Which node serves a request: the router's view of ready endpoints and its balancing.

The router's view mirrors the `endpoints/{model}/{version}/{node}` records in etcd; a record
exists only while its node's lease lives and the model version is READY there. A client that
routes itself keeps the same view from the router's `EndpointService`. Balancing is
power-of-two-choices on a replica's load: the requests this process has in flight to the node plus
the requests its Triton last reported pending for the model (which counts everyone else's).
"""

from __future__ import annotations

import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Generic, Protocol, TypeVar

from shard.deployment.v1 import deployment_pb2
from shard.node.v1 import node_pb2

_log = logging.getLogger(__name__)


class Backend(Protocol):
    """One node's Triton as the router tracks it: the node, its address, and requests in flight
    to it. A backend belongs to one node: a connection checks the peer is that node (mutual
    TLS), so a node that advertises another's address reaches nothing."""

    node: str
    address: str
    in_flight: int

    def connected(self) -> bool:
        """Whether the connection to the node is up; starts connecting if it is idle."""


B = TypeVar("B", bound=Backend)


@dataclass(frozen=True, kw_only=True)
class Route(Generic[B]):
    """Where a model version can be served."""

    model_name: str
    model_version: str
    node: str
    backend: B
    # Requests queued or executing for the model in the node's Triton at its last heartbeat.
    pending: int = 0

    def load(self) -> int:
        return self.backend.in_flight + self.pending


def unknown_model(model_name: str, model_version: str) -> str:
    """Triton's words for a model (or version) it does not serve."""
    if model_version:
        return f"Request for unknown model: '{model_name}' version {model_version} is not found"
    return f"Request for unknown model: '{model_name}' is not found"


def _version_order(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (-1, version)


def grpc_address(endpoint: node_pb2.ModelEndpoint) -> str:
    return endpoint.inference_address


def http_address(endpoint: node_pb2.ModelEndpoint) -> str:
    return endpoint.http_address


class EndpointTable(Generic[B]):
    """model → version → node → Route, kept equal to etcd by a `PrefixMirror`. Backends are
    made per node and address (`backend_factory(address, node)`): the gRPC address by default,
    or what `address_of` picks (an endpoint without one is left out)."""

    def __init__(
        self,
        *,
        backend_factory: Callable[[str, str], B],
        on_backend_removed: Callable[[B], None] = lambda _: None,
        on_change: Callable[[], None] = lambda: None,
        address_of: Callable[[node_pb2.ModelEndpoint], str] = grpc_address,
    ) -> None:
        self._routes: dict[str, dict[str, dict[str, Route[B]]]] = {}
        self._by_key: dict[str, Route[B]] = {}
        self._backends: dict[tuple[str, str], B] = {}
        self._users: dict[tuple[str, str], int] = {}
        self._backend_factory = backend_factory
        self._on_backend_removed = on_backend_removed
        self._on_change = on_change
        self._address_of = address_of

    # -- MirrorListener ---------------------------------------------------------------------

    def reset(self, entries: Mapping[str, bytes]) -> None:
        for key in list(self._by_key):
            if key not in entries:
                self.delete(key)
        for key, value in entries.items():
            self.put(key, value)

    def put(self, key: str, value: bytes) -> None:
        try:
            endpoint = node_pb2.ModelEndpoint.FromString(value)
        except Exception:
            _log.warning("ignoring unreadable endpoint record %s", key)
            return
        address = self._address_of(endpoint)
        if not address:
            self.delete(key)
            return
        old = self._by_key.get(key)
        if (
            old is not None
            and old.backend.address == address
            and (old.model_name, old.model_version, old.backend.node)
            == (endpoint.model_name, endpoint.model_version, endpoint.node)
        ):
            # The same replica with a new queue depth: keep its channel and in-flight count.
            if old.pending != endpoint.pending:
                self._place(key, replace(old, pending=endpoint.pending))
            return
        # Acquire before releasing, so a record that moves nothing keeps its channel open.
        try:
            backend = self._acquire(address, endpoint.node)
        except ValueError as error:  # e.g. plaintext, which only a loopback address may take
            _log.warning("not routing to %s at %s: %s", endpoint.node, address, error)
            self.delete(key)
            return
        route = Route(
            model_name=endpoint.model_name,
            model_version=endpoint.model_version,
            node=endpoint.node,
            backend=backend,
            pending=endpoint.pending,
        )
        if old is not None:
            self.delete(key)
        self._place(key, route)

    def _place(self, key: str, route: Route[B]) -> None:
        self._by_key[key] = route
        versions = self._routes.setdefault(route.model_name, {})
        versions.setdefault(route.model_version, {})[route.node] = route
        self._on_change()

    def delete(self, key: str) -> None:
        route = self._by_key.pop(key, None)
        if route is None:
            return
        versions = self._routes[route.model_name]
        nodes = versions[route.model_version]
        del nodes[route.node]
        if not nodes:
            del versions[route.model_version]
        if not versions:
            del self._routes[route.model_name]
        self._release(route.backend)
        self._on_change()

    def replace_all(self, endpoints: Iterable[node_pb2.ModelEndpoint]) -> None:
        """Make the view exactly `endpoints` (a snapshot from the router)."""
        self.reset(
            {f"{e.model_name}/{e.model_version}/{e.node}": e.SerializeToString() for e in endpoints}
        )

    # -- backends ---------------------------------------------------------------------------

    def _acquire(self, address: str, node: str) -> B:
        backend = self._backends.get((node, address))
        if backend is None:
            backend = self._backends[node, address] = self._backend_factory(address, node)
        self._users[node, address] = self._users.get((node, address), 0) + 1
        return backend

    def _release(self, backend: B) -> None:
        key = (backend.node, backend.address)
        self._users[key] -= 1
        if not self._users[key]:
            del self._users[key]
            del self._backends[key]
            self._on_backend_removed(backend)

    def reopen(self) -> None:
        """A new backend for every node (new connections, with the credentials of now: a
        renewed certificate); the old ones are handed to `on_backend_removed`."""
        old, self._backends = self._backends, {}
        for peer, backend in old.items():
            self._backends[peer] = self._backend_factory(backend.address, backend.node)
        for key, route in list(self._by_key.items()):
            fresh = self._backends[route.backend.node, route.backend.address]
            self._place(key, replace(route, backend=fresh))
        for backend in old.values():
            self._on_backend_removed(backend)

    # -- queries ----------------------------------------------------------------------------

    def route_count(self) -> int:
        return len(self._by_key)

    def endpoints(self) -> list[node_pb2.ModelEndpoint]:
        """Every route, as the endpoint records it came from (a table of gRPC addresses)."""
        return [
            node_pb2.ModelEndpoint(
                model_name=route.model_name,
                model_version=route.model_version,
                node=route.node,
                inference_address=route.backend.address,
                pending=route.pending,
            )
            for route in self._by_key.values()
        ]

    def any_routes(self) -> list[Route[B]]:
        """One route per node."""
        return list({route.node: route for route in self._by_key.values()}.values())

    def models(self) -> dict[str, list[str]]:
        """Every routable model and its ready versions."""
        return {
            name: sorted(versions, key=_version_order) for name, versions in self._routes.items()
        }

    def candidates(self, model_name: str, model_version: str) -> list[Route[B]]:
        """Routes for the model version; with no version, those of the newest ready version."""
        versions = self._routes.get(model_name)
        if not versions:
            return []
        if not model_version:
            model_version = max(versions, key=_version_order)
        return list(versions.get(model_version, {}).values())

    def choose_version(self, model_name: str, weights: Mapping[str, int]) -> str:
        """The version a request that names none goes to: drawn by the deployment's traffic
        weights among the versions with a ready replica, else the newest ready version."""
        ready = self._routes.get(model_name, {})
        weighted = [(version, weight) for version, weight in weights.items() if version in ready]
        if len(weighted) == 1 and weighted[0][1] > 0:
            return weighted[0][0]
        if any(weight > 0 for _, weight in weighted):
            names = [version for version, _ in weighted]
            shares = [weight for _, weight in weighted]
            chosen: str = random.choices(names, weights=shares)[0]
            return chosen
        return max(ready, key=_version_order) if ready else ""


class TrafficSplit:
    """Model → version → weight, mirrored from the deployments in etcd."""

    def __init__(self, *, on_change: Callable[[], None] = lambda: None) -> None:
        self._by_key: dict[str, tuple[str, dict[str, int]]] = {}
        self._by_model: dict[str, dict[str, int]] = {}
        self._on_change = on_change

    def weights(self, model_name: str) -> Mapping[str, int]:
        return self._by_model.get(model_name, {})

    def deployment_of(self, model_name: str) -> str:
        """The id of the deployment serving the model, or an empty string."""
        for key, (model, _) in self._by_key.items():
            if model == model_name:
                return key.rstrip("/").rsplit("/", 1)[-1]
        return ""

    def all_weights(self) -> Mapping[str, Mapping[str, int]]:
        return self._by_model

    def replace_all(self, weights: Mapping[str, Mapping[str, int]]) -> None:
        """Make the split exactly `weights` (model → version → weight)."""
        self._by_key = {model: (model, dict(versions)) for model, versions in weights.items()}
        self._by_model = {model: dict(versions) for model, versions in weights.items()}
        self._on_change()

    def models(self) -> list[str]:
        """Every deployed model."""
        return sorted(self._by_model)

    def reset(self, entries: Mapping[str, bytes]) -> None:
        self._by_key.clear()
        self._by_model.clear()
        for key, value in entries.items():
            self.put(key, value)

    def put(self, key: str, value: bytes) -> None:
        try:
            deployment = deployment_pb2.Deployment.FromString(value)
        except Exception:
            _log.warning("ignoring unreadable deployment record %s", key)
            return
        self.delete(key)
        model_name = deployment.model.removeprefix("models/")
        weights = {target.version: target.weight for target in deployment.targets}
        self._by_key[key] = (model_name, weights)
        self._by_model[model_name] = weights
        self._on_change()

    def delete(self, key: str) -> None:
        found = self._by_key.pop(key, None)
        if found is not None:
            self._by_model.pop(found[0], None)
            self._on_change()


def pick_order(
    routes: list[Route[B]], attempts: int, usable: Callable[[B], bool] | None = None
) -> list[Route[B]]:
    """Up to `attempts` distinct routes: the first by power-of-two-choices on load (see
    `Route.load`), the rest (for retries) at random. Routes whose backend is not `usable` (ejected)
    are left out, unless that would leave none: then every route is tried."""
    if usable is not None:
        healthy = [route for route in routes if usable(route.backend)]
        routes = healthy or routes
    if len(routes) <= 1:
        return routes
    first, second = random.sample(routes, 2)
    best = first if first.load() <= second.load() else second
    if attempts == 1:
        return [best]
    rest = [route for route in routes if route is not best]
    return [best, *random.sample(rest, min(attempts - 1, len(rest)))]


class SequenceAffinity:
    """Keeps every request of a sequence (Triton's `sequence_id`) on the version and replica that
    got its first request, so sequence batching and stateful models work through the shard.
    Bounded: the least recently used sequences are forgotten first."""

    def __init__(self, capacity: int = 100_000) -> None:
        self._pins: OrderedDict[tuple[str, str, str], tuple[str, str]] = OrderedDict()
        self._capacity = capacity

    def version(self, key: tuple[str, str, str]) -> str:
        """The version the sequence was pinned to, or an empty string."""
        pinned = self._pins.get(key)
        return pinned[0] if pinned else ""

    def order(
        self, key: tuple[str, str, str], version: str, routes: list[Route[B]]
    ) -> list[Route[B]]:
        """`routes` with the sequence's replica first, pinning the first route if it has none
        (or if its replica is gone)."""
        if not routes:
            return routes
        pinned = self._pins.get(key)
        if pinned is not None and pinned[0] == version:
            self._pins.move_to_end(key)
            first = [route for route in routes if route.backend.address == pinned[1]]
            if first:
                return first + [route for route in routes if route.backend.address != pinned[1]]
        self._pins[key] = (version, routes[0].backend.address)
        if len(self._pins) > self._capacity:
            self._pins.popitem(last=False)
        return routes


class OutlierEjection:
    """Passive outlier detection: a replica that fails `threshold` requests in a row is left out
    for a backoff that doubles with each ejection, up to `max_s`. When the backoff ends it gets
    traffic again only once its connection is up: a dead node is never probed with real
    requests. The first success clears its record."""

    def __init__(
        self,
        *,
        threshold: int = 3,
        base_s: float = 1.0,
        max_s: float = 30.0,
        recheck_s: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
        on_failure: Callable[[str], None] = lambda _: None,
    ) -> None:
        self._threshold = threshold
        self._base_s = base_s
        self._max_s = max_s
        self._recheck_s = recheck_s
        self._clock = clock
        self._on_failure = on_failure
        self._failures: dict[str, int] = {}
        self._ejections: dict[str, int] = {}
        self._until: dict[str, float] = {}

    def usable(self, backend: Backend) -> bool:
        until = self._until.get(backend.address)
        if until is None:
            return True
        now = self._clock()
        if now < until:
            return False
        if not backend.connected():
            self._until[backend.address] = now + self._recheck_s
            return False
        return True

    def failed(self, backend: Backend) -> None:
        address = backend.address
        self._on_failure(address)
        self._failures[address] = self._failures.get(address, 0) + 1
        if self._failures[address] >= self._threshold:
            ejections = self._ejections.get(address, 0)
            self._until[address] = self._clock() + min(self._base_s * 2**ejections, self._max_s)
            self._ejections[address] = ejections + 1
            self._failures[address] = 0
            _log.warning("ejected %s after repeated failures", address)

    def succeeded(self, backend: Backend) -> None:
        address = backend.address
        self._failures.pop(address, None)
        self._ejections.pop(address, None)
        self._until.pop(address, None)


class RetryBudget:
    """Retries may add at most `ratio` of the requests of the last second, and at least
    `floor_per_s`: when a failure is general, retries must not multiply the load."""

    def __init__(
        self,
        *,
        ratio: float = 0.2,
        floor_per_s: int = 50,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ratio = ratio
        self._floor = floor_per_s
        self._clock = clock
        self._second = -1
        self._requests = 0
        self._retries = 0

    def _roll(self) -> None:
        second = int(self._clock())
        if second != self._second:
            self._second, self._requests, self._retries = second, 0, 0

    def request(self) -> None:
        self._roll()
        self._requests += 1

    def retry(self) -> bool:
        """Whether one more retry fits; counts it if it does."""
        self._roll()
        if self._retries >= max(self._floor, self._ratio * self._requests):
            return False
        self._retries += 1
        return True


@dataclass(frozen=True, kw_only=True)
class Plan(Generic[B]):
    """Where one request goes: the version and the replicas to try, in order."""

    version: str  # empty when the model has no ready version
    chosen: bool  # the request named no version and the balancer picked `version`
    routes: list[Route[B]]


class Balancer(Generic[B]):
    """The routing decisions the router and the client-side router share: the version by the
    deployment's weights, the replica by power-of-two-choices, sequence affinity, outlier
    ejection and the retry budget."""

    def __init__(
        self,
        table: EndpointTable[B],
        split: TrafficSplit,
        *,
        max_attempts: int = 2,
        on_failure: Callable[[str], None] = lambda _: None,
    ) -> None:
        self.table = table
        self.split = split
        self.max_attempts = max_attempts
        self.affinity = SequenceAffinity()
        self.ejection = OutlierEjection(on_failure=on_failure)
        self.budget = RetryBudget()

    def plan(self, model_name: str, model_version: str, sequence: str = "") -> Plan[B]:
        """The replicas to try for a request; `sequence` is its Triton sequence id, if any."""
        pin = (model_name, model_version, sequence)
        chosen = not model_version
        if chosen:
            # Follow the deployment's traffic split; a sequence stays on the version its first
            # request got.
            model_version = (sequence and self.affinity.version(pin)) or (
                self.table.choose_version(model_name, self.split.weights(model_name))
            )
        candidates = self.table.candidates(model_name, model_version)
        usable = self.ejection.usable
        if sequence:
            ordered = pick_order(candidates, len(candidates), usable)
            routes = self.affinity.order(pin, model_version, ordered)[: self.max_attempts]
        else:
            routes = pick_order(candidates, self.max_attempts, usable)
        self.budget.request()
        return Plan(version=model_version, chosen=chosen, routes=routes)

    def attempts(self, plan: Plan[B]) -> Iterator[Route[B]]:
        """The plan's routes, the retries only while the retry budget allows them."""
        for attempt, route in enumerate(plan.routes):
            if attempt and not self.budget.retry():
                return
            yield route
