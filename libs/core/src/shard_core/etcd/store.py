"""A typed, prefix-scoped view of the control plane's etcd.

Every key the shard keeps lives under one prefix (`/shard/` by default), so several shards, or
several test runs, can share one etcd. Values are serialized protobuf messages.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import aetcd
import aetcd.exceptions
import aetcd.watcher
import grpc
from aetcd import rpc
from aetcd.utils import prefix_range_end

from shard_core.errors import UnavailableError
from shard_core.pki import Workload
from shard_core.settings import EtcdSettings
from shard_core.tls import RENEWAL_CHECK_S, TlsIdentity, require_loopback

P = ParamSpec("P")
T = TypeVar("T")


class StoreUnavailableError(UnavailableError):
    """etcd did not answer: callers get UNAVAILABLE naming the store, and may retry."""

    reason = "STORE_UNAVAILABLE"

    def __init__(self, detail: str = "") -> None:
        super().__init__(
            "the shard's coordination store (etcd) is unavailable; retry shortly",
            metadata={"detail": detail[:200]} if detail else None,
        )


# What a failed etcd call raises: aetcd's own errors, or gRPC's from the raw stubs.
STORE_FAILURES = (aetcd.exceptions.ClientError, grpc.aio.AioRpcError, ConnectionError)


def _unavailable(call: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """`call`, with every way etcd can fail turned into StoreUnavailableError."""

    @functools.wraps(call)
    async def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await call(*args, **kwargs)
        except STORE_FAILURES as error:
            raise StoreUnavailableError(type(error).__name__) from error

    return guarded


# Keepalive pings let a watch notice an etcd that vanished without closing the connection.
CHANNEL_OPTIONS = {
    "grpc.keepalive_time_ms": 5_000,
    "grpc.keepalive_timeout_ms": 3_000,
    "grpc.keepalive_permit_without_calls": 1,
    # gRPC's default backoff grows to two minutes: an etcd back from an outage would wait that
    # long for the control plane. Its clients try again within two seconds.
    "grpc.initial_reconnect_backoff_ms": 200,
    "grpc.max_reconnect_backoff_ms": 2_000,
}


class TlsClient(aetcd.Client):  # type: ignore[misc]  # aetcd ships no type information
    """aetcd's client over a mutual-TLS channel. aetcd 1.0 opens plaintext channels only; this
    opens the channel and makes the same stubs and watcher on it."""

    def __init__(self, *, credentials: grpc.ChannelCredentials, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._credentials = credentials

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        target = f"{self._host}:{self._port}"
        self.channel = grpc.aio.secure_channel(
            target, self._credentials, options=list(self._options.items())
        )
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self.auth_stub = rpc.AuthStub(self.channel)
        self._watcher = aetcd.watcher.Watcher(
            rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
        )
        self._connected.set()


def client(settings: EtcdSettings, *, timeout: float | None = None) -> aetcd.Client:
    """An etcd client as `settings` say: mutual TLS with the service's identity, checking the
    peer is the mesh's etcd, or plaintext (loopback only)."""
    options: dict[str, Any] = {**CHANNEL_OPTIONS}
    common: dict[str, Any] = {
        "host": settings.etcd_host,
        "port": settings.etcd_port,
        "timeout": timeout or settings.etcd_timeout_s,
    }
    if settings.etcd_tls_dir is None:
        require_loopback(f"{settings.etcd_host}:{settings.etcd_port}", what="plaintext to etcd")
        return aetcd.Client(**common, options=options)
    etcd = Workload(trust_domain=settings.etcd_trust_domain, kind="service", name="etcd")
    options["grpc.ssl_target_name_override"] = etcd.dns  # the peer must be the mesh's etcd
    credentials = TlsIdentity(settings.etcd_tls_dir).channel_credentials()
    return TlsClient(credentials=credentials, **common, options=options)


# What a replaced etcd client's calls in flight get to finish (watches and lease streams
# reopen on the new client when it closes).
RETIRE_AFTER_S = 30.0


async def _close_later(retired: aetcd.Client) -> None:
    await asyncio.sleep(RETIRE_AFTER_S)
    await retired.close()


@dataclass(frozen=True, kw_only=True)
class Entry:
    """One key and its value, with the revision that last changed it."""

    key: str
    value: bytes
    mod_revision: int
    lease: int


@dataclass(frozen=True, kw_only=True)
class Snapshot:
    """Every entry under a prefix as of one etcd revision."""

    entries: Sequence[Entry]
    revision: int


class EtcdStore:
    """The shard's etcd: keys are relative to the shard prefix."""

    def __init__(self, settings: EtcdSettings) -> None:
        self.settings = settings
        self.prefix = settings.etcd_prefix
        # A channel keeps the certificate it was made with, and reconnects with it: when this
        # service's TLS files are renewed, calls move to a client made with the new ones.
        self._identity = TlsIdentity(settings.etcd_tls_dir) if settings.etcd_tls_dir else None
        self._material = self._identity.material() if self._identity else None
        self._retiring: set[asyncio.Future[None]] = set()
        self._retired: set[aetcd.Client] = set()
        self._client = self._new_client()

    def _new_client(self) -> aetcd.Client:
        return client(self.settings)

    @property
    def client(self) -> aetcd.Client:
        """The etcd client: a fresh one once the TLS files were renewed (checked at most once a
        second); the old one closes after calls in flight had time to end."""
        if self._identity is not None:
            material = self._identity.material(max_age_s=RENEWAL_CHECK_S)
            if material is not self._material:
                self._material = material
                retired, self._client = self._client, self._new_client()
                retiring = asyncio.ensure_future(_close_later(retired))
                retiring.add_done_callback(lambda _: self._retired.discard(retired))
                self._retired.add(retired)
                self._retiring.add(retiring)
                retiring.add_done_callback(self._retiring.discard)
        return self._client

    @client.setter
    def client(self, value: aetcd.Client) -> None:
        self._client = value

    @_unavailable
    async def connect(self) -> None:
        await self.client.connect()

    async def reconnect(self) -> None:
        """Drop the connection and its watches, and open a fresh one."""
        await self.close()
        self.client = self._new_client()
        await self.client.connect()

    async def close(self) -> None:
        for retiring in list(self._retiring):
            retiring.cancel()
        for retired in list(self._retired):
            await retired.close()
        self._retired.clear()
        await self._client.close()

    def key(self, relative: str) -> bytes:
        return (self.prefix + relative).encode()

    def relative(self, key: bytes) -> str:
        return key.decode()[len(self.prefix) :]

    @_unavailable
    async def put(self, key: str, value: bytes, *, lease: int | None = None) -> None:
        await self.client.put(self.key(key), value, lease=lease)

    @_unavailable
    async def get(self, key: str) -> Entry | None:
        found = await self.client.get(self.key(key))
        return None if found is None else self._entry(found)

    @_unavailable
    async def delete(self, key: str) -> None:
        await self.client.delete(self.key(key))

    @_unavailable
    async def snapshot(self, prefix: str) -> Snapshot:
        """Every entry under `prefix`, ordered by key, and the revision they were read at."""
        found = await self.client.get_prefix(self.key(prefix), sort_order="ascend")
        return Snapshot(entries=[self._entry(kv) for kv in found], revision=found.header.revision)

    @_unavailable
    async def page(self, prefix: str, *, start_after: str, limit: int) -> tuple[list[Entry], bool]:
        """Up to `limit` entries under `prefix` with keys after `start_after`, and whether more
        follow. One bounded range read: listing never loads the whole prefix."""
        await self.client.connect()
        start = self.key(start_after) + b"\0" if start_after else self.key(prefix)
        request = rpc.RangeRequest(
            key=start, range_end=prefix_range_end(self.key(prefix)), limit=limit
        )
        reply = await self.client.kvstub.Range(
            request, timeout=self.settings.etcd_timeout_s, metadata=self.client.metadata
        )
        return [self._entry(kv) for kv in reply.kvs], reply.more

    @_unavailable
    async def write(
        self,
        *,
        puts: Mapping[str, bytes] | None = None,
        deletes: Iterable[str] = (),
        lease: int | None = None,
        expect: Mapping[str, int] | None = None,
        leases: Mapping[str, int] | None = None,
    ) -> int | None:
        """One transaction: if every key in `expect` is at that mod revision (0: the key must not
        exist), apply the puts (bound to `lease`, or to the key's own in `leases`) and deletes
        together. Returns the revision the write created, or None when an expectation failed and
        nothing was written."""
        leases = leases or {}
        await self.client.connect()
        compare = [
            rpc.Compare(
                result=rpc.Compare.EQUAL,
                target=rpc.Compare.MOD,
                key=self.key(key),
                mod_revision=revision,
            )
            for key, revision in (expect or {}).items()
        ]
        ops = [
            rpc.RequestOp(
                request_put=rpc.PutRequest(
                    key=self.key(k), value=v, lease=leases.get(k, lease or 0)
                )
            )
            for k, v in (puts or {}).items()
        ]
        ops += [
            rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=self.key(k)))
            for k in deletes
        ]
        reply = await self.client.kvstub.Txn(
            rpc.TxnRequest(compare=compare, success=ops, failure=[]),
            timeout=self.settings.etcd_timeout_s,
            metadata=self.client.metadata,
        )
        revision: int = reply.header.revision
        return revision if reply.succeeded else None

    @_unavailable
    async def grant_lease(self, ttl_s: int) -> int:
        lease = await self.client.lease(ttl_s)
        lease_id: int = lease.id
        return lease_id

    @_unavailable
    async def revoke_lease(self, lease_id: int) -> None:
        await self.client.revoke_lease(lease_id)

    async def watch(self, prefix: str, *, start_revision: int) -> Any:
        """An aetcd watch of every change under `prefix` from `start_revision` on."""
        return await self.client.watch_prefix(self.key(prefix), start_revision=start_revision)

    def _entry(self, kv: Any) -> Entry:
        return Entry(
            key=self.relative(kv.key), value=kv.value, mod_revision=kv.mod_revision, lease=kv.lease
        )
