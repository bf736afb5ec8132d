"""The node's self-check, and the supervision of the Triton it launched.

Problems go up with every heartbeat; a node with any is DEGRADED and gets no traffic until they
clear. A launched Triton that dies is started again and its models loaded again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import psutil

from shard.node.v1 import node_pb2
from shard_node.inventory import gpu_load
from shard_node.models import ModelManager
from shard_node.triton import TritonControl, TritonProcess

_log = logging.getLogger(__name__)

TRITON_GRACE_S = 3.0


class HealthCheck:
    def __init__(
        self,
        *,
        triton: TritonControl,
        state_dir: Path,
        min_free_disk_bytes: int,
        expected_gpus: int,
        models: ModelManager,
    ) -> None:
        self._triton = triton
        self._models = models
        self._restart: str | None = None
        self._state_dir = state_dir
        self._min_free_disk_bytes = min_free_disk_bytes
        self._expected_gpus = expected_gpus
        self._triton_seen = time.monotonic()

    async def problems(self) -> list[str]:
        """Everything wrong with this node right now, as `REASON: detail`."""
        found = []
        # Liveness, not readiness: a strict Triton is not "ready" while it loads a model, and
        # each model's readiness is reported per model anyway. One missed probe on a busy
        # machine is not an outage: Triton is down once it has not answered for a while.
        if await self._triton.live():
            self._triton_seen = time.monotonic()
        elif time.monotonic() - self._triton_seen > TRITON_GRACE_S:
            found.append(f"TRITON_DOWN: Triton at {self._triton.url} does not answer")
        if self._restart is not None:
            statuses = await self._models.statuses()
            if all(status.state == node_pb2.MODEL_STATE_READY for status in statuses):
                self._restart = None
            else:
                found.append(f"TRITON_RESTARTED: {self._restart}; reloading its models")
        free = psutil.disk_usage(str(self._state_dir)).free
        if free < self._min_free_disk_bytes:
            found.append(f"DISK_LOW: {free >> 20} MiB free under {self._state_dir}")
        visible = len(await asyncio.to_thread(gpu_load))
        if visible < self._expected_gpus:
            found.append(f"GPU_LOST: {visible} of {self._expected_gpus} GPUs answer NVML")
        return found

    def restarted(self, why: str) -> None:
        """Triton was started again: the node is degraded until its models are back."""
        self._restart = why


async def supervise(
    triton: TritonProcess, models: ModelManager, health: HealthCheck, interval_s: float = 1.0
) -> None:
    """Restart the launched Triton whenever it dies, and load its models again."""
    while True:
        await asyncio.sleep(interval_s)
        if triton.process.running():
            continue
        health.restarted(f"Triton exited with {triton.process.returncode()}")
        _log.error(
            "Triton exited with %s; starting it again:\n%s",
            triton.process.returncode(),
            triton.process.log_tail(10),
        )
        try:
            await triton.start()
        except (RuntimeError, TimeoutError, OSError) as error:
            _log.error("Triton failed to start again: %s", error)
            continue
        models.reload()
