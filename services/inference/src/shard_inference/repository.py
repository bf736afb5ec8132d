"""Triton's repository load and unload, mapped onto the registry's deployments.

Loading a model deploys its newest version with one replica; unloading deletes its deployment.
The router decides nothing itself: it passes the caller's credentials to the registry, which
refuses anyone who may not deploy.
"""

from __future__ import annotations

from typing import Any, NoReturn

import grpc
from tritonclient.grpc import service_pb2

from shard.deployment.v1 import deployment_pb2, deployment_service_pb2, deployment_service_pb2_grpc
from shard.model.v1 import model_service_pb2, model_service_pb2_grpc
from shard_core.auth import AUTHORIZATION

_Context = grpc.aio.ServicerContext[bytes, bytes]
TIMEOUT_S = 10.0
NEEDS_ADMIN = (
    "loading and unloading models deploys and undeploys them across the shard: this needs admin "
    "credentials ('authorization: Bearer <token>' metadata)"
)


def _credentials(context: _Context) -> list[tuple[str, str]]:
    return [
        (key, str(value))
        for key, value in context.invocation_metadata() or ()
        if key == AUTHORIZATION
    ]


async def _refuse(context: _Context, error: grpc.aio.AioRpcError) -> NoReturn:
    code = error.code()
    if code in {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{NEEDS_ADMIN}: {error.details()}")
    if code == grpc.StatusCode.UNAVAILABLE:
        await context.abort(code, f"the registry is unreachable: {error.details()}")
    await context.abort(code, error.details() or "")


class Repository:
    """The registry calls behind RepositoryModelLoad and RepositoryModelUnload."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._models = model_service_pb2_grpc.ModelServiceStub(channel)
        self._deployments = deployment_service_pb2_grpc.DeploymentServiceStub(channel)

    async def load(self, load: service_pb2.RepositoryModelLoadRequest, context: _Context) -> None:
        """Deploy the model's newest version, unless it has a deployment already."""
        if not load.model_name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "model_name is required")
        if load.parameters:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "parameters: the shard loads only published versions; publish a new version "
                "through the registry (`shard model push`) instead of sending config or files",
            )
        credentials = _credentials(context)
        if not credentials:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, NEEDS_ADMIN)
        name = load.model_name
        try:
            newest = await self._newest_version(name, credentials)
            if not newest:
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"model '{name}' has no published version to load",
                )
            await self._deployments.CreateDeployment(
                deployment_service_pb2.CreateDeploymentRequest(
                    deployment_id=name,
                    deployment=deployment_pb2.Deployment(
                        model=f"models/{name}",
                        targets=[
                            deployment_pb2.DeploymentTarget(version=newest, replicas=1, weight=100)
                        ],
                    ),
                ),
                metadata=credentials,
                timeout=TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.ALREADY_EXISTS:
                await _refuse(context, error)

    async def unload(
        self,
        unload: service_pb2.RepositoryModelUnloadRequest,
        deployment_id: str,
        context: _Context,
    ) -> None:
        """Delete the deployment serving the model."""
        credentials = _credentials(context)
        if not credentials:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, NEEDS_ADMIN)
        if not deployment_id:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"model '{unload.model_name}' is not deployed"
            )
        try:
            await self._deployments.DeleteDeployment(
                deployment_service_pb2.DeleteDeploymentRequest(name=f"deployments/{deployment_id}"),
                metadata=credentials,
                timeout=TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as error:
            await _refuse(context, error)

    async def _newest_version(self, model_name: str, credentials: Any) -> str:
        newest, token = "", ""
        while True:
            page = await self._models.ListModelVersions(
                model_service_pb2.ListModelVersionsRequest(
                    parent=f"models/{model_name}", page_size=1000, page_token=token
                ),
                metadata=credentials,
                timeout=TIMEOUT_S,
            )
            if page.model_versions:
                newest = page.model_versions[-1].name.rsplit("/", 1)[-1]
            token = page.next_page_token
            if not token:
                return newest
