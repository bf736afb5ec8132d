"""The node agent: keeps its Triton serving and the registry informed.

The agent holds one Connect stream to the registry: a registration, then a heartbeat with the
state of every model each interval the registry asked for. If the stream breaks it reconnects
with backoff and registers again (keeping its lease if it is back within the lease TTL). On
SIGTERM it says goodbye, which deregisters the node at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Mapping
from importlib.metadata import version

import grpc

from shard.node.v1 import node_service_pb2, node_service_pb2_grpc
from shard_node.identity import NodeIdentity
from shard_node.triton import TritonControl

_log = logging.getLogger(__name__)

AGENT_VERSION = version("shard-node")


class NodeAgent:
    def __init__(
        self,
        *,
        identity: NodeIdentity,
        triton: TritonControl,
        registry_address: str,
        advertise_address: str,
        labels: Mapping[str, str],
        reconnect_max_backoff_s: float,
    ) -> None:
        self._identity = identity
        self._triton = triton
        self._registry_address = registry_address
        self._advertise_address = advertise_address
        self._labels = dict(labels)
        self._max_backoff_s = reconnect_max_backoff_s
        self._stopping = asyncio.Event()
        self.registered = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def load_models(self, models: list[str] | None) -> None:
        """Load `models` (every model in the repository when None) into Triton, concurrently."""
        names = models if models is not None else await self._triton.repository_models()
        await asyncio.gather(*(self._triton.load(name) for name in names))

    async def run(self) -> None:
        """Stay connected to the registry until `stop()`."""
        backoff = 0.1
        async with grpc.aio.insecure_channel(self._registry_address) as channel:
            stub = node_service_pb2_grpc.NodeServiceStub(channel)
            while not self._stopping.is_set():
                try:
                    await self._session(stub)
                    backoff = 0.1
                except grpc.aio.AioRpcError as error:
                    _log.warning(
                        "registry stream to %s ended: %s %s",
                        self._registry_address,
                        error.code().name,
                        error.details(),
                    )
                except (ConnectionError, OSError) as error:
                    _log.warning("registry stream failed: %s", error)
                self.registered.clear()
                if self._stopping.is_set():
                    break
                # Jitter spreads the reconnects of many nodes after a registry restart.
                delay = backoff * random.uniform(0.5, 1.0)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                backoff = min(backoff * 2, self._max_backoff_s)

    async def _registration(self) -> node_service_pb2.ConnectRequest:
        return node_service_pb2.ConnectRequest(
            registration=node_service_pb2.Registration(
                node_id=self._identity.node_id,
                public_key=self._identity.public_key,
                inference_address=self._advertise_address,
                labels=self._labels,
                agent_version=AGENT_VERSION,
                triton_version=await self._triton.version(),
                models=await self._triton.model_statuses(),
            )
        )

    async def _session(self, stub: node_service_pb2_grpc.NodeServiceStub) -> None:
        outbox: asyncio.Queue[node_service_pb2.ConnectRequest | None] = asyncio.Queue()

        async def requests() -> AsyncIterator[node_service_pb2.ConnectRequest]:
            while (request := await outbox.get()) is not None:
                yield request

        outbox.put_nowait(await self._registration())
        call = stub.Connect(requests())
        ended: asyncio.Future[object] | None = None
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            reply = await call.read()
            if not isinstance(reply, node_service_pb2.ConnectResponse):
                raise ConnectionError("the registry closed the stream without an answer")
            interval = reply.registered.heartbeat_interval_ms / 1000
            _log.info("registered as %s; heartbeat every %.1fs", reply.registered.name, interval)
            self.registered.set()
            # The registry sends nothing more until it ends the stream: reading tells us when.
            ended = asyncio.ensure_future(call.read())
            while True:
                await asyncio.wait(
                    {ended, stopping}, timeout=interval, return_when=asyncio.FIRST_COMPLETED
                )
                if ended.done():
                    ended.result()  # raises the status the registry ended the stream with
                    raise ConnectionError("the registry ended the stream")
                if stopping.done():
                    goodbye = node_service_pb2.Deregistration(reason="agent shutting down")
                    outbox.put_nowait(node_service_pb2.ConnectRequest(deregistration=goodbye))
                    outbox.put_nowait(None)
                    with contextlib.suppress(grpc.aio.AioRpcError, TimeoutError):
                        await asyncio.wait_for(call.code(), timeout=5)
                    _log.info("deregistered")
                    return
                models = await self._triton.model_statuses()
                outbox.put_nowait(
                    node_service_pb2.ConnectRequest(
                        heartbeat=node_service_pb2.Heartbeat(models=models)
                    )
                )
        finally:
            stopping.cancel()
            if ended is not None:
                ended.cancel()
            call.cancel()
