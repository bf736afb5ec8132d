"""Who a call to the router comes from: its credentials and its client's address.

Every call reaches the router through its edge (Envoy, on a Unix socket only the router's user
can open): the edge appends the address it took the connection from to `x-forwarded-for`, and on
the mesh port names the caller's certificate in `x-forwarded-client-cert`, after removing any
that the caller sent."""

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

CACHE_CONTROL = "cache-control"
CLIENT_CERTIFICATE = "x-forwarded-client-cert"


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

    def trusted(self, address: str, certificate: str) -> bool:
        """Whether the peer at `address` (whose certificate, as the edge describes it in
        `x-forwarded-client-cert`, is `certificate`) is one of them."""
        if address in self.addresses:
            return True
        return bool(self.workload) and certificate_uris(certificate) == [self.workload]


def certificate_uris(certificate: str) -> list[str]:
    """The URI SANs of `x-forwarded-client-cert` (`Hash=...;URI=spiffe://...`, one element:
    the edge replaces whatever the caller sent)."""
    return [
        value
        for part in certificate.split(";")
        for key, _, value in [part.partition("=")]
        if key.strip().lower() == "uri"
    ]


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
    authorization = forwarded = cache_control = pinned = certificate = ""
    for key, value in context.invocation_metadata() or ():
        if key == AUTHORIZATION:
            authorization = str(value)
        elif key == FORWARDED_FOR:
            forwarded = str(value)
        elif key == CACHE_CONTROL:
            cache_control = str(value)
        elif key == CANARY_NODE:
            pinned = str(value)
        elif key == CLIENT_CERTIFICATE:
            certificate = str(value)
    client = client_address(forwarded, certificate, proxies)
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


def client_address(forwarded: str, certificate: str, proxies: Proxies) -> str:
    """The client a call through the edge is for: the peer the edge took it from (the last
    `x-forwarded-for` entry), or, for a trusted proxy, the client it names before that."""
    hops = [hop.strip() for hop in forwarded.split(",")] if forwarded else []
    if not hops:
        return ""
    if len(hops) > 1 and proxies.trusted(hops[-1], certificate):
        return hops[-2]
    return hops[-1]


def deadline(context: grpc.aio.ServicerContext[Any, Any], cap_s: float) -> float:
    """The timeout of a call forwarded for `context`: the client's remaining time, never more
    than `cap_s`; a node never holds a forwarded call open forever."""
    remaining = context.time_remaining()
    return cap_s if remaining is None else min(remaining, cap_s)
