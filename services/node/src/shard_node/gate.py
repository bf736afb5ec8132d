"""The node's gate: Envoy terminating mutual TLS in front of the node's Triton.

Triton listens on loopback only; the shard reaches it through the gate, which serves Triton's
gRPC and HTTP ports with the node's mesh certificate and takes a caller only with a certificate
from the mesh's CA naming one of the callers the port admits: the router and the gateway on both
ports, and, on the gRPC port, clients holding a certificate the registry issued to their API key
(`gate.lua` limits those to a few methods, for the models the certificate names). Envoy reads the
node's certificate and trust bundle from `state_dir/tls` through file-watched SDS, so a renewed
certificate serves new handshakes without a restart. Its admin interface listens on loopback, on
a port it chooses, and answers only the agent (readiness).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shard_core.envoy import (
    HTTP_TYPE,
    MAX_HEAP_BYTES,
    ROUTER_FILTER,
    EnvoyProcess,
    downstream_tls,
    exact_uri,
    lua_filter,
    overload_manager,
    static_cluster,
)
from shard_core.pki import MODEL_GRANT_PREFIX, Workload, spiffe_id

_log = logging.getLogger(__name__)

# A client's request is read whole for its model name: this much, at most (larger ones get 413;
# the router takes them). It bounds what one stream may hold, and Envoy's buffering throughout.
MAX_REQUEST_BYTES = 16 * 1024 * 1024 + 1024
MAX_REQUEST_WINDOW = 16 * 1024 * 1024 + 64 * 1024
# Streams at once on one connection: the router multiplexes its calls to a node on one.
MAX_STREAMS_PER_CONNECTION = 256
# Triton's headers that unlock model control: only the agent, on loopback, may send them.
CONTROL_HEADERS = ("shard-node-control", "triton-grpc-protocol-shard-node-control")
LUA_POLICY = Path(__file__).with_name("gate.lua")


@dataclass(frozen=True, kw_only=True)
class GatePorts:
    grpc: int
    http: int


def _listener(
    name: str,
    host: str,
    port: int,
    *,
    sds_dir: Path,
    callers: list[dict[str, Any]],
    cluster: str,
    lua_metadata: dict[str, Any] | None,
) -> dict[str, Any]:
    filters: list[dict[str, Any]] = []
    if lua_metadata is not None:
        filters.append(lua_filter(LUA_POLICY))
    filters.append(ROUTER_FILTER)
    route: dict[str, Any] = {
        "match": {"prefix": "/"},
        # No route timeout: gRPC deadlines and the callers' own timeouts bound each call.
        "route": {"cluster": cluster, "timeout": "0s"},
    }
    if lua_metadata is not None:
        route["metadata"] = {"filter_metadata": {"envoy.filters.http.lua": lua_metadata}}
    return {
        "name": name,
        "address": {"socket_address": {"address": host, "port_value": port}},
        "per_connection_buffer_limit_bytes": MAX_REQUEST_BYTES,
        "filter_chains": [
            {
                # A peer that stalls its handshake loses the connection.
                "transport_socket_connect_timeout": "5s",
                "transport_socket": downstream_tls(
                    sds_dir, callers=callers, alpn=("h2", "http/1.1")
                ),
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": f"{HTTP_TYPE}.HttpConnectionManager",
                            "stat_prefix": name,
                            "codec_type": "AUTO",
                            "normalize_path": True,
                            "merge_slashes": True,
                            "path_with_escaped_slashes_action": "REJECT_REQUEST",
                            "request_timeout": "0s",
                            "stream_idle_timeout": "300s",
                            "common_http_protocol_options": {
                                "headers_with_underscores_action": "REJECT_REQUEST",
                                # An idle connection does not hold a slot for long.
                                "idle_timeout": "300s",
                            },
                            "http2_protocol_options": {
                                "max_concurrent_streams": MAX_STREAMS_PER_CONNECTION,
                                # A stream's window is what a filter may buffer of it.
                                "initial_stream_window_size": MAX_REQUEST_WINDOW,
                                "initial_connection_window_size": MAX_REQUEST_WINDOW,
                            },
                            "route_config": {
                                "name": name,
                                "request_headers_to_remove": list(CONTROL_HEADERS),
                                "virtual_hosts": [
                                    {"name": "triton", "domains": ["*"], "routes": [route]}
                                ],
                            },
                            "http_filters": filters,
                        },
                    }
                ],
            }
        ],
    }


def _cluster(name: str, address: str, *, http2: bool) -> dict[str, Any]:
    host, port = address.rsplit(":", 1)
    socket = {"socket_address": {"address": host, "port_value": int(port)}}
    # Triton is local: no circuit breaking below what it can queue itself.
    return static_cluster(name, socket, http2=http2, max_requests=100_000)


def bootstrap(
    *,
    workload: Workload,
    sds_dir: Path,
    listen_host: str,
    ports: GatePorts,
    triton_grpc: str,
    triton_http: str | None,
    max_heap_bytes: int = MAX_HEAP_BYTES,
) -> dict[str, Any]:
    """Envoy's whole configuration for the gate of `workload` (a node); with no `triton_http`,
    no HTTP port."""
    domain = workload.trust_domain
    services = [spiffe_id(domain, "service", name) for name in ("router", "gateway")]
    clients = {"san_type": "URI", "matcher": {"prefix": spiffe_id(domain, "client", "")}}
    listeners = [
        _listener(
            "grpc",
            listen_host,
            ports.grpc,
            sds_dir=sds_dir,
            callers=[*map(exact_uri, services), clients],
            cluster="triton_grpc",
            lua_metadata={"services": services, "model_prefix": MODEL_GRANT_PREFIX},
        )
    ]
    clusters = [_cluster("triton_grpc", triton_grpc, http2=True)]
    if triton_http is not None:
        listeners.append(
            _listener(
                "http",
                listen_host,
                ports.http,
                sds_dir=sds_dir,
                callers=[exact_uri(uri) for uri in services],
                cluster="triton_http",
                lua_metadata=None,
            )
        )
        clusters.append(_cluster("triton_http", triton_http, http2=False))
    return {
        "node": {"id": workload.uri, "cluster": "shard-node-gate"},
        "overload_manager": overload_manager(max_heap_bytes),
        "static_resources": {
            "listeners": listeners,
            "clusters": clusters,
        },
    }


class NodeGate:
    """The gate's Envoy, started once the node holds its mesh certificate."""

    def __init__(
        self,
        *,
        workload: Workload,
        state_dir: Path,
        tls_dir: Path,
        listen_host: str,
        ports: GatePorts,
        triton_grpc: str,
        triton_http: str | None,
        max_heap_bytes: int = MAX_HEAP_BYTES,
    ) -> None:
        self.ports = ports
        directory = state_dir / "gate"
        self.envoy = EnvoyProcess(
            "envoy (node gate)",
            directory,
            bootstrap(
                workload=workload,
                sds_dir=directory / "sds",
                listen_host=listen_host,
                ports=ports,
                triton_grpc=triton_grpc,
                triton_http=triton_http,
                max_heap_bytes=max_heap_bytes,
            ),
            tls_dir=tls_dir,
        )
        self.process = self.envoy.process

    def write_configuration(self) -> Path:
        return self.envoy.write_configuration()

    async def start(self, *, timeout: float = 30.0) -> None:
        """Start Envoy and wait until its listeners serve (the certificate loaded)."""
        if self.process.running():
            return
        await self.envoy.start(timeout=timeout)
        _log.info("node gate serving on %s", self.ports)

    async def keep_running(self, interval_s: float = 1.0) -> None:
        """Start Envoy again whenever it exits (once it has been started)."""
        await self.envoy.keep_running(interval_s)

    def stop(self) -> None:
        self.envoy.stop()
