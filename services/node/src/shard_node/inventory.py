"""What this machine has and how loaded it is, read from the machine itself.

GPUs come from NVML (`nvidia-ml-py`) where a driver is present, and each is looked up among the
PCI devices in sysfs, so a GPU that NVML reports but the bus does not have is noticed. A machine
without NVIDIA GPUs is a valid, CPU-only node.
"""

from __future__ import annotations

import contextlib
import logging
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pynvml
from prometheus_client.parser import text_string_to_metric_families

from shard.node.v1 import node_pb2

_log = logging.getLogger(__name__)

NVIDIA_PCI_VENDOR = "0x10de"
SYSFS_PCI = Path("/sys/bus/pci/devices")


@contextlib.contextmanager
def _nvml() -> Iterator[bool]:
    """NVML for the duration of the block; False when there is no driver."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        yield False
        return
    try:
        yield True
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def gpus() -> list[node_pb2.GpuDevice]:
    with _nvml() as present:
        if not present:
            return []
        found = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            found.append(
                node_pb2.GpuDevice(
                    model=_text(pynvml.nvmlDeviceGetName(handle)),
                    memory_bytes=int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
                    uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                    pci_bus_id=_text(pynvml.nvmlDeviceGetPciInfo(handle).busId),
                )
            )
        return found


def on_pci_bus(gpu: node_pb2.GpuDevice, sysfs: Path = SYSFS_PCI) -> bool:
    """Whether the GPU's PCI address is an NVIDIA device in sysfs. NVML writes the domain with
    8 hex digits (00000000:65:00.0), sysfs with 4 (0000:65:00.0)."""
    domain, _, rest = gpu.pci_bus_id.lower().partition(":")
    device = sysfs / f"{domain[-4:]}:{rest}"
    try:
        return (device / "vendor").read_text().strip() == NVIDIA_PCI_VENDOR
    except OSError:
        return False


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return ""


def read_inventory(
    *, state_dir: Path, triton_version: str, agent_version: str
) -> node_pb2.Inventory:
    devices = gpus()
    disk = psutil.disk_usage(str(state_dir))
    return node_pb2.Inventory(
        gpus=devices,
        gpus_cross_checked=all(on_pci_bus(gpu) for gpu in devices),
        cpu_model=cpu_model(),
        cpu_cores=os.cpu_count() or 1,
        memory_bytes=psutil.virtual_memory().total,
        disk_bytes=disk.total,
        disk_free_bytes=disk.free,
        triton_version=triton_version,
        agent_version=agent_version,
    )


def gpu_load() -> list[node_pb2.GpuLoad]:
    with _nvml() as present:
        if not present:
            return []
        loads = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            loads.append(
                node_pb2.GpuLoad(
                    uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                    utilization_percent=float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                    memory_used_bytes=int(pynvml.nvmlDeviceGetMemoryInfo(handle).used),
                )
            )
        return loads


def model_load(metrics_url: str | None) -> list[node_pb2.ModelLoad]:
    """Pending requests per model from Triton's Prometheus metrics; empty if unreachable."""
    if metrics_url is None:
        return []
    try:
        with urllib.request.urlopen(metrics_url, timeout=2) as response:
            text = response.read().decode()
    except OSError as error:
        _log.debug("Triton metrics unreachable: %s", error)
        return []
    pending: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "nv_inference_pending_request_count":
            for sample in family.samples:
                model = sample.labels.get("model", "")
                pending[model] = pending.get(model, 0) + sample.value
    return [node_pb2.ModelLoad(model_name=m, pending=int(v)) for m, v in sorted(pending.items())]


def read_metrics(metrics_url: str | None) -> node_pb2.NodeMetrics:
    return node_pb2.NodeMetrics(
        gpus=gpu_load(),
        cpu_percent=psutil.cpu_percent(interval=None),
        memory_used_bytes=psutil.virtual_memory().used,
        models=model_load(metrics_url),
    )
