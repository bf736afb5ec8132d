"""The router's endpoint table and balancing, as pure domain logic."""

from __future__ import annotations

import collections
from dataclasses import dataclass

from shard.node.v1 import node_pb2
from shard_client.routing import (
    EndpointTable,
    OutlierEjection,
    RetryBudget,
    Route,
    SequenceAffinity,
    pick_order,
)
from shard_core import keys


@dataclass(eq=False)
class FakeBackend:
    address: str
    node: str = ""
    in_flight: int = 0
    up: bool = True

    def connected(self) -> bool:
        return self.up


def _endpoint(
    model: str, version: str, node: str, address: str, pending: int = 0
) -> tuple[str, bytes]:
    record = node_pb2.ModelEndpoint(
        model_name=model,
        model_version=version,
        node=f"nodes/{node}",
        inference_address=address,
        pending=pending,
    )
    return keys.endpoint(model, version, node), record.SerializeToString()


def _table() -> tuple[EndpointTable[FakeBackend], list[str]]:
    removed: list[str] = []
    table: EndpointTable[FakeBackend] = EndpointTable(
        backend_factory=FakeBackend, on_backend_removed=lambda b: removed.append(b.address)
    )
    return table, removed


def test_no_version_means_the_newest_ready_version() -> None:
    table, _ = _table()
    table.reset(
        dict(
            [
                _endpoint("m", "2", "a", "a:1"),
                _endpoint("m", "10", "b", "b:1"),
                _endpoint("m", "10", "c", "c:1"),
            ]
        )
    )
    assert {route.node for route in table.candidates("m", "")} == {"nodes/b", "nodes/c"}
    assert [route.node for route in table.candidates("m", "2")] == ["nodes/a"]
    assert table.candidates("m", "3") == []
    assert table.candidates("other", "") == []
    assert table.models() == {"m": ["2", "10"]}


def test_nodes_share_one_backend_per_address_released_with_the_last_endpoint() -> None:
    table, removed = _table()
    key_simple, value_simple = _endpoint("simple", "1", "a", "a:1")
    key_string, value_string = _endpoint("simple_string", "1", "a", "a:1")
    table.put(key_simple, value_simple)
    table.put(key_string, value_string)
    first = table.candidates("simple", "")[0].backend
    assert table.candidates("simple_string", "")[0].backend is first

    table.delete(key_simple)
    assert removed == []
    table.reset({})
    assert removed == ["a:1"]
    assert table.models() == {}


def test_unreadable_records_are_ignored() -> None:
    table, _ = _table()
    table.put("endpoints/m/1/a", b"\xff\xff not a protobuf")
    assert table.models() == {}


def test_power_of_two_choices_prefers_the_less_loaded_replica() -> None:
    table, _ = _table()
    table.reset(dict([_endpoint("m", "1", "busy", "busy:1"), _endpoint("m", "1", "idle", "i:1")]))
    routes = table.candidates("m", "1")
    next(route for route in routes if route.node == "nodes/busy").backend.in_flight = 5

    picks = collections.Counter(pick_order(routes, 1)[0].node for _ in range(200))

    assert picks == {"nodes/idle": 200}


def test_balancing_counts_the_queue_a_node_reports() -> None:
    """Another router (or direct clients) may be loading a node: its reported queue counts."""
    table, removed = _table()
    table.reset(
        dict([_endpoint("m", "1", "queued", "q:1", pending=8), _endpoint("m", "1", "idle", "i:1")])
    )
    routes = table.candidates("m", "1")
    next(route for route in routes if route.node == "nodes/idle").backend.in_flight = 3
    picks = collections.Counter(pick_order(routes, 1)[0].node for _ in range(100))
    assert picks == {"nodes/idle": 100}

    # The queue drains: the same replica, channel and in-flight count, with the new depth.
    queued = next(route for route in routes if route.node == "nodes/queued").backend
    queued.in_flight = 1
    table.put(*_endpoint("m", "1", "queued", "q:1", pending=0))
    drained = next(r for r in table.candidates("m", "1") if r.node == "nodes/queued")
    assert drained.backend is queued
    assert drained.load() == 1
    assert removed == []
    picks = collections.Counter(
        pick_order(table.candidates("m", "1"), 1)[0].node for _ in range(100)
    )
    assert picks == {"nodes/queued": 100}


def test_a_snapshot_from_the_router_replaces_the_whole_view() -> None:
    changes: list[None] = []
    table: EndpointTable[FakeBackend] = EndpointTable(
        backend_factory=FakeBackend, on_change=lambda: changes.append(None)
    )
    table.reset(dict([_endpoint("m", "1", "a", "a:1"), _endpoint("m", "1", "b", "b:1")]))
    snapshot = table.endpoints()
    assert {(e.node, e.inference_address) for e in snapshot} == {
        ("nodes/a", "a:1"),
        ("nodes/b", "b:1"),
    }
    mirror: EndpointTable[FakeBackend] = EndpointTable(backend_factory=FakeBackend)
    mirror.replace_all(snapshot)
    assert sorted(r.node for r in mirror.candidates("m", "")) == ["nodes/a", "nodes/b"]
    mirror.replace_all(snapshot[:1])
    assert len(mirror.candidates("m", "")) == 1
    assert len(changes) == 2


def test_retry_order_has_distinct_replicas() -> None:
    table, _ = _table()
    table.reset(dict(_endpoint("m", "1", name, f"{name}:1") for name in "abcd"))
    routes: list[Route[FakeBackend]] = table.candidates("m", "1")
    for _ in range(50):
        order = pick_order(routes, 3)
        assert len(order) == 3
        assert len({route.node for route in order}) == 3
    assert pick_order(routes[:1], 3) == routes[:1]


def test_a_sequence_keeps_its_version_and_replica_until_the_replica_goes() -> None:
    table, _ = _table()
    table.reset(dict(_endpoint("m", "1", name, f"{name}:1") for name in "abc"))
    affinity = SequenceAffinity(capacity=2)
    routes = table.candidates("m", "1")
    first = affinity.order(("m", "", "7"), "1", pick_order(routes, 3))[0]
    for _ in range(20):
        again = affinity.order(("m", "", "7"), "1", pick_order(routes, 3))
        assert again[0].node == first.node
    assert affinity.version(("m", "", "7")) == "1"
    survivors = [route for route in routes if route.node != first.node]
    moved = affinity.order(("m", "", "7"), "1", survivors)
    assert moved[0].node != first.node
    # Bounded: the least recently used sequences are forgotten.
    affinity.order(("m", "", "8"), "1", routes)
    affinity.order(("m", "", "9"), "1", routes)
    assert affinity.version(("m", "", "7")) == ""


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_replica_failing_in_a_row_is_ejected_with_a_growing_backoff() -> None:
    clock = Clock()
    ejection = OutlierEjection(threshold=3, base_s=1.0, max_s=4.0, clock=clock)
    flaky, steady = FakeBackend("flaky:1"), FakeBackend("steady:1")
    ejection.failed(flaky)
    ejection.failed(flaky)
    assert ejection.usable(flaky)  # two failures are not yet a pattern
    ejection.failed(flaky)
    assert not ejection.usable(flaky)
    assert ejection.usable(steady)
    clock.now += 1.0
    assert ejection.usable(flaky)
    for _ in range(3):
        ejection.failed(flaky)
    clock.now += 1.5
    assert not ejection.usable(flaky)  # the second ejection lasts 2 s
    ejection.succeeded(flaky)
    assert ejection.usable(flaky)


def test_an_ejected_replica_returns_only_once_its_connection_is_up() -> None:
    """A dead node is not probed with real requests: its channel must reconnect first."""
    clock = Clock()
    failures: list[str] = []
    ejection = OutlierEjection(
        threshold=1, base_s=1.0, recheck_s=0.25, clock=clock, on_failure=failures.append
    )
    dead = FakeBackend("dead:1", up=False)
    ejection.failed(dead)
    assert failures == ["dead:1"]
    clock.now += 5
    assert not ejection.usable(dead)
    dead.up = True
    assert not ejection.usable(dead)  # rechecked after recheck_s, not on every pick
    clock.now += 0.25
    assert ejection.usable(dead)


def test_picking_leaves_out_ejected_replicas_unless_all_are() -> None:
    table, _ = _table()
    table.reset(dict(_endpoint("m", "1", name, f"{name}:1") for name in "ab"))
    routes = table.candidates("m", "1")
    down = next(route.backend for route in routes if route.node == "nodes/a")
    for _ in range(50):
        (first, *_rest) = pick_order(routes, 2, lambda backend: backend is not down)
        assert first.node == "nodes/b"
    assert len(pick_order(routes, 2, lambda backend: False)) == 2


def test_retries_stay_within_the_budget() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.2, floor_per_s=2, clock=clock)
    for _ in range(100):
        budget.request()
    allowed = sum(budget.retry() for _ in range(100))
    assert allowed == 20
    clock.now += 1
    budget.request()
    assert [budget.retry() for _ in range(3)] == [True, True, False]  # the floor
