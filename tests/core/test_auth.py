"""Keys, principals and permission rules, as pure logic."""

from __future__ import annotations

import pytest
from google.protobuf import timestamp_pb2

from shard.auth.v1 import api_key_pb2
from shard.model.v1 import model_pb2
from shard_core.auth import (
    ANONYMOUS,
    BOOTSTRAP_ADMIN,
    KeyRing,
    ModelAccess,
    NodeCredentials,
    Permission,
    check,
    key_id_of,
    new_secret,
    principal_of,
    token_hash,
)
from shard_core.errors import PermissionDeniedError, ShardError, UnauthenticatedError

NOW = 1_800_000_000.0


def _stored(
    role: api_key_pb2.Role.ValueType, *, scopes: tuple[str, ...] = (), **times: float
) -> tuple[str, bytes]:
    key_id, secret = new_secret()
    key = api_key_pb2.ApiKey(name=f"keys/{key_id}", principal="alice", role=role, scopes=scopes)
    for field, seconds in times.items():
        getattr(key, field).CopyFrom(timestamp_pb2.Timestamp(seconds=int(seconds)))
    stored = api_key_pb2.StoredApiKey(key=key, secret_sha256=token_hash(secret))
    return secret, stored.SerializeToString()


def _ring(*keys: bytes) -> KeyRing:
    ring = KeyRing(admin_token_sha256=token_hash("bootstrap"), clock=lambda: NOW)
    ring.reset({f"keys/{i}": value for i, value in enumerate(keys)})
    return ring


def test_secrets_carry_their_key_id() -> None:
    key_id, secret = new_secret()
    assert key_id_of(secret) == key_id
    assert new_secret(key_id)[1] != secret  # a rotation keeps the id, not the secret
    assert key_id_of(new_secret(key_id)[1]) == key_id
    assert key_id_of("not-ours") == ""
    assert key_id_of("shard_short") == ""


def test_authentication_gives_the_key_s_principal() -> None:
    secret, record = _stored(api_key_pb2.ROLE_OWNER)
    ring = _ring(record)
    owner = ring.authenticate(f"Bearer {secret}")
    assert (owner.id, owner.role) == ("alice", api_key_pb2.ROLE_OWNER)
    assert owner.may(Permission.MODELS_WRITE)
    assert not owner.may(Permission.NODES_ENROLL)
    assert owner.owns("alice")
    assert not owner.owns("bob")
    assert ring.authenticate("") is ANONYMOUS
    assert ring.authenticate("Bearer bootstrap") is BOOTSTRAP_ADMIN
    assert BOOTSTRAP_ADMIN.owns("anyone")


@pytest.mark.parametrize(
    ("authorization", "reason"),
    [
        ("Basic dXNlcjpwYXNz", "BAD_CREDENTIALS"),
        ("Bearer", "BAD_CREDENTIALS"),
        ("Bearer shard_000000000000_nope", "BAD_CREDENTIALS"),
        ("Bearer wrong-admin-token", "BAD_CREDENTIALS"),
    ],
)
def test_bad_credentials_are_unauthenticated(authorization: str, reason: str) -> None:
    with pytest.raises(UnauthenticatedError) as raised:
        _ring().authenticate(authorization)
    assert raised.value.reason == reason


def test_a_right_key_id_with_a_wrong_secret_is_refused() -> None:
    secret, record = _stored(api_key_pb2.ROLE_DEVELOPER)
    forged = new_secret(key_id_of(secret))[1]
    with pytest.raises(UnauthenticatedError):
        _ring(record).authenticate(f"Bearer {forged}")


def test_revoked_and_expired_keys_are_refused() -> None:
    revoked, revoked_record = _stored(api_key_pb2.ROLE_DEVELOPER, revoke_time=NOW - 1)
    expired, expired_record = _stored(api_key_pb2.ROLE_DEVELOPER, expire_time=NOW - 1)
    later, later_record = _stored(api_key_pb2.ROLE_DEVELOPER, expire_time=NOW + 60)
    ring = _ring(revoked_record, expired_record, later_record)
    for secret, reason in ((revoked, "KEY_REVOKED"), (expired, "KEY_EXPIRED")):
        with pytest.raises(UnauthenticatedError) as raised:
            ring.authenticate(f"Bearer {secret}")
        assert raised.value.reason == reason
    assert ring.authenticate(f"Bearer {later}").id == "alice"


def test_scopes_narrow_a_role_and_never_widen_it() -> None:
    narrowed = api_key_pb2.ApiKey(
        principal="p", role=api_key_pb2.ROLE_OWNER, scopes=["inference", "nodes.enroll"]
    )
    assert principal_of(narrowed).permissions == {Permission.INFERENCE}


def test_rules_refuse_what_a_principal_may_not_do() -> None:
    rules = {"/S/Read": Permission.MODELS_READ, "/S/Open": None}
    developer = principal_of(api_key_pb2.ApiKey(principal="dev", role=api_key_pb2.ROLE_DEVELOPER))
    check(ANONYMOUS, "/S/Open", rules)
    check(developer, "/S/Read", rules)
    with pytest.raises(UnauthenticatedError):
        check(ANONYMOUS, "/S/Read", rules)
    with pytest.raises(PermissionDeniedError) as raised:
        check(developer, "/S/Unlisted", rules)
    assert raised.value.reason == "NO_RULE"
    with pytest.raises(PermissionDeniedError) as raised:
        check(developer, "/S/Read", {"/S/Read": Permission.MODELS_WRITE})
    assert raised.value.reason == "PERMISSION_MISSING"


class _Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_node_credentials_are_forgery_proof_expire_and_end_with_their_session() -> None:
    clock = _Clock()
    ended: dict[str, ShardError] = {
        "n2": PermissionDeniedError("quarantined", reason="NODE_NOT_ALLOWED")
    }
    credentials = NodeCredentials(
        "bootstrap", lambda node, _session: ended.get(node), ttl_s=60, clock=clock
    )
    ring = KeyRing(nodes=credentials)
    token, expires = credentials.issue("n1", 5)
    assert expires == clock.now + 60
    node = ring.authenticate(f"Bearer {token}")
    assert node.id == "nodes/n1"
    # Model files and task jobs in, task results out, its own tasks claimed and completed.
    assert node.permissions == {
        Permission.BLOBS_READ, Permission.BLOBS_WRITE, Permission.TASKS_RUN
    }  # fmt: skip

    def refused(secret: str) -> str:
        with pytest.raises(ShardError) as raised:
            ring.authenticate(f"Bearer {secret}")
        return raised.value.reason

    other = NodeCredentials("another shard's token", lambda *_: None, clock=clock)
    assert refused(other.issue("n1", 5)[0]) == "BAD_CREDENTIALS"
    node_id, session, expiry, mac = token.removeprefix("node_").split("_")
    # Stretching its life, or moving it to another session or node, breaks the MAC.
    assert refused(f"node_{node_id}_{session}_{int(expiry) + 1000}_{mac}") == "BAD_CREDENTIALS"
    assert refused(f"node_{node_id}_{int(session) + 1}_{expiry}_{mac}") == "BAD_CREDENTIALS"
    assert refused(f"node_n9_{session}_{expiry}_{mac}") == "BAD_CREDENTIALS"
    for malformed in ("node_", "node_n1", "node_n1_1_2", "node_n1_x_2_ab", "node_n1_1_2_3_4"):
        assert refused(malformed) == "BAD_CREDENTIALS", malformed
    # A session that no longer stands ends its credentials, whatever their expiry.
    assert refused(credentials.issue("n2", 5)[0]) == "NODE_NOT_ALLOWED"
    ended["n1"] = UnauthenticatedError("registered again", reason="CREDENTIAL_REVOKED")
    assert refused(token) == "CREDENTIAL_REVOKED"
    del ended["n1"]
    clock.now += 60
    assert refused(token) == "CREDENTIAL_EXPIRED"


def test_private_models_are_their_owner_s() -> None:
    access = ModelAccess()
    for name, visibility in (
        ("open", model_pb2.VISIBILITY_PUBLIC),
        ("mine", model_pb2.VISIBILITY_PRIVATE),
    ):
        model = model_pb2.Model(name=f"models/{name}", owner="alice", visibility=visibility)
        access.put(f"models/{name}", model.SerializeToString())
    alice = principal_of(api_key_pb2.ApiKey(principal="alice", role=api_key_pb2.ROLE_OWNER))
    bob = principal_of(api_key_pb2.ApiKey(principal="bob", role=api_key_pb2.ROLE_DEVELOPER))
    access.check(ANONYMOUS, "open")
    access.check(alice, "mine")
    access.check(BOOTSTRAP_ADMIN, "mine")
    access.check(ANONYMOUS, "unknown")  # routing answers NOT_FOUND
    with pytest.raises(UnauthenticatedError):
        access.check(ANONYMOUS, "mine")
    with pytest.raises(PermissionDeniedError):
        access.check(bob, "mine")
