"""The router's relay of client certificates in WatchEndpoints: what the registry refuses is
left out, a registry that is away costs the watcher nothing but the certificate for a while,
and only a bad key or a bad request ends the watch."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, NoReturn

import grpc
import pytest

from shard.auth.v1 import key_service_pb2
from shard.inference.v1 import endpoint_service_pb2 as api
from shard.node.v1 import node_pb2
from shard_client.routing import EndpointTable, TrafficSplit
from shard_core.auth import InferenceGuard, KeyRing, ModelAccess, token_hash
from shard_core.errors import (
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ShardError,
    UnavailableError,
)
from shard_core.limits import RateLimits
from shard_edge.view import ViewChanges
from shard_inference.endpoints import EndpointWatch
from tests.core.test_routing import FakeBackend

TOKEN = "admin-token"
MODELS = ["a", "b", "c"]


class AbortedError(Exception):
    """The stream ended with the router's status."""


class Context:
    def __init__(self, token: str) -> None:
        self._token = token
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self._token}")]

    async def abort(self, code: grpc.StatusCode, details: str, _: object = ()) -> NoReturn:
        self.aborted = (code, details)
        raise AbortedError(details)


def _rpc_error(error: ShardError) -> grpc.aio.AioRpcError:
    status = error.to_status()
    return grpc.aio.AioRpcError(
        status.code,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(*status.trailing_metadata),
        status.details,
        None,
    )


class Registry:
    """Issues for the models asked, after refusing as scripted."""

    def __init__(self, refusals: Sequence[ShardError]) -> None:
        self.refusals = list(refusals)
        self.asked: list[list[str]] = []

    async def issue(
        self, request: bytes, models: Sequence[str], authorization: str
    ) -> key_service_pb2.ClientCertificate:
        assert authorization == f"Bearer {TOKEN}"
        self.asked.append(list(models))
        if self.refusals:
            raise _rpc_error(self.refusals.pop(0))
        certificate = key_service_pb2.ClientCertificate(models=models)
        certificate.expire_time.FromSeconds(int(time.time()) + 900)
        return certificate


def _watch(registry: Registry) -> EndpointWatch:
    table: EndpointTable[FakeBackend] = EndpointTable(backend_factory=FakeBackend)
    table.replace_all(
        node_pb2.ModelEndpoint(
            model_name=m, model_version="1", node="nodes/n", inference_address="n:1"
        )
        for m in MODELS
    )
    guard = InferenceGuard(
        KeyRing(admin_token_sha256=token_hash(TOKEN)),
        ModelAccess(),
        RateLimits(key_rps=0, anonymous_rps=0),
    )
    return EndpointWatch(table, TrafficSplit(), ViewChanges(), guard, registry.issue)


async def _first(registry: Registry, context: Context) -> api.WatchEndpointsResponse:
    request = api.WatchEndpointsRequest(certificate_request=b"csr")
    stream: Any = _watch(registry).WatchEndpoints(request, context)
    try:
        snapshot: api.WatchEndpointsResponse = await anext(stream)
    finally:
        await stream.aclose()
    return snapshot


async def test_models_the_registry_will_not_grant_are_left_out() -> None:
    registry = Registry(
        [
            PermissionDeniedError("b is private", metadata={"field": "models[1]"}),
            NotFoundError("c is gone", metadata={"field": "models[1]"}),
        ]
    )
    snapshot = await _first(registry, Context(TOKEN))
    assert registry.asked == [MODELS, ["a", "c"], ["a"]]
    assert list(snapshot.client_certificate.models) == ["a"]
    assert len(snapshot.endpoints) == 3  # the rest route through the router


async def test_a_registry_that_is_away_costs_only_the_certificate() -> None:
    registry = Registry([UnavailableError("etcd is away")])
    snapshot = await _first(registry, Context(TOKEN))
    assert not snapshot.HasField("client_certificate")
    assert len(snapshot.endpoints) == 3


async def test_a_bad_request_or_key_ends_the_watch() -> None:
    bad = InvalidArgumentError("not a CSR", metadata={"field": "certificate_request"})
    context = Context(TOKEN)
    with pytest.raises(AbortedError):
        await _first(Registry([bad]), context)
    assert context.aborted is not None
    assert context.aborted[0] == grpc.StatusCode.INVALID_ARGUMENT
    stranger = Context("not-a-key")
    with pytest.raises(AbortedError):
        await _first(Registry([]), stranger)
    assert stranger.aborted is not None
    assert stranger.aborted[0] == grpc.StatusCode.UNAUTHENTICATED
