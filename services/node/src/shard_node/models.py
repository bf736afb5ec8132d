"""Converging the node's Triton to its assignments.

The registry sends the complete set of model versions the node must serve. For each new one the
agent fetches every file from the artifact store, checks its SHA-256 and size while writing it,
lays the version out in its own Triton model repository (the configuration pinned to this model
name and version) and loads it; it measures the memory the load took. A model no longer assigned
is unloaded and its files removed. States (LOADING, READY, FAILED with the reason) go up with
every heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import uuid
from pathlib import Path

import grpc
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

from shard.node.v1 import node_pb2
from shard_client.blobs import BlobError, download
from shard_node.registry_calls import RegistryCalls
from shard_node.triton import TritonControl

_log = logging.getLogger(__name__)

STAGING = ".staging"
RETRY_S = 30.0


class FetchError(Exception):
    """A model file could not be fetched or did not verify."""


def pinned_config(config_text: str, model_name: str, version: str) -> str:
    """The version's configuration, named for the model and serving exactly this version."""
    config = model_config_pb2.ModelConfig()
    text_format.Parse(config_text, config)
    config.name = model_name
    config.version_policy.Clear()
    config.version_policy.specific.versions.append(int(version))
    return text_format.MessageToString(config)


def _measured(before: tuple[int, int] | None, after: tuple[int, int] | None) -> int:
    """Memory a load took: its own backend processes, plus what Triton itself grew by (in-process
    backends). Loads run in parallel, so the second part can include a neighbour's growth: it
    errs towards more, which never overcommits a node."""
    if before is None or after is None:
        return 0
    return after[1] + max(after[0] - before[0], 0)


class ModelManager:
    def __init__(
        self,
        *,
        triton: TritonControl,
        repository: Path,
        registry: RegistryCalls,
    ) -> None:
        self._triton = triton
        self._repository = repository
        self._registry = registry
        self._desired: dict[str, node_pb2.ModelAssignment] = {}
        self._installed: dict[str, str] = {}  # model -> version loaded (or loading)
        self._states: dict[str, node_pb2.ModelStatus] = {}
        self._memory: dict[str, int] = {}
        self._changed = asyncio.Event()
        repository.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(repository / STAGING, ignore_errors=True)

    def reload(self) -> None:
        """Triton started afresh with nothing loaded: install every assignment again."""
        self._installed.clear()
        self._states.clear()
        self._changed.set()

    def assign(self, assignments: list[node_pb2.ModelAssignment]) -> None:
        """Take the registry's complete set of assignments; converging happens in `run`."""
        self._desired = {assignment.model_name: assignment for assignment in assignments}
        self._changed.set()

    async def run(self) -> None:
        """Converge Triton to the assignments each time they change, and retry failed models
        every `RETRY_S` until they load."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), RETRY_S)
            self._changed.clear()
            try:
                await self._converge()
            except Exception:
                _log.exception("converging Triton failed; retrying")

    async def _converge(self) -> None:
        for model in [m for m in self._installed if m not in self._desired]:
            await self._remove(model)
        for model, assignment in list(self._desired.items()):
            if (
                self._installed.get(model) == assignment.model_version
                and self._states.get(model, node_pb2.ModelStatus()).state
                != node_pb2.MODEL_STATE_FAILED
            ):
                continue
            if model in self._installed:
                await self._remove(model)
            await self._install(assignment)

    def _state(self, assignment: node_pb2.ModelAssignment, state: int, reason: str = "") -> None:
        self._states[assignment.model_name] = node_pb2.ModelStatus(
            model_name=assignment.model_name,
            model_version=assignment.model_version,
            state=state,  # type: ignore[arg-type]
            reason=reason,
        )

    async def _install(self, assignment: node_pb2.ModelAssignment) -> None:
        model, version = assignment.model_name, assignment.model_version
        self._installed[model] = version
        self._state(assignment, node_pb2.MODEL_STATE_LOADING)
        staging = self._repository / STAGING / f"{model}-{uuid.uuid4().hex}"
        try:
            for file in assignment.files:
                await self._fetch(file.sha256, file.size_bytes, staging / version / file.path)
            (staging / "config.pbtxt").write_text(pinned_config(assignment.config, model, version))
            target = self._repository / model
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
            before = self._triton.memory_bytes(target)
            await self._triton.load(model)
            after = self._triton.memory_bytes(target)
        except (FetchError, InferenceServerException, OSError, text_format.ParseError) as error:
            _log.warning("model %s version %s failed: %s", model, version, error)
            self._state(assignment, node_pb2.MODEL_STATE_FAILED, str(error)[:1000])
            return
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self._states.pop(model, None)
        measured = _measured(before, after)
        self._memory[model] = measured
        _log.info("model %s version %s loaded, %d MiB", model, version, measured >> 20)

    async def _fetch(self, sha256: str, size: int, path: Path) -> None:
        """Stream a blob from the artifact store to `path`, checking its hash and size."""
        try:
            received = await download(
                self._registry.artifacts, f"blobs/{sha256}", path, metadata=self._registry.metadata
            )
        except (BlobError, grpc.aio.AioRpcError) as error:
            raise FetchError(f"fetching blobs/{sha256} failed: {error}") from error
        if received != size:
            raise FetchError(f"blobs/{sha256} has {received} bytes, expected {size}")

    async def _remove(self, model: str) -> None:
        self._installed.pop(model, None)
        self._states.pop(model, None)
        self._memory.pop(model, None)
        try:
            await self._triton.unload(model)
        except InferenceServerException as error:
            _log.warning("unloading %s failed: %s", model, error)
        shutil.rmtree(self._repository / model, ignore_errors=True)

    async def statuses(self) -> list[node_pb2.ModelStatus]:
        """The state of every assigned model: the agent's own (loading, failed) where it has
        one, Triton's otherwise, with the memory measured at load."""
        try:
            reported = {status.model_name: status for status in await self._triton.model_statuses()}
        except InferenceServerException as error:
            reported = {}
            unreachable = f"Triton unreachable: {error}"[:1000]
        else:
            unreachable = ""
        statuses = []
        for model, assignment in sorted(self._desired.items()):
            status = node_pb2.ModelStatus()
            if model in self._states:
                status.CopyFrom(self._states[model])
            elif model in reported and reported[model].model_version == assignment.model_version:
                status.CopyFrom(reported[model])
                status.memory_bytes = self._memory.get(model, 0)
            else:
                status.model_name, status.model_version = model, assignment.model_version
                status.state = (
                    node_pb2.MODEL_STATE_UNAVAILABLE
                    if unreachable or model in self._installed
                    else node_pb2.MODEL_STATE_LOADING
                )
                status.reason = unreachable
            statuses.append(status)
        return statuses
