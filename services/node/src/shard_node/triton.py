"""The node's Triton: launching the real `tritonserver` from the nvidia-pytriton wheel, and
talking to it (readiness, model control, model states) over its KServe v2 gRPC API.

Launch recipe (see docs/architecture.md): the Python backend's stub must match the running
interpreter, so the agent assembles a backend directory from the wheel's backend and the stub
for this Python version. The stub embeds Python in isolated mode (it ignores PYTHONPATH), so it
finds its packages through PATH: the agent puts this environment's `bin` first, and the stub
resolves this virtual environment, with its numpy < 2, which the stub was built against.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import secrets
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import psutil
import tritonclient.grpc.aio as triton_grpc
from tritonclient.utils import InferenceServerException

from shard.node.v1 import node_pb2
from shard_core.process import ManagedProcess
from shard_node.sandbox import triton_policy

# How much of the sandbox a launched Triton runs in: all of it; its filesystem rules only (for
# kernels before 6.7, whose Landlock cannot restrict TCP); none (development only).
Sandboxing = Literal["strict", "filesystem", "off"]

_log = logging.getLogger(__name__)

_MODEL_STATES = {
    "READY": node_pb2.MODEL_STATE_READY,
    "LOADING": node_pb2.MODEL_STATE_LOADING,
    "UNAVAILABLE": node_pb2.MODEL_STATE_UNAVAILABLE,
    "UNLOADING": node_pb2.MODEL_STATE_UNAVAILABLE,
}


def _model_state(state: str, reason: str) -> node_pb2.ModelState.ValueType:
    if state == "UNAVAILABLE" and reason and reason != "unloaded":
        return node_pb2.MODEL_STATE_FAILED
    return _MODEL_STATES.get(state, node_pb2.MODEL_STATE_UNAVAILABLE)


def _pytriton_root() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the nvidia-pytriton wheel is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


@dataclass(frozen=True, kw_only=True)
class TritonPorts:
    grpc: int
    http: int
    metrics: int


# Triton's APIs that only the agent may call: loading and unloading model code, shared memory,
# and trace and log settings (which name files Triton writes). Everything else (health,
# metadata, config, inference, statistics) serves the shard.
RESTRICTED = "model-repository,shared-memory,trace,logging"
CONTROL_KEY = "shard-node-control"
# Triton expects the gRPC form of the header with this prefix.
GRPC_CONTROL_HEADER = f"triton-grpc-protocol-{CONTROL_KEY}"


def restricted_flags(control_key: str) -> list[str]:
    """Triton's flags that refuse its restricted APIs to callers without `control_key`."""
    return [
        f"--grpc-restricted-protocol={RESTRICTED}:{CONTROL_KEY}={control_key}",
        f"--http-restricted-api={RESTRICTED}:{CONTROL_KEY}={control_key}",
    ]


class TritonProcess:
    """A real `tritonserver` in explicit model-control mode, owned by this process. It listens
    on loopback only (the shard reaches it through the node's gate); its model control
    takes a key made here for each launch, which only the agent holds."""

    def __init__(
        self,
        *,
        model_repository: Path,
        state_dir: Path,
        ports: TritonPorts,
        sandbox: Sandboxing = "strict",
    ) -> None:
        self.ports = ports
        self.model_repository = model_repository
        self.control_key = secrets.token_urlsafe(32)
        self.grpc_url = f"127.0.0.1:{ports.grpc}"
        self.http_url = f"127.0.0.1:{ports.http}"
        root = _pytriton_root()
        server = root / "tritonserver"
        backends = self._assemble_backends(server, state_dir / "triton-backends")
        lib_dirs = [
            str(sysconfig.get_config_var("LIBDIR")),
            str(root.parent / "nvidia_pytriton.libs"),
        ]
        library_path = os.pathsep.join(lib_dirs)
        # The venv's `bin` first: the Python backend stub finds its interpreter on PATH.
        path = os.pathsep.join([str(Path(sys.executable).parent), "/usr/local/bin:/usr/bin:/bin"])
        program = [str(server / "bin" / "tritonserver")]
        env = {**os.environ, "LD_LIBRARY_PATH": library_path, "PATH": path}
        if sandbox != "off":
            temporary = state_dir / "triton-tmp"
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir(mode=0o700, parents=True)
            policy = triton_policy(
                programs=[str(server), *lib_dirs, str(backends), sys.prefix, sys.base_prefix],
                repository=str(model_repository.resolve()),
                temporary=str(temporary),
                ports=[ports.grpc, ports.http, ports.metrics],
                path=path,
                library_path=library_path,
                require_network_rules=sandbox == "strict",
            )
            program = [sys.executable, "-m", "shard_node.sandbox", policy.to_json(), "--", *program]
        self.process = ManagedProcess(
            "tritonserver",
            [
                *program,
                f"--model-repository={model_repository.resolve()}",
                f"--backend-directory={backends}",
                "--model-control-mode=explicit",
                "--grpc-address=127.0.0.1",
                f"--grpc-port={ports.grpc}",
                "--http-address=127.0.0.1",
                f"--http-port={ports.http}",
                "--metrics-address=127.0.0.1",
                f"--metrics-port={ports.metrics}",
                *restricted_flags(self.control_key),
                "--log-verbose=0",
                "--exit-timeout-secs=5",
            ],
            log_path=state_dir / "triton.log",
            env=env,
        )

    @staticmethod
    def _assemble_backends(server: Path, target: Path) -> Path:
        python_backend = target / "python"
        python_backend.mkdir(parents=True, exist_ok=True)
        for item in (server / "backends" / "python").iterdir():
            shutil.copy2(item, python_backend / item.name)
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = server / "python_backend_stubs" / version / "triton_python_backend_stub"
        shutil.copy2(stub, python_backend / stub.name)
        return target

    async def start(self, *, timeout: float = 60.0) -> None:
        self.process.start()
        async with TritonControl(self.grpc_url, self.control_key) as control:
            await self.process.wait_ready(control.ready, timeout=timeout)

    def stop(self) -> None:
        self.process.stop()


class TritonControl:
    """The agent's client of its Triton: readiness, version, model control and states."""

    def __init__(self, url: str, control_key: str | None) -> None:
        self.url = url
        self._client = triton_grpc.InferenceServerClient(url)
        self._pid: int | None = None
        # Sent with the calls Triton restricts: model control and the repository index.
        self._control = {GRPC_CONTROL_HEADER: control_key} if control_key else None

    async def __aenter__(self) -> TritonControl:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._client.close()

    async def ready(self) -> bool:
        try:
            return bool(await self._client.is_server_ready(client_timeout=2.0))
        except InferenceServerException:
            return False

    async def live(self) -> bool:
        try:
            return bool(await self._client.is_server_live(client_timeout=2.0))
        except InferenceServerException:
            return False

    async def version(self) -> str:
        metadata = await self._client.get_server_metadata(client_timeout=5.0)
        return str(metadata.version)

    async def load(self, model_name: str) -> None:
        _log.info("loading model %s", model_name)
        await self._client.load_model(model_name, headers=self._control, client_timeout=300.0)

    async def unload(self, model_name: str) -> None:
        _log.info("unloading model %s", model_name)
        await self._client.unload_model(model_name, headers=self._control, client_timeout=60.0)

    def memory_bytes(self, model_dir: Path) -> tuple[int, int] | None:
        """Resident memory of the Triton process itself, and of the backend processes serving
        the model in `model_dir` (the Python backend runs each model in processes of its own);
        None when this Triton's process cannot be seen."""
        process = self._process()
        if process is None:
            return None
        own = 0
        with contextlib.suppress(psutil.Error):
            own = process.memory_info().rss
        models = 0
        with contextlib.suppress(psutil.Error):
            for child in process.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if any(str(model_dir) in part for part in child.cmdline()):
                        models += child.memory_info().rss
        return own, models

    def _process(self) -> psutil.Process | None:
        """The local tritonserver serving `url`, found by its --grpc-port."""
        port = self.url.rsplit(":", 1)[-1]
        if self._pid is not None:
            with contextlib.suppress(psutil.Error):
                return psutil.Process(self._pid)
        for candidate in psutil.process_iter(["name", "cmdline"]):
            cmdline = candidate.info.get("cmdline") or []
            if candidate.info.get("name") == "tritonserver" and f"--grpc-port={port}" in cmdline:
                self._pid = candidate.pid
                return candidate
        return None

    async def model_statuses(self) -> list[node_pb2.ModelStatus]:
        """Every model version Triton knows, with its state; loaded versions only have numbers."""
        index = await self._client.get_model_repository_index(
            headers=self._control, client_timeout=5.0
        )
        return sorted(
            (
                node_pb2.ModelStatus(
                    model_name=model.name,
                    model_version=model.version,
                    state=_model_state(model.state, model.reason),
                    reason=model.reason,
                )
                for model in index.models
            ),
            key=lambda status: (status.model_name, status.model_version),
        )
