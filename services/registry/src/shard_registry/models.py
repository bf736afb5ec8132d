"""Models and their versions: what a model owner registers before deploying it.

A model version is immutable: its Triton configuration, validated on creation with Triton's own
`ModelConfig` protobuf, and its files, each a blob already in the artifact store whose size is
checked. Updates and deletes are optimistic: the `etag` is the record's etcd mod revision, and a
write against an older one is refused with ABORTED.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import PurePosixPath

from google.protobuf import field_mask_pb2, text_format
from tritonclient.grpc import model_config_pb2, service_pb2

from shard.model.v1 import model_pb2
from shard_core import keys
from shard_core.errors import (
    AbortedError,
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    require,
)
from shard_core.etcd import paging
from shard_core.etcd.store import EtcdStore
from shard_core.limits import check_rate
from shard_registry.artifacts import SHA256, BlobStore
from shard_registry.resources import (
    VERSION_ID,
    apply_mask,
    check_etag,
    check_id,
    parse_name,
    timestamp,
)

# What an update with no mask changes; the owner changes only when named (by an admin).
MODEL_UPDATED_BY_DEFAULT = (
    "description",
    "visibility",
    "labels",
    "rate_limit_rps",
    "verify_fraction",
)
MODEL_MUTABLE_FIELDS = (*MODEL_UPDATED_BY_DEFAULT, "owner")
MAX_CACHE_TTL_S = 7 * 24 * 3600
MAX_CANARIES = 1000


def _check_verify_fraction(value: float) -> None:
    if not 0 <= value <= 1:  # also refuses NaN
        raise InvalidArgumentError(
            "model.verify_fraction must be between 0 and 1",
            metadata={"field": "model.verify_fraction"},
        )


def _tensor_specs(tensors: Sequence[object]) -> list[model_pb2.TensorSpec]:
    return [
        model_pb2.TensorSpec(
            name=tensor.name,  # type: ignore[attr-defined]
            data_type=model_config_pb2.DataType.Name(tensor.data_type),  # type: ignore[attr-defined]
            dims=list(tensor.dims),  # type: ignore[attr-defined]
        )
        for tensor in tensors
    ]


def parse_config(text: str, model_id: str) -> model_config_pb2.ModelConfig:
    """Triton's `config.pbtxt`, parsed and checked the way Triton would refuse it."""
    field = "model_version.config"
    require(text, field)
    config = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as error:
        raise InvalidArgumentError(
            f"{field} is not a valid Triton model configuration: {error}",
            reason="BAD_MODEL_CONFIG",
            metadata={"field": field},
        ) from error
    if config.name and config.name != model_id:
        raise InvalidArgumentError(
            f"{field}.name is {config.name!r} but the model is {model_id!r}",
            reason="BAD_MODEL_CONFIG",
            metadata={"field": f"{field}.name"},
        )
    if not config.backend and not config.platform:
        raise InvalidArgumentError(
            f"{field} must name a backend or a platform",
            reason="BAD_MODEL_CONFIG",
            metadata={"field": f"{field}.backend"},
        )
    if config.max_batch_size < 0:
        raise InvalidArgumentError(
            f"{field}.max_batch_size must not be negative",
            reason="BAD_MODEL_CONFIG",
            metadata={"field": f"{field}.max_batch_size"},
        )
    for kind, tensors in (("input", config.input), ("output", config.output)):
        if not tensors:
            raise InvalidArgumentError(
                f"{field} declares no {kind}",
                reason="BAD_MODEL_CONFIG",
                metadata={"field": f"{field}.{kind}"},
            )
        names = set()
        for index, tensor in enumerate(tensors):
            where = f"{field}.{kind}[{index}]"
            if not tensor.name or tensor.name in names:
                raise InvalidArgumentError(
                    f"{where}.name must be set and unique",
                    reason="BAD_MODEL_CONFIG",
                    metadata={"field": f"{where}.name"},
                )
            names.add(tensor.name)
            if tensor.data_type == model_config_pb2.TYPE_INVALID:
                raise InvalidArgumentError(
                    f"{where} ({tensor.name}) has no data_type",
                    reason="BAD_MODEL_CONFIG",
                    metadata={"field": f"{where}.data_type"},
                )
            if not tensor.dims or any(dim < -1 or dim == 0 for dim in tensor.dims):
                raise InvalidArgumentError(
                    f"{where} ({tensor.name}) needs dims, each positive or -1",
                    reason="BAD_MODEL_CONFIG",
                    metadata={"field": f"{where}.dims"},
                )
    return config


def check_canaries(canaries: Sequence[model_pb2.Canary], input_names: set[str], field: str) -> None:
    """Refuse canaries that are not a request and an answer the version could give."""
    if len(canaries) > MAX_CANARIES:
        raise InvalidArgumentError(
            f"a version has at most {MAX_CANARIES} canaries", metadata={"field": field}
        )
    for index, canary in enumerate(canaries):
        where = f"{field}[{index}]"
        try:
            request = service_pb2.ModelInferRequest.FromString(canary.request)
            response = service_pb2.ModelInferResponse.FromString(canary.response)
        except Exception as error:
            raise InvalidArgumentError(
                f"{where} must hold a serialized ModelInferRequest and ModelInferResponse",
                metadata={"field": where},
            ) from error
        names = {tensor.name for tensor in request.inputs}
        if (
            not names
            or not names <= input_names
            or len(request.raw_input_contents) != len(request.inputs)
        ):
            raise InvalidArgumentError(
                f"{where}.request must give the version's inputs in raw_input_contents",
                metadata={"field": f"{where}.request"},
            )
        if not response.outputs or len(response.raw_output_contents) != len(response.outputs):
            raise InvalidArgumentError(
                f"{where}.response must give outputs with raw_output_contents",
                metadata={"field": f"{where}.response"},
            )


def _check_path(path: str, field: str) -> None:
    pure = PurePosixPath(path)
    if (
        not path
        or pure.is_absolute()
        or any(part in {"", ".", ".."} for part in path.split("/"))
        or "\\" in path
    ):
        raise InvalidArgumentError(
            f"{field} {path!r} must be a relative path without '.', '..' or empty parts",
            metadata={"field": field},
        )


def _check_visibility(visibility: int) -> None:
    """Refuse a visibility the API does not define (proto3 lets any number through)."""
    if visibility not in model_pb2.Visibility.values():
        raise InvalidArgumentError(
            f"model.visibility {visibility} is not one of {', '.join(model_pb2.Visibility.keys())}",
            metadata={"field": "model.visibility"},
        )


class ModelRegistry:
    def __init__(
        self, *, store: EtcdStore, blobs: BlobStore, clock: Callable[[], float] = time.time
    ) -> None:
        self._store = store
        self._blobs = blobs
        self._clock = clock

    # -- models -----------------------------------------------------------------------------

    async def create_model(self, model_id: str, model: model_pb2.Model) -> model_pb2.Model:
        check_id(model_id, "model_id")
        check_rate(model.rate_limit_rps, "model.rate_limit_rps")
        _check_verify_fraction(model.verify_fraction)
        _check_visibility(model.visibility)
        now = timestamp(self._clock())
        record = model_pb2.Model()
        record.CopyFrom(model)
        record.name = f"models/{model_id}"
        record.etag = ""
        if record.visibility == model_pb2.VISIBILITY_UNSPECIFIED:
            record.visibility = model_pb2.VISIBILITY_PRIVATE
        record.create_time.CopyFrom(now)
        record.update_time.CopyFrom(now)
        revision = await self._store.write(
            puts={keys.model(model_id): record.SerializeToString()},
            expect={keys.model(model_id): 0},
        )
        if revision is None:
            raise AlreadyExistsError(
                f"model models/{model_id} already exists", metadata={"name": record.name}
            )
        record.etag = str(revision)
        return record

    async def _read_model(self, model_id: str) -> tuple[model_pb2.Model, int]:
        found = await self._store.get(keys.model(model_id))
        if found is None:
            raise NotFoundError(
                f"model models/{model_id} not found", metadata={"name": f"models/{model_id}"}
            )
        model = model_pb2.Model.FromString(found.value)
        model.etag = str(found.mod_revision)
        return model, found.mod_revision

    async def get_model(self, name: str) -> model_pb2.Model:
        (model_id,) = parse_name(name, "models/{}")
        model, _ = await self._read_model(model_id)
        return model

    async def list_models(
        self, *, page_size: int, page_token: str
    ) -> tuple[list[model_pb2.Model], str]:
        entries, token = await paging.page(
            self._store, keys.MODELS, page_size=page_size, page_token=page_token
        )
        models = []
        for entry in entries:
            model = model_pb2.Model.FromString(entry.value)
            model.etag = str(entry.mod_revision)
            models.append(model)
        return models, token

    async def update_model(
        self, model: model_pb2.Model, mask: field_mask_pb2.FieldMask
    ) -> model_pb2.Model:
        (model_id,) = parse_name(model.name, "models/{}", "model.name")
        current, revision = await self._read_model(model_id)
        check_etag(model.etag, revision, model.name)
        apply_mask(current, model, mask, MODEL_MUTABLE_FIELDS)
        check_rate(current.rate_limit_rps, "model.rate_limit_rps")
        _check_verify_fraction(current.verify_fraction)
        _check_visibility(current.visibility)
        current.etag = ""
        current.update_time.CopyFrom(timestamp(self._clock()))
        written = await self._store.write(
            puts={keys.model(model_id): current.SerializeToString()},
            expect={keys.model(model_id): revision},
        )
        if written is None:
            raise AbortedError(
                f"{model.name} changed during the update; read it again and retry",
                reason="ETAG_MISMATCH",
                metadata={"name": model.name},
            )
        current.etag = str(written)
        return current

    async def delete_model(self, name: str, etag: str) -> None:
        (model_id,) = parse_name(name, "models/{}")
        _, revision = await self._read_model(model_id)
        check_etag(etag, revision, name)
        versions, _ = await self._store.page(keys.versions(model_id), start_after="", limit=1)
        if versions:
            raise FailedPreconditionError(
                f"{name} still has versions; delete them first",
                reason="MODEL_HAS_VERSIONS",
                metadata={"name": name},
            )
        key = keys.model(model_id)
        if await self._store.write(deletes=[key], expect={key: revision}) is None:
            raise AbortedError(f"{name} changed during the delete", reason="ETAG_MISMATCH")

    # -- versions ---------------------------------------------------------------------------

    async def create_version(
        self, parent: str, version_id: str, version: model_pb2.ModelVersion
    ) -> model_pb2.ModelVersion:
        (model_id,) = parse_name(parent, "models/{}", "parent")
        require(version_id, "model_version_id")
        if not VERSION_ID.fullmatch(version_id):
            raise InvalidArgumentError(
                f"model_version_id {version_id!r} must be a positive decimal number without "
                "leading zeros",
                metadata={"field": "model_version_id"},
            )
        await self._read_model(model_id)
        config = parse_config(version.config, model_id)
        await self._check_files(version.files, config)
        check_canaries(
            version.canaries, {tensor.name for tensor in config.input}, "model_version.canaries"
        )
        if not 0 <= version.response_cache_ttl_seconds <= MAX_CACHE_TTL_S:
            raise InvalidArgumentError(
                f"model_version.response_cache_ttl_seconds must be between 0 and {MAX_CACHE_TTL_S}",
                metadata={"field": "model_version.response_cache_ttl_seconds"},
            )
        record = model_pb2.ModelVersion(
            name=f"{parent}/versions/{version_id}",
            config=version.config,
            files=version.files,
            backend=config.backend or config.platform,
            max_batch_size=config.max_batch_size,
            inputs=_tensor_specs(config.input),
            outputs=_tensor_specs(config.output),
            size_bytes=sum(file.size_bytes for file in version.files),
            canaries=version.canaries,
            create_time=timestamp(self._clock()),
            response_cache_ttl_seconds=version.response_cache_ttl_seconds,
        )
        key = keys.version(model_id, version_id)
        if await self._store.write(puts={key: record.SerializeToString()}, expect={key: 0}) is None:
            raise AlreadyExistsError(
                f"{record.name} already exists; versions are immutable",
                metadata={"name": record.name},
            )
        return record

    async def _check_files(
        self, files: Sequence[model_pb2.ModelFile], config: model_config_pb2.ModelConfig
    ) -> None:
        if not files:
            raise InvalidArgumentError(
                "model_version.files must list the version's files",
                metadata={"field": "model_version.files"},
            )
        seen = set()
        for index, file in enumerate(files):
            where = f"model_version.files[{index}]"
            _check_path(file.path, f"{where}.path")
            if file.path in seen:
                raise InvalidArgumentError(
                    f"{where}.path {file.path!r} is listed twice",
                    metadata={"field": f"{where}.path"},
                )
            seen.add(file.path)
            if not SHA256.fullmatch(file.sha256):
                raise InvalidArgumentError(
                    f"{where}.sha256 must be 64 lowercase hex digits",
                    metadata={"field": f"{where}.sha256"},
                )
            blob = await self._blobs.stat(file.sha256)
            if blob is None:
                raise FailedPreconditionError(
                    f"{where}.sha256: no blob blobs/{file.sha256} was uploaded",
                    reason="BLOB_NOT_FOUND",
                    metadata={"field": f"{where}.sha256"},
                )
            if blob.size_bytes != file.size_bytes:
                raise InvalidArgumentError(
                    f"{where}.size_bytes is {file.size_bytes} but blob blobs/{file.sha256} has "
                    f"{blob.size_bytes} bytes",
                    metadata={"field": f"{where}.size_bytes"},
                )
        if config.backend == "python" and "model.py" not in seen:
            raise InvalidArgumentError(
                "a Python-backend version needs a model.py in model_version.files",
                metadata={"field": "model_version.files"},
            )

    async def get_version(self, name: str) -> model_pb2.ModelVersion:
        model_id, version_id = parse_name(name, "models/{}/versions/{}")
        found = await self._store.get(keys.version(model_id, version_id))
        if found is None:
            raise NotFoundError(f"model version {name} not found", metadata={"name": name})
        return model_pb2.ModelVersion.FromString(found.value)

    async def add_canaries(
        self, name: str, canaries: Sequence[model_pb2.Canary]
    ) -> model_pb2.ModelVersion:
        """Add known answers to a version's pool (compare-and-swap on its record)."""
        model_id, version_id = parse_name(name, "models/{}/versions/{}")
        require(canaries, "canaries")
        key = keys.version(model_id, version_id)
        while True:
            found = await self._store.get(key)
            if found is None:
                raise NotFoundError(f"model version {name} not found", metadata={"name": name})
            version = model_pb2.ModelVersion.FromString(found.value)
            config = parse_config(version.config, model_id)
            if len(version.canaries) + len(canaries) > MAX_CANARIES:
                raise InvalidArgumentError(
                    f"a version has at most {MAX_CANARIES} canaries; {name} has "
                    f"{len(version.canaries)}",
                    metadata={"field": "canaries"},
                )
            check_canaries(canaries, {tensor.name for tensor in config.input}, "canaries")
            version.canaries.extend(canaries)
            value = version.SerializeToString()
            if await self._store.write(puts={key: value}, expect={key: found.mod_revision}):
                return version

    async def list_versions(
        self, parent: str, *, page_size: int, page_token: str
    ) -> tuple[list[model_pb2.ModelVersion], str]:
        (model_id,) = parse_name(parent, "models/{}", "parent")
        await self._read_model(model_id)
        entries, token = await paging.page(
            self._store, keys.versions(model_id), page_size=page_size, page_token=page_token
        )
        return [model_pb2.ModelVersion.FromString(entry.value) for entry in entries], token

    async def delete_version(
        self, name: str, *, in_use: Callable[[str, str], Awaitable[bool]]
    ) -> None:
        model_id, version_id = parse_name(name, "models/{}/versions/{}")
        await self.get_version(name)
        if await in_use(model_id, version_id):
            raise FailedPreconditionError(
                f"{name} is deployed; remove it from its deployment first",
                reason="VERSION_DEPLOYED",
                metadata={"name": name},
            )
        await self._store.delete(keys.version(model_id, version_id))
