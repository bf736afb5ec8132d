"""ModelService: models and versions, validated configs and files, optimistic concurrency."""

from __future__ import annotations

import uuid
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from shard.model.v1 import model_pb2
from shard.model.v1 import model_service_pb2 as api
from shard_core.errors import error_info
from shard_tool.publish import Publisher
from tests.demo import MODEL_REPOSITORY

SIMPLE_CONFIG = (
    (MODEL_REPOSITORY / "simple" / "config.pbtxt").read_text().replace('name: "simple"', "")
)


@pytest.fixture
def model_id() -> str:
    return f"m-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def model_file(publisher: Publisher, tmp_path: Any) -> model_pb2.ModelFile:
    path = tmp_path / "model.py"
    path.write_text((MODEL_REPOSITORY / "simple" / "1" / "model.py").read_text())
    uploaded = await publisher.upload(path)
    uploaded.path = "model.py"
    return uploaded


async def _refused(call: Any, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    assert raised.value.code() == code, raised.value.details()
    return raised.value


def _field(error: grpc.aio.AioRpcError) -> str:
    info = error_info(error)
    assert info is not None
    return str(info.metadata["field"])


async def test_model_lifecycle_with_etags(publisher: Publisher, model_id: str) -> None:
    models = publisher.models
    created = (
        await models.CreateModel(
            api.CreateModelRequest(
                model_id=model_id,
                model=model_pb2.Model(description="first", labels={"team": "a"}, owner="ann"),
            )
        )
    ).model
    assert created.name == f"models/{model_id}"
    assert created.visibility == model_pb2.VISIBILITY_PRIVATE
    assert created.etag
    fetched = (await models.GetModel(api.GetModelRequest(name=created.name))).model
    assert fetched == created

    change = model_pb2.Model(name=created.name, description="second", etag=created.etag)
    updated = (
        await models.UpdateModel(
            api.UpdateModelRequest(
                model=change, update_mask=field_mask_pb2.FieldMask(paths=["description"])
            )
        )
    ).model
    assert updated.description == "second"
    assert updated.labels == {"team": "a"}  # not in the mask: untouched
    assert updated.etag != created.etag

    # The old etag is stale now: the second writer loses, with ABORTED.
    stale = model_pb2.Model(name=created.name, description="third", etag=created.etag)
    error = await _refused(
        models.UpdateModel(
            api.UpdateModelRequest(
                model=stale, update_mask=field_mask_pb2.FieldMask(paths=["description"])
            )
        ),
        grpc.StatusCode.ABORTED,
    )
    assert error_info(error).reason == "ETAG_MISMATCH"  # type: ignore[union-attr]
    await _refused(
        models.DeleteModel(api.DeleteModelRequest(name=created.name, etag=created.etag)),
        grpc.StatusCode.ABORTED,
    )
    await models.DeleteModel(api.DeleteModelRequest(name=created.name, etag=updated.etag))
    await _refused(
        models.GetModel(api.GetModelRequest(name=created.name)), grpc.StatusCode.NOT_FOUND
    )


@pytest.mark.parametrize(
    ("mask", "field"),
    [(["create_time"], "update_mask"), (["no_such_field"], "update_mask")],
)
async def test_update_mask_names_only_mutable_fields(
    publisher: Publisher, model_id: str, mask: list[str], field: str
) -> None:
    await publisher.ensure_model(model_id, model_pb2.Model())
    error = await _refused(
        publisher.models.UpdateModel(
            api.UpdateModelRequest(
                model=model_pb2.Model(name=f"models/{model_id}"),
                update_mask=field_mask_pb2.FieldMask(paths=mask),
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert _field(error) == field


@pytest.mark.parametrize("bad_id", ["", "Upper", "-lead", "a/b", "x" * 64])
async def test_bad_model_ids_are_refused(publisher: Publisher, bad_id: str) -> None:
    error = await _refused(
        publisher.models.CreateModel(
            api.CreateModelRequest(model_id=bad_id, model=model_pb2.Model())
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert _field(error) == "model_id"


async def test_duplicate_model_is_already_exists(publisher: Publisher, model_id: str) -> None:
    await publisher.ensure_model(model_id, model_pb2.Model())
    await _refused(
        publisher.models.CreateModel(
            api.CreateModelRequest(model_id=model_id, model=model_pb2.Model())
        ),
        grpc.StatusCode.ALREADY_EXISTS,
    )


async def test_versions_are_validated_listed_in_order_and_immutable(
    publisher: Publisher, model_id: str, model_file: model_pb2.ModelFile
) -> None:
    await publisher.ensure_model(model_id, model_pb2.Model())
    for version in ("10", "2", "1"):
        created = (
            await publisher.models.CreateModelVersion(
                api.CreateModelVersionRequest(
                    parent=f"models/{model_id}",
                    model_version_id=version,
                    model_version=model_pb2.ModelVersion(config=SIMPLE_CONFIG, files=[model_file]),
                )
            )
        ).model_version
    assert created.backend == "python"
    assert created.max_batch_size == 8
    assert [t.name for t in created.inputs] == ["INPUT0", "INPUT1"]
    assert created.inputs[0].data_type == "TYPE_INT32"
    assert list(created.inputs[0].dims) == [16]
    listed = await publisher.models.ListModelVersions(
        api.ListModelVersionsRequest(parent=f"models/{model_id}")
    )
    assert [v.name.rsplit("/", 1)[1] for v in listed.model_versions] == ["1", "2", "10"]
    await _refused(
        publisher.models.CreateModelVersion(
            api.CreateModelVersionRequest(
                parent=f"models/{model_id}",
                model_version_id="2",
                model_version=model_pb2.ModelVersion(config=SIMPLE_CONFIG, files=[model_file]),
            )
        ),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    # A model with versions cannot be deleted.
    error = await _refused(
        publisher.models.DeleteModel(api.DeleteModelRequest(name=f"models/{model_id}")),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert error_info(error).reason == "MODEL_HAS_VERSIONS"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("version_id", "config", "file_changes", "code", "field"),
    [
        ("1", "not { a config", {}, grpc.StatusCode.INVALID_ARGUMENT, "model_version.config"),
        ("1", 'name: "other"\n' + SIMPLE_CONFIG, {}, grpc.StatusCode.INVALID_ARGUMENT,
         "model_version.config.name"),
        ("1", 'backend: "python"\ninput [{name: "X" data_type: TYPE_FP32 dims: [1]}]', {},
         grpc.StatusCode.INVALID_ARGUMENT, "model_version.config.output"),
        ("1", SIMPLE_CONFIG.replace("dims: [ 16 ]", "dims: [ 0 ]", 1), {},
         grpc.StatusCode.INVALID_ARGUMENT, "model_version.config.input[0].dims"),
        ("1", "", {}, grpc.StatusCode.INVALID_ARGUMENT, "model_version.config"),
        ("1", SIMPLE_CONFIG, {"sha256": "0" * 64}, grpc.StatusCode.FAILED_PRECONDITION,
         "model_version.files[0].sha256"),
        ("1", SIMPLE_CONFIG, {"sha256": "not-a-hash"}, grpc.StatusCode.INVALID_ARGUMENT,
         "model_version.files[0].sha256"),
        ("1", SIMPLE_CONFIG, {"size_bytes": 1}, grpc.StatusCode.INVALID_ARGUMENT,
         "model_version.files[0].size_bytes"),
        ("1", SIMPLE_CONFIG, {"path": "../model.py"}, grpc.StatusCode.INVALID_ARGUMENT,
         "model_version.files[0].path"),
        ("1", SIMPLE_CONFIG, {"path": "other.py"}, grpc.StatusCode.INVALID_ARGUMENT,
         "model_version.files"),
        ("01", SIMPLE_CONFIG, {}, grpc.StatusCode.INVALID_ARGUMENT, "model_version_id"),
        ("v1", SIMPLE_CONFIG, {}, grpc.StatusCode.INVALID_ARGUMENT, "model_version_id"),
    ],
)  # fmt: skip
async def test_bad_versions_are_refused_naming_the_field(
    publisher: Publisher,
    model_id: str,
    model_file: model_pb2.ModelFile,
    version_id: str,
    config: str,
    file_changes: dict[str, Any],
    code: grpc.StatusCode,
    field: str,
) -> None:
    await publisher.ensure_model(model_id, model_pb2.Model())
    file = model_pb2.ModelFile()
    file.CopyFrom(model_file)
    for name, value in file_changes.items():
        setattr(file, name, value)

    error = await _refused(
        publisher.models.CreateModelVersion(
            api.CreateModelVersionRequest(
                parent=f"models/{model_id}",
                model_version_id=version_id,
                model_version=model_pb2.ModelVersion(config=config, files=[file]),
            )
        ),
        code,
    )
    assert _field(error) == field
    assert field.split("[", maxsplit=1)[0].split(".", maxsplit=1)[0] in (error.details() or "")
    listed = await publisher.models.ListModelVersions(
        api.ListModelVersionsRequest(parent=f"models/{model_id}")
    )
    assert list(listed.model_versions) == []
