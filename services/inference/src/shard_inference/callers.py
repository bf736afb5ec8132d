"""Who a call to the router comes from: its credentials and its client's address."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc

from shard_core.auth import (
    AUTHORIZATION,
    CANARY_NODE,
    FORWARDED_FOR,
    InferenceGuard,
    Permission,
    Principal,
)
from shard_core.errors import PermissionDeniedError
from shard_core.net import peer_host

CACHE_CONTROL = "cache-control"


@dataclass(frozen=True, slots=True)
class Caller:
    principal: Principal
    fresh: bool  # `cache-control: no-cache`: the caller wants a fresh answer
    pinned_node: str = ""  # the node an admin's canary must go to (`shard-canary-node`)


@dataclass(frozen=True)
class Proxies:
    """Who may name the client it serves in `x-forwarded-for` (the gateway): a peer at one of
    `addresses`, or one whose mesh certificate names `workload` (a SPIFFE ID), wherever it is."""

    addresses: frozenset[str] = frozenset()
    workload: str = ""

    def trusted(self, context: grpc.aio.ServicerContext[Any, Any], address: str) -> bool:
        if address in self.addresses:
            return True
        if not self.workload:
            return False
        names = context.auth_context().get("peer_spiffe_id", ())
        return [name.decode(errors="replace") for name in names] == [self.workload]


NO_PROXIES = Proxies()


def admit(
    guard: InferenceGuard,
    proxies: Proxies,
    context: grpc.aio.ServicerContext[Any, Any],
    model_name: str,
    *,
    limited: bool,
) -> Caller:
    """Check the call with the guard. Anonymous callers are limited per address; a trusted
    proxy (the gateway) names the address it serves in `x-forwarded-for`."""
    authorization = forwarded = cache_control = pinned = ""
    for key, value in context.invocation_metadata() or ():
        if key == AUTHORIZATION:
            authorization = str(value)
        elif key == FORWARDED_FOR:
            forwarded = str(value)
        elif key == CACHE_CONTROL:
            cache_control = str(value)
        elif key == CANARY_NODE:
            pinned = str(value)
    client = peer_host(context.peer())
    if forwarded and proxies.trusted(context, client):
        client = forwarded.split(",")[0].strip()
    principal = guard.check(authorization, model_name, client=client, limited=limited)
    if pinned and not principal.may(Permission.NODES_ADMIN):
        raise PermissionDeniedError(
            f"the {CANARY_NODE} header is the shard's own (its canaries): send requests "
            "without it and the shard picks the node",
            reason="PERMISSION_MISSING",
            metadata={"field": CANARY_NODE},
        )
    return Caller(
        principal=principal, fresh="no-cache" in cache_control.lower(), pinned_node=pinned
    )


def deadline(context: grpc.aio.ServicerContext[Any, Any], cap_s: float) -> float:
    """The timeout of a call forwarded for `context`: the client's remaining time, never more
    than `cap_s`; a node never holds a forwarded call open forever."""
    remaining = context.time_remaining()
    return cap_s if remaining is None else min(remaining, cap_s)
