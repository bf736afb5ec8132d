"""`shard key`: API keys."""

from __future__ import annotations

from typing import Annotated

import typer
from google.protobuf import timestamp_pb2

from shard.auth.v1 import api_key_pb2, key_service_pb2, key_service_pb2_grpc
from shard_tool.output import Column, as_dict, emit, emit_data
from shard_tool.session import TIMEOUT_S, all_pages, resource_name, session

app = typer.Typer(help="API keys: create (the secret is shown once), list, revoke.")

Stub = key_service_pb2_grpc.KeyServiceStub
ROLES = {"admin", "provider", "owner", "developer"}
COLUMNS: list[Column] = [
    ("name", lambda k: k.name.removeprefix("keys/")),
    ("principal", lambda k: k.principal),
    ("role", lambda k: api_key_pb2.Role.Name(k.role).removeprefix("ROLE_").lower()),
    ("expires", lambda k: k.expire_time.ToJsonString() if k.HasField("expire_time") else "never"),
    ("revoked", lambda k: k.revoke_time.ToJsonString() if k.HasField("revoke_time") else "-"),
    ("display name", lambda k: k.display_name),
]


@app.command("create")
def create(
    ctx: typer.Context,
    principal: Annotated[str, typer.Argument(help="Who the key acts as.")],
    role: Annotated[str, typer.Option(help="admin, provider, owner or developer.")] = "developer",
    expires_in: Annotated[int, typer.Option(min=0, help="Seconds until it expires; 0: never.")] = 0,
    rate_limit: Annotated[float, typer.Option(min=0, help="Inference requests a second.")] = 0,
    display_name: Annotated[str, typer.Option(help="A name to recognise it by.")] = "",
) -> None:
    """Make an API key. Its secret is printed once and stored nowhere.

    Example: shard key create alice --role owner --expires-in 86400
    """
    if role not in ROLES:
        raise typer.BadParameter(f"must be one of {', '.join(sorted(ROLES))}", param_hint="--role")
    s = session(ctx)
    key = api_key_pb2.ApiKey(
        principal=principal,
        role=api_key_pb2.Role.Value(f"ROLE_{role.upper()}"),
        rate_limit_rps=rate_limit,
        display_name=display_name,
    )
    if expires_in:
        expire = timestamp_pb2.Timestamp()
        expire.GetCurrentTime()
        expire.seconds += expires_in
        key.expire_time.CopyFrom(expire)
    request = key_service_pb2.CreateApiKeyRequest(api_key=key)
    reply = s.call(Stub, lambda keys: keys.CreateApiKey(request, timeout=TIMEOUT_S))
    emit_data({**as_dict(reply.api_key), "secret": reply.secret}, s.output)


@app.command("ls")
def list_keys(ctx: typer.Context) -> None:
    """List API keys (never their secrets).

    Example: shard key ls -o yaml
    """
    s = session(ctx)
    request = key_service_pb2.ListApiKeysRequest()
    found = s.call(Stub, lambda keys: all_pages(keys.ListApiKeys, request, "api_keys"))
    emit(found, COLUMNS, s.output)


@app.command("revoke")
def revoke(
    ctx: typer.Context, key: Annotated[str, typer.Argument(help="The key id (or keys/<id>).")]
) -> None:
    """Revoke a key at once.

    Example: shard key revoke 3f9c2a1b
    """
    s = session(ctx)
    request = key_service_pb2.RevokeApiKeyRequest(name=resource_name("keys", key))
    reply = s.call(Stub, lambda keys: keys.RevokeApiKey(request, timeout=TIMEOUT_S))
    emit(reply.api_key, COLUMNS, s.output)
