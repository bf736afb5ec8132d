"""Assembles and runs the node agent process."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc

from shard.artifact.v1 import artifact_service_pb2_grpc
from shard_node.agent import NodeAgent
from shard_node.identity import NodeIdentity
from shard_node.models import ModelManager
from shard_node.settings import NodeSettings
from shard_node.triton import TritonControl, TritonPorts, TritonProcess

_log = logging.getLogger(__name__)

# Model files can be large: let blob chunks through.
CHANNEL_OPTIONS = (("grpc.max_receive_message_length", 64 * 1024 * 1024),)


async def serve(settings: NodeSettings) -> None:
    identity = NodeIdentity.load_or_create(settings.state_dir)
    _log.info("node id %s", identity.node_id)
    repository = settings.repository or settings.state_dir / "repository"
    repository.mkdir(parents=True, exist_ok=True)
    launched: TritonProcess | None = None
    triton_url = settings.triton_url
    if triton_url is None:
        launched = TritonProcess(
            model_repository=repository,
            state_dir=settings.state_dir,
            ports=TritonPorts(
                grpc=settings.triton_grpc_port,
                http=settings.triton_http_port,
                metrics=settings.triton_metrics_port,
            ),
        )
        await launched.start()
        triton_url = launched.grpc_url
    try:
        async with (
            TritonControl(triton_url) as triton,
            grpc.aio.insecure_channel(settings.registry_address, CHANNEL_OPTIONS) as channel,
        ):
            models = ModelManager(
                triton=triton,
                repository=repository,
                artifacts=artifact_service_pb2_grpc.ArtifactServiceStub(channel),
            )
            agent = NodeAgent(
                identity=identity,
                triton=triton,
                models=models,
                channel=channel,
                advertise_address=settings.advertise_address or triton_url,
                labels=settings.labels,
                reconnect_max_backoff_s=settings.reconnect_max_backoff_s,
            )
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, agent.stop)
            await agent.run()
    finally:
        if launched is not None:
            launched.stop()
