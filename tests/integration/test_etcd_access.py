"""etcd behind mutual TLS and its own users: only the control plane holds credentials, each
service with the least it needs; nodes and strangers reach nothing."""

from __future__ import annotations

from pathlib import Path

import aetcd
import aetcd.exceptions
import pytest

from shard_core import pki
from shard_core.etcd.store import EtcdStore, client
from shard_core.tls import write_identity
from shard_tool.local import LocalMesh
from tests.waiting import until

PREFIX = b"/shard/"


def _identity(mesh: LocalMesh, service: str) -> Path:
    return mesh.state_dir / "tls" / service


async def test_the_registry_writes_the_router_and_gateway_only_read(mesh: LocalMesh) -> None:
    async with client(mesh.etcd.settings(_identity(mesh, "registry"))) as registry:
        await registry.put(PREFIX + b"test/access", b"written by the registry")
        # Its role covers the shard's prefix, nothing beside it.
        with pytest.raises(aetcd.exceptions.ClientError, match="permission denied"):
            await registry.put(b"/elsewhere", b"x")
    for reader in ("router", "gateway"):
        async with client(mesh.etcd.settings(_identity(mesh, reader))) as etcd:
            got = await etcd.get(PREFIX + b"test/access")
            assert got is not None
            assert got.value == b"written by the registry"
            with pytest.raises(aetcd.exceptions.ClientError, match="permission denied"):
                await etcd.put(PREFIX + b"keys/forged-admin", b"x")
            with pytest.raises(aetcd.exceptions.ClientError, match="permission denied"):
                await etcd.delete(PREFIX + b"test/access")


async def test_nodes_and_strangers_reach_nothing(mesh: LocalMesh, tmp_path: Path) -> None:
    # A node's own certificate from the mesh CA names no etcd user.
    node = mesh.nodes["node-0"].state_dir / "tls"
    async with client(mesh.etcd.settings(node)) as etcd:
        with pytest.raises(aetcd.exceptions.ClientError):
            await etcd.get(PREFIX + b"keys/")
    # A certificate from another CA, even one whose CN is `root`, does not get past TLS.
    stranger = pki.Authority.create()
    key = pki.new_key()
    issued = stranger.issue(key.public_key(), stranger.workload("service", "root"))
    write_identity(
        tmp_path / "forged",
        chain=issued.chain_pem,
        key=pki.key_pem(key),
        bundle=mesh.ca_file.read_bytes(),  # it trusts the real etcd, etcd does not trust it
    )
    async with client(mesh.etcd.settings(tmp_path / "forged"), timeout=3) as etcd:
        with pytest.raises(aetcd.exceptions.ClientError):
            await etcd.get(PREFIX + b"keys/")
    # Plaintext to etcd's TLS-only port gets nowhere.
    async with aetcd.Client(port=mesh.ports.etcd, timeout=3) as plain:
        with pytest.raises(aetcd.exceptions.ClientError):
            await plain.get(PREFIX + b"keys/")


async def test_a_service_moves_to_its_renewed_etcd_certificate(
    mesh: LocalMesh, tmp_path: Path
) -> None:
    identity = tmp_path / "registry"
    ca = pki.Authority.load(
        certificate=mesh.ca_dir / "ca-cert.pem",
        key=mesh.ca_dir / "ca-key.pem",
        bundle=mesh.ca_file,
    )

    def issue() -> int:
        key = pki.new_key()
        issued = ca.issue(key.public_key(), ca.workload("service", "registry"), lifetime_s=600)
        write_identity(identity, chain=issued.chain_pem, key=pki.key_pem(key), bundle=ca.bundle_pem)
        return issued.serial

    issue()
    store = EtcdStore(mesh.etcd.settings(identity))
    try:
        await store.put("test/renewal", b"before")
        first = store.client
        issue()  # renewed, as `shard up` does at half-life

        async def moved() -> bool:  # looked at again within a second of a call
            await store.put("test/renewal", b"during")
            return store.client is not first

        await until(moved, "never moved to the new files")
        await store.put("test/renewal", b"after")
        got = await store.get("test/renewal")
        assert got is not None
        assert got.value == b"after"
    finally:
        await store.close()
