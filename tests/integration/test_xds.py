"""The xDS control plane against a real Envoy: it configures Envoy over ADS, moves endpoints
without touching the rest, and hears Envoy reject a configuration while Envoy serves on with the
last good one."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc
from google.protobuf import duration_pb2
from tritonclient.grpc import service_pb2

from shard_core.envoy import envoy_binary
from shard_core.net import free_port
from shard_core.process import ManagedProcess
from shard_edge.xds import CLUSTER, ENDPOINT, LISTENER, ROUTE, AdsServer, Snapshot
from tests.fake_node import FakeTriton
from tests.waiting import until

ADS = config_source_pb2.ConfigSource(
    ads=config_source_pb2.AggregatedConfigSource(),
    resource_api_version=config_source_pb2.ApiVersion.V3,
)


def _address(host: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address=host, port_value=port)
    )


def _snapshot(version: str, front: int, upstream: int, *, timeout_s: int = 2) -> Snapshot:
    """A listener on `front` routing everything to cluster `simple`, whose one endpoint is
    `upstream` (a gRPC server)."""
    manager = hcm.HttpConnectionManager(
        stat_prefix="front",
        rds=hcm.Rds(route_config_name="routes", config_source=ADS),
    )
    manager.http_filters.add(name="envoy.filters.http.router").typed_config.Pack(
        router_pb2.Router()
    )
    listener = listener_pb2.Listener(name="front", address=_address("127.0.0.1", front))
    listener.filter_chains.add().filters.add(
        name="envoy.filters.network.http_connection_manager"
    ).typed_config.Pack(manager)
    routes = route_pb2.RouteConfiguration(name="routes")
    routes.virtual_hosts.add(name="all", domains=["*"]).routes.add(
        match=route_components_pb2.RouteMatch(prefix="/"),
        route=route_components_pb2.RouteAction(cluster="simple"),
    )
    cluster = cluster_pb2.Cluster(
        name="simple",
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=ADS),
        connect_timeout=duration_pb2.Duration(seconds=timeout_s),
    )
    options = http_protocol_options_pb2.HttpProtocolOptions()
    options.explicit_http_config.http2_protocol_options.SetInParent()
    cluster.typed_extension_protocol_options[
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ].Pack(options)
    assignment = endpoint_pb2.ClusterLoadAssignment(cluster_name="simple")
    assignment.endpoints.add().lb_endpoints.add(
        endpoint=endpoint_components_pb2.Endpoint(address=_address("127.0.0.1", upstream))
    )
    return Snapshot(
        version=version,
        resources={
            LISTENER: {"front": listener},
            ROUTE: {"routes": routes},
            CLUSTER: {"simple": cluster},
            ENDPOINT: {"simple": assignment},
        },
    )


@pytest.fixture
async def control(tmp_path: Path) -> AsyncIterator[tuple[AdsServer, list[str], ManagedProcess]]:
    """An ADS server and a real Envoy configured only by it."""
    rejected: list[str] = []
    ads = AdsServer(on_rejected=lambda type_url, _: rejected.append(type_url))
    server = grpc.aio.server()
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(ads, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    bootstrap = {
        "node": {"id": "edge-1", "cluster": "shard-edge"},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}],
            },
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {
            "clusters": [
                {
                    "name": "xds",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                            "HttpProtocolOptions",
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                    "load_assignment": {
                        "cluster_name": "xds",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": "127.0.0.1",
                                                    "port_value": port,
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ]
        },
    }
    config = tmp_path / "envoy.json"
    config.write_text(json.dumps(bootstrap))
    envoy = ManagedProcess(
        "envoy (edge)",
        [envoy_binary(), "-c", str(config), "--use-dynamic-base-id", "--log-level", "warn"],
        log_path=tmp_path / "envoy.log",
    )
    envoy.start()
    try:
        yield ads, rejected, envoy
    finally:
        envoy.stop()
        await server.stop(None)


async def _served_by(front: int, triton: FakeTriton) -> bool:
    """Whether a call through Envoy's listener reaches `triton`."""
    before = len(triton.calls)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{front}") as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelMetadata", None, None)
        try:
            await call(
                service_pb2.ModelMetadataRequest(name="simple").SerializeToString(), timeout=5
            )
        except grpc.aio.AioRpcError:
            return False
    return len(triton.calls) > before


async def test_envoy_runs_what_the_control_plane_publishes(
    control: tuple[AdsServer, list[str], ManagedProcess],
) -> None:
    ads, rejected, envoy = control
    front = free_port()
    async with FakeTriton() as first, FakeTriton() as second:
        ads.publish(_snapshot("1", front, first.port))
        await until(lambda: _served_by(front, first), "Envoy never served the first snapshot")
        # An endpoint moves: calls follow it.
        ads.publish(_snapshot("2", front, second.port))
        await until(lambda: _served_by(front, second), "Envoy never moved to the new endpoint")
        # A configuration Envoy rejects (a negative connect timeout): it says so, and serves on
        # with the last good one.
        ads.publish(_snapshot("3", front, second.port, timeout_s=-1))
        await until(lambda: CLUSTER in rejected, "the control plane never heard the NACK")
        assert await _served_by(front, second)
        assert envoy.running()
        # The next good snapshot is taken.
        ads.publish(_snapshot("4", front, first.port))
        await until(lambda: _served_by(front, first), "Envoy never took the next good snapshot")
