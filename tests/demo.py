"""The demo models as the tests use them: requests, copies under new names, scaling."""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import tritonclient.grpc as triton

from shard.deployment.v1 import deployment_pb2
from shard.model.v1 import model_pb2
from shard_tool.publish import Publisher, read_canaries

MODEL_REPOSITORY = Path(__file__).resolve().parent.parent / "infra" / "triton" / "models"


def simple_inputs(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> list[triton.InferInput]:
    """`INPUT0` and `INPUT1` of the `simple` model (INT32)."""
    inputs = []
    for name, data in (("INPUT0", a), ("INPUT1", b)):
        tensor = triton.InferInput(name, list(data.shape), "INT32")
        tensor.set_data_from_numpy(data.astype(np.int32))
        inputs.append(tensor)
    return inputs


def infer_simple(client: triton.InferenceServerClient) -> None:
    """One `simple` request whose answer is checked."""
    data = np.arange(16, dtype=np.int32).reshape(1, 16)
    result = client.infer("simple", simple_inputs(data, data))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data * 2)


async def push_copy(
    publisher: Publisher,
    model_id: str,
    *,
    source: str = "simple",
    versions: tuple[str, ...] = ("1",),
    response_cache_ttl_seconds: int = 0,
    canaries: bool = True,
) -> None:
    """Publish the demo model `source` again as `model_id`, with the given version numbers
    (and, unless `canaries` is off, its canaries: the shard then runs them now and then)."""
    source_dir = MODEL_REPOSITORY / source
    config = re.sub(r'^name: ".*"$', "", (source_dir / "config.pbtxt").read_text(), flags=re.M)
    await publisher.ensure_model(model_id, model_pb2.Model(visibility=model_pb2.VISIBILITY_PUBLIC))
    for version in versions:
        with tempfile.TemporaryDirectory() as tmp:
            version_dir = Path(tmp) / version
            shutil.copytree(source_dir / "1", version_dir)
            await publisher.push_version(
                model_id,
                version_dir,
                config,
                read_canaries(source_dir) if canaries else (),
                response_cache_ttl_seconds=response_cache_ttl_seconds,
            )


def target(version: str, replicas: int, weight: int = 1) -> deployment_pb2.DeploymentTarget:
    return deployment_pb2.DeploymentTarget(version=version, replicas=replicas, weight=weight)
