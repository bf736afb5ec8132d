"""The node agent: keeps the registry informed and its Triton converged to its assignments.

The agent holds one Connect stream to the registry: a registration, then a heartbeat with the
state of every assigned model each interval the registry asked for. The registry sends back the
node's complete set of assignments whenever it changes; the `ModelManager` converges Triton to
it. If the stream breaks the agent reconnects with backoff and registers again (keeping its lease
if it is back within the lease TTL). On SIGTERM it says goodbye, which deregisters the node at
once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from collections.abc import AsyncIterator, Mapping
from importlib.metadata import version
from typing import Any

import grpc
import psutil
from tritonclient.utils import InferenceServerException

from shard.node.v1 import node_pb2, node_service_pb2, node_service_pb2_grpc
from shard_node.identity import NodeIdentity
from shard_node.models import ModelManager
from shard_node.triton import TritonControl

_log = logging.getLogger(__name__)

AGENT_VERSION = version("shard-node")


def measure_capacity() -> node_pb2.NodeResources:
    """What this machine has for model replicas. GPUs are added with NVML support."""
    return node_pb2.NodeResources(
        cpu_millis=(os.cpu_count() or 1) * 1000, memory_bytes=psutil.virtual_memory().total
    )


class NodeAgent:
    def __init__(
        self,
        *,
        identity: NodeIdentity,
        triton: TritonControl,
        models: ModelManager,
        channel: grpc.aio.Channel,
        advertise_address: str,
        labels: Mapping[str, str],
        reconnect_max_backoff_s: float,
    ) -> None:
        self._identity = identity
        self._triton = triton
        self._models = models
        self._stub = node_service_pb2_grpc.NodeServiceStub(channel)
        self._advertise_address = advertise_address
        self._labels = dict(labels)
        self._max_backoff_s = reconnect_max_backoff_s
        self._stopping = asyncio.Event()
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
                # Jitter spreads the reconnects of many nodes after a registry restart.
                delay = backoff * random.uniform(0.5, 1.0)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                backoff = min(backoff * 2, self._max_backoff_s)
        finally:
            converging.cancel()
            await asyncio.gather(converging, return_exceptions=True)

    async def _registration(self) -> node_service_pb2.ConnectRequest:
        return node_service_pb2.ConnectRequest(
            registration=node_service_pb2.Registration(
                node_id=self._identity.node_id,
                public_key=self._identity.public_key,
                inference_address=self._advertise_address,
                labels=self._labels,
                agent_version=AGENT_VERSION,
                triton_version=await self._triton.version(),
                models=await self._models.statuses(),
                capacity=measure_capacity(),
            )
        )

    async def _receive(
        self, call: grpc.aio.StreamStreamCall[Any, node_service_pb2.ConnectResponse]
    ) -> None:
        """Take everything the registry sends after the registration: assignments."""
        while isinstance(reply := await call.read(), node_service_pb2.ConnectResponse):
            if reply.WhichOneof("message") == "assignments":
                self._models.assign(list(reply.assignments.models))
        raise ConnectionError("the registry ended the stream")

    async def _session(self) -> None:
        outbox: asyncio.Queue[node_service_pb2.ConnectRequest | None] = asyncio.Queue()

        async def requests() -> AsyncIterator[node_service_pb2.ConnectRequest]:
            while (request := await outbox.get()) is not None:
                yield request

        outbox.put_nowait(await self._registration())
        call = self._stub.Connect(requests())
        receiving: asyncio.Future[None] | None = None
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            reply = await call.read()
            if not isinstance(reply, node_service_pb2.ConnectResponse):
                raise ConnectionError("the registry closed the stream without an answer")
            interval = reply.registered.heartbeat_interval_ms / 1000
            _log.info("registered as %s; heartbeat every %.1fs", reply.registered.name, interval)
            self.registered.set()
            receiving = asyncio.ensure_future(self._receive(call))
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
                heartbeat = node_service_pb2.Heartbeat(models=await self._models.statuses())
                outbox.put_nowait(node_service_pb2.ConnectRequest(heartbeat=heartbeat))
        finally:
            stopping.cancel()
            if receiving is not None:
                receiving.cancel()
            call.cancel()
