"""REST inference straight to the node Tritons: the gateway's own data plane.

A node's Triton already speaks KServe v2 over HTTP, so the gateway does not translate a request
to gRPC for the router: it admits the call with the router's guard (key, model access, rate
limits), picks a replica with the router's balancer (traffic weights, power-of-two-choices,
sequence affinity, outlier ejection, retries within a budget) and sends the body to that Triton
as it came, with only the headers Triton needs (never the caller's key). Triton's answer goes back
as it came: one Python hop, and no tensor is decoded or encoded on the way.

Requests the router must see still go to it: versions whose answers are cached (the router holds
the cache, shared with its gRPC callers) and models no node serves over HTTP.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from shard_client.routing import Balancer, Plan
from shard_core import tls
from shard_core.errors import DeadlineExceededError, UnavailableError
from shard_core.pki import node_workload
from shard_core.tls import RETIRE_GRACE_S
from shard_edge.view import ShardView
from shard_gateway.callers import client_address
from shard_gateway.kserve import HEADER_LENGTH, parse_infer_request

_log = logging.getLogger(__name__)

# Request headers Triton needs to read the body; everything else stays at the gateway.
PASSED_ON = (HEADER_LENGTH, "Content-Type")
# Response headers that say how to read Triton's answer.
PASSED_BACK = (HEADER_LENGTH, "Content-Type")
# How long a node that failed has to answer a liveness probe before it gets traffic again.
PROBE_TIMEOUT = aiohttp.ClientTimeout(total=1.0)
# Connection failures: the request never reached Triton, or Triton went away under it.
UNREACHABLE = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)


@dataclass(eq=False, kw_only=True)
class NodeHttp:
    """One node's Triton over HTTP: a keep-alive connection pool and requests in flight."""

    node: str
    address: str
    session: aiohttp.ClientSession = field(repr=False)
    # The name the node's certificate must carry (TLS), or None (plaintext, loopback only).
    server_hostname: str | None = None
    in_flight: int = 0
    _live: bool = False
    _probe: asyncio.Task[None] | None = field(default=None, repr=False)

    @classmethod
    def opener(
        cls, identity: tls.TlsIdentity | None, trust_domain: str
    ) -> Callable[[str, str], NodeHttp]:
        """What opens a node's connection pool: HTTPS to the node's gate presenting
        `identity`'s certificate of the moment and checking the peer is the node, or
        plaintext (loopback only) without an identity."""

        def open_pool(address: str, node: str) -> NodeHttp:
            expect = node_workload(trust_domain, node)
            if identity is None:
                tls.require_loopback(address, what="plaintext HTTP to a node")
            session = aiohttp.ClientSession(
                f"{'https' if identity else 'http'}://{address}",
                connector=aiohttp.TCPConnector(
                    limit=0,
                    ttl_dns_cache=None,
                    ssl=identity.client_context() if identity else False,
                ),
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding"),
            )
            hostname = expect.dns if identity else None
            return cls(node=node, address=address, session=session, server_hostname=hostname)

        return open_pool

    def connected(self) -> bool:
        """Asked only of an ejected node once its backoff ends: whether its Triton answered the
        last liveness probe (a probe starts in the background; real requests never probe)."""
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(self._check_live())
        return self._live

    async def _check_live(self) -> None:
        try:
            async with self.session.get(
                "/v2/health/live", timeout=PROBE_TIMEOUT, server_hostname=self.server_hostname
            ) as response:
                self._live = response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            self._live = False

    def close_later(self, grace_s: float = RETIRE_GRACE_S) -> None:
        """Close once requests in flight have had `grace_s` to finish."""

        async def close() -> None:
            await asyncio.sleep(grace_s)
            await self.session.close()

        task = asyncio.ensure_future(close())
        _closing.add(task)
        task.add_done_callback(_closing.discard)


_closing: set[asyncio.Task[None]] = set()


def _sequence_id(body: bytes, header_length: str | None) -> str:
    """The Triton sequence id in the request's JSON, if any (read only when the bytes mention
    one: most requests are not parsed at all)."""
    end = int(header_length) if header_length and header_length.isdigit() else len(body)
    header = body[:end]
    if b'"sequence_id"' not in header:
        return ""
    try:
        parameters = json.loads(header).get("parameters", {})
    except (ValueError, AttributeError):
        return ""  # Triton answers a malformed body; see `_explained`
    sequence = parameters.get("sequence_id", 0) if isinstance(parameters, dict) else 0
    return str(sequence) if sequence else ""


class DirectInference:
    """Routes REST inference to node Tritons over HTTP."""

    def __init__(
        self,
        view: ShardView[NodeHttp],
        *,
        max_attempts: int,
        timeout_s: float,
        on_failure: Callable[[str], None] = lambda _: None,
    ) -> None:
        self._view = view
        self._balancer: Balancer[NodeHttp] = Balancer(
            view.table, view.split, max_attempts=max_attempts, on_failure=on_failure
        )
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    def plan(
        self, name: str, version: str, body: bytes, header_length: str | None
    ) -> Plan[NodeHttp]:
        """Where the request goes; no routes when the router should take it."""
        plan = self._balancer.plan(name, version, _sequence_id(body, header_length))
        if plan.routes and self._view.cacheable.ttl(name, plan.version):
            return Plan(version=plan.version, chosen=plan.chosen, routes=[])
        return plan

    async def infer(
        self,
        request: web.Request,
        plan: Plan[NodeHttp],
        name: str,
        body: bytes,
        authorization: str,
    ) -> web.Response:
        """Admit the call, then send it to the plan's replicas until one takes it."""
        self._view.guard.check(authorization, name, client=client_address(request), limited=True)
        headers = {key: request.headers[key] for key in PASSED_ON if key in request.headers}
        path = f"/v2/models/{name}/versions/{plan.version}/infer"
        last = "the retry budget is spent"
        for route in self._balancer.attempts(plan):
            node = route.backend
            node.in_flight += 1
            try:
                async with node.session.post(
                    path,
                    data=body,
                    headers=headers,
                    timeout=self._timeout,
                    server_hostname=node.server_hostname,
                ) as answer:
                    content = await answer.read()
                    status = answer.status
                    passed = {k: answer.headers[k] for k in PASSED_BACK if k in answer.headers}
            except UNREACHABLE as error:
                _log.warning("%s unreachable for %s: %r", route.node, name, error)
                self._balancer.ejection.failed(node)
                last = f"{route.node}: {error!r}"
                continue
            except TimeoutError:
                raise DeadlineExceededError(
                    f"model '{name}' did not answer within {self._timeout.total:g} s"
                ) from None
            finally:
                node.in_flight -= 1
            self._balancer.ejection.succeeded(node)
            if status >= 400:
                _explained(body, request.headers.get(HEADER_LENGTH), name, plan.version)
            return web.Response(body=content, status=status, headers=passed)
        raise UnavailableError(f"no replica of model '{name}' could be reached: {last}")


def _explained(body: bytes, header_length: str | None, name: str, version: str) -> None:
    """For a request Triton refused: the gateway's own reading of it, which raises
    INVALID_ARGUMENT naming the field at fault when the body itself is malformed. Otherwise
    Triton's answer stands."""
    parse_infer_request(body, header_length, name, version)
