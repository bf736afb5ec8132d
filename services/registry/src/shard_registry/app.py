"""Assembles and runs the registry process."""

from __future__ import annotations

import logging

from shard.node.v1 import node_service_pb2, node_service_pb2_grpc
from shard_core.etcd.lease import LeaseKeeper
from shard_core.etcd.store import EtcdStore
from shard_core.grpc.server import GrpcServer
from shard_registry.service import NodeRegistry, NodeTiming
from shard_registry.servicer import NodeServicer
from shard_registry.settings import RegistrySettings

_log = logging.getLogger(__name__)

SERVICE_NAMES = [node_service_pb2.DESCRIPTOR.services_by_name["NodeService"].full_name]


async def serve(settings: RegistrySettings) -> None:
    store = EtcdStore(settings)
    await store.connect()
    keeper = LeaseKeeper(store)
    keeper.start()
    registry = NodeRegistry(
        store=store,
        keeper=keeper,
        timing=NodeTiming(
            heartbeat_interval_s=settings.heartbeat_interval_s, lease_ttl_s=settings.lease_ttl_s
        ),
    )
    server = GrpcServer(
        address=settings.address,
        services=SERVICE_NAMES,
        register=lambda s: node_service_pb2_grpc.add_NodeServiceServicer_to_server(
            NodeServicer(registry), s
        ),
    )
    server.on_shutdown(keeper.stop)
    server.on_shutdown(store.close)
    await server.start()
    _log.info("registry serving on port %d", server.port)
    await server.serve_until_signalled()
