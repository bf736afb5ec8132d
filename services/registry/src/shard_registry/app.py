"""Assembles and runs the registry process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

import grpc

from shard.artifact.v1 import artifact_service_pb2, artifact_service_pb2_grpc
from shard.auth.v1 import key_service_pb2, key_service_pb2_grpc
from shard.deployment.v1 import deployment_service_pb2, deployment_service_pb2_grpc
from shard.model.v1 import model_service_pb2, model_service_pb2_grpc
from shard.node.v1 import node_service_pb2, node_service_pb2_grpc
from shard.task.v1 import task_service_pb2, task_service_pb2_grpc
from shard_core import keys, tls
from shard_core.auth import (
    AuthInterceptor,
    KeyRing,
    NodeCredentials,
    PeerCertificates,
    token_hash,
)
from shard_core.errors import ShardError
from shard_core.etcd.election import Election
from shard_core.etcd.lease import LeaseKeeper
from shard_core.etcd.mirror import PrefixMirror
from shard_core.etcd.store import EtcdStore
from shard_core.grpc.interceptors import ErrorInterceptor
from shard_core.grpc.server import GrpcServer, server_options
from shard_core.pki import Authority, Workload
from shard_core.tls import TlsIdentity
from shard_registry.access import RULES
from shard_registry.apikeys import KeyLimits, KeyRegistry
from shard_registry.artifacts import BlobStore
from shard_registry.blob_ledger import BlobLedger, BlobLimits
from shard_registry.canary import CanaryProber
from shard_registry.control import ControlLoop
from shard_registry.deployments import DeploymentRegistry
from shard_registry.directory import NodeDirectory
from shard_registry.enrollment import Enrollment, NodePolicy
from shard_registry.lifecycle import NodeAction
from shard_registry.models import ModelRegistry
from shard_registry.nodes import NodeRegistry, NodeTiming
from shard_registry.servicer import (
    ArtifactServicer,
    DeploymentServicer,
    KeyServicer,
    ModelServicer,
    NodeServicer,
    TaskServicer,
)
from shard_registry.settings import RegistrySettings
from shard_registry.tasks import TaskRegistry

_log = logging.getLogger(__name__)

SERVICE_NAMES = [
    module.DESCRIPTOR.services_by_name[name].full_name
    for module, name in (
        (node_service_pb2, "NodeService"),
        (artifact_service_pb2, "ArtifactService"),
        (model_service_pb2, "ModelService"),
        (deployment_service_pb2, "DeploymentService"),
        (key_service_pb2, "KeyService"),
        (task_service_pb2, "TaskService"),
    )
]


def blob_store(settings: RegistrySettings) -> BlobStore:
    if settings.blob_bucket is None:
        return BlobStore.local(settings.blob_dir)
    secret = settings.s3_secret_access_key
    return BlobStore.s3(
        bucket=settings.blob_bucket,
        prefix=settings.blob_prefix,
        endpoint=settings.s3_endpoint,
        region=settings.s3_region,
        access_key_id=settings.s3_access_key_id,
        secret_access_key=secret.get_secret_value() if secret else None,
        allow_http=settings.s3_allow_http,
    )


def node_registry(
    settings: RegistrySettings, store: EtcdStore, keeper: LeaseKeeper, directory: NodeDirectory
) -> NodeRegistry:
    return NodeRegistry(
        store=store,
        keeper=keeper,
        timing=NodeTiming(
            heartbeat_interval_s=settings.heartbeat_interval_s,
            lease_ttl_s=settings.lease_ttl_s,
            attest_interval_s=settings.attest_interval_s,
        ),
        directory=directory,
        policy=NodePolicy(
            min_gpu_memory_bytes=settings.min_gpu_memory_bytes,
            allowed_gpu_models=settings.allowed_gpu_models,
            min_agent_version=settings.min_agent_version,
            require_gpu_cross_check=settings.require_gpu_cross_check,
            require_join_token=settings.require_join_token,
            trust_node_addresses=settings.trust_node_addresses,
        ),
        enrollment=Enrollment(
            store=store,
            token_retention_s=settings.join_token_retention_s,
            enrollment_retention_s=settings.enrollment_retention_s,
        ),
    )


async def every(period_s: float, work: Callable[[], Awaitable[object]], what: str) -> None:
    """`work()` every `period_s`, for as long as this replica leads; a failed pass is logged
    and the next one tries again."""
    while True:
        try:
            await work()
        except Exception:
            _log.exception("%s failed; retrying next period", what)
        await asyncio.sleep(period_s)


async def serve(settings: RegistrySettings) -> None:
    store = EtcdStore(settings)
    await store.connect()
    keeper = LeaseKeeper(store)
    keeper.start()
    # Each mirror reconnects its own client on failure, so each gets one of its own.
    directory = NodeDirectory(trusted_claims=settings.trusted_label_claims)
    credentials, ring = _credentials(settings, directory)
    mirrors = [
        PrefixMirror(EtcdStore(settings), keys.API_KEYS, ring),
        PrefixMirror(EtcdStore(settings), keys.NODES, directory.records),
        PrefixMirror(EtcdStore(settings), keys.NODE_ADMIN, directory.admin),
        PrefixMirror(EtcdStore(settings), keys.ASSIGNMENTS, directory.assignment_records),
        PrefixMirror(EtcdStore(settings), keys.OPEN_TASKS, directory.open_task_records),
    ]
    for mirror in mirrors:
        mirror.start()
    for mirror in mirrors:
        await mirror.wait_synced(settings.etcd_timeout_s * 3)
    blobs = blob_store(settings)
    nodes = node_registry(settings, store, keeper, directory)
    api_keys = KeyRegistry(
        store,
        ring,
        limits=KeyLimits(
            max_keys_per_principal=settings.max_keys_per_principal,
            default_rate_limit_rps=settings.default_key_rate_limit_rps,
            retention_s=settings.key_retention_s,
        ),
    )
    ledger = BlobLedger(
        store=store,
        blobs=blobs,
        limits=BlobLimits(
            max_blob_bytes=settings.max_blob_bytes,
            quota_bytes=settings.blob_quota_bytes,
            gc_grace_s=settings.blob_gc_grace_s,
        ),
    )
    models = ModelRegistry(store=store, blobs=blobs)
    authority = _authority(settings)
    identity = TlsIdentity(settings.tls_dir) if settings.tls_dir else None
    tasks = TaskRegistry(
        store=store,
        directory=directory,
        models=models,
        blobs=blobs,
        max_open_per_owner=settings.max_open_tasks_per_owner,
        retention_s=settings.task_retention_s,
    )
    deployments = DeploymentRegistry(store=store, models=models)
    election = Election(
        store=store,
        keeper=keeper,
        role="scheduler",
        candidate=f"registry-{uuid.uuid4().hex[:8]}",
        ttl_s=settings.leader_ttl_s,
    )
    control = ControlLoop(
        store=store,
        election_key=election.key,
        period_s=settings.control_period_s,
        trusted_claims=settings.trusted_label_claims,
    )
    prober = CanaryProber(
        store=store,
        router=lambda: tls.peer_channel(
            settings.router_address,
            mesh_address=settings.router_mesh_address,
            identity=identity,
            expect=Workload(trust_domain=settings.trust_domain, kind="service", name="router"),
        ),
        admin_token=settings.admin_token.get_secret_value(),
        quarantine=lambda node, reason: nodes.change_state(
            node, NodeAction.QUARANTINE, by=None, reason=reason
        ),
        interval_s=settings.canary_interval_s,
        lease_ttl_s=settings.lease_ttl_s,
    )

    async def housekeeping() -> None:
        """What grows with use and must not grow forever: old keys, join tokens and
        enrollments, and blobs nothing refers to."""
        await api_keys.prune()
        await nodes.enrollment.prune(live=lambda node: node in directory.records.values)
        await ledger.collect()

    async def lead(leader_revision: int) -> None:
        await asyncio.gather(
            control.run(leader_revision),
            prober.run(),
            every(settings.control_period_s, tasks.sweep, "task sweep"),
            every(settings.housekeeping_interval_s, housekeeping, "housekeeping"),
        )

    leading = asyncio.ensure_future(election.lead(lead))

    node_servicer = NodeServicer(
        nodes,
        credentials,
        authority=authority,
        certificate_lifetime_s=settings.node_certificate_lifetime_s,
        max_unauthenticated=settings.max_connecting_nodes,
        max_unauthenticated_per_address=settings.max_connecting_nodes_per_address,
    )

    def register(server: grpc.aio.Server) -> None:
        node_service_pb2_grpc.add_NodeServiceServicer_to_server(node_servicer, server)
        artifact_service_pb2_grpc.add_ArtifactServiceServicer_to_server(
            ArtifactServicer(blobs, ledger), server
        )
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(
            ModelServicer(models, deployments), server
        )
        deployment_service_pb2_grpc.add_DeploymentServiceServicer_to_server(
            DeploymentServicer(deployments, models), server
        )
        key_service_pb2_grpc.add_KeyServiceServicer_to_server(
            KeyServicer(api_keys, models=models, authority=authority), server
        )
        task_service_pb2_grpc.add_TaskServiceServicer_to_server(TaskServicer(tasks), server)

    server = GrpcServer(
        address=settings.address or None,
        tls=identity,
        tls_address=settings.tls_address if settings.tls_dir else None,
        mtls_address=settings.mesh_address if settings.tls_dir else None,
        services=SERVICE_NAMES,
        register=register,
        interceptors=(ErrorInterceptor(), AuthInterceptor(ring, RULES)),
        options=server_options(max_receive_bytes=settings.max_message_bytes),
    )

    async def stop_leading() -> None:
        leading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await leading

    server.on_stopping(node_servicer.stop_streams)
    server.on_shutdown(stop_leading)
    for mirror in mirrors:
        server.on_shutdown(mirror.stop)
    server.on_shutdown(keeper.stop)
    server.on_shutdown(store.close)
    await server.start()
    _log.info(
        "registry serving on ports %d (plaintext, loopback), %d (TLS) and %d (mutual TLS)",
        server.port,
        server.tls_port,
        server.mtls_port,
    )
    await server.serve_until_signalled()


def _authority(settings: RegistrySettings) -> Authority | None:
    """The mesh CA that issues node certificates, when the registry is given one."""
    if settings.ca_dir is None:
        return None
    return Authority.load(
        certificate=settings.ca_dir / "ca-cert.pem",
        key=settings.ca_dir / "ca-key.pem",
        bundle=settings.ca_dir / "ca.pem",
        trust_domain=settings.trust_domain,
    )


def _credentials(
    settings: RegistrySettings, directory: NodeDirectory
) -> tuple[NodeCredentials, KeyRing]:
    """How callers prove who they are: API keys and the admin token, node credentials, and
    node certificates; a node's standing is read from the live view."""

    def standing(node_id: str, since_ms: int) -> ShardError | None:
        return directory.session_standing(node_id, since_ms, now=time.time())

    admin_token = settings.admin_token.get_secret_value()
    credentials = NodeCredentials(admin_token, standing, ttl_s=settings.node_credential_ttl_s)
    peers = PeerCertificates(settings.trust_domain, standing)
    ring = KeyRing(admin_token_sha256=token_hash(admin_token), nodes=credentials, peers=peers)
    return credentials, ring
