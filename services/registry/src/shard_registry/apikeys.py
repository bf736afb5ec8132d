"""API keys: created, listed, rotated and revoked by their principals (or an admin).

A key is stored as `StoredApiKey` under `keys/{key}`: the key and the SHA-256 of its secret. The
secret itself is returned once and never kept. Nobody gets a key with more than they have: a
non-admin creates keys only for itself, with its own role and a subset of its permissions.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from shard.auth.v1 import api_key_pb2
from shard_core import keys
from shard_core.auth import (
    PERMISSION_NAMES,
    KeyRing,
    Principal,
    new_secret,
    principal_of,
    token_hash,
)
from shard_core.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    require,
)
from shard_core.etcd import paging
from shard_core.etcd.store import EtcdStore
from shard_core.limits import check_rate
from shard_registry.resources import check_id, parse_name, timestamp


@dataclass(frozen=True, kw_only=True)
class KeyLimits:
    """How far a principal's keys may reach."""

    max_keys_per_principal: int = 100
    # What a key without a rate of its own gets at the data planes (their default).
    default_rate_limit_rps: float = 1000.0
    # How long a revoked or expired key is kept (shown as such) before it is deleted.
    retention_s: float = 7 * 24 * 3600


class KeyRegistry:
    def __init__(
        self,
        store: EtcdStore,
        ring: KeyRing,
        *,
        limits: KeyLimits | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._ring = ring  # this registry's own view, updated at once so a new key works here
        self._limits = limits or KeyLimits()
        self._clock = clock

    async def create(
        self, key: api_key_pb2.ApiKey, caller: Principal
    ) -> tuple[api_key_pb2.ApiKey, str]:
        check_id(key.principal, "api_key.principal")
        if key.role not in (
            api_key_pb2.ROLE_ADMIN,
            api_key_pb2.ROLE_PROVIDER,
            api_key_pb2.ROLE_OWNER,
            api_key_pb2.ROLE_DEVELOPER,
        ):
            raise InvalidArgumentError(
                "api_key.role must be ROLE_ADMIN, ROLE_PROVIDER, ROLE_OWNER or ROLE_DEVELOPER",
                metadata={"field": "api_key.role"},
            )
        for index, scope in enumerate(key.scopes):
            if scope not in PERMISSION_NAMES:
                raise InvalidArgumentError(
                    f"api_key.scopes[{index}] {scope!r} is not a permission; known: "
                    + ", ".join(sorted(PERMISSION_NAMES)),
                    metadata={"field": f"api_key.scopes[{index}]"},
                )
        check_rate(key.rate_limit_rps, "api_key.rate_limit_rps")
        if key.HasField("expire_time") and key.expire_time.ToSeconds() <= self._clock():
            raise InvalidArgumentError(
                "api_key.expire_time must be in the future",
                metadata={"field": "api_key.expire_time"},
            )
        if not caller.admin:
            if key.principal != caller.id or key.role != caller.role:
                raise PermissionDeniedError(
                    "only an admin creates keys for another principal or role",
                    reason="NOT_YOURS",
                )
            wanted = principal_of(key).permissions
            if not wanted <= caller.permissions:
                raise PermissionDeniedError(
                    "a key cannot have permissions its creator lacks: "
                    + ", ".join(sorted(wanted - caller.permissions)),
                    reason="PERMISSION_MISSING",
                )
        created = api_key_pb2.ApiKey()
        created.CopyFrom(key)
        if not caller.admin:
            self._within_creator(created, caller)
        key_id, secret = new_secret()
        created.name = f"keys/{key_id}"
        created.create_time.CopyFrom(timestamp(self._clock()))
        created.ClearField("revoke_time")
        created.ClearField("rotate_time")
        await self._save(created, token_hash(secret), expect=0)
        return created, secret

    def _within_creator(self, key: api_key_pb2.ApiKey, caller: Principal) -> None:
        """A key reaches no further than the key that makes it: no faster, and no more of
        them than the cap. A key that names no rate gets its creator's."""
        ceiling = caller.rate_limit_rps or self._limits.default_rate_limit_rps
        if ceiling:
            if key.rate_limit_rps > ceiling:
                raise PermissionDeniedError(
                    f"api_key.rate_limit_rps {key.rate_limit_rps:g} is above the creating key's "
                    f"{ceiling:g}",
                    reason="RATE_ABOVE_YOURS",
                    metadata={"field": "api_key.rate_limit_rps"},
                )
            key.rate_limit_rps = key.rate_limit_rps or ceiling
        if self._ring.active_keys(key.principal) >= self._limits.max_keys_per_principal:
            raise ResourceExhaustedError(
                f"{key.principal} has {self._limits.max_keys_per_principal} keys, the most a "
                "principal may have; revoke one first",
                reason="TOO_MANY_KEYS",
                metadata={"field": "api_key.principal"},
            )

    async def prune(self) -> int:
        """Delete keys revoked or expired longer ago than the retention: nobody can use them,
        and every service's ring forgets them with the deletion. Returns how many went."""
        cutoff = self._clock() - self._limits.retention_s
        pruned = 0
        async for entry in paging.every(self._store, keys.API_KEYS):
            key = api_key_pb2.StoredApiKey.FromString(entry.value).key
            ended = (
                key.revoke_time.ToSeconds()
                if key.HasField("revoke_time")
                else key.expire_time.ToSeconds()
                if key.HasField("expire_time")
                else None
            )
            if ended is not None and ended < cutoff:
                deleted = await self._store.write(
                    deletes=[entry.key], expect={entry.key: entry.mod_revision}
                )
                if deleted is not None:
                    self._ring.delete(entry.key)
                    pruned += 1
        return pruned

    async def get(self, name: str, caller: Principal) -> api_key_pb2.ApiKey:
        return (await self._read(name, caller))[0].key

    async def list(
        self, caller: Principal, *, page_size: int, page_token: str
    ) -> tuple[list[api_key_pb2.ApiKey], str]:
        entries, token = await paging.page(
            self._store, keys.API_KEYS, page_size=page_size, page_token=page_token
        )
        found = (api_key_pb2.StoredApiKey.FromString(entry.value).key for entry in entries)
        return [key for key in found if caller.owns(key.principal)], token

    async def revoke(self, name: str, caller: Principal) -> api_key_pb2.ApiKey:
        stored, revision = await self._read(name, caller)
        if not stored.key.HasField("revoke_time"):
            stored.key.revoke_time.CopyFrom(timestamp(self._clock()))
            await self._save(stored.key, stored.secret_sha256, expect=revision)
        return stored.key

    async def rotate(self, name: str, caller: Principal) -> tuple[api_key_pb2.ApiKey, str]:
        stored, revision = await self._read(name, caller)
        if stored.key.HasField("revoke_time"):
            raise FailedPreconditionError(
                f"{name} is revoked; create a new key", reason="KEY_REVOKED"
            )
        _, secret = new_secret(name.removeprefix("keys/"))
        stored.key.rotate_time.CopyFrom(timestamp(self._clock()))
        await self._save(stored.key, token_hash(secret), expect=revision)
        return stored.key, secret

    async def _read(self, name: str, caller: Principal) -> tuple[api_key_pb2.StoredApiKey, int]:
        (key_id,) = parse_name(name, "keys/{}")
        found = await self._store.get(keys.api_key(key_id))
        if found is None:
            raise NotFoundError(f"{name} does not exist", metadata={"name": name})
        stored = api_key_pb2.StoredApiKey.FromString(found.value)
        if not caller.owns(stored.key.principal):
            raise PermissionDeniedError(f"{name} belongs to another principal", reason="NOT_YOURS")
        return stored, found.mod_revision

    async def _save(self, key: api_key_pb2.ApiKey, secret_sha256: str, *, expect: int) -> None:
        require(key.name, "api_key.name")
        record = api_key_pb2.StoredApiKey(key=key, secret_sha256=secret_sha256).SerializeToString()
        path = keys.api_key(key.name.removeprefix("keys/"))
        if await self._store.write(puts={path: record}, expect={path: expect}) is None:
            raise FailedPreconditionError(
                f"{key.name} changed meanwhile; retry", reason="CONCURRENT_CHANGE"
            )
        self._ring.put(path, record)
