"""How the agent's calls beside its stream reach the registry: model files and tasks.

At first they go over the stream's channel with the bearer credential the registry issued on the
stream. Once the node holds a mesh certificate, and the registry's mutual-TLS address is known,
they go over a channel that proves who the node is by that certificate, and no bearer secret
crosses the network; a renewed certificate gets a fresh channel.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from shard.artifact.v1 import artifact_service_pb2_grpc
from shard.task.v1 import task_service_pb2_grpc
from shard_core.auth import AUTHORIZATION
from shard_core.tls import RETIRE_GRACE_S

_log = logging.getLogger(__name__)


class RegistryCalls:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._by_certificate: grpc.aio.Channel | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self.metadata: list[tuple[str, str]] = []
        self._bind(channel)

    def _bind(self, channel: grpc.aio.Channel) -> None:
        self.artifacts = artifact_service_pb2_grpc.ArtifactServiceStub(channel)
        self.tasks = task_service_pb2_grpc.TaskServiceStub(channel)

    @property
    def by_certificate(self) -> bool:
        return self._by_certificate is not None

    def use_credential(self, token: str) -> None:
        """The bearer credential from the stream: sent until a certificate replaces it."""
        if self._by_certificate is None:
            self.metadata = [(AUTHORIZATION, f"Bearer {token}")] if token else []

    def use_certificate(self, channel: grpc.aio.Channel) -> None:
        """Call over `channel` (mutual TLS with the node's certificate) from now on."""
        previous, self._by_certificate = self._by_certificate, channel
        self._bind(channel)
        self.metadata = []
        if previous is None:
            _log.info("calls to the registry prove who this node is by its certificate now")
        if previous is not None:
            retiring = asyncio.ensure_future(self._retire(previous))
            self._retiring.add(retiring)
            retiring.add_done_callback(self._retiring.discard)

    @staticmethod
    async def _retire(channel: grpc.aio.Channel) -> None:
        await asyncio.sleep(RETIRE_GRACE_S)
        await channel.close(None)

    async def close(self) -> None:
        for retiring in self._retiring:
            retiring.cancel()
        if self._by_certificate is not None:
            await self._by_certificate.close(None)
