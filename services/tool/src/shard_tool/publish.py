"""Publishing models to the shard from a Triton model repository on disk, over the registry's
gRPC API: upload each file as a blob (skipping blobs the store has), create the model and its
versions, deploy. A model directory may hold `canaries.json`: requests with known answers that
the shard uses to check nodes. Used by `shard up` for the demo models and by the CLI."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2
from tritonclient.utils import serialize_byte_tensor, triton_to_np_dtype

from shard.artifact.v1 import artifact_service_pb2_grpc
from shard.deployment.v1 import deployment_pb2, deployment_service_pb2_grpc
from shard.deployment.v1 import deployment_service_pb2 as deployment_api
from shard.model.v1 import model_pb2, model_service_pb2_grpc
from shard.model.v1 import model_service_pb2 as model_api
from shard_client.blobs import upload_file

CHUNK_BYTES = 1024 * 1024
TIMEOUT_S = 30.0


def _raw(tensor: Mapping[str, Any]) -> bytes:
    """A JSON tensor's data as KServe raw contents: little-endian values, or length-prefixed
    strings for BYTES."""
    if tensor["datatype"] == "BYTES":
        values = np.array([str(value).encode() for value in tensor["data"]], dtype=object)
        serialized: bytes = serialize_byte_tensor(values).item()
        return serialized
    dtype = triton_to_np_dtype(tensor["datatype"])
    return np.asarray(tensor["data"], dtype=dtype).tobytes()


def canary_from_json(item: Mapping[str, Any]) -> model_pb2.Canary:
    """A canary from `{"inputs": [tensor...], "outputs": [tensor...]}`, where a tensor is
    `{"name", "datatype", "shape", "data"}` with `data` flat, as in KServe's JSON."""
    request = service_pb2.ModelInferRequest()
    for tensor in item["inputs"]:
        request.inputs.add(name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"])
        request.raw_input_contents.append(_raw(tensor))
    response = service_pb2.ModelInferResponse()
    for tensor in item["outputs"]:
        response.outputs.add(
            name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"]
        )
        response.raw_output_contents.append(_raw(tensor))
    return model_pb2.Canary(
        request=request.SerializeToString(), response=response.SerializeToString()
    )


def read_canaries(model_dir: Path) -> list[model_pb2.Canary]:
    """The model directory's `canaries.json`, if it has one."""
    path = model_dir / "canaries.json"
    if not path.exists():
        return []
    return [canary_from_json(item) for item in json.loads(path.read_text())]


def _files(version_dir: Path) -> list[Path]:
    return sorted(
        path
        for path in version_dir.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    )


def _version_dirs(model_dir: Path) -> list[Path]:
    numbered = (path for path in model_dir.iterdir() if path.is_dir() and path.name.isdigit())
    return sorted(numbered, key=lambda path: int(path.name))


def directory_bytes(model_dir: Path) -> int:
    """The bytes a push of the model directory uploads (at most: stored files are skipped)."""
    return sum(path.stat().st_size for d in _version_dirs(model_dir) for path in _files(d))


@dataclass(frozen=True, kw_only=True)
class Publisher:
    """The registry's model APIs, as one client uses them."""

    channel: grpc.aio.Channel
    # Called with each chunk's size as it is sent (and a skipped file's whole size).
    on_bytes: Callable[[int], None] = lambda _: None

    @property
    def artifacts(self) -> artifact_service_pb2_grpc.ArtifactServiceStub:
        return artifact_service_pb2_grpc.ArtifactServiceStub(self.channel)

    @property
    def models(self) -> model_service_pb2_grpc.ModelServiceStub:
        return model_service_pb2_grpc.ModelServiceStub(self.channel)

    @property
    def deployments(self) -> deployment_service_pb2_grpc.DeploymentServiceStub:
        return deployment_service_pb2_grpc.DeploymentServiceStub(self.channel)

    async def upload(self, path: Path) -> model_pb2.ModelFile:
        """Upload one file as a blob unless the store already has it."""
        sha256, size = await upload_file(self.artifacts, path, on_bytes=self.on_bytes)
        return model_pb2.ModelFile(sha256=sha256, size_bytes=size)

    async def ensure_model(self, model_id: str, model: model_pb2.Model) -> None:
        try:
            await self.models.CreateModel(
                model_api.CreateModelRequest(model_id=model_id, model=model), timeout=TIMEOUT_S
            )
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise

    async def push_version(
        self,
        model_id: str,
        version_dir: Path,
        config: str,
        canaries: Sequence[model_pb2.Canary] = (),
        *,
        response_cache_ttl_seconds: int = 0,
    ) -> model_pb2.ModelVersion:
        """Upload a version directory's files and create the version (kept if it exists)."""
        files = []
        for path in await asyncio.to_thread(_files, version_dir):
            uploaded = await self.upload(path)
            uploaded.path = path.relative_to(version_dir).as_posix()
            files.append(uploaded)
        request = model_api.CreateModelVersionRequest(
            parent=f"models/{model_id}",
            model_version_id=version_dir.name,
            model_version=model_pb2.ModelVersion(
                config=config,
                files=files,
                canaries=canaries,
                response_cache_ttl_seconds=response_cache_ttl_seconds,
            ),
        )
        try:
            reply = await self.models.CreateModelVersion(request, timeout=TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
            return await self._version(model_id, version_dir.name)
        return reply.model_version

    async def _version(self, model_id: str, version: str) -> model_pb2.ModelVersion:
        reply = await self.models.GetModelVersion(
            model_api.GetModelVersionRequest(name=f"models/{model_id}/versions/{version}"),
            timeout=TIMEOUT_S,
        )
        return reply.model_version

    async def push_directory(
        self, model_dir: Path, *, visibility: model_pb2.Visibility.ValueType
    ) -> list[str]:
        """Publish a Triton model directory (config.pbtxt and numbered version directories) as
        the model named after the directory; return its version numbers."""
        model_id = model_dir.name
        config = await asyncio.to_thread((model_dir / "config.pbtxt").read_text)
        await self.ensure_model(model_id, model_pb2.Model(visibility=visibility))
        versions = await asyncio.to_thread(_version_dirs, model_dir)
        canaries = await asyncio.to_thread(read_canaries, model_dir)
        for version_dir in versions:
            await self.push_version(model_id, version_dir, config, canaries)
        return [version_dir.name for version_dir in versions]

    async def deploy(
        self,
        model_id: str,
        targets: list[deployment_pb2.DeploymentTarget],
        *,
        resources: deployment_pb2.Resources | None = None,
        node_selector: deployment_pb2.NodeSelector | None = None,
    ) -> deployment_pb2.Deployment:
        """Create the model's deployment (named after the model), or replace the spec of the
        one it has."""
        deployment = deployment_pb2.Deployment(
            model=f"models/{model_id}",
            targets=targets,
            resources=resources,
            node_selector=node_selector,
        )
        try:
            reply = await self.deployments.CreateDeployment(
                deployment_api.CreateDeploymentRequest(
                    deployment_id=model_id, deployment=deployment
                ),
                timeout=TIMEOUT_S,
            )
            return reply.deployment
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
        deployment.name = f"deployments/{model_id}"
        updated = await self.deployments.UpdateDeployment(
            deployment_api.UpdateDeploymentRequest(deployment=deployment), timeout=TIMEOUT_S
        )
        return updated.deployment

    async def wait_available(self, deployment: str, *, timeout: float) -> None:
        """Wait until every desired replica of `deployment` is ready."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            reply = await self.deployments.GetDeployment(
                deployment_api.GetDeploymentRequest(name=deployment), timeout=TIMEOUT_S
            )
            spec, status = reply.deployment, reply.deployment.status
            conditions = {c.type: c for c in status.conditions}
            desired = {t.version: t.replicas for t in spec.targets}
            # The status must describe the current spec, not the one before it.
            observed = {t.version: t.desired_replicas for t in status.targets}
            ready = all(t.ready_replicas >= t.desired_replicas for t in status.targets)
            if observed == desired and ready:
                return
            if asyncio.get_running_loop().time() > deadline:
                why = "; ".join(f"{c.type}={c.status}: {c.message}" for c in conditions.values())
                raise TimeoutError(f"{deployment} not available after {timeout:.0f}s ({why})")
            await asyncio.sleep(0.2)
