"""The edge (a real Envoy, configured over ADS by the router's control plane) in front of a
stand-in router on its Unix socket and stand-in nodes: what goes straight to a node, what goes to
the router, and that no body, header or client can move a request onto a route it may not take."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from envoy.service.discovery.v3 import ads_pb2_grpc
from google.protobuf import json_format, timestamp_pb2
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from shard.auth.v1 import api_key_pb2
from shard.model.v1 import model_pb2
from shard.node.v1 import node_pb2
from shard_client.routing import EndpointTable, TrafficSplit
from shard_core import pki, tls
from shard_core.auth import KeyRing, ModelAccess, new_secret, token_hash
from shard_core.envoy import envoy_binary, secret_files
from shard_core.limits import MIN_RATE_RPS
from shard_core.net import free_port
from shard_edge.edge import (
    GRPC_DOOR,
    REST_DOOR,
    Edge,
    EdgePolicy,
    EdgePorts,
    NodeAddress,
    ShardState,
    resources,
)
from shard_edge.view import CacheableVersions
from shard_edge.xds import CLUSTER, ENDPOINT, LISTENER, ROUTE
from tests.demo import simple_inputs
from tests.fake_node import FakeTriton
from tests.grpc_frames import INFER, frame, h2_post, malformed
from tests.grpc_frames import field as pb_field
from tests.waiting import until

DOMAIN = "shard.local"


@dataclass
class Shard:
    """What the router's view would hold, made by hand, and the edge built from it."""

    edge: Edge
    state: ShardState
    router: FakeTriton
    nodes: dict[str, FakeTriton]
    address: str
    rejected: list[str] = field(default_factory=list)
    delays: list[float] = field(default_factory=list)

    def serve(self, node: str, model: str, version: str) -> None:
        endpoint = node_pb2.ModelEndpoint(
            model_name=model,
            model_version=version,
            node=node,
            inference_address=self.nodes[node].address,
        )
        self.state.table.put(f"{model}/{version}/{node}", endpoint.SerializeToString())

    def withdraw(self, node: str, model: str, version: str) -> None:
        self.state.table.delete(f"{model}/{version}/{node}")

    def model(self, name: str, *, public: bool = True, **fields: Any) -> None:
        visibility = model_pb2.VISIBILITY_PUBLIC if public else model_pb2.VISIBILITY_PRIVATE
        record = model_pb2.Model(name=f"models/{name}", visibility=visibility, **fields)
        self.state.access.put(f"models/{name}", record.SerializeToString())

    def key(self, principal: str, **fields: Any) -> str:
        """A new key of `principal` (a developer's unless `fields` say): its secret."""
        key_id, secret = new_secret()
        key = api_key_pb2.ApiKey(
            name=f"keys/{key_id}",
            principal=principal,
            role=fields.pop("role", api_key_pb2.ROLE_DEVELOPER),
            **fields,
        )
        stored = api_key_pb2.StoredApiKey(key=key, secret_sha256=token_hash(secret))
        self.state.keys.put(key.name, stored.SerializeToString())
        return secret

    def calls(self, where: str) -> list[dict[str, str]]:
        server = self.router if where == "router" else self.nodes[where]
        return [metadata for method, _, metadata in server.calls if method == "ModelInfer"]

    async def published(self) -> None:
        """Publish the view and wait until Envoy runs it (every type acknowledged)."""
        self.edge.publish()
        await until(self.edge.applied, "the edge never applied the view", timeout=20)


@pytest.fixture
async def shard(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Shard]:
    """The edge, with anonymous clients limited to `request.param` requests a second (none
    unless a test says)."""
    directory = tmp_path / "edge"
    directory.mkdir()
    socket = directory / "router.sock"
    rejected: list[str] = []
    delays: list[float] = []
    nodes = {name: FakeTriton() for name in ("nodes/a", "nodes/b")}
    state = ShardState(
        table=EndpointTable(backend_factory=NodeAddress.of),
        split=TrafficSplit(),
        access=ModelAccess(),
        cacheable=CacheableVersions(),
        keys=KeyRing(),
    )
    port = free_port()
    edge = Edge(
        directory=directory,
        state=state,
        ports=EdgePorts(plaintext=f"127.0.0.1:{port}", tls=None, mesh=None),
        policy=EdgePolicy(
            trust_domain=DOMAIN,
            anonymous_rps=getattr(request, "param", 0.0),
            key_rps=0.0,
            max_attempts=2,
            upstream_timeout_s=30,
            sds_dir=None,
        ),
        service_socket=socket,
        tls_dir=None,
        on_rejected=rejected.append,
        on_applied=delays.append,
    )
    router = FakeTriton(
        address=f"unix:{socket}",
        register=lambda server: ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(
            edge.ads, server
        ),
    )
    async with router:
        for node in nodes.values():
            await node.__aenter__()
        try:
            await edge.start()
            found = Shard(edge, state, router, nodes, f"127.0.0.1:{port}", rejected, delays)
            found.model("simple")
            found.serve("nodes/a", "simple", "1")
            await found.published()
            yield found
        finally:
            edge.stop()
            for node in nodes.values():
                await node.__aexit__()


LIMITED = "StatusCode.RESOURCE_EXHAUSTED"
TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _direct_log(shard: Shard) -> list[tuple[str, str, str]]:
    """(principal, model, version) of each call the access log shows went to a node (to a
    model version's cluster)."""
    if not shard.edge.access_log.exists():
        return []
    entries = [json.loads(line) for line in shard.edge.access_log.read_text().splitlines()]
    return [
        (e["principal"], e["model"], e["version"])
        for e in entries
        if str(e["route"]).startswith(("m/", "s/"))
    ]


def _bearer(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


def _infer(
    shard: Shard,
    model: str = "simple",
    version: str = "",
    headers: dict[str, str] | None = None,
    *,
    sequence_id: int = 0,
    timeout_s: float | None = None,
) -> str:
    """One ModelInfer through the edge: "ok" or the status code's name."""
    client = triton.InferenceServerClient(shard.address)
    data = np.ones((1, 16), dtype=np.int32)
    try:
        client.infer(
            model,
            simple_inputs(data, data),
            model_version=version,
            headers=headers,
            sequence_id=sequence_id,
            client_timeout=timeout_s,
        )
    except InferenceServerException as error:
        return str(error.status())
    finally:
        client.close()
    return "ok"


async def test_a_public_inference_goes_to_a_node_and_everything_else_to_the_router(
    shard: Shard,
) -> None:
    assert await asyncio.to_thread(_infer, shard) == "ok"
    assert [c["model"] for c in shard.calls("nodes/a")] == ["simple"]
    # The node was told which version the edge chose.
    assert shard.calls("nodes/a")[0]["version"] == "1"
    router_before = len(shard.calls("router"))
    shard.model("private", public=False, owner="ann")
    shard.serve("nodes/a", "private", "1")
    shard.model("checked", verify_fraction=0.5)
    shard.serve("nodes/a", "checked", "1")
    await shard.published()
    # A private model without a key, a verified one, an unknown one: the router's to answer.
    for model in ("private", "checked", "unknown"):
        await asyncio.to_thread(_infer, shard, model)
    # So are credentials that are not a working key, and the shard's own headers.
    for headers in (
        {"authorization": "Bearer sk-x"},
        {"authorization": "Basic c2hhcmQ="},
        {"shard-canary-node": "nodes/a"},
    ):
        await asyncio.to_thread(_infer, shard, "simple", "", headers)
    routed = [c["model"] for c in shard.calls("router")[router_before:]]
    assert routed == ["private", "checked", "unknown", "simple", "simple", "simple"]
    assert len(shard.calls("nodes/a")) == 1


async def test_keys_that_work_go_straight_to_their_models(shard: Shard) -> None:
    shard.model("private", public=False, owner="ann")
    shard.serve("nodes/b", "private", "1")
    ann, bob = shard.key("ann"), shard.key("bob")
    admin = shard.key("root", role=api_key_pb2.ROLE_ADMIN)
    read_only = shard.key("ann", scopes=["models.read"])
    await shard.published()
    for secret in (ann, admin):
        assert await asyncio.to_thread(_infer, shard, "private", "", _bearer(secret)) == "ok"
    assert await asyncio.to_thread(_infer, shard, "simple", "", _bearer(bob)) == "ok"
    assert [c["model"] for c in shard.calls("nodes/b")] == ["private", "private"]
    assert [c["model"] for c in shard.calls("nodes/a")] == ["simple"]
    # A node never sees a caller's key or address, nor any header but those it needs.
    private = {"cookie": "session=s3cr3t", "x-api-key": "another-secret", "traceparent": TRACE}
    assert await asyncio.to_thread(_infer, shard, "simple", "", {**_bearer(bob), **private}) == "ok"
    for call in shard.calls("nodes/a") + shard.calls("nodes/b"):
        assert not {"authorization", "x-forwarded-for", "cookie", "x-api-key"} & set(call), call
    assert shard.calls("nodes/a")[-1]["traceparent"] == TRACE
    # Another principal's key, a key without the inference scope, a wrong secret for a real key
    # id: the router judges them (and refuses).
    wrong = ann[:-4] + ("AAAA" if not ann.endswith("AAAA") else "BBBB")
    for secret in (bob, read_only, wrong):
        await asyncio.to_thread(_infer, shard, "private", "", _bearer(secret))
    assert len(shard.calls("nodes/b")) == 2
    assert [c["authorization"] for c in shard.calls("router")] == [
        f"Bearer {secret}" for secret in (bob, read_only, wrong)
    ]
    # The access log names the principal, model and version of each direct call, never a secret.
    logged = {("ann", "private", "1"), ("root", "private", "1"), ("bob", "simple", "1")}
    await until(lambda: logged <= set(_direct_log(shard)), "the access log lacks direct calls")
    log = shard.edge.access_log.read_text()
    for secret in (ann, bob, admin, read_only, wrong):
        assert secret not in log


async def test_a_revoked_or_expired_key_goes_to_the_router(shard: Shard) -> None:
    revoked = shard.key("ann", revoke_time=timestamp_pb2.Timestamp(seconds=1))
    expired = shard.key("ann", expire_time=timestamp_pb2.Timestamp(seconds=1))
    expires_at = int(time.time()) + 3
    expiring = shard.key("ann", expire_time=timestamp_pb2.Timestamp(seconds=expires_at))
    await shard.published()
    assert await asyncio.to_thread(_infer, shard, "simple", "", _bearer(expiring)) == "ok"
    for secret in (revoked, expired):
        await asyncio.to_thread(_infer, shard, "simple", "", _bearer(secret))
    assert len(shard.calls("router")) == 2
    # A key past its expiry stops taking the direct path without a new configuration.
    # (Envoy's Lua reads C's time(), which may follow a coarse clock a tick behind Python's.)
    await until(lambda: time.time() >= expires_at + 0.5, "the key never expired", timeout=10)
    outcome = await asyncio.to_thread(_infer, shard, "simple", "", _bearer(expiring))
    assert outcome == "ok"
    assert len(shard.calls("nodes/a")) == 1, _direct_log(shard)
    assert len(shard.calls("router")) == 3


async def test_versions_named_drawn_or_unready(shard: Shard) -> None:
    shard.serve("nodes/b", "simple", "2")
    shard.state.split.replace_all({"simple": {"1": 0, "2": 1}})
    await shard.published()
    for _ in range(5):
        assert await asyncio.to_thread(_infer, shard) == "ok"
    # Drawn by the weights, and written into the request for the node.
    assert [c["version"] for c in shard.calls("nodes/b")] == ["2"] * 5
    assert await asyncio.to_thread(_infer, shard, "simple", "1") == "ok"
    assert [c["version"] for c in shard.calls("nodes/a")] == ["1"]
    # A version with no ready replica is the router's to answer.
    await asyncio.to_thread(_infer, shard, "simple", "7")
    assert [c["version"] for c in shard.calls("router")] == ["7"]
    shard.state.split.replace_all({"simple": {"1": 1, "2": 1}})
    await shard.published()
    for _ in range(40):
        assert await asyncio.to_thread(_infer, shard) == "ok"
    # Both drawn (the chance of 40 draws of one is 2^-39).
    assert {c["version"] for c in shard.calls("nodes/a")} == {"1"}
    assert len(shard.calls("nodes/a")) > 1
    assert len(shard.calls("nodes/b")) > 5


async def test_hostile_bodies_and_headers_never_take_a_route_they_may_not(shard: Shard) -> None:
    shard.model("private", public=False)
    shard.serve("nodes/b", "private", "1")
    await shard.published()
    port = int(shard.address.rsplit(":", 1)[1])
    simple, private = pb_field(1, b"simple"), pb_field(1, b"private")
    for case, body in malformed(b"simple", b"private").items():
        await asyncio.to_thread(h2_post, port, body)
        assert not shard.calls("nodes/b"), case
        assert not shard.calls("nodes/a"), case
    # The last name wins, as in Triton: the private model's request goes to the router.
    await asyncio.to_thread(h2_post, port, frame(simple + private))
    assert not shard.calls("nodes/b")
    # The public one's goes to a node, named as the node reads it.
    await asyncio.to_thread(h2_post, port, frame(private + simple))
    assert [c["model"] for c in shard.calls("nodes/a")] == ["simple"]
    # The edge's own headers, sent by a client, route nothing.
    for headers in (
        [("x-shard-cluster", "m/private/1")],
        [("x-shard-cluster", "m/private/1"), ("x-shard-direct", "anonymous")],
        [("x-shard-cluster", "xds")],
        # No client is internal to Envoy, loopback included: Envoy obeys none of its own
        # headers from one (a timeout of 1 ms would fail the call) and passes none on.
        [("x-envoy-upstream-rq-timeout-ms", "1")],
        [("x-envoy-ip-tags", "x"), ("x-envoy-max-retries", "3")],
    ):
        await asyncio.to_thread(h2_post, port, frame(private), headers=headers)
    assert not shard.calls("nodes/b")
    assert [c["model"] for c in shard.calls("router")].count("private") >= 6
    # x-shard-* never reach a node or the router, nor do a client's x-envoy-*.
    assert not any(k.startswith("x-shard") for c in shard.calls("router") for k in c)
    assert not any(
        k in ("x-envoy-internal", "x-envoy-ip-tags") for c in shard.calls("router") for k in c
    )
    assert not any(k.startswith("x-shard") for c in shard.calls("nodes/a") for k in c)


@pytest.mark.parametrize("shard", [2.0], indirect=True)
async def test_anonymous_clients_are_limited_per_address_before_their_bodies_are_read(
    shard: Shard,
) -> None:
    outcomes = [await asyncio.to_thread(_infer, shard) for _ in range(12)]
    # A burst of two seconds' worth passes, the rest is refused until tokens come back.
    assert outcomes[:4] == ["ok"] * 4
    assert "StatusCode.RESOURCE_EXHAUSTED" in outcomes
    assert outcomes.count("ok") < 12
    # The limit holds before the edge reads a body: an address over its rate reaches nothing,
    # not even the router (with a model only the router could answer). A key is not anonymous.
    refused = [await asyncio.to_thread(_infer, shard, "unknown") for _ in range(4)]
    assert LIMITED in refused
    assert len(shard.calls("router")) < 4
    # No header gets a caller out of it but a key: an empty one or another token is no key.
    for headers in ({"authorization": ""}, {"authorization": "Bearer not-a-key"}):
        assert await asyncio.to_thread(_infer, shard, "simple", "", headers) == LIMITED
    assert await asyncio.to_thread(_infer, shard, "simple", "", _bearer(shard.key("ann"))) == "ok"


async def test_a_sequence_stays_on_one_version_and_one_node(shard: Shard) -> None:
    shard.serve("nodes/b", "simple", "1")
    shard.serve("nodes/a", "simple", "2")
    shard.serve("nodes/b", "simple", "2")
    shard.state.split.replace_all({"simple": {"1": 1, "2": 1}})
    await shard.published()
    placed: dict[int, set[tuple[str, str]]] = {}
    for _ in range(3):
        for sequence in range(1, 25):
            before = {node: len(shard.calls(node)) for node in shard.nodes}
            assert await asyncio.to_thread(_infer, shard, sequence_id=sequence) == "ok"
            node = next(n for n in shard.nodes if len(shard.calls(n)) > before[n])
            placed.setdefault(sequence, set()).add((node, shard.calls(node)[-1]["version"]))
    # Every request of a sequence met the same node and version; the sequences spread over both
    # nodes and versions (the chance that 24 ids hash onto one of either is about 2^-23).
    assert all(len(where) == 1 for where in placed.values()), placed
    assert {node for ((node, _),) in placed.values()} == {"nodes/a", "nodes/b"}
    assert {version for ((_, version),) in placed.values()} == {"1", "2"}
    assert not shard.calls("router")
    # Of the edge's headers, a node sees only the sequence's hash key (its own sequence id).
    seen = {k for n in shard.nodes for c in shard.calls(n) for k in c if k.startswith("x-shard")}
    assert seen == {"x-shard-sequence"}


async def test_keys_and_models_are_limited_on_the_direct_path(shard: Shard) -> None:
    # The slowest rate there is, one request in two seconds: the first passes, the next
    # ones are refused.
    slow, other = shard.key("ann", rate_limit_rps=MIN_RATE_RPS), shard.key("bob")
    shard.model("limited", rate_limit_rps=MIN_RATE_RPS)
    shard.serve("nodes/b", "limited", "1")
    await shard.published()
    by_key = [await asyncio.to_thread(_infer, shard, "simple", "", _bearer(slow)) for _ in range(3)]
    assert by_key[0] == "ok"
    assert LIMITED in by_key
    # Another key has its own bucket (and no limit here, where keys have no default rate).
    assert await asyncio.to_thread(_infer, shard, "simple", "", _bearer(other)) == "ok"
    # A model's rate holds for everyone together, keyed or not.
    by_model = [await asyncio.to_thread(_infer, shard, "limited", "", _bearer(other))]
    by_model += [await asyncio.to_thread(_infer, shard, "limited") for _ in range(2)]
    assert by_model[0] == "ok"
    assert LIMITED in by_model
    assert not shard.calls("router")


async def test_a_new_configuration_hands_out_no_fresh_tokens(shard: Shard) -> None:
    """Any key holder can change the configuration (by making a key): that must not refill
    the buckets. A try tells only when the edge ran the new configuration within a refill."""
    slow = shard.key("ann", rate_limit_rps=MIN_RATE_RPS)
    await shard.published()
    refill_s = 1 / MIN_RATE_RPS
    admitted = time.monotonic()
    for attempt in range(10):
        while (await asyncio.to_thread(_infer, shard, "simple", "", _bearer(slow))) == "ok":
            admitted = time.monotonic()
        shard.key(f"new-{attempt}")
        await shard.published()
        asked = time.monotonic()
        outcome = await asyncio.to_thread(_infer, shard, "simple", "", _bearer(slow))
        if outcome == LIMITED:
            return
        assert asked - admitted >= refill_s, "the new configuration refilled the bucket"
    pytest.fail("the machine was too slow to tell, ten times")


async def test_a_withdrawn_replica_takes_no_more_requests(shard: Shard) -> None:
    shard.serve("nodes/b", "simple", "1")
    await shard.published()
    reported = len(shard.delays)
    shard.withdraw("nodes/a", "simple", "1")
    await shard.published()
    # How long the change took to reach Envoy is reported once Envoy runs it.
    await until(lambda: len(shard.delays) > reported, "no delay reported", timeout=20)
    assert not shard.rejected
    before = len(shard.calls("nodes/a"))
    for _ in range(4):
        assert await asyncio.to_thread(_infer, shard) == "ok"
    assert len(shard.calls("nodes/a")) == before
    assert len(shard.calls("nodes/b")) == 4


async def test_versions_coming_and_going_fail_no_request(shard: Shard) -> None:
    """Make before break: the route names a version only once Envoy runs its clusters, and a
    cluster stays until Envoy runs a route without it; a request meanwhile goes to the router."""
    shard.model("fresh")
    outcomes: list[str] = []
    done = asyncio.Event()

    async def traffic() -> None:
        while not done.is_set():
            outcomes.append(await asyncio.to_thread(_infer, shard, "fresh"))

    clients = [asyncio.ensure_future(traffic()) for _ in range(4)]
    for version in ("1", "2", "3"):
        shard.serve("nodes/b", "fresh", version)
        await shard.published()
        await until(lambda: len(shard.calls("nodes/b")) > 0, "nothing went straight to the node")
        shard.withdraw("nodes/b", "fresh", version)
        await shard.published()
    done.set()
    await asyncio.gather(*clients)
    assert set(outcomes) == {"ok"}
    assert shard.calls("router")


async def test_clients_short_deadlines_eject_no_node(shard: Shard) -> None:
    """A client can make a healthy node miss deadlines at will (by setting short ones): that
    must not take the node out of the rotation for everyone."""
    shard.serve("nodes/b", "simple", "1")
    await shard.published()
    slow = shard.nodes["nodes/a"]
    slow.delay_s = 0.3
    outcomes = [await asyncio.to_thread(_infer, shard, timeout_s=0.02) for _ in range(12)]
    assert "StatusCode.DEADLINE_EXCEEDED" in outcomes
    address = f"::{slow.address}::health_flags::"
    # (Envoy's admin interface, which can change and stop it, is this user's alone.)
    assert shard.edge.envoy.admin_socket.stat().st_mode & 0o777 == 0o600
    _, clusters = await shard.edge.envoy.admin_get("/clusters")
    flags = [line for line in clusters.splitlines() if address in line]
    assert flags
    assert not any("failed_outlier_check" in line for line in flags), flags


async def test_a_dead_replica_is_retried_on_another(shard: Shard) -> None:
    shard.serve("nodes/b", "simple", "1")
    await shard.published()
    await shard.nodes["nodes/a"].__aexit__()
    outcomes = [await asyncio.to_thread(_infer, shard) for _ in range(4)]
    assert outcomes == ["ok"] * 4
    assert len(shard.calls("nodes/b")) == 4


def test_every_shape_the_control_plane_emits_passes_envoy_validation(tmp_path: Path) -> None:
    table: EndpointTable[NodeAddress] = EndpointTable(backend_factory=NodeAddress.of)
    access, split = ModelAccess(), TrafficSplit()
    for i, node in enumerate(("nodes/a", "nodes/b")):
        for model, version in (("simple", "1"), ("simple", "2"), ("other", "3")):
            endpoint = node_pb2.ModelEndpoint(
                model_name=model,
                model_version=version,
                node=node,
                inference_address=f"127.0.0.{i + 1}:8001",
                pending=i * 5,
            )
            table.put(f"{model}/{version}/{node}", endpoint.SerializeToString())
    for model in ("simple", "other"):
        record = model_pb2.Model(name=f"models/{model}", visibility=model_pb2.VISIBILITY_PUBLIC)
        access.put(f"models/{model}", record.SerializeToString())
    private = model_pb2.Model(
        name="models/other", visibility=model_pb2.VISIBILITY_PRIVATE, owner="ann", rate_limit_rps=3
    )
    access.put("models/other", private.SerializeToString())
    split.replace_all({"simple": {"1": 3, "2": 1}})
    keys = KeyRing()
    for rate in (0.0, 7.5):
        key_id, key_secret = new_secret()
        stored = api_key_pb2.StoredApiKey(
            key=api_key_pb2.ApiKey(name=f"keys/{key_id}", principal="ann", rate_limit_rps=rate),
            secret_sha256=token_hash(key_secret),
        )
        keys.put(f"keys/{key_id}", stored.SerializeToString())
    state = ShardState(
        table=table, split=split, access=access, cacheable=CacheableVersions(), keys=keys
    )
    authority, key = pki.Authority.create(), pki.new_key()
    issued = authority.issue(
        key.public_key(), authority.workload("service", "router"), lifetime_s=600
    )
    tls.write_identity(
        tmp_path / "tls", chain=issued.chain_pem, key=pki.key_pem(key), bundle=authority.bundle_pem
    )
    (tmp_path / "sds").mkdir()
    for name, secret in secret_files(tmp_path / "tls").items():
        (tmp_path / "sds" / name).write_text(json.dumps(secret))
    plaintext = EdgePorts(plaintext="127.0.0.1:1", tls=None, mesh=None)
    shapes = {
        "gRPC, plaintext, no limits": (plaintext, 0.0, None, GRPC_DOOR),
        "gRPC, tls and mesh, limited": (
            EdgePorts(plaintext="127.0.0.1:1", tls="0.0.0.0:2", mesh="0.0.0.0:3"),
            2.5,
            tmp_path / "sds",
            GRPC_DOOR,
        ),
        "REST, plaintext, no limits": (plaintext, 0.0, None, REST_DOOR),
        "REST, tls, limited": (
            EdgePorts(plaintext="127.0.0.1:1", tls="0.0.0.0:2", mesh=None),
            2.5,
            tmp_path / "sds",
            REST_DOOR,
        ),
    }
    for shape, (ports, rps, sds_dir, door) in shapes.items():
        policy = EdgePolicy(
            trust_domain=DOMAIN,
            anonymous_rps=rps,
            key_rps=rps * 10,
            max_attempts=3,
            upstream_timeout_s=60,
            sds_dir=sds_dir,
            door=door,
        )
        built = resources(
            state,
            ports=ports,
            policy=policy,
            service_socket=tmp_path / "service.sock",
            access_log=tmp_path / "access.log",
            # A cluster the route no longer names, kept until Envoy runs the route without it.
            routed=("m/gone/7", "s/gone/7"),
        )
        assert "m/gone/7" in built[CLUSTER]
        config = tmp_path / f"{shape}.json"
        config.write_text(json.dumps(_static(built)))
        checked = subprocess.run(
            [envoy_binary(), "--mode", "validate", "-c", str(config)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert checked.returncode == 0, f"{shape}: {checked.stdout}{checked.stderr}"


def _static(built: dict[str, Any]) -> dict[str, Any]:
    """The resources as one static configuration (routes inline, endpoints in their clusters)
    for `envoy --mode validate`, which does not fetch over xDS."""

    def plain(message: Any) -> dict[str, Any]:
        return json_format.MessageToDict(message, preserving_proto_field_name=True)

    (routes,) = built[ROUTE].values()
    listeners = []
    for listener in built[LISTENER].values():
        config = plain(listener)
        for chain in config["filter_chains"]:
            for network_filter in chain["filters"]:
                manager = network_filter["typed_config"]
                del manager["rds"]
                manager["route_config"] = plain(routes)
        listeners.append(config)
    clusters = []
    for name, cluster in built[CLUSTER].items():
        config = plain(cluster)
        if config.get("type") == "EDS":
            del config["eds_cluster_config"]
            config["type"] = "STATIC"
            config["load_assignment"] = plain(built[ENDPOINT][name])
        clusters.append(config)
    return {
        "node": {"id": "edge", "cluster": "shard-edge"},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def _identity(authority: pki.Authority, root: Path, kind: str, name: str) -> tls.TlsIdentity:
    key = pki.new_key()
    issued = authority.issue(key.public_key(), authority.workload(kind, name), lifetime_s=600)
    tls.write_identity(
        root / f"{kind}-{name}",
        chain=issued.chain_pem,
        key=pki.key_pem(key),
        bundle=authority.bundle_pem,
    )
    return tls.TlsIdentity(root / f"{kind}-{name}")


async def test_on_the_mesh_port_only_the_gateway_escapes_the_per_address_limit(
    tmp_path: Path,
) -> None:
    """Any workload of the mesh may call the router's mutual-TLS port, nodes included: a caller
    without a key is limited per address there too, but for the gateway (told by the certificate
    Envoy describes), whose clients the router limits by the address the gateway names."""
    authority = pki.Authority.create()
    router = _identity(authority, tmp_path, "service", "router")
    directory = tmp_path / "edge"
    directory.mkdir()
    state = ShardState(
        table=EndpointTable(backend_factory=NodeAddress.of),
        split=TrafficSplit(),
        access=ModelAccess(),
        cacheable=CacheableVersions(),
        keys=KeyRing(),
    )
    port = free_port()
    edge = Edge(
        directory=directory,
        state=state,
        ports=EdgePorts(plaintext=None, tls=None, mesh=f"127.0.0.1:{port}"),
        policy=EdgePolicy(
            trust_domain=authority.workload("service", "router").trust_domain,
            anonymous_rps=MIN_RATE_RPS,
            key_rps=0.0,
            max_attempts=2,
            upstream_timeout_s=30,
            sds_dir=directory / "sds",
        ),
        service_socket=directory / "router.sock",
        tls_dir=router.directory,
    )
    stand_in = FakeTriton(
        address=f"unix:{directory / 'router.sock'}",
        register=lambda server: ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(
            edge.ads, server
        ),
    )
    request = service_pb2.ModelInferRequest(model_name="unknown").SerializeToString()

    async def calls_as(caller: tls.TlsIdentity, count: int) -> list[grpc.StatusCode]:
        expect = authority.workload("service", "router")
        async with tls.channel(
            f"127.0.0.1:{port}", caller.channel_credentials(), expect=expect
        ) as channel:
            infer = channel.unary_unary(INFER, None, None)
            codes = []
            for _ in range(count):
                try:
                    await infer(request, timeout=10)
                    codes.append(grpc.StatusCode.OK)
                except grpc.aio.AioRpcError as error:
                    codes.append(error.code())
            return codes

    async with stand_in:
        try:
            await edge.start()
            await until(edge.applied, "the edge never applied the view", timeout=20)
            node = await calls_as(_identity(authority, tmp_path, "node", "n1"), 4)
            reached = len(stand_in.calls)
            gateway = await calls_as(_identity(authority, tmp_path, "service", "gateway"), 4)
        finally:
            edge.stop()
    # A burst of one (the slowest rate there is), then the node is refused at the edge.
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in node
    assert reached < 4
    # Every one of the gateway's calls reached the router.
    assert grpc.StatusCode.RESOURCE_EXHAUSTED not in gateway
    assert len(stand_in.calls) == reached + 4
