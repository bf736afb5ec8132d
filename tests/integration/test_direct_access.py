"""Direct-to-node clients authenticate like everyone else: a node's gate serves a caller only with
a client certificate the registry issued to its API key, for the models that key may use."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as triton_aio
from google.protobuf import field_mask_pb2
from google.rpc.error_details_pb2 import ErrorInfo
from tritonclient.utils import InferenceServerException

from shard.auth.v1 import api_key_pb2, key_service_pb2_grpc
from shard.auth.v1 import key_service_pb2 as key_api
from shard.deployment.v1 import deployment_service_pb2 as deployment_api
from shard.model.v1 import model_pb2
from shard.model.v1 import model_service_pb2 as model_api
from shard.node.v1.node_pb2 import MODEL_STATE_READY
from shard.node.v1.node_service_pb2 import ListNodesRequest
from shard.node.v1.node_service_pb2_grpc import NodeServiceStub
from shard_client.aio import InferenceServerClient
from shard_core import pki, tls
from shard_core.errors import error_info
from shard_node.identity import NodeIdentity
from shard_tool.local import LOCAL_NAME_LABEL, LocalMesh, NodeHandle
from shard_tool.publish import Publisher
from tests.demo import push_copy, simple_inputs, target

PRIVATE = "direct-private"
OWNER = "direct-owner"


@pytest.fixture(scope="module")
async def keys(mesh: LocalMesh) -> dict[str, str]:
    """An owner's key (the private model's) and a developer's."""
    secrets = {}
    async with mesh.admin_channel() as channel:
        stub = key_service_pb2_grpc.KeyServiceStub(channel)
        for principal, role in (
            (OWNER, api_key_pb2.ROLE_OWNER),
            ("direct-developer", api_key_pb2.ROLE_DEVELOPER),
        ):
            reply = await stub.CreateApiKey(
                key_api.CreateApiKeyRequest(
                    api_key=api_key_pb2.ApiKey(principal=principal, role=role)
                )
            )
            secrets[principal] = reply.secret
    return secrets


@pytest.fixture(scope="module")
async def node(mesh: LocalMesh) -> AsyncIterator[NodeHandle]:
    """The node serving the private model."""
    async with mesh.admin_channel() as admin:
        publisher = Publisher(channel=admin)
        await push_copy(publisher, PRIVATE, canaries=False)
        await publisher.models.UpdateModel(
            model_api.UpdateModelRequest(
                model=model_pb2.Model(
                    name=f"models/{PRIVATE}", owner=OWNER, visibility=model_pb2.VISIBILITY_PRIVATE
                ),
                update_mask=field_mask_pb2.FieldMask(paths=["owner", "visibility"]),
            )
        )
        await publisher.deploy(PRIVATE, [target("1", replicas=1)])
        await publisher.wait_available(f"deployments/{PRIVATE}", timeout=60)
        nodes = (await NodeServiceStub(admin).ListNodes(ListNodesRequest())).nodes
        (serving,) = [
            n
            for n in nodes
            if any(m.model_name == PRIVATE and m.state == MODEL_STATE_READY for m in n.models)
        ]
        yield mesh.nodes[serving.labels[LOCAL_NAME_LABEL]]
        await publisher.deployments.DeleteDeployment(
            deployment_api.DeleteDeploymentRequest(name=f"deployments/{PRIVATE}")
        )


async def _certificate(
    mesh: LocalMesh, secret: str, models: list[str], directory: Path
) -> tls.TlsIdentity:
    """A client certificate the registry issues to the key `secret`, written to `directory`."""
    key = pki.new_key()
    async with tls.channel(mesh.registry_address, None) as channel:
        reply = await key_service_pb2_grpc.KeyServiceStub(channel).IssueClientCertificate(
            key_api.IssueClientCertificateRequest(
                certificate_request=pki.certificate_request(key, None), models=models
            ),
            metadata=(("authorization", f"Bearer {secret}"),),
        )
    certificate = reply.certificate
    tls.write_identity(
        directory,
        chain=certificate.certificate_chain,
        key=pki.key_pem(key),
        bundle=certificate.trust_bundle,
    )
    return tls.TlsIdentity(directory)


def _info(error: grpc.aio.AioRpcError) -> ErrorInfo:
    info = error_info(error)
    assert info is not None, error
    return info


async def _issue_error(
    mesh: LocalMesh, secret: str, *, models: Sequence[str] = (), csr: bytes | None = None
) -> grpc.aio.AioRpcError:
    """The registry's refusal to issue the key `secret` a certificate."""
    request = key_api.IssueClientCertificateRequest(
        certificate_request=csr or pki.certificate_request(pki.new_key(), None),
        models=models,
    )
    metadata = (("authorization", f"Bearer {secret}"),) if secret else ()
    async with tls.channel(mesh.registry_address, None) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await key_service_pb2_grpc.KeyServiceStub(channel).IssueClientCertificate(
                request, metadata=metadata
            )
    return raised.value


def _node_client(
    mesh: LocalMesh, node: NodeHandle, identity: tls.TlsIdentity | None
) -> triton_aio.InferenceServerClient:
    """A tritonclient at the node's gate, presenting `identity` (or no certificate)."""
    workload = pki.node_workload("shard.local", _node_id(node))
    credentials = identity.channel_credentials() if identity else tls.trusting(mesh.ca_file)
    return triton_aio.InferenceServerClient(
        node.address,
        creds=credentials,
        channel_args=[("grpc.ssl_target_name_override", workload.dns)],
    )


def _node_id(node: NodeHandle) -> str:
    return NodeIdentity.load_or_create(node.state_dir).node_id


async def _ready_status(client: triton_aio.InferenceServerClient, model: str) -> str:
    """Whether the node's gate lets the question through (to a Triton that may or may not
    serve the model)."""
    try:
        await client.is_model_ready(model)
    except InferenceServerException as error:
        return str(error.status())
    finally:
        await client.close()
    return "OK"


async def _infer_status(client: triton_aio.InferenceServerClient, model: str) -> str:
    data = np.ones((1, 16), dtype=np.int32)
    try:
        await client.infer(model, simple_inputs(data, data))
    except InferenceServerException as error:
        return str(error.status())
    finally:
        await client.close()
    return "OK"


async def test_only_a_certificate_for_the_model_reaches_a_private_model_at_its_node(
    mesh: LocalMesh, keys: dict[str, str], node: NodeHandle, tmp_path: Path
) -> None:
    # No certificate (anonymous): the gate's handshake refuses it.
    assert await _infer_status(_node_client(mesh, node, None), PRIVATE) == "StatusCode.UNAVAILABLE"
    # A developer's key gets a certificate for public models only, which the node holds to.
    developer = await _certificate(mesh, keys["direct-developer"], ["simple"], tmp_path / "dev")
    assert await _ready_status(_node_client(mesh, node, developer), "simple") == "OK"
    assert await _ready_status(_node_client(mesh, node, developer), PRIVATE) == (
        "StatusCode.PERMISSION_DENIED"
    )
    assert await _infer_status(_node_client(mesh, node, developer), PRIVATE) == (
        "StatusCode.PERMISSION_DENIED"
    )
    # The owner's, for its model.
    owner = await _certificate(mesh, keys[OWNER], [PRIVATE], tmp_path / "owner")
    assert await _infer_status(_node_client(mesh, node, owner), PRIVATE) == "OK"


async def test_the_registry_issues_certificates_only_for_models_the_key_may_use(
    mesh: LocalMesh, keys: dict[str, str], node: NodeHandle
) -> None:
    developer = keys["direct-developer"]
    refused = await _issue_error(mesh, developer, models=[PRIVATE])
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
    refused = await _issue_error(mesh, developer, models=["no-such-model"])
    assert refused.code() == grpc.StatusCode.NOT_FOUND
    refused = await _issue_error(mesh, developer, models=["simple", "Bad Name"])
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _info(refused).metadata["field"] == "models[1]"
    refused = await _issue_error(mesh, developer, models=[f"m{i}" for i in range(300)])
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _info(refused).metadata["field"] == "models"
    refused = await _issue_error(mesh, "")
    assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
    # A request naming a workload (here, the router), or not a CSR at all.
    router = pki.Workload(trust_domain="shard.local", kind="service", name="router")
    refused = await _issue_error(
        mesh, developer, csr=pki.certificate_request(pki.new_key(), router)
    )
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _info(refused).reason == "BAD_CERTIFICATE_REQUEST"
    refused = await _issue_error(mesh, developer, csr=b"not a csr")
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _info(refused).metadata["field"] == "certificate_request"


async def test_the_sdk_routes_to_nodes_with_the_certificate_the_router_gets_it(
    mesh: LocalMesh, keys: dict[str, str], node: NodeHandle
) -> None:
    data = np.ones((1, 16), dtype=np.int32)
    async with InferenceServerClient(mesh.router_address, api_key=keys[OWNER]) as owner:
        result = await owner.infer(PRIVATE, simple_inputs(data, data))
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data * 2)
    async with InferenceServerClient(
        mesh.router_tls_address, api_key=keys["direct-developer"], ssl=True,
        root_certificates=str(mesh.ca_file),  # as tritonclient takes it
    ) as developer:  # fmt: skip
        result = await developer.infer("simple", simple_inputs(data, data))
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data * 2)
        with pytest.raises(InferenceServerException) as raised:
            await developer.infer(PRIVATE, simple_inputs(data, data))
        assert raised.value.status() == "StatusCode.NOT_FOUND"
