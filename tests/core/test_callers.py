"""Who may name the client it serves (`x-forwarded-for`) to the router: the gateway, by its
address or by its mesh certificate; anyone else is counted by its own address."""

from __future__ import annotations

from typing import Any

import pytest

from shard_core.auth import FORWARDED_FOR, InferenceGuard, KeyRing, ModelAccess
from shard_core.errors import ResourceExhaustedError
from shard_core.limits import RateLimits
from shard_core.pki import spiffe_id
from shard_inference.callers import CLIENT_CERTIFICATE, Proxies, admit

GATEWAY = spiffe_id("shard.local", "service", "gateway")
ROUTER = spiffe_id("shard.local", "service", "router")


class Context:
    """A call as the router gets it from its edge: the edge appended the address of its peer
    to what the peer sent in x-forwarded-for, and described the peer's certificate."""

    def __init__(self, peer: str, forwarded: str, spiffe: str = "") -> None:
        self._metadata = [(FORWARDED_FOR, f"{forwarded}, {peer}")]
        if spiffe:
            self._metadata.append((CLIENT_CERTIFICATE, f"Hash=00ff;URI={spiffe}"))

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self._metadata

    def peer(self) -> str:
        return "unix:/run/shard/router.sock"


def _from(peer: str, forwarded: str, spiffe: str = "") -> Any:
    """A call's context, as the router sees it."""
    return Context(peer, forwarded, spiffe)


def _guard() -> InferenceGuard:
    # A frozen clock: buckets never refill, so each address has a fixed number of calls.
    limits = RateLimits(key_rps=0, anonymous_rps=1, clock=lambda: 0.0)
    return InferenceGuard(KeyRing(), ModelAccess(), limits)


def _exhaust(guard: InferenceGuard, proxies: Proxies, context: Any) -> None:
    for _ in range(100):
        try:
            admit(guard, proxies, context, "simple", limited=True)
        except ResourceExhaustedError:
            return
    raise AssertionError("never limited")


@pytest.mark.parametrize(
    "proxies",
    [Proxies(workload=GATEWAY), Proxies(addresses=frozenset({"10.1.1.1"}))],
    ids=["by certificate", "by address"],
)
def test_the_gateway_names_its_clients(proxies: Proxies) -> None:
    guard = _guard()
    _exhaust(guard, proxies, _from("10.1.1.1", "203.0.113.1", GATEWAY))
    # Another client of the gateway has its own bucket.
    admit(guard, proxies, _from("10.1.1.1", "203.0.113.2", GATEWAY), "simple", limited=True)


def test_anyone_else_is_counted_by_its_own_address() -> None:
    guard, proxies = _guard(), Proxies(workload=GATEWAY)
    _exhaust(guard, proxies, _from("10.2.2.2", "203.0.113.3", ROUTER))
    with pytest.raises(ResourceExhaustedError):
        admit(guard, proxies, _from("10.2.2.2", "203.0.113.4", ROUTER), "simple", limited=True)
    with pytest.raises(ResourceExhaustedError):
        admit(guard, proxies, _from("10.2.2.2", "203.0.113.5"), "simple", limited=True)
