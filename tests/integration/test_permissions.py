"""API keys and who may do what: KeyService, the role-by-RPC matrix, ownership, private models."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from google.protobuf import field_mask_pb2, timestamp_pb2
from tritonclient.utils import InferenceServerException

from shard.artifact.v1 import artifact_service_pb2 as artifact_api
from shard.artifact.v1 import artifact_service_pb2_grpc
from shard.auth.v1 import api_key_pb2, key_service_pb2_grpc
from shard.auth.v1 import key_service_pb2 as key_api
from shard.deployment.v1 import deployment_pb2, deployment_service_pb2_grpc
from shard.deployment.v1 import deployment_service_pb2 as deployment_api
from shard.model.v1 import model_pb2, model_service_pb2_grpc
from shard.model.v1 import model_service_pb2 as model_api
from shard.node.v1 import node_pb2, node_service_pb2, node_service_pb2_grpc
from shard.task.v1 import task_pb2, task_service_pb2_grpc
from shard.task.v1 import task_service_pb2 as task_api
from shard_core.errors import error_info
from shard_tool.local import LocalMesh
from shard_tool.publish import Publisher
from tests.demo import push_copy, simple_inputs, target

ROLES = {
    "provider": api_key_pb2.ROLE_PROVIDER,
    "owner": api_key_pb2.ROLE_OWNER,
    "developer": api_key_pb2.ROLE_DEVELOPER,
}
REFUSED = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}


async def _create_key(
    channel: grpc.aio.Channel, principal: str, role: api_key_pb2.Role.ValueType, **fields: Any
) -> str:
    reply = await key_service_pb2_grpc.KeyServiceStub(channel).CreateApiKey(
        key_api.CreateApiKeyRequest(
            api_key=api_key_pb2.ApiKey(principal=principal, role=role, **fields)
        )
    )
    assert reply.secret.startswith("shard_")
    return reply.secret


@pytest.fixture(scope="module")
async def secrets(mesh: LocalMesh) -> dict[str, str]:
    """A key per role, created by the admin; `None` stands for anonymous."""
    async with mesh.admin_channel() as channel:
        return {
            role: await _create_key(channel, f"perm-{role}", value) for role, value in ROLES.items()
        }


def _auth(secret: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {secret}"),) if secret else ()


async def _upload(channel: grpc.aio.Channel, metadata: Any) -> Any:
    async def requests() -> AsyncIterator[artifact_api.UploadBlobRequest]:
        header = artifact_api.UploadBlobHeader(sha256="0" * 64, size_bytes=1)
        yield artifact_api.UploadBlobRequest(header=header)
        yield artifact_api.UploadBlobRequest(chunk=b"x")

    stub = artifact_service_pb2_grpc.ArtifactServiceStub(channel)
    return await stub.UploadBlob(requests(), metadata=metadata, timeout=5)


async def _first(call: Any) -> Any:
    async for reply in call:
        return reply
    return None


Call = Callable[[grpc.aio.Channel, Any], Any]


def _calls() -> dict[str, Call]:
    """Every registry RPC with a request that passes authorization and then fails on (or
    succeeds with) what it names: nothing here exists, so an allowed call gets NOT_FOUND,
    INVALID_ARGUMENT or an answer, never UNAUTHENTICATED or PERMISSION_DENIED."""
    nodes = node_service_pb2_grpc.NodeServiceStub
    models = model_service_pb2_grpc.ModelServiceStub
    deployments = deployment_service_pb2_grpc.DeploymentServiceStub
    keys = key_service_pb2_grpc.KeyServiceStub
    blobs = artifact_service_pb2_grpc.ArtifactServiceStub
    tasks = task_service_pb2_grpc.TaskServiceStub
    task = "tasks/matrix-none"
    node = "nodes/nmatrix"
    model = "models/matrix-none"
    blob = "blobs/" + "0" * 64
    deployment = "deployments/matrix-none"
    key = "keys/000000000000"
    return {
        "GetNode": lambda c, m: nodes(c).GetNode(
            node_service_pb2.GetNodeRequest(name=node), metadata=m
        ),
        "ListNodes": lambda c, m: nodes(c).ListNodes(
            node_service_pb2.ListNodesRequest(), metadata=m
        ),
        "WatchNodes": lambda c, m: asyncio.wait_for(
            _first(nodes(c).WatchNodes(node_service_pb2.WatchNodesRequest(), metadata=m)), 1
        ),
        "CordonNode": lambda c, m: nodes(c).CordonNode(
            node_service_pb2.CordonNodeRequest(name=node), metadata=m
        ),
        "UncordonNode": lambda c, m: nodes(c).UncordonNode(
            node_service_pb2.UncordonNodeRequest(name=node), metadata=m
        ),
        "DrainNode": lambda c, m: nodes(c).DrainNode(
            node_service_pb2.DrainNodeRequest(name=node), metadata=m
        ),
        "DeleteNode": lambda c, m: nodes(c).DeleteNode(
            node_service_pb2.DeleteNodeRequest(name=node), metadata=m
        ),
        "UpdateNode": lambda c, m: nodes(c).UpdateNode(
            node_service_pb2.UpdateNodeRequest(node=node_pb2.Node(name=node)), metadata=m
        ),
        "QuarantineNode": lambda c, m: nodes(c).QuarantineNode(
            node_service_pb2.QuarantineNodeRequest(name=node, reason="MATRIX: a test"), metadata=m
        ),
        "CreateJoinToken": lambda c, m: nodes(c).CreateJoinToken(
            node_service_pb2.CreateJoinTokenRequest(
                join_token=node_service_pb2.JoinToken(ttl_seconds=-1)
            ),
            metadata=m,
        ),
        "UploadBlob": _upload,
        "GetBlob": lambda c, m: blobs(c).GetBlob(
            artifact_api.GetBlobRequest(name=blob), metadata=m
        ),
        "ReadBlob": lambda c, m: _first(
            blobs(c).ReadBlob(artifact_api.ReadBlobRequest(name=blob), metadata=m)
        ),
        "CreateModel": lambda c, m: models(c).CreateModel(
            model_api.CreateModelRequest(model_id="Bad Id"), metadata=m
        ),
        "GetModel": lambda c, m: models(c).GetModel(
            model_api.GetModelRequest(name=model), metadata=m
        ),
        "ListModels": lambda c, m: models(c).ListModels(model_api.ListModelsRequest(), metadata=m),
        "UpdateModel": lambda c, m: models(c).UpdateModel(
            model_api.UpdateModelRequest(model=model_pb2.Model(name=model)), metadata=m
        ),
        "DeleteModel": lambda c, m: models(c).DeleteModel(
            model_api.DeleteModelRequest(name=model), metadata=m
        ),
        "CreateModelVersion": lambda c, m: models(c).CreateModelVersion(
            model_api.CreateModelVersionRequest(parent=model), metadata=m
        ),
        "GetModelVersion": lambda c, m: models(c).GetModelVersion(
            model_api.GetModelVersionRequest(name=f"{model}/versions/1"), metadata=m
        ),
        "ListModelVersions": lambda c, m: models(c).ListModelVersions(
            model_api.ListModelVersionsRequest(parent=model), metadata=m
        ),
        "DeleteModelVersion": lambda c, m: models(c).DeleteModelVersion(
            model_api.DeleteModelVersionRequest(name=f"{model}/versions/1"), metadata=m
        ),
        "AddModelVersionCanaries": lambda c, m: models(c).AddModelVersionCanaries(
            model_api.AddModelVersionCanariesRequest(name=f"{model}/versions/1"), metadata=m
        ),
        "CreateDeployment": lambda c, m: deployments(c).CreateDeployment(
            deployment_api.CreateDeploymentRequest(
                deployment_id="matrix-none",
                deployment=deployment_pb2.Deployment(model=model, targets=[target("1", 1)]),
            ),
            metadata=m,
        ),
        "GetDeployment": lambda c, m: deployments(c).GetDeployment(
            deployment_api.GetDeploymentRequest(name=deployment), metadata=m
        ),
        "ListDeployments": lambda c, m: deployments(c).ListDeployments(
            deployment_api.ListDeploymentsRequest(), metadata=m
        ),
        "UpdateDeployment": lambda c, m: deployments(c).UpdateDeployment(
            deployment_api.UpdateDeploymentRequest(
                deployment=deployment_pb2.Deployment(name=deployment)
            ),
            metadata=m,
        ),
        "DeleteDeployment": lambda c, m: deployments(c).DeleteDeployment(
            deployment_api.DeleteDeploymentRequest(name=deployment), metadata=m
        ),
        "ExplainDeployment": lambda c, m: deployments(c).ExplainDeployment(
            deployment_api.ExplainDeploymentRequest(name=deployment), metadata=m
        ),
        "CreateApiKey": lambda c, m: keys(c).CreateApiKey(
            key_api.CreateApiKeyRequest(api_key=api_key_pb2.ApiKey(principal="Bad Id")),
            metadata=m,
        ),
        "GetApiKey": lambda c, m: keys(c).GetApiKey(key_api.GetApiKeyRequest(name=key), metadata=m),
        "ListApiKeys": lambda c, m: keys(c).ListApiKeys(key_api.ListApiKeysRequest(), metadata=m),
        "RevokeApiKey": lambda c, m: keys(c).RevokeApiKey(
            key_api.RevokeApiKeyRequest(name=key), metadata=m
        ),
        "RotateApiKey": lambda c, m: keys(c).RotateApiKey(
            key_api.RotateApiKeyRequest(name=key), metadata=m
        ),
        "CreateTask": lambda c, m: tasks(c).CreateTask(
            task_api.CreateTaskRequest(task_id="Bad Id", task=task_pb2.Task()), metadata=m
        ),
        "GetTask": lambda c, m: tasks(c).GetTask(task_api.GetTaskRequest(name=task), metadata=m),
        "ListTasks": lambda c, m: tasks(c).ListTasks(task_api.ListTasksRequest(), metadata=m),
        "CancelTask": lambda c, m: tasks(c).CancelTask(
            task_api.CancelTaskRequest(name=task), metadata=m
        ),
        "ClaimTask": lambda c, m: tasks(c).ClaimTask(
            task_api.ClaimTaskRequest(name="bad"), metadata=m
        ),
        "CompleteTask": lambda c, m: tasks(c).CompleteTask(
            task_api.CompleteTaskRequest(name="bad"), metadata=m
        ),
    }


EVERYONE = {"admin", "provider", "owner", "developer"}
OWNERS = {"admin", "owner"}
TASK_OWNERS = {"admin", "owner", "developer"}
# Who may make each call: written out here, not derived from the code under test.
ALLOWED: dict[str, set[str]] = {
    "GetNode": EVERYONE,
    "ListNodes": EVERYONE,
    "WatchNodes": EVERYONE,
    "CordonNode": {"admin", "provider"},
    "UncordonNode": {"admin", "provider"},
    "DrainNode": {"admin", "provider"},
    "DeleteNode": {"admin", "provider"},
    "UpdateNode": {"admin"},  # labels are facts: a provider's word is a claim
    "QuarantineNode": {"admin"},  # and the shard itself, on failed checks
    "CreateJoinToken": {"admin", "provider"},
    # Task owners (developers too) store sealed jobs and read sealed results.
    "UploadBlob": TASK_OWNERS,
    "GetBlob": TASK_OWNERS,
    "ReadBlob": TASK_OWNERS,
    "CreateModel": OWNERS,
    "GetModel": EVERYONE,
    "ListModels": EVERYONE,
    "UpdateModel": OWNERS,
    "DeleteModel": OWNERS,
    "CreateModelVersion": OWNERS,
    "GetModelVersion": EVERYONE,
    "ListModelVersions": EVERYONE,
    "DeleteModelVersion": OWNERS,
    "AddModelVersionCanaries": OWNERS,
    "CreateDeployment": OWNERS,
    "GetDeployment": OWNERS,
    "ListDeployments": OWNERS,
    "UpdateDeployment": OWNERS,
    "DeleteDeployment": OWNERS,
    "ExplainDeployment": OWNERS,
    "CreateApiKey": EVERYONE,
    "GetApiKey": EVERYONE,
    "ListApiKeys": EVERYONE,
    "RevokeApiKey": EVERYONE,
    "RotateApiKey": EVERYONE,
    "CreateTask": TASK_OWNERS,
    "GetTask": EVERYONE,  # providers see the tasks of their nodes
    "ListTasks": EVERYONE,
    "CancelTask": TASK_OWNERS,
    "ClaimTask": {"admin"},  # and node agents, with their node credentials
    "CompleteTask": {"admin"},
}


async def test_the_role_by_rpc_matrix(mesh: LocalMesh, secrets: dict[str, str]) -> None:
    calls = _calls()
    assert calls.keys() == ALLOWED.keys()
    who = {**secrets, "admin": mesh.admin_token, "anonymous": None}
    wrong: list[str] = []
    async with grpc.aio.insecure_channel(mesh.registry_address) as channel:
        for method, call in calls.items():
            for role, secret in who.items():
                try:
                    await call(channel, _auth(secret))
                    outcome = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as error:
                    outcome = error.code()
                    info = error_info(error)
                    # Refusals by ownership come later and carry another reason.
                    if outcome == grpc.StatusCode.PERMISSION_DENIED and info is not None:
                        assert info.reason == "PERMISSION_MISSING", (method, role, info.reason)
                except TimeoutError:
                    outcome = grpc.StatusCode.OK  # a watch that was let in and stayed open
                refused = outcome in REFUSED
                if refused == (role in ALLOWED[method]):
                    wrong.append(f"{method} as {role}: {outcome.name}")
                if role == "anonymous":
                    assert outcome == grpc.StatusCode.UNAUTHENTICATED, method
    assert wrong == []


async def test_keys_are_shown_once_listed_rotated_and_revoked(
    mesh: LocalMesh, secrets: dict[str, str]
) -> None:
    async with grpc.aio.insecure_channel(mesh.registry_address) as channel:
        keys = key_service_pb2_grpc.KeyServiceStub(channel)
        developer = _auth(secrets["developer"])
        # A developer makes itself a second key, narrowed to inference.
        made = await keys.CreateApiKey(
            key_api.CreateApiKeyRequest(
                api_key=api_key_pb2.ApiKey(
                    principal="perm-developer",
                    role=api_key_pb2.ROLE_DEVELOPER,
                    scopes=["inference"],
                    display_name="ci",
                )
            ),
            metadata=developer,
        )
        name, secret = made.api_key.name, made.secret
        fetched = await keys.GetApiKey(key_api.GetApiKeyRequest(name=name), metadata=developer)
        assert fetched.api_key.display_name == "ci"
        assert secret not in str(fetched)  # the secret is never shown again
        listed = await keys.ListApiKeys(key_api.ListApiKeysRequest(), metadata=developer)
        assert {k.principal for k in listed.api_keys} == {"perm-developer"}
        # An admin sees everyone's keys (on however many pages the session's keys fill).
        principals: set[str] = set()
        token = ""
        while True:
            page = await keys.ListApiKeys(
                key_api.ListApiKeysRequest(page_token=token), metadata=_auth(mesh.admin_token)
            )
            principals |= {k.principal for k in page.api_keys}
            if not (token := page.next_page_token):
                break
        assert {"perm-owner", "perm-developer"} <= principals

        # Scopes hold: the narrowed key may infer but not read models.
        models = model_service_pb2_grpc.ModelServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await models.ListModels(model_api.ListModelsRequest(), metadata=_auth(secret))
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED

        # Rotation: the old secret stops, the new one works.
        rotated = await keys.RotateApiKey(
            key_api.RotateApiKeyRequest(name=name), metadata=developer
        )
        assert rotated.secret != secret
        await _refused_everywhere(mesh, channel, secret, "BAD_CREDENTIALS")
        data = np.ones((1, 16), dtype=np.int32)
        triton.InferenceServerClient(mesh.router_address).infer(
            "simple", simple_inputs(data, data), headers=dict(_auth(rotated.secret))
        )

        # Revocation: refused at once by the registry, and by the router.
        revoked = await keys.RevokeApiKey(
            key_api.RevokeApiKeyRequest(name=name), metadata=developer
        )
        assert revoked.api_key.HasField("revoke_time")
        await _refused_everywhere(mesh, channel, rotated.secret, "KEY_REVOKED")


async def _refused_everywhere(
    mesh: LocalMesh, channel: grpc.aio.Channel, secret: str, reason: str
) -> None:
    keys = key_service_pb2_grpc.KeyServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await keys.ListApiKeys(key_api.ListApiKeysRequest(), metadata=_auth(secret))
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(raised.value).reason == reason  # type: ignore[union-attr]
    router = triton.InferenceServerClient(mesh.router_address)
    data = np.ones((1, 16), dtype=np.int32)
    refusal = await _eventually_refused(
        lambda: router.infer("simple", simple_inputs(data, data), headers=dict(_auth(secret)))
    )
    assert refusal == "StatusCode.UNAUTHENTICATED"


async def _eventually_refused(attempt: Callable[[], object]) -> str:
    """The status `attempt` fails with once the router has seen a change (through its watch)."""
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        try:
            attempt()
        except InferenceServerException as error:
            return str(error.status())
        assert asyncio.get_running_loop().time() < deadline, "the router never saw the change"
        await asyncio.sleep(0.05)


async def test_expired_keys_are_refused_and_nobody_escalates(
    mesh: LocalMesh, secrets: dict[str, str]
) -> None:
    async with grpc.aio.insecure_channel(mesh.registry_address) as channel:
        keys = key_service_pb2_grpc.KeyServiceStub(channel)
        # Long enough that a slow machine still uses the key before it lapses.
        soon = timestamp_pb2.Timestamp()
        soon.GetCurrentTime()
        soon.seconds += 5
        expiring = await _create_key(
            mesh.admin_channel(), "perm-brief", api_key_pb2.ROLE_DEVELOPER, expire_time=soon
        )
        await keys.ListApiKeys(key_api.ListApiKeysRequest(), metadata=_auth(expiring))
        await asyncio.sleep(max(0.0, soon.seconds - time.time()) + 1.0)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await keys.ListApiKeys(key_api.ListApiKeysRequest(), metadata=_auth(expiring))
        assert error_info(raised.value).reason == "KEY_EXPIRED"  # type: ignore[union-attr]

        for api_key in (
            api_key_pb2.ApiKey(principal="perm-developer", role=api_key_pb2.ROLE_ADMIN),
            api_key_pb2.ApiKey(principal="someone-else", role=api_key_pb2.ROLE_DEVELOPER),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await keys.CreateApiKey(
                    key_api.CreateApiKeyRequest(api_key=api_key),
                    metadata=_auth(secrets["developer"]),
                )
            assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await keys.CreateApiKey(
                key_api.CreateApiKeyRequest(
                    api_key=api_key_pb2.ApiKey(
                        principal="x", role=api_key_pb2.ROLE_DEVELOPER, scopes=["everything"]
                    )
                ),
                metadata=_auth(mesh.admin_token),
            )
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "api_key.scopes[0]" in (raised.value.details() or "")


async def test_owners_act_only_on_their_own_models(
    mesh: LocalMesh, secrets: dict[str, str], publisher: Publisher
) -> None:
    async with grpc.aio.insecure_channel(mesh.registry_address) as channel:
        other_owner = await _create_key(
            mesh.admin_channel(), "perm-other-owner", api_key_pb2.ROLE_OWNER
        )
        models = model_service_pb2_grpc.ModelServiceStub(channel)
        owner = _auth(secrets["owner"])
        created = await models.CreateModel(
            model_api.CreateModelRequest(
                model_id="perm-private", model=model_pb2.Model(description="mine")
            ),
            metadata=owner,
        )
        assert created.model.owner == "perm-owner"
        for metadata, code in (
            (_auth(other_owner), grpc.StatusCode.PERMISSION_DENIED),
            (_auth(secrets["developer"]), grpc.StatusCode.PERMISSION_DENIED),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await models.GetModel(
                    model_api.GetModelRequest(name="models/perm-private"), metadata=metadata
                )
            assert raised.value.code() == code
            listed = await models.ListModels(
                model_api.ListModelsRequest(page_size=1000), metadata=metadata
            )
            assert "models/perm-private" not in {m.name for m in listed.models}
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await models.DeleteModel(
                model_api.DeleteModelRequest(name="models/perm-private"),
                metadata=_auth(other_owner),
            )
        assert error_info(raised.value).reason == "NOT_YOURS"  # type: ignore[union-attr]
        deployments = deployment_service_pb2_grpc.DeploymentServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await deployments.CreateDeployment(
                deployment_api.CreateDeploymentRequest(
                    deployment_id="perm-hijack",
                    deployment=deployment_pb2.Deployment(
                        model="models/simple", targets=[target("1", 1)]
                    ),
                ),
                metadata=owner,
            )
        assert error_info(raised.value).reason == "NOT_YOURS"  # type: ignore[union-attr]
        await models.DeleteModel(
            model_api.DeleteModelRequest(name="models/perm-private"), metadata=owner
        )


async def test_private_models_serve_only_their_owner(
    mesh: LocalMesh, secrets: dict[str, str], publisher: Publisher
) -> None:
    await push_copy(publisher, "perm-secret-sauce")
    await publisher.models.UpdateModel(
        model_api.UpdateModelRequest(
            model=model_pb2.Model(
                name="models/perm-secret-sauce",
                owner="perm-owner",
                visibility=model_pb2.VISIBILITY_PRIVATE,
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["owner", "visibility"]),
        )
    )
    await publisher.deploy("perm-secret-sauce", [target("1", replicas=1)])
    await publisher.wait_available("deployments/perm-secret-sauce", timeout=60)
    router = triton.InferenceServerClient(mesh.router_address)
    data = np.ones((1, 16), dtype=np.int32)

    def infer(secret: str | None) -> Any:
        headers = {"authorization": f"Bearer {secret}"} if secret else None
        return router.infer("perm-secret-sauce", simple_inputs(data, data), headers=headers)

    assert await _eventually_refused(lambda: infer(None)) == "StatusCode.UNAUTHENTICATED"
    np.testing.assert_array_equal(infer(secrets["owner"]).as_numpy("OUTPUT0"), data * 2)
    infer(mesh.admin_token)
    for stranger in (secrets["developer"], secrets["provider"]):
        with pytest.raises(InferenceServerException) as raised:
            infer(stranger)
        assert raised.value.status() == "StatusCode.PERMISSION_DENIED"
    # Public models take anyone, and anonymous callers.
    np.testing.assert_array_equal(
        router.infer("simple", simple_inputs(data, data)).as_numpy("OUTPUT0"), data * 2
    )
    await publisher.deployments.DeleteDeployment(
        deployment_api.DeleteDeploymentRequest(name="deployments/perm-secret-sauce")
    )
