"""Assembles and runs the node agent process."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from urllib.parse import urlsplit

import grpc

from shard_core import tls
from shard_core.pki import Workload
from shard_core.tls import TlsIdentity
from shard_node.agent import AGENT_VERSION, NodeAgent
from shard_node.certificate import NodeCertificates
from shard_node.gate import GatePorts, NodeGate
from shard_node.health import HealthCheck, supervise
from shard_node.identity import NodeIdentity
from shard_node.inventory import read_inventory
from shard_node.models import ModelManager
from shard_node.registry_calls import RegistryCalls
from shard_node.sandbox import protect_agent
from shard_node.settings import NodeSettings
from shard_node.tasks import TaskRunner
from shard_node.triton import TritonControl, TritonPorts, TritonProcess

_log = logging.getLogger(__name__)

# Model files can be large: let blob chunks through. gRPC's own reconnect backoff (up to two
# minutes by default) would outlast the node's lease after a registry restart: calls would fail
# fast on a cached error long after the registry is back. Keep it short; the agent adds jitter.
CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


async def serve(settings: NodeSettings) -> None:
    # Nothing the agent starts (model code above all) may read its memory or environment.
    protect_agent()
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
            sandbox=settings.sandbox,
        )
        await launched.start()
        triton_url = launched.grpc_url
    control_key = (
        launched.control_key
        if launched
        else settings.triton_control_key.get_secret_value()
        if settings.triton_control_key
        else None
    )
    try:
        async with (
            TritonControl(triton_url, control_key) as triton,
            _registry_channel(settings) as channel,
        ):
            registry_calls = RegistryCalls(channel)
            tls_dir = settings.state_dir / "tls"
            node = Workload(trust_domain=settings.trust_domain, kind="node", name=identity.node_id)
            models = ModelManager(triton=triton, repository=repository, registry=registry_calls)
            inventory = await asyncio.to_thread(
                read_inventory,
                state_dir=settings.state_dir,
                triton_version=await triton.version(),
                agent_version=AGENT_VERSION,
            )
            health = HealthCheck(
                triton=triton,
                state_dir=settings.state_dir,
                min_free_disk_bytes=settings.min_free_disk_bytes,
                expected_gpus=len(inventory.gpus),
                models=models,
            )
            metrics_url = settings.triton_metrics_url or (
                f"http://127.0.0.1:{launched.ports.metrics}/metrics" if launched else None
            )
            triton_http_url = settings.triton_http_url or (
                f"http://127.0.0.1:{launched.ports.http}" if launched else None
            )
            triton_http = urlsplit(triton_http_url).netloc if triton_http_url else None
            # In a mesh with TLS the shard reaches Triton through the gate; without, Triton
            # serves it directly, on loopback.
            gate = (
                NodeGate(
                    workload=node,
                    state_dir=settings.state_dir,
                    tls_dir=tls_dir,
                    listen_host=settings.gate_host,
                    ports=GatePorts(grpc=settings.gate_grpc_port, http=settings.gate_http_port),
                    triton_grpc=triton_url,
                    triton_http=triton_http,
                )
                if settings.registry_ca_file
                else None
            )
            served, served_http = (
                (f"127.0.0.1:{settings.gate_grpc_port}", f"127.0.0.1:{settings.gate_http_port}")
                if gate
                else (triton_url, triton_http)
            )
            advertise_address = settings.advertise_address or served
            http_address = settings.advertise_http_address or (
                f"{advertise_address.rsplit(':', 1)[0]}:{served_http.rsplit(':', 1)[1]}"
                if served_http
                else ""
            )
            tasks = TaskRunner(
                identity=identity,
                registry=registry_calls,
                triton_http_url=triton_http_url,
                work_dir=settings.state_dir / "tasks",
                max_concurrent=settings.max_concurrent_tasks,
            )
            agent = NodeAgent(
                identity=identity,
                triton=triton,
                models=models,
                channel=channel,
                advertise_address=advertise_address,
                http_address=http_address,
                labels=settings.labels,
                reconnect_max_backoff_s=settings.reconnect_max_backoff_s,
                state_dir=settings.state_dir,
                join_token=settings.join_token,
                health=health,
                metrics_url=metrics_url,
                tasks=tasks,
                registry_calls=registry_calls,
                # In a mesh with TLS, the node holds a certificate from the mesh CA, and calls
                # the registry's mutual-TLS port with it.
                certificates=NodeCertificates(tls_dir, node) if settings.registry_ca_file else None,
                certificate_channel=(lambda: _certificate_channel(settings, tls_dir))
                if settings.registry_ca_file and settings.registry_mesh_address
                else None,
                gate=gate,
            )
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, agent.stop)
            supervising = [
                *([asyncio.ensure_future(supervise(launched, models, health))] if launched else []),
                *([asyncio.ensure_future(gate.keep_running())] if gate else []),
            ]
            try:
                await agent.run()
            finally:
                for task in supervising:
                    task.cancel()
                await registry_calls.close()
                if gate is not None:
                    gate.stop()
    finally:
        if launched is not None:
            launched.stop()


def _registry_channel(settings: NodeSettings) -> grpc.aio.Channel:
    """The channel to the registry: TLS checking it is the registry, or loopback plaintext."""
    credentials = tls.trusting(settings.registry_ca_file) if settings.registry_ca_file else None
    registry = Workload(trust_domain=settings.trust_domain, kind="service", name="registry")
    return tls.channel(
        settings.registry_address, credentials, expect=registry, options=CHANNEL_OPTIONS
    )


def _certificate_channel(settings: NodeSettings, tls_dir: Path) -> grpc.aio.Channel:
    """A channel to the registry's mutual-TLS port that proves who the node is by its
    certificate (the one in `tls_dir` now)."""
    assert settings.registry_mesh_address is not None
    registry = Workload(trust_domain=settings.trust_domain, kind="service", name="registry")
    return tls.channel(
        settings.registry_mesh_address,
        TlsIdentity(tls_dir).channel_credentials(),
        expect=registry,
        options=CHANNEL_OPTIONS,
    )
