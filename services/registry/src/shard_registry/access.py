"""Who may call what on the registry: the permission each RPC needs, and ownership.

`RULES` names the permission of every method the registry serves; the `AuthInterceptor` applies
them before a call reaches a servicer. Ownership is decided here on the resource itself: a
provider acts on the nodes it enrolled, an owner on its models and their versions and
deployments; admins on everything. Private models are seen only by their owner (and admins).
"""

from __future__ import annotations

from shard.model.v1 import model_pb2
from shard_core.auth import (
    INFRASTRUCTURE,
    MethodRules,
    Permission,
    Principal,
    current_principal,
)
from shard_core.errors import PermissionDeniedError


def _rules(service: str, methods: dict[str, Permission | None]) -> dict[str, Permission | None]:
    return {f"/{service}/{method}": permission for method, permission in methods.items()}


RULES: MethodRules = {
    **_rules(
        "shard.node.v1.NodeService",
        {
            "Connect": None,  # node agents prove themselves on the stream
            "GetNode": Permission.NODES_READ,
            "ListNodes": Permission.NODES_READ,
            "WatchNodes": Permission.NODES_READ,
            "CordonNode": Permission.NODES_WRITE,
            "UncordonNode": Permission.NODES_WRITE,
            "DrainNode": Permission.NODES_WRITE,
            "DeleteNode": Permission.NODES_WRITE,
            "UpdateNode": Permission.NODES_ADMIN,
            "QuarantineNode": Permission.NODES_ADMIN,
            "CreateJoinToken": Permission.NODES_ENROLL,
        },
    ),
    **_rules(
        "shard.artifact.v1.ArtifactService",
        {
            "UploadBlob": Permission.BLOBS_WRITE,
            "GetBlob": Permission.BLOBS_READ,
            "ReadBlob": Permission.BLOBS_READ,
        },
    ),
    **_rules(
        "shard.model.v1.ModelService",
        {
            "CreateModel": Permission.MODELS_WRITE,
            "GetModel": Permission.MODELS_READ,
            "ListModels": Permission.MODELS_READ,
            "UpdateModel": Permission.MODELS_WRITE,
            "DeleteModel": Permission.MODELS_WRITE,
            "CreateModelVersion": Permission.MODELS_WRITE,
            "GetModelVersion": Permission.MODELS_READ,
            "ListModelVersions": Permission.MODELS_READ,
            "DeleteModelVersion": Permission.MODELS_WRITE,
            "AddModelVersionCanaries": Permission.MODELS_WRITE,
        },
    ),
    **_rules(
        "shard.deployment.v1.DeploymentService",
        {
            "CreateDeployment": Permission.DEPLOYMENTS_WRITE,
            "GetDeployment": Permission.DEPLOYMENTS_READ,
            "ListDeployments": Permission.DEPLOYMENTS_READ,
            "UpdateDeployment": Permission.DEPLOYMENTS_WRITE,
            "DeleteDeployment": Permission.DEPLOYMENTS_WRITE,
            "ExplainDeployment": Permission.DEPLOYMENTS_READ,
        },
    ),
    **_rules(
        "shard.auth.v1.KeyService",
        {
            "CreateApiKey": Permission.KEYS_WRITE,
            "GetApiKey": Permission.KEYS_READ,
            "ListApiKeys": Permission.KEYS_READ,
            "RevokeApiKey": Permission.KEYS_WRITE,
            "RotateApiKey": Permission.KEYS_WRITE,
            "IssueClientCertificate": Permission.INFERENCE,
        },
    ),
    **_rules(
        "shard.task.v1.TaskService",
        {
            "CreateTask": Permission.TASKS_WRITE,
            "GetTask": Permission.TASKS_READ,
            "ListTasks": Permission.TASKS_READ,
            "CancelTask": Permission.TASKS_WRITE,
            "ClaimTask": Permission.TASKS_RUN,
            "CompleteTask": Permission.TASKS_RUN,
        },
    ),
    **INFRASTRUCTURE,
}


def caller() -> Principal:
    """The principal of the call being served."""
    return current_principal.get()


def require_owner(owner: str, name: str) -> None:
    """Refuse the caller an action on `name` unless it owns it (or is an admin)."""
    if not caller().owns(owner):
        raise PermissionDeniedError(
            f"{name} belongs to another principal", reason="NOT_YOURS", metadata={"name": name}
        )


def visible(model: model_pb2.Model) -> bool:
    """Whether the caller may see the model: public ones, and its own."""
    return model.visibility == model_pb2.VISIBILITY_PUBLIC or caller().owns(model.owner)


def require_visible(model: model_pb2.Model) -> None:
    if not visible(model):
        raise PermissionDeniedError(
            f"{model.name} is private", reason="NOT_YOURS", metadata={"name": model.name}
        )
