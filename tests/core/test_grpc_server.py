"""The shared gRPC server bootstrap on a real loopback server and channel."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from shard_core.errors import NotFoundError, error_info
from shard_core.grpc.server import GrpcServer

SERVICE = "test.Echo"


async def _unary(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    if request == b"missing":
        raise NotFoundError("thing 'x' not found", reason="THING_NOT_FOUND", metadata={"id": "x"})
    if request == b"bug":
        raise RuntimeError("secret internals")
    return request


async def _streaming(
    request: bytes, context: grpc.aio.ServicerContext[Any, Any]
) -> AsyncIterator[bytes]:
    yield request
    raise NotFoundError("ran out", reason="RAN_OUT")


def _register(server: grpc.aio.Server) -> None:
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE,
                {
                    "Unary": grpc.unary_unary_rpc_method_handler(_unary),
                    "Streaming": grpc.unary_stream_rpc_method_handler(_streaming),
                },
            ),
        )
    )


@pytest.fixture
async def server() -> AsyncIterator[GrpcServer]:
    server = GrpcServer(address="127.0.0.1:0", services=[SERVICE], register=_register, grace_s=1)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def channel(server: GrpcServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield channel


async def test_domain_errors_become_status_with_error_info(channel: grpc.aio.Channel) -> None:
    unary = channel.unary_unary(f"/{SERVICE}/Unary", None, None)
    assert await unary(b"hello", timeout=5) == b"hello"

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await unary(b"missing", timeout=5)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert raised.value.details() == "thing 'x' not found"
    info = error_info(raised.value)
    assert info is not None
    assert (info.reason, info.domain, dict(info.metadata)) == (
        "THING_NOT_FOUND",
        "shard.ai",
        {"id": "x"},
    )


async def test_unexpected_errors_are_internal_without_details(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await channel.unary_unary(f"/{SERVICE}/Unary", None, None)(b"bug", timeout=5)
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in (raised.value.details() or "")


async def test_errors_in_server_streams_are_translated(channel: grpc.aio.Channel) -> None:
    call = channel.unary_stream(f"/{SERVICE}/Streaming", None, None)(b"one", timeout=5)
    assert await call.read() == b"one"
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call.read()
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    info = error_info(raised.value)
    assert info is not None
    assert info.reason == "RAN_OUT"


async def test_health_and_reflection_are_served(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    )
    reply = await call.read()
    names = {service.name for service in reply.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names


async def test_stop_runs_hooks_after_calls_in_flight_finish() -> None:
    order: list[str] = []
    release = asyncio.Event()

    async def slow(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        await release.wait()
        order.append("call finished")
        return request

    def register(server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    SERVICE, {"Slow": grpc.unary_unary_rpc_method_handler(slow)}
                ),
            )
        )

    server = GrpcServer(address="127.0.0.1:0", services=[SERVICE], register=register, grace_s=5)
    await server.start()

    async def hook() -> None:
        order.append("hook")

    server.on_shutdown(hook)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = channel.unary_unary(f"/{SERVICE}/Slow", None, None)(b"x", timeout=10)
        await asyncio.sleep(0.2)  # the call is in flight
        health = health_pb2_grpc.HealthStub(channel)
        stopping = asyncio.ensure_future(server.stop())
        await asyncio.sleep(0.2)
        assert order == []  # the hook waits for the call
        release.set()
        assert await call == b"x"
        await stopping
        with pytest.raises(grpc.aio.AioRpcError):
            await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
    assert order == ["call finished", "hook"]
