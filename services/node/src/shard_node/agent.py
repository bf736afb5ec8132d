"""The node agent: keeps the registry informed and its Triton converged to its assignments.

The agent holds one Connect stream to the registry: a hello; a registration that answers the
registry's challenge with a signed attestation (and, the first time, a join token); then each
interval the registry asked for, a heartbeat with the state of every assigned model, the
machine's load and its self-check; and a fresh attestation whenever the registry challenges
again. The registry sends the node's complete set of assignments whenever it changes; the
`ModelManager` converges Triton to it. It sends the node's open tasks the same way; the
`TaskRunner` runs them. If the stream breaks the agent reconnects with backoff and
registers again (keeping its lease if it is back within the lease TTL). On SIGTERM it says
goodbye, which deregisters the node at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping
from importlib.metadata import version
from pathlib import Path
from typing import Any

import grpc
from tritonclient.utils import InferenceServerException

from shard.node.v1 import node_service_pb2, node_service_pb2_grpc
from shard_core.attestation import signed_bytes
from shard_node.certificate import NodeCertificates
from shard_node.gate import NodeGate
from shard_node.health import HealthCheck
from shard_node.identity import NodeIdentity
from shard_node.inventory import read_inventory, read_metrics
from shard_node.models import ModelManager
from shard_node.registry_calls import RegistryCalls
from shard_node.tasks import TaskRunner
from shard_node.triton import TritonControl

_log = logging.getLogger(__name__)

AGENT_VERSION = version("shard-node")


class NodeAgent:
    def __init__(
        self,
        *,
        identity: NodeIdentity,
        triton: TritonControl,
        models: ModelManager,
        channel: grpc.aio.Channel,
        advertise_address: str,
        http_address: str = "",
        labels: Mapping[str, str],
        reconnect_max_backoff_s: float,
        state_dir: Path,
        join_token: str,
        health: HealthCheck,
        metrics_url: str | None,
        tasks: TaskRunner,
        registry_calls: RegistryCalls,
        certificates: NodeCertificates | None = None,
        certificate_channel: Callable[[], grpc.aio.Channel] | None = None,
        gate: NodeGate | None = None,
    ) -> None:
        """With `certificates`, the node asks for a mesh certificate; with
        `certificate_channel` too, its calls beside the stream go over the channel that makes
        (mutual TLS with that certificate) once it has one; with `gate`, the gate starts
        serving the shard with the first certificate (before any model is loaded: the registry
        sends the certificate before the assignments)."""
        self._gate = gate
        self._identity = identity
        self._certificates = certificates
        self._registry_calls = registry_calls
        self._certificate_channel = certificate_channel
        self._triton = triton
        self._models = models
        self._stub = node_service_pb2_grpc.NodeServiceStub(channel)
        self._advertise_address = advertise_address
        self._http_address = http_address
        self._labels = dict(labels)
        self._max_backoff_s = reconnect_max_backoff_s
        self._lease_ttl_s = float("inf")
        self._state_dir = state_dir
        self._join_token = join_token
        self._health = health
        self._metrics_url = metrics_url
        self._tasks = tasks
        self._stopping = asyncio.Event()
        self._last_triton_version = ""
        self.registered = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Stay connected to the registry until `stop()`."""
        converging = asyncio.ensure_future(self._models.run())
        backoff = 0.1
        try:
            while not self._stopping.is_set():
                try:
                    await self._session()
                    backoff = 0.1
                except grpc.aio.AioRpcError as error:
                    _log.warning("registry stream ended: %s %s", error.code().name, error.details())
                except (ConnectionError, OSError, InferenceServerException) as error:
                    _log.warning("registry stream failed: %s", error)
                self.registered.clear()
                if self._stopping.is_set():
                    break
                # Jitter spreads the reconnects of many nodes after a registry restart. The node
                # tries several times within its lease, so a registry restart costs it nothing.
                delay = backoff * random.uniform(0.5, 1.0)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                backoff = min(backoff * 2, self._max_backoff_s, self._lease_ttl_s / 4)
        finally:
            converging.cancel()
            await asyncio.gather(converging, self._tasks.stop(), return_exceptions=True)

    def _use_credential(self, token: str) -> None:
        """Send `token` from now on (until a certificate replaces it): the registry renews it
        with every attestation."""
        self._registry_calls.use_credential(token)

    async def _use_certificate(self, certificate: node_service_pb2.NodeCertificate) -> None:
        assert self._certificates is not None
        if not self._certificates.accept(certificate):
            return
        if self._certificate_channel is not None:
            self._registry_calls.use_certificate(self._certificate_channel())
        if self._gate is not None:
            try:
                await self._gate.start()
            except (RuntimeError, TimeoutError, OSError) as error:
                # The gate's supervisor tries again; the stream and the models go on.
                _log.error("the node gate did not start: %s", error)

    async def _triton_version(self) -> str:
        """Triton's version, or the last one seen while it restarts: a Triton that is down
        for a moment must not cost the node its stream (and, if that outlasts the lease, its
        replicas)."""
        try:
            self._last_triton_version = await self._triton.version()
        except InferenceServerException:
            if not self._last_triton_version:
                raise
        return self._last_triton_version

    async def _attestation(
        self, nonce: bytes, *, registering: bool = False
    ) -> node_service_pb2.Attestation:
        """Sign the registry's nonce with what this machine has, now."""
        inventory = await asyncio.to_thread(
            read_inventory,
            state_dir=self._state_dir,
            triton_version=await self._triton_version(),
            agent_version=AGENT_VERSION,
        )
        time_ms = int(time.time() * 1000)
        certificates = self._certificates
        request = certificates.request(renew=registering) if certificates is not None else b""
        message = signed_bytes(
            nonce=nonce,
            inventory=inventory,
            time_ms=time_ms,
            node_id=self._identity.node_id,
            certificate_request=request,
        )
        return node_service_pb2.Attestation(
            nonce=nonce,
            inventory=inventory,
            time_ms=time_ms,
            signature=self._identity.private_key.sign(message),
            certificate_request=request,
        )

    async def _registration(self, nonce: bytes) -> node_service_pb2.ConnectRequest:
        attestation = await self._attestation(nonce, registering=True)
        return node_service_pb2.ConnectRequest(
            registration=node_service_pb2.Registration(
                inference_address=self._advertise_address,
                http_address=self._http_address,
                labels=self._labels,
                models=await self._models.statuses(),
                join_token=self._join_token,
                attestation=attestation,
                encryption_key=self._identity.vouched_encryption_key(),
            )
        )

    async def _heartbeat(self) -> node_service_pb2.ConnectRequest:
        return node_service_pb2.ConnectRequest(
            heartbeat=node_service_pb2.Heartbeat(
                models=await self._models.statuses(),
                metrics=await asyncio.to_thread(read_metrics, self._metrics_url),
                problems=await self._health.problems(),
            )
        )

    async def _receive(
        self,
        call: grpc.aio.StreamStreamCall[Any, node_service_pb2.ConnectResponse],
        outbox: asyncio.Queue[node_service_pb2.ConnectRequest | None],
    ) -> None:
        """Take everything the registry sends after the registration: assignments to converge
        to, and challenges to attest to."""
        while isinstance(reply := await call.read(), node_service_pb2.ConnectResponse):
            kind = reply.WhichOneof("message")
            if kind == "assignments":
                self._models.assign(list(reply.assignments.models))
            elif kind == "tasks":
                self._tasks.offer(list(reply.tasks.tasks))
            elif kind == "credential":
                self._use_credential(reply.credential.token)
            elif kind == "certificate" and self._certificates is not None:
                await self._use_certificate(reply.certificate)
            elif kind == "challenge":
                attestation = await self._attestation(reply.challenge.nonce)
                outbox.put_nowait(node_service_pb2.ConnectRequest(attestation=attestation))
        raise ConnectionError("the registry ended the stream")

    async def _session(self) -> None:
        outbox: asyncio.Queue[node_service_pb2.ConnectRequest | None] = asyncio.Queue()

        async def requests() -> AsyncIterator[node_service_pb2.ConnectRequest]:
            while (request := await outbox.get()) is not None:
                yield request

        hello = node_service_pb2.Hello(
            node_id=self._identity.node_id, public_key=self._identity.public_key
        )
        outbox.put_nowait(node_service_pb2.ConnectRequest(hello=hello))
        call = self._stub.Connect(requests())
        receiving: asyncio.Future[None] | None = None
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            challenge = await call.read()
            if not isinstance(challenge, node_service_pb2.ConnectResponse):
                raise ConnectionError("the registry closed the stream without a challenge")
            outbox.put_nowait(await self._registration(challenge.challenge.nonce))
            reply = await call.read()
            if not isinstance(reply, node_service_pb2.ConnectResponse):
                raise ConnectionError("the registry closed the stream without an answer")
            interval = reply.registered.heartbeat_interval_ms / 1000
            self._lease_ttl_s = reply.registered.lease_ttl_ms / 1000 or float("inf")
            self._use_credential(reply.registered.blob_credential)
            _log.info("registered as %s; heartbeat every %.1fs", reply.registered.name, interval)
            self.registered.set()
            receiving = asyncio.ensure_future(self._receive(call, outbox))
            while True:
                await asyncio.wait(
                    {receiving, stopping}, timeout=interval, return_when=asyncio.FIRST_COMPLETED
                )
                if receiving.done():
                    receiving.result()  # raises why the stream ended
                if stopping.done():
                    goodbye = node_service_pb2.Deregistration(reason="agent shutting down")
                    outbox.put_nowait(node_service_pb2.ConnectRequest(deregistration=goodbye))
                    outbox.put_nowait(None)
                    with contextlib.suppress(grpc.aio.AioRpcError, TimeoutError):
                        await asyncio.wait_for(call.code(), timeout=5)
                    _log.info("deregistered")
                    return
                outbox.put_nowait(await self._heartbeat())
        finally:
            stopping.cancel()
            if receiving is not None:
                receiving.cancel()
            call.cancel()
