"""The one gRPC server bootstrap every service uses.

Health (`grpc.health.v1`), reflection and the error interceptor come with every server. On
SIGTERM or SIGINT the server reports NOT_SERVING, stops with a grace period for calls in flight,
then runs the service's shutdown hooks (stopping background work, closing etcd), so calls that
finish during the grace period still have what they need.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shard_core.grpc.interceptors import ErrorInterceptor
from shard_core.tls import TlsIdentity, require_loopback

_log = logging.getLogger(__name__)

ShutdownHook = Callable[[], Awaitable[None]]


def server_options(
    *, max_receive_bytes: int = 64 << 20, handshake_timeout_ms: int = 10_000
) -> Sequence[tuple[str, int]]:
    """Keepalive settings that let long-lived streams (node agents, watchers) notice a dead
    peer, the largest message a client may send (tensors on the data plane; the registry,
    which strangers reach, takes far less), and how long a connection may take over its TLS
    handshake before it is dropped (gRPC's default, two minutes, lets a stalling client hold
    sockets)."""
    return (
        ("grpc.server_handshake_timeout_ms", handshake_timeout_ms),
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_receive_message_length", max_receive_bytes),
        ("grpc.max_send_message_length", 64 << 20),
    )


SERVER_OPTIONS = server_options()


def _slow(what: str, started: float, *, over_s: float = 1.0) -> None:
    """Say so when a step of shutting down took long (a restart must fit in a node's lease)."""
    took = time.monotonic() - started
    if took > over_s:
        _log.warning("%s took %.1f s", what, took)


class GrpcServer:
    """A started `grpc.aio` server with health, reflection and graceful shutdown."""

    def __init__(
        self,
        *,
        address: str | None,
        services: Sequence[str],
        register: Callable[[grpc.aio.Server], None],
        interceptors: Sequence[grpc.aio.ServerInterceptor[Any, Any]] = (ErrorInterceptor(),),
        grace_s: float = 5.0,
        options: Sequence[tuple[str, int]] = SERVER_OPTIONS,
        tls: TlsIdentity | None = None,
        tls_address: str | None = None,
        require_client_certificate: bool = False,
        mtls_address: str | None = None,
    ) -> None:
        """Listen in plaintext on `address` (loopback only; None for no plaintext listener),
        with TLS on `tls_address` using `tls`, and with mutual TLS (a client certificate from
        the mesh CA required) on `mtls_address`."""
        self._server = grpc.aio.server(interceptors=list(interceptors), options=list(options))
        self._health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        register(self._server)
        names = [*services, health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, self._server)
        self._services = list(services)
        self.port = 0
        if address is not None:
            require_loopback(address, what="a plaintext listener")
            self.port = self._listen(address, self._server.add_insecure_port)
        self.tls_port = 0
        if tls_address is not None:
            if tls is None:
                raise ValueError(f"a TLS listener on {tls_address} needs TLS files")
            credentials = tls.server_credentials(
                require_client_certificate=require_client_certificate
            )
            self.tls_port = self._listen(
                tls_address, lambda at: self._server.add_secure_port(at, credentials)
            )
        self.mtls_port = 0
        if mtls_address is not None:
            if tls is None:
                raise ValueError(f"a mutual-TLS listener on {mtls_address} needs TLS files")
            mutual = tls.server_credentials(require_client_certificate=True)
            self.mtls_port = self._listen(
                mtls_address, lambda at: self._server.add_secure_port(at, mutual)
            )
        self._grace_s = grace_s
        self._shutdown_hooks: list[ShutdownHook] = []
        self._stopping_hooks: list[Callable[[], None]] = []
        self._stopped = asyncio.Event()

    @staticmethod
    def _listen(address: str, add: Callable[[str], int]) -> int:
        port = add(address)
        if port == 0:
            raise OSError(f"cannot listen on {address}")
        return port

    def on_stopping(self, hook: Callable[[], None]) -> None:
        """Run `hook` when shutdown begins, before the grace period: for ending calls that never
        finish on their own (long-lived streams), so their clients move on at once."""
        self._stopping_hooks.append(hook)

    def on_shutdown(self, hook: ShutdownHook) -> None:
        """Run `hook` once the server has stopped and calls in flight have finished."""
        self._shutdown_hooks.append(hook)

    async def start(self) -> None:
        await self._server.start()
        await self.set_serving(serving=True)

    async def set_serving(self, *, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self._services]:
            await self._health.set(name, status)

    async def set_component(self, name: str, *, serving: bool) -> None:
        """Report one component's health under its own name, beside the services'."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self._health.set(name, status)

    async def stop(self) -> None:
        """Graceful shutdown: NOT_SERVING, stop with the grace period, then shutdown hooks."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        await self.set_serving(serving=False)
        for stopping in self._stopping_hooks:
            stopping()
        started = time.monotonic()
        await self._server.stop(self._grace_s)
        _slow("stopping the server (calls in flight)", started)
        for hook in self._shutdown_hooks:
            started = time.monotonic()
            try:
                await hook()
            except Exception:
                _log.exception("shutdown hook failed")
            _slow(f"shutdown hook {getattr(hook, '__qualname__', hook)}", started)

    async def serve_until_signalled(self) -> None:
        """Serve until SIGTERM or SIGINT, then shut down gracefully."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        server_done = asyncio.ensure_future(self._server.wait_for_termination())
        signalled = asyncio.ensure_future(stop.wait())
        await asyncio.wait({server_done, signalled}, return_when=asyncio.FIRST_COMPLETED)
        _log.info("shutting down")
        await self.stop()
        signalled.cancel()
        await server_done
