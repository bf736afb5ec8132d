"""Assembles and runs the node agent process."""

from __future__ import annotations

import asyncio
import logging
import signal

from shard_node.agent import NodeAgent
from shard_node.identity import NodeIdentity
from shard_node.settings import NodeSettings
from shard_node.triton import TritonControl, TritonPorts, TritonProcess

_log = logging.getLogger(__name__)


async def serve(settings: NodeSettings) -> None:
    identity = NodeIdentity.load_or_create(settings.state_dir)
    _log.info("node id %s", identity.node_id)
    launched: TritonProcess | None = None
    triton_url = settings.triton_url
    if triton_url is None:
        if settings.model_repository is None:
            raise SystemExit("set SHARD_NODE_TRITON_URL or SHARD_NODE_MODEL_REPOSITORY")
        launched = TritonProcess(
            model_repository=settings.model_repository,
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
        async with TritonControl(triton_url) as triton:
            agent = NodeAgent(
                identity=identity,
                triton=triton,
                registry_address=settings.registry_address,
                advertise_address=settings.advertise_address or triton_url,
                labels=settings.labels,
                reconnect_max_backoff_s=settings.reconnect_max_backoff_s,
            )
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, agent.stop)
            await agent.load_models(settings.models)
            await agent.run()
    finally:
        if launched is not None:
            launched.stop()
