"""The whole shard on one machine: etcd, registry, router, gateway and node agents with Triton.

`shard up` runs a `LocalMesh` until Ctrl-C or SIGTERM; the tests run one per session. Every
part is a real process started from this environment, each in its own process group, so stopping
the mesh leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shard.deployment.v1 import deployment_pb2
from shard.model.v1 import model_pb2
from shard.node.v1 import node_pb2, node_service_pb2, node_service_pb2_grpc
from shard_core import pki
from shard_core.auth import bearer_interceptors
from shard_core.etcd.server import EtcdServer, EtcdTls
from shard_core.net import free_port
from shard_core.process import ManagedProcess
from shard_core.settings import EtcdSettings
from shard_core.tls import write_identity
from shard_tool.publish import Publisher


@dataclass(frozen=True, kw_only=True)
class MeshPorts:
    """Every port the local mesh listens on."""

    etcd: int = 2379
    etcd_peer: int = 2380
    registry: int = 7070
    router: int = 8001
    gateway: int = 8000
    registry_metrics: int = 9101
    router_metrics: int = 9102
    gateway_metrics: int = 9103
    registry_tls: int = 7443
    registry_mesh: int = 7444
    router_tls: int = 8444
    router_mesh: int = 8445
    gateway_tls: int = 8443

    @classmethod
    def free(cls) -> MeshPorts:
        """Ports free right now, for meshes that must not collide (tests)."""
        return cls(**{name: free_port() for name in asdict(cls())})


@dataclass(frozen=True, kw_only=True)
class MeshTiming:
    heartbeat_interval_s: float = 2.0
    lease_ttl_s: int = 10
    control_period_s: float = 2.0
    attest_interval_s: float = 300.0
    canary_interval_s: float = 30.0


@dataclass(frozen=True, kw_only=True)
class NodeHandle:
    """A node agent the mesh started."""

    name: str
    process: ManagedProcess
    state_dir: Path
    triton_grpc_port: int | None
    triton_http_port: int | None = None
    gate_grpc_port: int | None = None
    gate_http_port: int | None = None

    @property
    def address(self) -> str:
        """Where the shard reaches the node: its gate's gRPC port (mutual TLS)."""
        return f"127.0.0.1:{self.gate_grpc_port}"


LOCAL_NAME_LABEL = "shard.local/name"
# The services `shard up` gives certificates, renewed at half their life while it runs.
TLS_SERVICES = ("registry", "router", "gateway", "etcd", "root")
SERVICE_CERTIFICATE_LIFETIME_S = 12 * 3600


def _endpoint_env(prefix: str, values: Mapping[str, object]) -> dict[str, str]:
    """Settings as the `SHARD_<SERVICE>_*` environment variables the service reads."""
    return {
        f"SHARD_{prefix}_{key.upper()}": (
            json.dumps(value) if isinstance(value, dict | list) else str(value)
        )
        for key, value in values.items()
    }


class LocalMesh:
    def __init__(
        self,
        *,
        state_dir: Path,
        model_repository: Path,
        ports: MeshPorts | None = None,
        timing: MeshTiming | None = None,
        registry_settings: Mapping[str, object] | None = None,
    ) -> None:
        self.registry_settings = dict(registry_settings or {})  # beyond the defaults
        self.state_dir = state_dir.resolve()
        self.model_repository = model_repository.resolve()
        self.ports = ports or MeshPorts()
        self.timing = timing or MeshTiming()
        self.etcd = EtcdServer(
            data_dir=self.state_dir / "etcd",
            client_port=self.ports.etcd,
            peer_port=self.ports.etcd_peer,
            # etcd's certificate, and the client one of its root user (CN root).
            tls=EtcdTls(server=self.tls_path("etcd"), root=self.tls_path("root")),
        )
        self.services: dict[str, ManagedProcess] = {}
        self._renewing: asyncio.Future[None] | None = None
        self.nodes: dict[str, NodeHandle] = {}
        # The local mesh's admin credential: made fresh for every run, never written to a log.
        self.admin_token = secrets.token_urlsafe(32)

    def admin_channel(self) -> grpc.aio.Channel:
        """A channel to the registry that carries the admin token on every call."""
        return grpc.aio.insecure_channel(
            self.registry_address, interceptors=bearer_interceptors(self.admin_token)
        )

    @property
    def registry_address(self) -> str:
        return f"127.0.0.1:{self.ports.registry}"

    @property
    def registry_tls_address(self) -> str:
        return f"127.0.0.1:{self.ports.registry_tls}"

    @property
    def registry_mesh_address(self) -> str:
        """The registry's mutual-TLS port, where nodes call with their certificates."""
        return f"127.0.0.1:{self.ports.registry_mesh}"

    @property
    def router_mesh_address(self) -> str:
        """The router's mutual-TLS port, where the mesh's services call with certificates."""
        return f"127.0.0.1:{self.ports.router_mesh}"

    @property
    def router_tls_address(self) -> str:
        return f"127.0.0.1:{self.ports.router_tls}"

    @property
    def gateway_tls_url(self) -> str:
        return f"https://127.0.0.1:{self.ports.gateway_tls}"

    @property
    def ca_file(self) -> Path:
        """The mesh CA's trust bundle: what clients of the TLS ports trust."""
        return self.ca_dir / "ca.pem"

    @property
    def ca_dir(self) -> Path:
        return self.state_dir / "ca"

    def renew_certificates(self) -> None:
        """Fresh certificates for every service; each serves new handshakes with it at once."""
        for service in TLS_SERVICES:
            self._issue(service)

    async def _keep_certificates_fresh(self) -> None:
        while True:
            await asyncio.sleep(SERVICE_CERTIFICATE_LIFETIME_S / 2)
            self.renew_certificates()

    @property
    def router_edge_dir(self) -> Path:
        """The router's edge: its Envoy's files (admin.sock, access.log) and the router's
        own socket behind it."""
        return self.state_dir / "edge"

    @property
    def gateway_edge_dir(self) -> Path:
        """The gateway's edge: its Envoy's files and the gateway's own socket behind it."""
        return self.state_dir / "gateway-edge"

    @property
    def router_socket(self) -> Path:
        """The Python router behind the edge (a Unix socket)."""
        return self.router_edge_dir / "router.sock"

    def tls_path(self, service: str) -> Path:
        return self.state_dir / "tls" / service

    def _issue(self, service: str) -> Path:
        return self.issue("service", service, self.tls_path(service))

    def issue(self, kind: str, name: str, directory: Path) -> Path:
        """A fresh certificate for workload `kind`/`name` in `directory`, from the mesh CA
        (made on the first run)."""
        if (self.ca_dir / "ca-key.pem").exists():
            authority = pki.Authority.load(
                certificate=self.ca_dir / "ca-cert.pem",
                key=self.ca_dir / "ca-key.pem",
                bundle=self.ca_file,
            )
        else:
            authority = pki.Authority.create()
            authority.write(self.ca_dir)
        key = pki.new_key()
        issued = authority.issue(
            key.public_key(),
            authority.workload(kind, name),
            lifetime_s=SERVICE_CERTIFICATE_LIFETIME_S,
            addresses=["127.0.0.1", "localhost"],
        )
        write_identity(
            directory, chain=issued.chain_pem, key=pki.key_pem(key), bundle=authority.bundle_pem
        )
        return directory

    @property
    def router_address(self) -> str:
        return f"127.0.0.1:{self.ports.router}"

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.gateway}"

    def _service(self, name: str, module: str, env: dict[str, str]) -> ManagedProcess:
        return ManagedProcess(
            name,
            [sys.executable, "-m", module],
            log_path=self.state_dir / "logs" / f"{name}.log",
            env={**os.environ, **env},
        )

    async def start(self, *, nodes: int = 1) -> None:
        """Start every part and wait until each is ready, the nodes' models included."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # The local mesh's etcd starts empty: records of an earlier run would point the router
        # at Tritons that are gone. Node identities, under nodes/, are kept.
        shutil.rmtree(self.etcd.data_dir / "data", ignore_errors=True)
        self.renew_certificates()
        await self.etcd.start()
        # Only the control plane reaches etcd, each service as its own user: the registry
        # writes, the router and gateway read.
        await self.etcd.enable_auth(
            prefix=EtcdSettings().etcd_prefix, writers=["registry"], readers=["router", "gateway"]
        )
        etcd = {"etcd_port": self.ports.etcd}
        self.services["registry"] = self._service(
            "registry",
            "shard_registry",
            _endpoint_env(
                "REGISTRY",
                {
                    **etcd,
                    "address": self.registry_address,
                    "tls_address": self.registry_tls_address,
                    "mesh_address": self.registry_mesh_address,
                    "tls_dir": self.tls_path("registry"),
                    "etcd_tls_dir": self.tls_path("registry"),
                    "ca_dir": self.ca_dir,
                    "metrics_port": self.ports.registry_metrics,
                    "heartbeat_interval_s": self.timing.heartbeat_interval_s,
                    "lease_ttl_s": self.timing.lease_ttl_s,
                    "control_period_s": self.timing.control_period_s,
                    "attest_interval_s": self.timing.attest_interval_s,
                    "canary_interval_s": self.timing.canary_interval_s,
                    "router_address": self.router_address,
                    "router_mesh_address": self.router_mesh_address,
                    "leader_ttl_s": max(2, self.timing.lease_ttl_s),
                    "blob_dir": self.state_dir / "blobs",
                    "admin_token": self.admin_token,
                    **self.registry_settings,
                },
            ),
        )
        self.services["inference"] = self._service(
            "inference",
            "shard_inference",
            _endpoint_env(
                "INFERENCE",
                {
                    **etcd,
                    "address": self.router_address,
                    "tls_address": self.router_tls_address,
                    "mesh_address": self.router_mesh_address,
                    "tls_dir": self.tls_path("router"),
                    "etcd_tls_dir": self.tls_path("router"),
                    "edge_dir": self.router_edge_dir,
                    "metrics_port": self.ports.router_metrics,
                    "registry_address": self.registry_address,
                    "registry_mesh_address": self.registry_mesh_address,
                    "admin_token": self.admin_token,
                    # Local benchmarks and demos send anonymous traffic at full speed.
                    "anonymous_rate_limit_rps": 0,
                },
            ),
        )
        self.services["gateway"] = self._service(
            "gateway",
            "shard_gateway",
            _endpoint_env(
                "GATEWAY",
                {
                    "host": "127.0.0.1",
                    **etcd,
                    "port": self.ports.gateway,
                    "tls_host": "127.0.0.1",
                    "tls_port": self.ports.gateway_tls,
                    "tls_dir": self.tls_path("gateway"),
                    "etcd_tls_dir": self.tls_path("gateway"),
                    "router_address": self.router_address,
                    "router_mesh_address": self.router_mesh_address,
                    "registry_address": self.registry_address,
                    "registry_mesh_address": self.registry_mesh_address,
                    "metrics_port": self.ports.gateway_metrics,
                    "admin_token": self.admin_token,
                    "anonymous_rate_limit_rps": 0,
                    "edge_dir": self.gateway_edge_dir,
                },
            ),
        )
        for process in self.services.values():
            process.start()
        await asyncio.gather(
            self.services["registry"].wait_ready(
                lambda: _serving(self.registry_address), timeout=30
            ),
            self.services["inference"].wait_ready(
                lambda: _serving(self.router_address), timeout=30
            ),
            self.services["gateway"].wait_ready(self._gateway_live, timeout=30),
        )
        self._renewing = asyncio.ensure_future(self._keep_certificates_fresh())
        await asyncio.gather(*(self.start_node(f"node-{index}") for index in range(nodes)))
        self._write_state()
        await self.publish_demo_models(replicas=nodes)

    async def publish_demo_models(self, *, replicas: int, timeout: float = 120) -> None:
        """Publish every model in the demo repository as a public model, deploy its newest
        version on `replicas` nodes, and wait until every replica is ready."""
        async with self.admin_channel() as channel:
            publisher = Publisher(channel=channel)
            model_dirs = sorted(p for p in self.model_repository.iterdir() if p.is_dir())
            for model_dir in model_dirs:
                versions = await publisher.push_directory(
                    model_dir, visibility=model_pb2.VISIBILITY_PUBLIC
                )
                target = deployment_pb2.DeploymentTarget(
                    version=versions[-1], replicas=replicas, weight=1
                )
                await publisher.deploy(model_dir.name, [target])
            await asyncio.gather(
                *(
                    publisher.wait_available(f"deployments/{model_dir.name}", timeout=timeout)
                    for model_dir in model_dirs
                )
            )

    async def start_node(
        self,
        name: str,
        *,
        triton_url: str | None = None,
        repository: Path | None = None,
        labels: Mapping[str, str] | None = None,
        triton_control_key: str | None = None,
    ) -> NodeHandle:
        """Start a node agent that launches its own Triton, or attaches to the Triton at
        `triton_url` serving `repository` (whose model control takes `triton_control_key`),
        and wait until it is ACTIVE."""
        state_dir = self.state_dir / "nodes" / name
        node_labels = {**(labels or {}), LOCAL_NAME_LABEL: name}
        settings: dict[str, object] = {
            "registry_address": self.registry_tls_address,
            "registry_ca_file": self.ca_file,
            "registry_mesh_address": self.registry_mesh_address,
            "state_dir": state_dir,
            "labels": node_labels,
            "join_token": await self.join_token(f"local node {name}"),
            "gate_host": "127.0.0.1",
            "gate_grpc_port": (gate_grpc_port := free_port()),
            "gate_http_port": (gate_http_port := free_port()),
        }
        triton_grpc_port = triton_http_port = None
        if triton_url is None:
            triton_grpc_port, triton_http_port = free_port(), free_port()
            settings |= {
                "triton_grpc_port": triton_grpc_port,
                "triton_http_port": triton_http_port,
                "triton_metrics_port": free_port(),
            }
        else:
            settings |= {"triton_url": triton_url, "repository": repository}
            if triton_control_key is not None:
                settings["triton_control_key"] = triton_control_key
        process = self._service(f"node-{name}", "shard_node", _endpoint_env("NODE", settings))
        handle = NodeHandle(
            name=name,
            process=process,
            state_dir=state_dir,
            triton_grpc_port=triton_grpc_port,
            triton_http_port=triton_http_port,
            gate_grpc_port=gate_grpc_port,
            gate_http_port=gate_http_port,
        )
        self.nodes[name] = handle
        process.start()
        await process.wait_ready(lambda: self._node_registered(name), timeout=120, interval=0.2)
        # What a provider's agent says of its node is a claim; the mesh's admin confirms it.
        await self.set_labels(name, node_labels)
        return handle

    async def set_labels(self, name: str, labels: Mapping[str, str]) -> None:
        """Set the labels of the node this mesh started as `name`, as an admin."""
        node = await self.find_node(name)
        assert node is not None, name
        node.labels.clear()
        node.labels.update(labels)
        async with self.admin_channel() as channel:
            await node_service_pb2_grpc.NodeServiceStub(channel).UpdateNode(
                node_service_pb2.UpdateNodeRequest(node=node), timeout=10
            )

    async def join_token(self, description: str) -> str:
        """A one-time join token from the registry, as an admin would make one."""
        async with self.admin_channel() as channel:
            reply = await node_service_pb2_grpc.NodeServiceStub(channel).CreateJoinToken(
                node_service_pb2.CreateJoinTokenRequest(
                    join_token=node_service_pb2.JoinToken(description=description)
                ),
                timeout=10,
            )
        return reply.join_token.token

    async def _node_registered(self, name: str) -> bool:
        return await self.find_node(name) is not None

    async def find_node(self, name: str) -> node_pb2.Node | None:
        """The registry's record of the node this mesh started as `name`, if it is alive."""
        async with self.admin_channel() as channel:
            stub = node_service_pb2_grpc.NodeServiceStub(channel)
            reply = await stub.ListNodes(
                node_service_pb2.ListNodesRequest(page_size=1000), timeout=2
            )
        return next(
            (node for node in reply.nodes if node.claimed_labels.get(LOCAL_NAME_LABEL) == name),
            None,
        )

    async def _gateway_live(self) -> bool:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.ports.gateway)
        writer.write(b"GET /v2/health/live HTTP/1.1\r\nHost: local\r\nConnection: close\r\n\r\n")
        status_line = await reader.readline()
        writer.close()
        return b" 200 " in status_line

    async def restart(self, service: str) -> None:
        """Stop a control-plane service (SIGTERM) and start it again, as an upgrade would."""
        old = self.services[service]
        old.stop()
        fresh = ManagedProcess(old.name, old.argv, log_path=old.log_path, env=old.env)
        self.services[service] = fresh
        fresh.start()
        address = {"registry": self.registry_address, "inference": self.router_address}[service]
        await fresh.wait_ready(lambda: _serving(address), timeout=30)

    def processes(self) -> list[ManagedProcess]:
        return [
            self.etcd.process,
            *self.services.values(),
            *(node.process for node in self.nodes.values()),
        ]

    def stop(self) -> None:
        """Stop nodes first (they deregister), then the services, then etcd."""
        if self._renewing is not None:
            self._renewing.cancel()
        for node in self.nodes.values():
            node.process.stop()
        for process in reversed(list(self.services.values())):
            process.stop()
        self.etcd.stop()

    def endpoints(self) -> dict[str, str]:
        return {
            "router (KServe v2 gRPC)": self.router_address,
            "router (gRPC, TLS)": self.router_tls_address,
            "gateway (HTTP)": self.gateway_url,
            "gateway (HTTPS)": self.gateway_tls_url,
            "registry (gRPC)": self.registry_address,
            "registry (gRPC, TLS)": self.registry_tls_address,
            "mesh CA": str(self.ca_file),
            "etcd": f"127.0.0.1:{self.ports.etcd}",
            "metrics": ", ".join(
                f"{name} 127.0.0.1:{port}"
                for name, port in (
                    ("registry", self.ports.registry_metrics),
                    ("router", self.ports.router_metrics),
                    ("gateway", self.ports.gateway_metrics),
                )
            ),
            "edges (Envoy)": (f"{self.router_edge_dir}, {self.gateway_edge_dir}"),
            "state and logs": str(self.state_dir),
            "admin token (file)": str(self.state_dir / "admin-token"),
        }

    def _write_state(self) -> None:
        state = {
            "launcher_pid": os.getpid(),
            "ports": asdict(self.ports),
            "processes": {process.name: process.pid for process in self.processes()},
        }
        (self.state_dir / "mesh.json").write_text(json.dumps(state, indent=2))
        # The admin token is a secret: readable by this user only, and never printed.
        token_file = self.state_dir / "admin-token"
        token_file.touch(mode=0o600)
        token_file.chmod(0o600)
        token_file.write_text(self.admin_token)


async def _serving(address: str) -> bool:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=1
        )
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
