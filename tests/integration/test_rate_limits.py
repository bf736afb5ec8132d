"""Rate limits per key and per model: gRPC RESOURCE_EXHAUSTED, HTTP 429 with Retry-After."""

from __future__ import annotations

from typing import Any

import aiohttp
import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from google.protobuf import field_mask_pb2
from tritonclient.utils import InferenceServerException

from shard.auth.v1 import api_key_pb2, key_service_pb2_grpc
from shard.auth.v1 import key_service_pb2 as key_api
from shard.model.v1 import model_pb2
from shard.model.v1 import model_service_pb2 as model_api
from shard_tool.local import LocalMesh
from shard_tool.publish import Publisher
from tests.demo import push_copy, simple_inputs, target

BODY = {
    "inputs": [
        {"name": name, "datatype": "INT32", "shape": [1, 16], "data": list(range(16))}
        for name in ("INPUT0", "INPUT1")
    ]
}


def _outcome(
    router: triton.InferenceServerClient,
    model: str,
    data: np.ndarray[Any, Any],
    headers: dict[str, str] | None = None,
) -> str:
    try:
        router.infer(model, simple_inputs(data, data), headers=headers)
    except InferenceServerException as error:
        return str(error.status())
    return "ok"


async def test_a_key_over_its_rate_gets_429_and_resource_exhausted(mesh: LocalMesh) -> None:
    async with mesh.admin_channel() as channel:
        made = await key_service_pb2_grpc.KeyServiceStub(channel).CreateApiKey(
            key_api.CreateApiKeyRequest(
                api_key=api_key_pb2.ApiKey(
                    principal="limited", role=api_key_pb2.ROLE_DEVELOPER, rate_limit_rps=2
                )
            )
        )
    auth = {"Authorization": f"Bearer {made.secret}"}
    statuses = []
    async with aiohttp.ClientSession(base_url=mesh.gateway_url) as http:
        for _ in range(12):  # a burst of twice the rate passes, the rest is refused
            async with http.post("/v2/models/simple/infer", json=BODY, headers=auth) as response:
                statuses.append(response.status)
                if response.status == 429:
                    assert int(response.headers["Retry-After"]) >= 1
                    assert (await response.json())["reason"] == "RATE_LIMITED"
    assert statuses.count(200) >= 4
    assert 429 in statuses
    router = triton.InferenceServerClient(mesh.router_address)
    data = np.ones((1, 16), dtype=np.int32)
    grpc_auth = {"authorization": auth["Authorization"]}
    outcomes = [_outcome(router, "simple", data, grpc_auth) for _ in range(12)]
    assert "StatusCode.RESOURCE_EXHAUSTED" in outcomes


async def test_a_model_limit_holds_for_everyone(mesh: LocalMesh, publisher: Publisher) -> None:
    await push_copy(publisher, "limited-model")
    await publisher.models.UpdateModel(
        model_api.UpdateModelRequest(
            model=model_pb2.Model(name="models/limited-model", rate_limit_rps=1),
            update_mask=field_mask_pb2.FieldMask(paths=["rate_limit_rps"]),
        )
    )
    await publisher.deploy("limited-model", [target("1", replicas=1)])
    await publisher.wait_available("deployments/limited-model", timeout=60)
    router = triton.InferenceServerClient(mesh.router_address)
    data = np.ones((1, 16), dtype=np.int32)
    outcomes = [_outcome(router, "limited-model", data) for _ in range(10)]
    assert set(outcomes) == {"ok", "StatusCode.RESOURCE_EXHAUSTED"}
    assert outcomes.count("ok") <= 4  # a burst of 2, then about one a second
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await publisher.models.UpdateModel(
            model_api.UpdateModelRequest(
                model=model_pb2.Model(name="models/limited-model", rate_limit_rps=-1),
                update_mask=field_mask_pb2.FieldMask(paths=["rate_limit_rps"]),
            )
        )
    assert "model.rate_limit_rps" in (bad.value.details() or "")
