"""Who is calling and what they may do: API keys, roles and permissions, for every service.

Callers send an API key's secret as `authorization: Bearer <secret>` (gRPC metadata, or the HTTP
header at the gateway). A secret reads `shard_<key id>_<random>`: the key id finds the stored key
without a scan, and only the SHA-256 of the secret is stored, compared in constant time. Each
service follows the keys in etcd (`keys/`) through a `KeyRing`, so a revocation reaches every
service within a watch event. The operator's bootstrap admin token (a setting, held only as a hash)
works everywhere as the principal `admin`.

A key acts for a principal with one role; its scopes can narrow the role's permissions. Every RPC
names the permission it needs (`MethodRules`); ownership (a provider's nodes, an owner's models)
is checked by the service on the resource itself, through `Principal.owns`.
"""

from __future__ import annotations

import contextvars
import enum
import hashlib
import hmac
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from cryptography import x509

from shard.auth.v1 import api_key_pb2
from shard.auth.v1.api_key_pb2 import Role
from shard.model.v1 import model_pb2
from shard_core.errors import PermissionDeniedError, ShardError, UnauthenticatedError
from shard_core.grpc.interceptors import handler_kind, with_behaviour
from shard_core.limits import RateLimits
from shard_core.pki import Workload, issued_at

if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
    _UnaryUnary = grpc.aio.UnaryUnaryClientInterceptor[Any, Any]
    _UnaryStream = grpc.aio.UnaryStreamClientInterceptor[Any, Any]
    _StreamUnary = grpc.aio.StreamUnaryClientInterceptor[Any, Any]
    _StreamStream = grpc.aio.StreamStreamClientInterceptor[Any, Any]
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor
    _UnaryUnary = grpc.aio.UnaryUnaryClientInterceptor
    _UnaryStream = grpc.aio.UnaryStreamClientInterceptor
    _StreamUnary = grpc.aio.StreamUnaryClientInterceptor
    _StreamStream = grpc.aio.StreamStreamClientInterceptor

AUTHORIZATION = "authorization"
# The client address a trusted proxy (the gateway) calls on behalf of.
FORWARDED_FOR = "x-forwarded-for"
SECRET_PREFIX = "shard_"
NODE_PREFIX = "node_"
KEY_ID_CHARS = 12


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Permission(enum.StrEnum):
    """What an RPC needs; also the names a key's scopes use."""

    NODES_READ = "nodes.read"
    NODES_WRITE = "nodes.write"
    NODES_ENROLL = "nodes.enroll"
    NODES_ADMIN = "nodes.admin"  # set the facts about nodes, quarantine them: admins only
    BLOBS_READ = "blobs.read"
    BLOBS_WRITE = "blobs.write"
    MODELS_READ = "models.read"
    MODELS_WRITE = "models.write"
    DEPLOYMENTS_READ = "deployments.read"
    DEPLOYMENTS_WRITE = "deployments.write"
    KEYS_READ = "keys.read"
    KEYS_WRITE = "keys.write"
    INFERENCE = "inference"
    TASKS_READ = "tasks.read"
    TASKS_WRITE = "tasks.write"
    TASKS_RUN = "tasks.run"  # node agents: claim and complete the tasks addressed to them


PERMISSION_NAMES = frozenset(permission.value for permission in Permission)
_EVERYONE = {
    Permission.NODES_READ,
    Permission.MODELS_READ,
    Permission.KEYS_READ,
    Permission.KEYS_WRITE,
    Permission.INFERENCE,
}
# What submitting encrypted tasks takes: storing the sealed job, reading the sealed results.
_TASK_OWNER = {
    Permission.BLOBS_READ,
    Permission.BLOBS_WRITE,
    Permission.TASKS_READ,
    Permission.TASKS_WRITE,
}
ROLE_PERMISSIONS: Mapping[Role.ValueType, frozenset[Permission]] = {
    api_key_pb2.ROLE_ADMIN: frozenset(Permission),
    api_key_pb2.ROLE_PROVIDER: frozenset(
        _EVERYONE | {Permission.NODES_WRITE, Permission.NODES_ENROLL, Permission.TASKS_READ}
    ),
    api_key_pb2.ROLE_OWNER: frozenset(
        _EVERYONE
        | {
            Permission.BLOBS_READ,
            Permission.BLOBS_WRITE,
            Permission.MODELS_WRITE,
            Permission.DEPLOYMENTS_READ,
            Permission.DEPLOYMENTS_WRITE,
            *_TASK_OWNER,
        }
    ),
    api_key_pb2.ROLE_DEVELOPER: frozenset(_EVERYONE | _TASK_OWNER),
}


@dataclass(frozen=True, kw_only=True)
class Principal:
    """Who a call comes from. The anonymous principal has no id and may only run inference on
    public models."""

    id: str
    role: Role.ValueType
    permissions: frozenset[Permission]
    key: str = ""  # the key's resource name; empty for the bootstrap admin and anonymous
    rate_limit_rps: float = 0.0  # the key's own inference rate; 0: the service's default

    @property
    def anonymous(self) -> bool:
        return not self.id

    @property
    def admin(self) -> bool:
        return self.role == api_key_pb2.ROLE_ADMIN

    def may(self, permission: Permission) -> bool:
        return permission in self.permissions

    def owns(self, owner: str) -> bool:
        """Whether the principal may act on a resource owned by `owner`: its own, or any for
        an admin."""
        return self.admin or (bool(self.id) and self.id == owner)


ANONYMOUS = Principal(id="", role=api_key_pb2.ROLE_UNSPECIFIED, permissions=frozenset())
BOOTSTRAP_ADMIN = Principal(
    id="admin", role=api_key_pb2.ROLE_ADMIN, permissions=ROLE_PERMISSIONS[api_key_pb2.ROLE_ADMIN]
)
# Metadata an admin's call (the registry's canary prober) sets to send a request to one node:
# the router honours it only from admins, and never passes it on.
CANARY_NODE = "shard-canary-node"
# The principal of the call being served, set by `AuthInterceptor`.
current_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar(
    "current_principal", default=ANONYMOUS
)


def new_secret(key_id: str = "") -> tuple[str, str]:
    """A key id (fresh unless given) and a new secret that carries it."""
    key_id = key_id or secrets.token_hex(KEY_ID_CHARS // 2)
    return key_id, f"{SECRET_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def key_id_of(secret: str) -> str:
    """The key id written in a secret, or an empty string when it is not one of ours."""
    if not secret.startswith(SECRET_PREFIX):
        return ""
    key_id = secret[len(SECRET_PREFIX) : len(SECRET_PREFIX) + KEY_ID_CHARS]
    if secret[len(SECRET_PREFIX) + KEY_ID_CHARS : len(SECRET_PREFIX) + KEY_ID_CHARS + 1] != "_":
        return ""
    return key_id


def principal_of(key: api_key_pb2.ApiKey) -> Principal:
    allowed = ROLE_PERMISSIONS.get(key.role, frozenset())
    scopes = {Permission(scope) for scope in key.scopes if scope in PERMISSION_NAMES}
    return Principal(
        id=key.principal,
        role=key.role,
        permissions=allowed & scopes if key.scopes else allowed,
        key=key.name,
        rate_limit_rps=key.rate_limit_rps,
    )


def bearer(metadata: Collection[tuple[str, Any]] | None) -> str:
    """The `authorization` value of a call's metadata, or an empty string."""
    for key, value in metadata or ():
        if key == AUTHORIZATION:
            return str(value)
    return ""


# Node agents read model files and task jobs, store task results, claim and complete tasks.
NODE_PERMISSIONS = frozenset({Permission.BLOBS_READ, Permission.BLOBS_WRITE, Permission.TASKS_RUN})


class NodeCredentials:
    """Credentials the registry gives node agents on their stream, for model files and tasks:
    `node_<id>_<session ms>_<expiry ms>_<mac>`, an HMAC under a key derived from the admin
    token, so every registry replica checks one without shared state.

    A credential names the node's session (the time it registered): `standing` decides, from
    the registry's live view, whether that session still stands (it is the node's latest, the
    node is not deleted or quarantined) and returns why not otherwise. It also expires: the
    registry issues a new one on each accepted attestation, long before the old one runs out."""

    def __init__(
        self,
        admin_token: str,
        standing: Callable[[str, int], ShardError | None],
        *,
        ttl_s: float = 900.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key = hmac.new(admin_token.encode(), b"shard node credentials v2", "sha256").digest()
        self._standing = standing
        self._ttl_s = ttl_s
        self._clock = clock

    def _mac(self, node_id: str, session_ms: int, expires_ms: int) -> str:
        message = f"{node_id}|{session_ms}|{expires_ms}".encode()
        return hmac.new(self._key, message, "sha256").hexdigest()

    def issue(self, node_id: str, session_ms: int) -> tuple[str, float]:
        """A credential for the node's session, and when it expires (seconds)."""
        expires_ms = int((self._clock() + self._ttl_s) * 1000)
        mac = self._mac(node_id, session_ms, expires_ms)
        return f"{NODE_PREFIX}{node_id}_{session_ms}_{expires_ms}_{mac}", expires_ms / 1000

    def principal(self, secret: str) -> Principal:
        parts = secret.removeprefix(NODE_PREFIX).split("_")
        if len(parts) != 4 or not all(parts) or not (parts[1] + parts[2]).isdigit():
            raise UnauthenticatedError("the node credential is not valid", reason="BAD_CREDENTIALS")
        node_id, session, expires, mac = parts
        session_ms, expires_ms = int(session), int(expires)
        if not hmac.compare_digest(mac, self._mac(node_id, session_ms, expires_ms)):
            raise UnauthenticatedError("the node credential is not valid", reason="BAD_CREDENTIALS")
        if expires_ms / 1000 <= self._clock():
            raise UnauthenticatedError(
                f"the credential of node {node_id} has expired", reason="CREDENTIAL_EXPIRED"
            )
        refusal = self._standing(node_id, session_ms)
        if refusal is not None:
            raise refusal
        return node_principal(node_id)


def node_principal(node_id: str) -> Principal:
    """What a node agent may do, however it proved who it is."""
    return Principal(
        id=f"nodes/{node_id}", role=api_key_pb2.ROLE_UNSPECIFIED, permissions=NODE_PERMISSIONS
    )


class PeerCertificates:
    """Node agents calling with their mesh certificate (mutual TLS). The certificate must name
    a node of this trust domain; `standing` then decides, from the live view, whether that
    node may still act with a certificate issued at that time (it is not deleted, quarantined,
    or registered again since): revocation takes effect at once, not at expiry. A service's
    certificate acts as nothing: its calls are its callers' (their key, or anonymous)."""

    def __init__(
        self, trust_domain: str, standing: Callable[[str, int], ShardError | None]
    ) -> None:
        self._trust_domain = trust_domain
        self._standing = standing

    def principal(self, peer: Mapping[str, Iterable[bytes]]) -> Principal | None:
        """The node a call's peer certificate names (gRPC's auth context), or None when the
        call came without one."""
        uris = list(peer.get("peer_spiffe_id", ()))
        pems = list(peer.get("x509_pem_cert", ()))
        if not uris or not pems:
            return None
        uri = uris[0].decode(errors="replace")
        workload = Workload.parse(uri)
        if workload is None or workload.trust_domain != self._trust_domain:
            raise UnauthenticatedError(
                f"the client certificate names {uri[:200]!r}, not a workload of this mesh",
                reason="CERTIFICATE_NOT_ACCEPTED",
            )
        if workload.kind == "service":
            # A service of the mesh relays its callers: what they are is the key it sends on,
            # or none (anonymous). Its certificate secures the hop and grants nothing.
            return None
        if workload.kind != "node":
            raise UnauthenticatedError(
                f"the client certificate names {workload.uri}; here only nodes act by "
                "certificate (clients send their key)",
                reason="CERTIFICATE_NOT_ACCEPTED",
            )
        certificate = x509.load_pem_x509_certificate(pems[0])
        # Whole seconds: give the issue time the benefit of the doubt within its second.
        issued_ms = int(issued_at(certificate) * 1000) + 999
        refusal = self._standing(workload.name, issued_ms)
        if refusal is not None:
            raise refusal
        return node_principal(workload.name)


class KeyRing:
    """Every API key, mirrored from etcd (a `PrefixMirror` listener), and the bootstrap admin
    token's hash: turns an `authorization` value into a `Principal`. Only the registry, which
    serves model files, also takes node credentials."""

    def __init__(
        self,
        *,
        admin_token_sha256: str = "",
        nodes: NodeCredentials | None = None,
        peers: PeerCertificates | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._admin = admin_token_sha256
        self._nodes = nodes
        self._peers = peers
        self._clock = clock
        self._keys: dict[str, api_key_pb2.StoredApiKey] = {}

    # -- MirrorListener ---------------------------------------------------------------------

    def reset(self, entries: Mapping[str, bytes]) -> None:
        self._keys.clear()
        for key, value in entries.items():
            self.put(key, value)

    def put(self, key: str, value: bytes) -> None:
        stored = api_key_pb2.StoredApiKey.FromString(value)
        self._keys[stored.key.name.removeprefix("keys/")] = stored

    def delete(self, key: str) -> None:
        self._keys.pop(key.rstrip("/").rsplit("/", 1)[-1], None)

    def usable(self) -> dict[str, api_key_pb2.StoredApiKey]:
        """The keys that work now (neither revoked nor expired), by key id."""
        now = self._clock()
        return {
            key_id: stored
            for key_id, stored in self._keys.items()
            if not stored.key.HasField("revoke_time")
            and not (
                stored.key.HasField("expire_time") and stored.key.expire_time.ToSeconds() <= now
            )
        }

    def active_keys(self, principal: str) -> int:
        """How many keys of `principal` work now (neither revoked nor expired)."""
        return sum(1 for stored in self.usable().values() if stored.key.principal == principal)

    # -- authentication ---------------------------------------------------------------------

    @property
    def takes_certificates(self) -> bool:
        return self._peers is not None

    def authenticate_peer(self, peer: Mapping[str, Iterable[bytes]]) -> Principal:
        """The principal a call without a key stands for: the node its client certificate
        names, or anonymous."""
        found = self._peers.principal(peer) if self._peers is not None else None
        return found or ANONYMOUS

    def authenticate(self, authorization: str) -> Principal:
        """The principal an `authorization` value stands for: anonymous when there is none.
        A malformed, unknown, revoked or expired credential is UNAUTHENTICATED."""
        if not authorization:
            return ANONYMOUS
        scheme, _, secret = authorization.partition(" ")
        if scheme.lower() != "bearer" or not secret:
            raise UnauthenticatedError(
                "credentials go in 'authorization' as 'Bearer <key secret>'",
                reason="BAD_CREDENTIALS",
            )
        if self._nodes is not None and secret.startswith(NODE_PREFIX):
            return self._nodes.principal(secret)
        digest = token_hash(secret)
        if self._admin and hmac.compare_digest(digest, self._admin):
            return BOOTSTRAP_ADMIN
        stored = self._keys.get(key_id_of(secret))
        if stored is None or not hmac.compare_digest(digest, stored.secret_sha256):
            raise UnauthenticatedError("the API key is not valid", reason="BAD_CREDENTIALS")
        key = stored.key
        if key.HasField("revoke_time"):
            raise UnauthenticatedError(f"API key {key.name} was revoked", reason="KEY_REVOKED")
        if key.HasField("expire_time") and key.expire_time.ToSeconds() <= self._clock():
            raise UnauthenticatedError(f"API key {key.name} has expired", reason="KEY_EXPIRED")
        return principal_of(key)


class ModelAccess:
    """Who may run inference on which model, mirrored from the model records (`models/`): a
    public model takes anyone, anonymous callers included; a private one only its owner and
    admins."""

    def __init__(self) -> None:
        self._models: dict[str, tuple[bool, str]] = {}  # model id -> (public, owner)
        self._rates: dict[str, float] = {}  # model id -> its rate limit, where it has one
        self._verified: dict[str, float] = {}  # model id -> the share of requests re-run

    def reset(self, entries: Mapping[str, bytes]) -> None:
        self._models.clear()
        self._rates.clear()
        self._verified.clear()
        for key, value in entries.items():
            self.put(key, value)

    def put(self, key: str, value: bytes) -> None:
        model = model_pb2.Model.FromString(value)
        public = model.visibility == model_pb2.VISIBILITY_PUBLIC
        model_id = model.name.removeprefix("models/")
        self._models[model_id] = (public, model.owner)
        self._rates.pop(model_id, None)
        if model.rate_limit_rps > 0:
            self._rates[model_id] = model.rate_limit_rps
        self._verified.pop(model_id, None)
        if model.verify_fraction > 0:
            self._verified[model_id] = model.verify_fraction

    def delete(self, key: str) -> None:
        model_id = key.rstrip("/").rsplit("/", 1)[-1]
        self._models.pop(model_id, None)
        self._rates.pop(model_id, None)
        self._verified.pop(model_id, None)

    def rate_limit(self, model_name: str) -> float:
        """The model's requests a second for everyone together; 0: no limit."""
        return self._rates.get(model_name, 0.0)

    def verify_fraction(self, model_name: str) -> float:
        """The share of the model's requests run again on another replica and compared."""
        return self._verified.get(model_name, 0.0)

    def public(self, model_name: str) -> bool:
        found = self._models.get(model_name)
        return found is not None and found[0]

    def owner(self, model_name: str) -> str:
        """The model's owner (a principal id); empty for a model the registry does not know."""
        found = self._models.get(model_name)
        return found[1] if found is not None else ""

    def visible(self, principal: Principal, model_name: str) -> bool:
        """Whether `principal` may see the model in listings and statistics: public models,
        and its own when it may run inference. A model the registry does not know is not
        listed."""
        found = self._models.get(model_name)
        if found is None:
            return False
        public, owner = found
        return public or (principal.may(Permission.INFERENCE) and principal.owns(owner))

    def check(self, principal: Principal, model_name: str) -> None:
        """Refuse `principal` inference on a model it may not use. A model the registry does not
        know is left to routing, which answers NOT_FOUND."""
        public, owner = self._models.get(model_name, (True, ""))
        if public:
            return
        if principal.anonymous:
            raise UnauthenticatedError(
                f"model '{model_name}' is private: send an API key "
                "('authorization: Bearer <key secret>')",
                reason="CREDENTIALS_MISSING",
            )
        if not principal.may(Permission.INFERENCE):
            raise PermissionDeniedError(
                "this key does not have the 'inference' permission", reason="PERMISSION_MISSING"
            )
        if not principal.owns(owner):
            raise PermissionDeniedError(
                f"model '{model_name}' is private to its owner", reason="NOT_YOURS"
            )


class InferenceGuard:
    """The data plane's check, for the router and the gateway: may this call's credentials run
    inference on this model, and is there room in their rate limits and the model's?
    Credentials that are sent must be valid, even for public models."""

    def __init__(self, ring: KeyRing, access: ModelAccess, limits: RateLimits) -> None:
        self.ring = ring
        self.access = access
        self.limits = limits

    def check(
        self, authorization: str, model_name: str, *, client: str = "", limited: bool = False
    ) -> Principal:
        """Admit a call from `client` (its address) or refuse it with the right status; only
        `limited` calls (inference itself, not metadata) take from the rate limits."""
        principal = self.ring.authenticate(authorization)
        self.access.check(principal, model_name)
        if limited:
            self.limits.admit(
                caller=principal.key or principal.id or f"anonymous/{client}",
                caller_rps=principal.rate_limit_rps,
                model=model_name,
                model_rps=self.access.rate_limit(model_name),
            )
        return principal


# A method's rule: the permission it needs, or None for a method open to anonymous callers (health,
# reflection, the node agents' stream, which authenticates nodes itself).
MethodRules = Mapping[str, Permission | None]
# Health checks and reflection are open on every server.
INFRASTRUCTURE: MethodRules = {
    "/grpc.health.v1.Health/Check": None,
    "/grpc.health.v1.Health/Watch": None,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": None,
}


class AuthInterceptor(_ServerInterceptor):
    """Authenticates every call, refuses those whose principal lacks the method's permission, and
    serves the rest with `current_principal` set. A method without a rule is refused: a new RPC
    is closed until someone decides who may call it."""

    def __init__(self, ring: KeyRing, rules: MethodRules) -> None:
        self._ring = ring
        self._rules = rules

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        authorization = bearer(handler_call_details.invocation_metadata)
        if not authorization and self._ring.takes_certificates:
            # Who the peer is shows only in the call's context: decide there.
            return _around(handler, lambda context: self._by_certificate(context, method))
        try:
            principal = self._ring.authenticate(authorization)
            check(principal, method, self._rules)
        except ShardError as error:
            return _refusing(handler, error)
        return _as(handler, principal)

    async def _by_certificate(
        self, context: grpc.aio.ServicerContext[Any, Any], method: str
    ) -> None:
        try:
            principal = self._ring.authenticate_peer(context.auth_context())
            check(principal, method, self._rules)
        except ShardError as error:
            status = error.to_status()
            await context.abort(status.code, status.details, status.trailing_metadata)
        current_principal.set(principal)


def check(principal: Principal, method: str, rules: MethodRules) -> None:
    """Refuse `principal` a call of `method` it may not make."""
    if method not in rules:
        raise PermissionDeniedError(f"{method} is not open to callers", reason="NO_RULE")
    permission = rules[method]
    if permission is None or principal.may(permission):
        return
    if principal.anonymous:
        raise UnauthenticatedError(
            f"{method} needs an API key ('authorization: Bearer <key secret>')",
            reason="CREDENTIALS_MISSING",
        )
    raise PermissionDeniedError(
        f"{method} needs the '{permission}' permission, which this key does not have",
        reason="PERMISSION_MISSING",
        metadata={"permission": str(permission)},
    )


_Prelude = Callable[[grpc.aio.ServicerContext[Any, Any]], Awaitable[None]]


def _around(handler: Any, prelude: _Prelude) -> Any:
    """A handler of the same shape as `handler` that runs `prelude` before it."""
    kind = handler_kind(handler)
    behaviour = getattr(handler, kind)
    if kind.endswith("_unary"):

        async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await prelude(context)
            return await behaviour(request, context)

        return with_behaviour(handler, kind, unary)

    async def streaming(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        await prelude(context)
        async for response in behaviour(request, context):
            yield response

    return with_behaviour(handler, kind, streaming)


def _as(handler: Any, principal: Principal) -> Any:
    """`handler`, run as `principal`."""

    async def become(context: grpc.aio.ServicerContext[Any, Any]) -> None:
        current_principal.set(principal)

    return _around(handler, become)


def _refusing(handler: Any, error: ShardError) -> Any:
    """A handler of the same shape as `handler` that refuses the call with `error`."""
    status = error.to_status()

    async def refuse(context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(status.code, status.details, status.trailing_metadata)

    return _around(handler, refuse)


class _Bearer:
    def __init__(self, token: str) -> None:
        self._metadata = (AUTHORIZATION, f"Bearer {token}")

    def _details(self, details: Any) -> Any:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self._metadata)
        return details._replace(metadata=metadata)


class _BearerUnaryUnary(_Bearer, _UnaryUnary):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _BearerUnaryStream(_Bearer, _UnaryStream):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _BearerStreamUnary(_Bearer, _StreamUnary):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


class _BearerStreamStream(_Bearer, _StreamStream):
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


def bearer_interceptors(token: str) -> list[Any]:
    """Client interceptors adding `authorization: Bearer <token>` to every call on a channel.
    One per call shape: a channel files each interceptor under the first shape it matches."""
    return [
        kind(token)
        for kind in (_BearerUnaryUnary, _BearerUnaryStream, _BearerStreamUnary, _BearerStreamStream)
    ]
