"""Deployments: the desired state the scheduler makes real.

A deployment names a model, the versions to serve with their replicas and traffic weights, what
each replica needs and which nodes may run it. Its spec lives under `deployments/`; the scheduler
writes what it observed under `deployment-status/` and every placement decision under
`decisions/`, so the spec's etag changes only when someone changes the spec.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from google.protobuf import field_mask_pb2

from shard.deployment.v1 import deployment_pb2
from shard.node.v1 import node_pb2
from shard_core import keys
from shard_core.errors import (
    AbortedError,
    AlreadyExistsError,
    InvalidArgumentError,
    NotFoundError,
    require,
)
from shard_core.etcd import paging
from shard_core.etcd.store import EtcdStore
from shard_registry.models import ModelRegistry
from shard_registry.resources import (
    apply_mask,
    check_etag,
    check_id,
    parse_name,
    timestamp,
)

DEPLOYMENT_MUTABLE_FIELDS = ("targets", "resources", "node_selector")
MAX_REPLICAS = 1000


def _check_spec(deployment: deployment_pb2.Deployment) -> None:
    if not deployment.targets:
        raise InvalidArgumentError(
            "deployment.targets must name at least one version",
            metadata={"field": "deployment.targets"},
        )
    versions = set()
    for index, target in enumerate(deployment.targets):
        where = f"deployment.targets[{index}]"
        require(target.version, f"{where}.version")
        if target.version in versions:
            raise InvalidArgumentError(
                f"{where}.version {target.version} is listed twice",
                metadata={"field": f"{where}.version"},
            )
        versions.add(target.version)
        if not 0 <= target.replicas <= MAX_REPLICAS:
            raise InvalidArgumentError(
                f"{where}.replicas must be between 0 and {MAX_REPLICAS}",
                metadata={"field": f"{where}.replicas"},
            )
        if target.weight < 0:
            raise InvalidArgumentError(
                f"{where}.weight must not be negative", metadata={"field": f"{where}.weight"}
            )
    resources = deployment.resources
    for field in ("gpu_count", "gpu_memory_bytes", "cpu_millis", "memory_bytes"):
        if getattr(resources, field) < 0:
            raise InvalidArgumentError(
                f"deployment.resources.{field} must not be negative",
                metadata={"field": f"deployment.resources.{field}"},
            )
    if resources.gpu_memory_bytes and not resources.gpu_count:
        raise InvalidArgumentError(
            "deployment.resources.gpu_memory_bytes needs gpu_count",
            metadata={"field": "deployment.resources.gpu_count"},
        )


class DeploymentRegistry:
    def __init__(
        self, *, store: EtcdStore, models: ModelRegistry, clock: Callable[[], float] = time.time
    ) -> None:
        self._store = store
        self._models = models
        self._clock = clock

    async def _check_versions_exist(self, deployment: deployment_pb2.Deployment) -> None:
        for index, target in enumerate(deployment.targets):
            try:
                await self._models.get_version(f"{deployment.model}/versions/{target.version}")
            except NotFoundError as error:
                raise InvalidArgumentError(
                    f"deployment.targets[{index}].version: {error.message}",
                    reason="VERSION_NOT_FOUND",
                    metadata={"field": f"deployment.targets[{index}].version"},
                ) from error
            except InvalidArgumentError as error:
                raise InvalidArgumentError(
                    f"deployment.targets[{index}].version {target.version!r} is not a version "
                    "number",
                    metadata={"field": f"deployment.targets[{index}].version"},
                ) from error

    async def create(
        self, deployment_id: str, deployment: deployment_pb2.Deployment
    ) -> deployment_pb2.Deployment:
        check_id(deployment_id, "deployment_id")
        (model_id,) = parse_name(deployment.model, "models/{}", "deployment.model")
        await self._models.get_model(deployment.model)
        _check_spec(deployment)
        await self._check_versions_exist(deployment)
        record = deployment_pb2.Deployment()
        record.CopyFrom(deployment)
        record.name = f"deployments/{deployment_id}"
        record.model = f"models/{model_id}"
        record.ClearField("status")
        record.etag = ""
        now = timestamp(self._clock())
        record.create_time.CopyFrom(now)
        record.update_time.CopyFrom(now)
        key, owner = keys.deployment(deployment_id), keys.deployment_of(model_id)
        revision = await self._store.write(
            puts={key: record.SerializeToString(), owner: deployment_id.encode()},
            expect={key: 0, owner: 0},
        )
        if revision is None:
            if await self._deployment_of(deployment.model) is not None:
                raise AlreadyExistsError(
                    f"{deployment.model} already has a deployment; update that one",
                    reason="MODEL_ALREADY_DEPLOYED",
                    metadata={"field": "deployment.model"},
                )
            raise AlreadyExistsError(
                f"{record.name} already exists", metadata={"name": record.name}
            )
        record.etag = str(revision)
        return record

    async def _deployment_of(self, model: str) -> deployment_pb2.Deployment | None:
        owner = await self._store.get(keys.deployment_of(model.removeprefix("models/")))
        if owner is None:
            return None
        found = await self._store.get(keys.deployment(owner.value.decode()))
        return deployment_pb2.Deployment.FromString(found.value) if found else None

    async def _read(self, deployment_id: str) -> tuple[deployment_pb2.Deployment, int]:
        found = await self._store.get(keys.deployment(deployment_id))
        if found is None:
            name = f"deployments/{deployment_id}"
            raise NotFoundError(f"deployment {name} not found", metadata={"name": name})
        deployment = deployment_pb2.Deployment.FromString(found.value)
        deployment.etag = str(found.mod_revision)
        status = await self._store.get(keys.deployment_status(deployment_id))
        if status is not None:
            deployment.status.ParseFromString(status.value)
        return deployment, found.mod_revision

    async def get_deployment(self, name: str) -> deployment_pb2.Deployment:
        (deployment_id,) = parse_name(name, "deployments/{}")
        deployment, _ = await self._read(deployment_id)
        return deployment

    async def list_deployments(
        self, *, page_size: int, page_token: str
    ) -> tuple[list[deployment_pb2.Deployment], str]:
        entries, token = await paging.page(
            self._store, keys.DEPLOYMENTS, page_size=page_size, page_token=page_token
        )
        found = []
        for entry in entries:
            deployment, _ = await self._read(entry.key.removeprefix(keys.DEPLOYMENTS))
            found.append(deployment)
        return found, token

    async def update(
        self, deployment: deployment_pb2.Deployment, mask: field_mask_pb2.FieldMask
    ) -> deployment_pb2.Deployment:
        (deployment_id,) = parse_name(deployment.name, "deployments/{}", "deployment.name")
        current, revision = await self._read(deployment_id)
        check_etag(deployment.etag, revision, deployment.name)
        apply_mask(current, deployment, mask, DEPLOYMENT_MUTABLE_FIELDS)
        _check_spec(current)
        await self._check_versions_exist(current)
        status = deployment_pb2.DeploymentStatus()
        status.CopyFrom(current.status)
        current.ClearField("status")
        current.etag = ""
        current.update_time.CopyFrom(timestamp(self._clock()))
        key = keys.deployment(deployment_id)
        written = await self._store.write(
            puts={key: current.SerializeToString()}, expect={key: revision}
        )
        if written is None:
            raise AbortedError(
                f"{deployment.name} changed during the update; read it again and retry",
                reason="ETAG_MISMATCH",
                metadata={"name": deployment.name},
            )
        current.etag = str(written)
        current.status.CopyFrom(status)
        return current

    async def delete(self, name: str, etag: str) -> None:
        (deployment_id,) = parse_name(name, "deployments/{}")
        current, revision = await self._read(deployment_id)
        check_etag(etag, revision, name)
        key = keys.deployment(deployment_id)
        owner = keys.deployment_of(current.model.removeprefix("models/"))
        if await self._store.write(deletes=[key, owner], expect={key: revision}) is None:
            raise AbortedError(f"{name} changed during the delete", reason="ETAG_MISMATCH")

    async def explain(
        self, name: str
    ) -> tuple[list[deployment_pb2.PlacementDecision], list[deployment_pb2.PlacementDecision]]:
        """Where each replica is and why; and the scheduler's recent decisions, newest first."""
        (deployment_id,) = parse_name(name, "deployments/{}")
        await self._read(deployment_id)
        placements = []
        assignments = await self._store.snapshot(keys.ASSIGNMENTS)
        for entry in assignments.entries:
            assignment = node_pb2.ModelAssignment.FromString(entry.value)
            if assignment.deployment == name:
                node_id = entry.key.removeprefix(keys.ASSIGNMENTS).split("/", 1)[0]
                placements.append(
                    deployment_pb2.PlacementDecision(
                        action=deployment_pb2.PLACEMENT_ACTION_PLACED,
                        version=assignment.model_version,
                        node=f"nodes/{node_id}",
                        reason="PLACED",
                        message=assignment.reason,
                    )
                )
        history = await self._store.snapshot(keys.decisions(deployment_id))
        decisions = [
            deployment_pb2.PlacementDecision.FromString(entry.value)
            for entry in reversed(history.entries)
        ]
        return placements, decisions

    async def uses_version(self, model_id: str, version_id: str) -> bool:
        deployment = await self._deployment_of(f"models/{model_id}")
        return deployment is not None and any(
            target.version == version_id for target in deployment.targets
        )
