"""gRPC face of the registry: translates protobuf to the domain and back, nothing more."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import field_mask_pb2

from shard.artifact.v1 import artifact_service_pb2, artifact_service_pb2_grpc, blob_pb2
from shard.auth.v1 import key_service_pb2 as key_api
from shard.auth.v1 import key_service_pb2_grpc
from shard.deployment.v1 import deployment_pb2, deployment_service_pb2_grpc
from shard.deployment.v1 import deployment_service_pb2 as deployment_api
from shard.model.v1 import model_pb2, model_service_pb2_grpc
from shard.model.v1 import model_service_pb2 as model_api
from shard.node.v1 import node_pb2, node_service_pb2, node_service_pb2_grpc
from shard.task.v1 import task_pb2, task_service_pb2_grpc
from shard.task.v1 import task_service_pb2 as task_api
from shard_core.auth import NodeCredentials
from shard_core.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    require,
)
from shard_core.net import peer_host
from shard_core.pki import DEFAULT_LIFETIME_S, MAX_GRANTS, Authority, model_grant
from shard_registry.access import caller, require_owner, require_visible, visible
from shard_registry.apikeys import KeyRegistry
from shard_registry.artifacts import BlobStore, StoredBlob, blob_sha256
from shard_registry.blob_ledger import BlobLedger
from shard_registry.deployments import DeploymentRegistry
from shard_registry.directory import NodeDirectory
from shard_registry.enrollment import Challenge
from shard_registry.lifecycle import NodeAction
from shard_registry.models import MODEL_UPDATED_BY_DEFAULT, ModelRegistry
from shard_registry.nodes import NodeRegistry, NodeSession, validate_hello
from shard_registry.resources import RESOURCE_ID, timestamp
from shard_registry.tasks import TaskRegistry

_log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]

# Client certificates live minutes: they are not revoked, they lapse (the router renews them
# at half their life for as long as the key may use the models).
CLIENT_CERTIFICATE_LIFETIME_S = 15 * 60


class _Pushed:
    """What a node's stream last sent it: assignments and open tasks go again only changed."""

    def __init__(self) -> None:
        self.assignments: list[node_pb2.ModelAssignment] | None = None
        self.tasks: list[task_pb2.Task] | None = None

    def updates(
        self, directory: NodeDirectory, node_id: str
    ) -> list[node_service_pb2.ConnectResponse]:
        updates = []
        assignments = list(directory.assignments(node_id).values())
        if assignments != self.assignments:
            self.assignments = assignments
            updates.append(
                node_service_pb2.ConnectResponse(
                    assignments=node_service_pb2.Assignments(models=assignments)
                )
            )
        tasks = directory.open_tasks(node_id)
        if tasks != self.tasks:
            self.tasks = tasks
            updates.append(
                node_service_pb2.ConnectResponse(tasks=node_service_pb2.OpenTasks(tasks=tasks))
            )
        return updates


class _Admission:
    """Connect streams that have not proved themselves yet, in all and per client address:
    beyond either cap a new stream is refused at once, so a flood of streams that never
    register costs the registry no more than the caps' worth of memory."""

    def __init__(self, *, total: int, per_address: int) -> None:
        self._total = total
        self._per_address = per_address
        self._by_address: collections.Counter[str] = collections.Counter()
        self._count = 0

    @contextlib.contextmanager
    def unauthenticated(self, address: str) -> Iterator[None]:
        if self._count >= self._total:
            raise ResourceExhaustedError(
                "too many nodes are connecting at once; retry shortly",
                reason="TOO_MANY_CONNECTS",
            )
        if self._by_address[address] >= self._per_address:
            raise ResourceExhaustedError(
                f"too many unregistered Connect streams from {address}",
                reason="TOO_MANY_CONNECTS",
                metadata={"address": address},
            )
        self._by_address[address] += 1
        self._count += 1
        try:
            yield
        finally:
            self._count -= 1
            self._by_address[address] -= 1
            if not self._by_address[address]:
                del self._by_address[address]


class NodeServicer(node_service_pb2_grpc.NodeServiceServicer):
    def __init__(
        self,
        registry: NodeRegistry,
        credentials: NodeCredentials,
        *,
        authority: Authority | None = None,
        certificate_lifetime_s: float = DEFAULT_LIFETIME_S,
        max_unauthenticated: int = 256,
        max_unauthenticated_per_address: int = 16,
    ) -> None:
        self._registry = registry
        self._credentials = credentials
        self._authority = authority
        self._certificate_lifetime_s = certificate_lifetime_s
        self._stopping = asyncio.Event()
        self._admission = _Admission(
            total=max_unauthenticated, per_address=max_unauthenticated_per_address
        )

    def stop_streams(self) -> None:
        """End every node's stream now (the registry is shutting down): nodes reconnect to
        another replica, or to this one restarted, within their leases."""
        self._stopping.set()

    async def Connect(
        self, request_iterator: AsyncIterator[node_service_pb2.ConnectRequest], context: Context
    ) -> AsyncIterator[node_service_pb2.ConnectResponse]:
        requests = aiter(request_iterator)
        answer_within = self._registry.policy.nonce_ttl_s
        address = peer_host(context.peer())
        with self._admission.unauthenticated(address):
            hello = await _next(requests, answer_within, "hello")
            if hello is None:
                return
            if hello.WhichOneof("message") != "hello":
                raise InvalidArgumentError(
                    "the first message on a Connect stream must be a hello",
                    metadata={"field": "hello"},
                )
            node_id = validate_hello(hello.hello)
            challenge = Challenge.new(self._registry.clock)
            yield node_service_pb2.ConnectResponse(
                challenge=node_service_pb2.Challenge(nonce=challenge.nonce)
            )
            second = await _next(requests, answer_within, "registration")
            if second is None:
                return
            if second.WhichOneof("message") != "registration":
                raise InvalidArgumentError(
                    "the answer to the first challenge must be a registration",
                    metadata={"field": "registration"},
                )
            wanted = self._certificate_key(
                second.registration.attestation, node_id, field="registration.attestation"
            )
            session = await self._registry.register(
                node_id, hello.hello.public_key, second.registration, challenge, address
            )
        for welcome in self._welcome(session, wanted):
            yield welcome
        timing = self._registry.timing
        changed = asyncio.Event()
        directory = self._registry.directory
        directory.subscribe(session.node_id, changed.set)
        reader = asyncio.ensure_future(self._read(session, requests, changed))
        pushed = _Pushed()
        loop = asyncio.get_running_loop()
        challenged_at = loop.time()  # the registration answered the first challenge
        try:
            while True:
                # With a challenge out, the answer is due within the nonce's life; without one,
                # the next challenge is due an attestation interval after the last.
                outstanding = session.challenge is not None
                deadline = challenged_at + (
                    answer_within if outstanding else timing.attest_interval_s
                )
                await self._wait(changed, reader, max(deadline - loop.time(), 0))
                if reader.done():
                    reader.result()  # the stream ended: raise its error, if any
                    return
                if loop.time() >= deadline and not changed.is_set():
                    if session.challenge is not None:
                        raise UnauthenticatedError(
                            "the node did not answer its attestation challenge in time",
                            reason="ATTESTATION_MISSED",
                            metadata={"field": "attestation"},
                        )
                    if not outstanding:
                        challenged_at = loop.time()
                        yield node_service_pb2.ConnectResponse(challenge=session.new_challenge())
                    continue
                changed.clear()
                renewed = self._renewals(session)
                for update in itertools.chain(renewed, pushed.updates(directory, session.node_id)):
                    yield update
                # Evicted replicas, and nodes that may no longer take traffic, stop being
                # routable now.
                await session.publish(record=False)
        finally:
            directory.unsubscribe(session.node_id, changed.set)
            reader.cancel()

    async def _wait(
        self, changed: asyncio.Event, reader: asyncio.Future[None], timeout: float
    ) -> None:
        """Until the node's assignments change, its stream ends, or `timeout`; refuse to go on
        once the registry is stopping."""
        woken = asyncio.ensure_future(changed.wait())
        stopping = asyncio.ensure_future(self._stopping.wait())
        watched: set[asyncio.Future[Any]] = {woken, reader, stopping}
        try:
            await asyncio.wait(watched, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()
            stopping.cancel()
        if self._stopping.is_set():
            raise UnavailableError(
                "the registry is shutting down; reconnect", reason="REGISTRY_STOPPING"
            )

    def _welcome(
        self, session: NodeSession, wanted: ec.EllipticCurvePublicKey | None
    ) -> Iterator[node_service_pb2.ConnectResponse]:
        """The answer to a registration: the node's name and timing, then its certificate if
        it asked for one. A node that asked for a certificate proves who it is by it, and gets
        no bearer credential, now or later; one that did not (no TLS) gets a credential."""
        timing = self._registry.timing
        registered = node_service_pb2.Registered(
            name=session.node.name,
            heartbeat_interval_ms=int(timing.heartbeat_interval_s * 1000),
            lease_ttl_ms=timing.lease_ttl_s * 1000,
        )
        session.by_certificate = wanted is not None
        if not session.by_certificate:
            credential = self._credential(session)
            registered.blob_credential = credential.token
            registered.blob_credential_expire_time.CopyFrom(credential.expire_time)
        yield node_service_pb2.ConnectResponse(registered=registered)
        yield from self._certificate(session, wanted)

    def _renewals(self, session: NodeSession) -> Iterator[node_service_pb2.ConnectResponse]:
        """After an accepted attestation: a fresh credential, and the certificate it asked
        for."""
        if not session.attested:
            return
        session.attested = False
        if not session.by_certificate:
            yield node_service_pb2.ConnectResponse(credential=self._credential(session))
        wanted, session.certificate_key = session.certificate_key, None
        yield from self._certificate(session, wanted)

    def _certificate_key(
        self, attestation: node_service_pb2.Attestation, node_id: str, *, field: str
    ) -> ec.EllipticCurvePublicKey | None:
        """The key a certificate request asks a node certificate for, checked before the
        attestation is taken (a bad request leaves nothing made); None without a request, or
        without a CA to answer it."""
        if not attestation.certificate_request or self._authority is None:
            return None
        return self._authority.check_request(
            attestation.certificate_request,
            self._authority.workload("node", node_id),
            field=f"{field}.certificate_request",
        )

    def _certificate(
        self, session: NodeSession, key: ec.EllipticCurvePublicKey | None
    ) -> Iterator[node_service_pb2.ConnectResponse]:
        """The node's certificate for `key`, if it asked and may have one (a quarantined node
        may not)."""
        if key is None or self._authority is None:
            return
        if self._registry.directory.quarantined(session.node_id) or (
            session.node.state == node_pb2.NODE_STATE_QUARANTINED
        ):
            _log.info("no certificate for quarantined node %s", session.node_id)
            return
        issued = self._authority.issue(
            key,
            self._authority.workload("node", session.node_id),
            lifetime_s=self._certificate_lifetime_s,
        )
        _log.info("node %s certificate %x issued", session.node_id, issued.serial)
        yield node_service_pb2.ConnectResponse(
            certificate=node_service_pb2.NodeCertificate(
                certificate_chain=issued.chain_pem,
                trust_bundle=self._authority.bundle_pem,
                expire_time=timestamp(issued.not_after.timestamp()),
            )
        )

    def _credential(self, session: NodeSession) -> node_service_pb2.NodeCredential:
        """A fresh credential for the node's current session."""
        token, expires = self._credentials.issue(
            session.node_id, session.node.register_time.ToMilliseconds()
        )
        return node_service_pb2.NodeCredential(token=token, expire_time=timestamp(expires))

    async def _read(
        self,
        session: NodeSession,
        requests: AsyncIterator[node_service_pb2.ConnectRequest],
        changed: asyncio.Event,
    ) -> None:
        # Heartbeats coalesce: one that comes sooner than half an interval after the last one
        # taken is dropped. Each carries the node's whole state, so the next one taken brings
        # the latest; a node that floods heartbeats costs what one that keeps time does.
        min_gap = self._registry.timing.heartbeat_interval_s / 2
        loop = asyncio.get_running_loop()
        taken_at = -min_gap
        async for request in requests:
            kind = request.WhichOneof("message")
            if kind == "heartbeat":
                if loop.time() - taken_at >= min_gap:
                    taken_at = loop.time()
                    await session.heartbeat(request.heartbeat)
            elif kind == "attestation":
                wanted = self._certificate_key(
                    request.attestation, session.node_id, field="attestation"
                )
                await session.attest(request.attestation, certificate_key=wanted)
                changed.set()  # a new credential is due
            elif kind == "deregistration":
                await session.close(request.deregistration.reason)
                return
            else:
                raise InvalidArgumentError(
                    "after registering, a Connect stream carries heartbeats, attestations and "
                    "a deregistration",
                    metadata={"field": kind or "message"},
                )
        # The stream ended without a goodbye: the connection broke. The node stays until its
        # lease expires, free to reconnect and keep it.

    async def GetNode(
        self, request: node_service_pb2.GetNodeRequest, context: Context
    ) -> node_service_pb2.GetNodeResponse:
        return node_service_pb2.GetNodeResponse(node=await self._registry.get_node(request.name))

    async def ListNodes(
        self, request: node_service_pb2.ListNodesRequest, context: Context
    ) -> node_service_pb2.ListNodesResponse:
        nodes, token = await self._registry.list_nodes(
            page_size=request.page_size, page_token=request.page_token, filter_=request.filter
        )
        return node_service_pb2.ListNodesResponse(nodes=nodes, next_page_token=token)

    async def CordonNode(
        self, request: node_service_pb2.CordonNodeRequest, context: Context
    ) -> node_service_pb2.CordonNodeResponse:
        node = await self._registry.change_state(
            request.name, NodeAction.CORDON, by=caller(), reason=request.reason
        )
        return node_service_pb2.CordonNodeResponse(node=node)

    async def UncordonNode(
        self, request: node_service_pb2.UncordonNodeRequest, context: Context
    ) -> node_service_pb2.UncordonNodeResponse:
        node = await self._registry.change_state(request.name, NodeAction.UNCORDON, by=caller())
        return node_service_pb2.UncordonNodeResponse(node=node)

    async def WatchNodes(
        self, request: node_service_pb2.WatchNodesRequest, context: Context
    ) -> AsyncIterator[node_service_pb2.WatchNodesResponse]:
        directory = self._registry.directory
        changes = directory.watch()
        try:
            while (change := await changes.get()) is not None:
                yield change
        finally:
            directory.unwatch(changes)
        raise ResourceExhaustedError(
            "this watcher fell more than 1000 changes behind; watch again to start over",
            reason="WATCH_TOO_SLOW",
        )

    async def DeleteNode(
        self, request: node_service_pb2.DeleteNodeRequest, context: Context
    ) -> node_service_pb2.DeleteNodeResponse:
        await self._registry.delete_node(request.name, by=caller())
        return node_service_pb2.DeleteNodeResponse()

    async def UpdateNode(
        self, request: node_service_pb2.UpdateNodeRequest, context: Context
    ) -> node_service_pb2.UpdateNodeResponse:
        require(request.HasField("node"), "node")
        paths = set(request.update_mask.paths) or {"labels"}
        if paths != {"labels"}:
            raise InvalidArgumentError(
                f"update_mask may name only labels, not {', '.join(sorted(paths - {'labels'}))}",
                metadata={"field": "update_mask"},
            )
        node = await self._registry.set_labels(request.node.name, request.node.labels, by=caller())
        return node_service_pb2.UpdateNodeResponse(node=node)

    async def QuarantineNode(
        self, request: node_service_pb2.QuarantineNodeRequest, context: Context
    ) -> node_service_pb2.QuarantineNodeResponse:
        require(request.reason, "reason")
        node = await self._registry.change_state(
            request.name, NodeAction.QUARANTINE, by=caller(), reason=request.reason[:1000]
        )
        return node_service_pb2.QuarantineNodeResponse(node=node)

    async def CreateJoinToken(
        self, request: node_service_pb2.CreateJoinTokenRequest, context: Context
    ) -> node_service_pb2.CreateJoinTokenResponse:
        token = await self._registry.enrollment.create_token(request.join_token, caller().id)
        return node_service_pb2.CreateJoinTokenResponse(join_token=token)

    async def DrainNode(
        self, request: node_service_pb2.DrainNodeRequest, context: Context
    ) -> node_service_pb2.DrainNodeResponse:
        node = await self._registry.change_state(
            request.name, NodeAction.DRAIN, by=caller(), reason=request.reason
        )
        return node_service_pb2.DrainNodeResponse(node=node)


async def _next(
    requests: AsyncIterator[node_service_pb2.ConnectRequest], within_s: float, expected: str
) -> node_service_pb2.ConnectRequest | None:
    """The stream's next message, which must come within `within_s`: a stream that says
    nothing is not held open."""
    try:
        return await asyncio.wait_for(anext(requests, None), within_s)
    except TimeoutError as error:
        raise UnauthenticatedError(
            f"no {expected} within {within_s:.0f}s", reason="TOO_SLOW", metadata={"field": expected}
        ) from error


def _blob(stored: StoredBlob) -> blob_pb2.Blob:
    return blob_pb2.Blob(name=stored.name, sha256=stored.sha256, size_bytes=stored.size_bytes)


class ArtifactServicer(artifact_service_pb2_grpc.ArtifactServiceServicer):
    def __init__(self, blobs: BlobStore, ledger: BlobLedger) -> None:
        self._blobs = blobs
        self._ledger = ledger

    async def UploadBlob(
        self,
        request_iterator: AsyncIterator[artifact_service_pb2.UploadBlobRequest],
        context: Context,
    ) -> artifact_service_pb2.UploadBlobResponse:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("message") != "header":
            raise InvalidArgumentError(
                "an upload must start with a header", metadata={"field": "header"}
            )

        async def chunks() -> AsyncIterator[bytes]:
            async for request in request_iterator:
                if request.WhichOneof("message") != "chunk":
                    raise InvalidArgumentError(
                        "an upload carries one header, then chunks", metadata={"field": "chunk"}
                    )
                yield request.chunk

        # Too large, or over the quota: refused before a byte is read.
        sha, size, who = first.header.sha256, first.header.size_bytes, caller()
        self._ledger.check_size(size)
        blob_sha256(f"blobs/{sha}", "header.sha256")
        charged = await self._ledger.reserve(who, sha, size)
        # The header is taken: say so before the data flows (clients wait for this, so a refusal
        # of the header reaches them as our status, not as a failed send).
        await context.send_initial_metadata(())
        try:
            stored = await self._blobs.put(sha, size, chunks())
        except BaseException as error:
            if charged:
                await self._ledger.release(who, size)
            if isinstance(error, InvalidArgumentError):
                # Refusing while the client still sends makes its gRPC library report a failed
                # send (INTERNAL) instead of our status: take the rest of the stream, then refuse.
                async for _ in request_iterator:
                    pass
            raise
        if charged and not await self._ledger.hold(who, stored.sha256, size):
            await self._ledger.release(who, size)  # a concurrent upload of it got there first
        return artifact_service_pb2.UploadBlobResponse(blob=_blob(stored))

    async def GetBlob(
        self, request: artifact_service_pb2.GetBlobRequest, context: Context
    ) -> artifact_service_pb2.GetBlobResponse:
        sha = blob_sha256(request.name)
        stored = await self._blobs.stat(sha)
        if stored is None:
            raise NotFoundError(f"blob {request.name} not found", metadata={"name": request.name})
        return artifact_service_pb2.GetBlobResponse(blob=_blob(stored))

    async def ReadBlob(
        self, request: artifact_service_pb2.ReadBlobRequest, context: Context
    ) -> AsyncIterator[artifact_service_pb2.ReadBlobResponse]:
        sha = blob_sha256(request.name)
        async for chunk in self._blobs.read(sha, offset=request.offset):
            yield artifact_service_pb2.ReadBlobResponse(data=chunk)


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, models: ModelRegistry, deployments: DeploymentRegistry) -> None:
        self._models = models
        self._deployments = deployments

    async def CreateModel(
        self, request: model_api.CreateModelRequest, context: Context
    ) -> model_api.CreateModelResponse:
        wanted = model_pb2.Model()
        wanted.CopyFrom(request.model)
        who = caller()
        if not who.admin and wanted.owner not in ("", who.id):
            raise PermissionDeniedError(
                "only an admin creates models for another owner",
                reason="NOT_YOURS",
                metadata={"field": "model.owner"},
            )
        wanted.owner = wanted.owner or who.id
        model = await self._models.create_model(request.model_id, wanted)
        return model_api.CreateModelResponse(model=model)

    async def GetModel(
        self, request: model_api.GetModelRequest, context: Context
    ) -> model_api.GetModelResponse:
        model = await self._models.get_model(request.name)
        require_visible(model)
        return model_api.GetModelResponse(model=model)

    async def ListModels(
        self, request: model_api.ListModelsRequest, context: Context
    ) -> model_api.ListModelsResponse:
        models, token = await self._models.list_models(
            page_size=request.page_size, page_token=request.page_token
        )
        shown = [model for model in models if visible(model)]
        return model_api.ListModelsResponse(models=shown, next_page_token=token)

    async def _require_owner_of(self, name: str) -> model_pb2.Model:
        """The model `name` names (a model, or one of its versions), if the caller owns it."""
        model = await self._models.get_model("/".join(name.split("/")[:2]))
        require_owner(model.owner, model.name)
        return model

    async def UpdateModel(
        self, request: model_api.UpdateModelRequest, context: Context
    ) -> model_api.UpdateModelResponse:
        await self._require_owner_of(request.model.name)
        mask = field_mask_pb2.FieldMask(
            paths=list(request.update_mask.paths) or list(MODEL_UPDATED_BY_DEFAULT)
        )
        if "owner" in mask.paths and not caller().admin:
            raise PermissionDeniedError(
                "only an admin gives a model to another owner",
                reason="NOT_YOURS",
                metadata={"field": "update_mask"},
            )
        model = await self._models.update_model(request.model, mask)
        return model_api.UpdateModelResponse(model=model)

    async def DeleteModel(
        self, request: model_api.DeleteModelRequest, context: Context
    ) -> model_api.DeleteModelResponse:
        await self._require_owner_of(request.name)
        await self._models.delete_model(request.name, request.etag)
        return model_api.DeleteModelResponse()

    async def CreateModelVersion(
        self, request: model_api.CreateModelVersionRequest, context: Context
    ) -> model_api.CreateModelVersionResponse:
        await self._require_owner_of(request.parent)
        version = await self._models.create_version(
            request.parent, request.model_version_id, request.model_version
        )
        return model_api.CreateModelVersionResponse(model_version=version)

    async def _require_visible_canaries(self, name: str) -> bool:
        """Refuse a model the caller may not see; whether it may see its canaries (its owner
        and admins: a provider who knew them could tell them from real requests)."""
        model = await self._models.get_model("/".join(name.split("/")[:2]))
        require_visible(model)
        return caller().owns(model.owner)

    async def GetModelVersion(
        self, request: model_api.GetModelVersionRequest, context: Context
    ) -> model_api.GetModelVersionResponse:
        owner = await self._require_visible_canaries(request.name)
        version = await self._models.get_version(request.name)
        if not owner:
            version.ClearField("canaries")
        return model_api.GetModelVersionResponse(model_version=version)

    async def ListModelVersions(
        self, request: model_api.ListModelVersionsRequest, context: Context
    ) -> model_api.ListModelVersionsResponse:
        owner = await self._require_visible_canaries(request.parent)
        versions, token = await self._models.list_versions(
            request.parent, page_size=request.page_size, page_token=request.page_token
        )
        if not owner:
            for version in versions:
                version.ClearField("canaries")
        return model_api.ListModelVersionsResponse(model_versions=versions, next_page_token=token)

    async def AddModelVersionCanaries(
        self, request: model_api.AddModelVersionCanariesRequest, context: Context
    ) -> model_api.AddModelVersionCanariesResponse:
        await self._require_owner_of(request.name)
        version = await self._models.add_canaries(request.name, request.canaries)
        return model_api.AddModelVersionCanariesResponse(model_version=version)

    async def DeleteModelVersion(
        self, request: model_api.DeleteModelVersionRequest, context: Context
    ) -> model_api.DeleteModelVersionResponse:
        await self._require_owner_of(request.name)
        await self._models.delete_version(request.name, in_use=self._deployments.uses_version)
        return model_api.DeleteModelVersionResponse()


class DeploymentServicer(deployment_service_pb2_grpc.DeploymentServiceServicer):
    """Deployments belong to the owner of their model."""

    def __init__(self, deployments: DeploymentRegistry, models: ModelRegistry) -> None:
        self._deployments = deployments
        self._models = models

    async def _model_owner(self, model_name: str) -> str | None:
        """The owner of the model, or None when there is no such model."""
        try:
            return (await self._models.get_model(model_name)).owner
        except (NotFoundError, InvalidArgumentError):
            return None

    async def _owns_model(self, model_name: str) -> bool:
        owner = await self._model_owner(model_name)
        return caller().admin if owner is None else caller().owns(owner)

    async def _require_owner(
        self, deployment: deployment_pb2.Deployment, *, creating: bool = False
    ) -> None:
        # Creating one for a model that does not exist is refused by validation, naming the field.
        if creating and await self._model_owner(deployment.model) is None:
            return
        if not await self._owns_model(deployment.model):
            raise PermissionDeniedError(
                f"{deployment.model} belongs to another principal",
                reason="NOT_YOURS",
                metadata={"name": deployment.name or deployment.model},
            )

    async def _require_owner_of(self, name: str) -> None:
        await self._require_owner(await self._deployments.get_deployment(name))

    async def CreateDeployment(
        self, request: deployment_api.CreateDeploymentRequest, context: Context
    ) -> deployment_api.CreateDeploymentResponse:
        await self._require_owner(request.deployment, creating=True)
        deployment = await self._deployments.create(request.deployment_id, request.deployment)
        return deployment_api.CreateDeploymentResponse(deployment=deployment)

    async def GetDeployment(
        self, request: deployment_api.GetDeploymentRequest, context: Context
    ) -> deployment_api.GetDeploymentResponse:
        deployment = await self._deployments.get_deployment(request.name)
        await self._require_owner(deployment)
        return deployment_api.GetDeploymentResponse(deployment=deployment)

    async def ListDeployments(
        self, request: deployment_api.ListDeploymentsRequest, context: Context
    ) -> deployment_api.ListDeploymentsResponse:
        deployments, token = await self._deployments.list_deployments(
            page_size=request.page_size, page_token=request.page_token
        )
        shown = [d for d in deployments if await self._owns_model(d.model)]
        return deployment_api.ListDeploymentsResponse(deployments=shown, next_page_token=token)

    async def UpdateDeployment(
        self, request: deployment_api.UpdateDeploymentRequest, context: Context
    ) -> deployment_api.UpdateDeploymentResponse:
        await self._require_owner_of(request.deployment.name)
        deployment = await self._deployments.update(request.deployment, request.update_mask)
        return deployment_api.UpdateDeploymentResponse(deployment=deployment)

    async def DeleteDeployment(
        self, request: deployment_api.DeleteDeploymentRequest, context: Context
    ) -> deployment_api.DeleteDeploymentResponse:
        await self._require_owner_of(request.name)
        await self._deployments.delete(request.name, request.etag)
        return deployment_api.DeleteDeploymentResponse()

    async def ExplainDeployment(
        self, request: deployment_api.ExplainDeploymentRequest, context: Context
    ) -> deployment_api.ExplainDeploymentResponse:
        await self._require_owner_of(request.name)
        placements, history = await self._deployments.explain(request.name)
        return deployment_api.ExplainDeploymentResponse(placements=placements, history=history)


class KeyServicer(key_service_pb2_grpc.KeyServiceServicer):
    def __init__(
        self,
        keys: KeyRegistry,
        *,
        models: ModelRegistry,
        authority: Authority | None,
        client_certificate_lifetime_s: float = CLIENT_CERTIFICATE_LIFETIME_S,
    ) -> None:
        self._keys = keys
        self._models = models
        self._authority = authority
        self._client_lifetime_s = client_certificate_lifetime_s

    async def CreateApiKey(
        self, request: key_api.CreateApiKeyRequest, context: Context
    ) -> key_api.CreateApiKeyResponse:
        key, secret = await self._keys.create(request.api_key, caller())
        return key_api.CreateApiKeyResponse(api_key=key, secret=secret)

    async def GetApiKey(
        self, request: key_api.GetApiKeyRequest, context: Context
    ) -> key_api.GetApiKeyResponse:
        return key_api.GetApiKeyResponse(api_key=await self._keys.get(request.name, caller()))

    async def ListApiKeys(
        self, request: key_api.ListApiKeysRequest, context: Context
    ) -> key_api.ListApiKeysResponse:
        found, token = await self._keys.list(
            caller(), page_size=request.page_size, page_token=request.page_token
        )
        return key_api.ListApiKeysResponse(api_keys=found, next_page_token=token)

    async def RevokeApiKey(
        self, request: key_api.RevokeApiKeyRequest, context: Context
    ) -> key_api.RevokeApiKeyResponse:
        return key_api.RevokeApiKeyResponse(api_key=await self._keys.revoke(request.name, caller()))

    async def RotateApiKey(
        self, request: key_api.RotateApiKeyRequest, context: Context
    ) -> key_api.RotateApiKeyResponse:
        key, secret = await self._keys.rotate(request.name, caller())
        return key_api.RotateApiKeyResponse(api_key=key, secret=secret)

    async def IssueClientCertificate(
        self, request: key_api.IssueClientCertificateRequest, context: Context
    ) -> key_api.IssueClientCertificateResponse:
        """A certificate naming the caller's key and the models it asked for, each checked
        against what the key may use now (it lives minutes: a key revoked, or a model made
        private, stops being honoured with it)."""
        if self._authority is None:
            raise FailedPreconditionError(
                "this registry has no mesh CA: it issues no certificates", reason="NO_MESH_CA"
            )
        principal = caller()
        models = list(dict.fromkeys(request.models))
        if len(models) > MAX_GRANTS:
            raise InvalidArgumentError(
                f"models: at most {MAX_GRANTS} in one certificate",
                metadata={"field": "models"},
            )
        for index, name in enumerate(models):
            field = f"models[{index}]"
            if not RESOURCE_ID.fullmatch(name):
                raise InvalidArgumentError(
                    f"{field} is not a model name: {name[:80]!r}", metadata={"field": field}
                )
            require_visible(await self._models.get_model(f"models/{name}"))
        key_id = principal.key.removeprefix("keys/") or principal.id
        workload = self._authority.workload("client", key_id)
        public_key = self._authority.check_request(
            request.certificate_request, workload, field="certificate_request"
        )
        issued = self._authority.issue(
            public_key,
            workload,
            lifetime_s=self._client_lifetime_s,
            grants=[model_grant(name) for name in models],
        )
        _log.info("client certificate %x issued to %s", issued.serial, workload.uri)
        return key_api.IssueClientCertificateResponse(
            certificate=key_api.ClientCertificate(
                certificate_chain=issued.chain_pem,
                trust_bundle=self._authority.bundle_pem,
                expire_time=timestamp(issued.not_after.timestamp()),
                models=models,
            )
        )


class TaskServicer(task_service_pb2_grpc.TaskServiceServicer):
    """Owners create, read and cancel their tasks; provider nodes claim and complete theirs."""

    def __init__(self, tasks: TaskRegistry) -> None:
        self._tasks = tasks

    async def CreateTask(
        self, request: task_api.CreateTaskRequest, context: Context
    ) -> task_api.CreateTaskResponse:
        require(request.HasField("task"), "task")
        return task_api.CreateTaskResponse(
            task=await self._tasks.create(request.task_id, request.task)
        )

    async def GetTask(
        self, request: task_api.GetTaskRequest, context: Context
    ) -> task_api.GetTaskResponse:
        return task_api.GetTaskResponse(task=await self._tasks.get(request.name))

    async def ListTasks(
        self, request: task_api.ListTasksRequest, context: Context
    ) -> task_api.ListTasksResponse:
        tasks, token = await self._tasks.list(
            page_size=request.page_size, page_token=request.page_token, filter_text=request.filter
        )
        return task_api.ListTasksResponse(tasks=tasks, next_page_token=token)

    async def CancelTask(
        self, request: task_api.CancelTaskRequest, context: Context
    ) -> task_api.CancelTaskResponse:
        return task_api.CancelTaskResponse(
            task=await self._tasks.cancel(request.name, request.reason)
        )

    async def ClaimTask(
        self, request: task_api.ClaimTaskRequest, context: Context
    ) -> task_api.ClaimTaskResponse:
        return task_api.ClaimTaskResponse(task=await self._tasks.claim(request.name))

    async def CompleteTask(
        self, request: task_api.CompleteTaskRequest, context: Context
    ) -> task_api.CompleteTaskResponse:
        task = await self._tasks.complete(
            request.name, request.state, request.result, request.reason, request.attempt
        )
        return task_api.CompleteTaskResponse(task=task)
