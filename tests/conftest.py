"""Session fixtures: one real local shard (etcd, registry, router, gateway, two node agents with
their own Tritons) for the whole test run, on free loopback ports."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from shard_core.etcd.store import EtcdStore
from shard_core.net import free_port
from shard_core.settings import EtcdSettings
from shard_node.triton import TritonPorts, TritonProcess
from shard_tool.local import LocalMesh, MeshPorts, MeshTiming
from shard_tool.publish import Publisher
from tests.demo import MODEL_REPOSITORY

REPO = Path(__file__).resolve().parent.parent
# Short enough to keep the tests quick, long enough for a loaded 2-core CI machine.
TEST_TIMING = MeshTiming(
    heartbeat_interval_s=0.5,
    lease_ttl_s=5,
    control_period_s=0.5,
    attest_interval_s=2,
    canary_interval_s=1,
)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalMesh]:
    local = LocalMesh(
        state_dir=tmp_path_factory.mktemp("mesh"),
        model_repository=MODEL_REPOSITORY,
        ports=MeshPorts.free(),
        timing=TEST_TIMING,
        # Limits small enough for the tests to reach.
        registry_settings={"max_blob_bytes": 768 << 20, "blob_quota_bytes": 1 << 30},
    )
    try:
        await local.start(nodes=2)
        yield local
    finally:
        local.stop()


@pytest.fixture
def etcd_settings(mesh: LocalMesh, request: pytest.FixtureRequest) -> EtcdSettings:
    """The session's etcd, as its root user, under a prefix of this test's own."""
    return mesh.etcd.settings().model_copy(
        update={"etcd_prefix": f"/test/{request.node.name}/", "etcd_timeout_s": 5}
    )


@pytest_asyncio.fixture(loop_scope="session")
async def registry_channel(mesh: LocalMesh) -> AsyncIterator[grpc.aio.Channel]:
    async with mesh.admin_channel() as channel:
        yield channel


@pytest.fixture
def publisher(registry_channel: grpc.aio.Channel) -> Publisher:
    return Publisher(channel=registry_channel)


@pytest_asyncio.fixture(loop_scope="session")
async def store(etcd_settings: EtcdSettings) -> AsyncIterator[EtcdStore]:
    """A connected store on the session's etcd, under this test's own prefix."""
    store = EtcdStore(etcd_settings)
    await store.connect()
    yield store
    await store.close()


@pytest_asyncio.fixture(loop_scope="session")
async def spare_triton(tmp_path: Path) -> AsyncIterator[TritonProcess]:
    """A Triton the test owns, with an empty repository, outside any node agent."""
    repository = tmp_path / "repository"
    repository.mkdir()
    process = TritonProcess(
        model_repository=repository,
        state_dir=tmp_path,
        ports=TritonPorts(grpc=free_port(), http=free_port(), metrics=free_port()),
    )
    await process.start()
    yield process
    process.stop()
