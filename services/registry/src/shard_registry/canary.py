"""Behaviour validation: requests with known answers (each version's pool of canaries, which
its owner can extend), sent at random times to every node that serves a version that has them.

Canaries go through the data path like any request: the registry asks a router, with the admin's
credentials and the `shard-canary-node` header naming the node, and the router sends the bytes
over the same connection as real traffic. A node sees a request of the model, nothing more.

A node whose Triton answers one wrong is quarantined: it stops getting traffic and its replicas
move. A node that leaves several in a row unanswered while it keeps its lease (a dead node's
endpoints vanish with its lease first) is quarantined too. Failures of the router, or a node
the router does not route to, judge nobody.

Runs on the registry replica that leads, beside the scheduler.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2

from shard.model.v1 import model_pb2
from shard.node.v1 import node_pb2
from shard_client.answers import mismatch
from shard_core import keys
from shard_core.auth import AUTHORIZATION, CANARY_NODE
from shard_core.errors import error_info
from shard_core.etcd.store import EtcdStore

_log = logging.getLogger(__name__)

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
PARALLEL_PROBES = 8
TIMEOUT_S = 10.0
# Canaries in a row a node leaves unanswered before it is judged.
MAX_UNANSWERED = 3
UNANSWERED = "NODE_UNANSWERED"  # the router's reason when the node failed, not the router


@dataclass(slots=True)
class _Silence:
    count: int
    since: float  # monotonic time of the first unanswered canary in the row
    last: str  # what the router said about the last one


class CanaryProber:
    def __init__(
        self,
        *,
        store: EtcdStore,
        router: Callable[[], grpc.aio.Channel],
        admin_token: str,
        quarantine: Callable[[str, str], Awaitable[object]],
        interval_s: float,
        lease_ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._router = router
        self._metadata = ((AUTHORIZATION, f"Bearer {admin_token}"),)
        self._quarantine = quarantine
        self._interval_s = interval_s
        # A node silent for longer than this while its endpoints stay has kept its lease.
        self._patience_s = lease_ttl_s + interval_s
        self._clock = clock
        self._silences: dict[str, _Silence] = {}
        self._channel: grpc.aio.Channel | None = None

    async def run(self) -> None:
        """Probe at random times, about once an interval, for as long as this replica leads."""
        self._channel = self._router()  # the admin token rides on each call
        try:
            while True:
                await asyncio.sleep(self._interval_s * random.uniform(0.5, 1.5))
                try:
                    await self.probe_all()
                except Exception:
                    _log.exception("canary pass failed")
        finally:
            await self._channel.close(None)
            self._channel = None
            self._silences.clear()

    async def probe_all(self) -> None:
        endpoints = [
            node_pb2.ModelEndpoint.FromString(entry.value)
            for entry in (await self._store.snapshot(keys.ENDPOINTS)).entries
        ]
        versions: dict[tuple[str, str], model_pb2.ModelVersion | None] = {}
        probes = []
        for endpoint in endpoints:
            key = (endpoint.model_name, endpoint.model_version)
            if key not in versions:
                found = await self._store.get(keys.version(*key))
                versions[key] = model_pb2.ModelVersion.FromString(found.value) if found else None
            version = versions[key]
            if version is not None and version.canaries:
                probes.append(self._probe(endpoint, random.choice(list(version.canaries))))
        # In parallel, a few at a time: a slow node must not hold up the others' checks.
        limit = asyncio.Semaphore(PARALLEL_PROBES)

        async def limited(probe: Awaitable[None]) -> None:
            async with limit:
                await probe

        await asyncio.gather(*(limited(probe) for probe in probes))
        live = {endpoint.node for endpoint in endpoints}
        for node in [n for n in self._silences if n not in live]:
            del self._silences[node]

    async def _probe(self, endpoint: node_pb2.ModelEndpoint, canary: model_pb2.Canary) -> None:
        assert self._channel is not None
        request = service_pb2.ModelInferRequest.FromString(canary.request)
        request.model_name, request.model_version = endpoint.model_name, endpoint.model_version
        where = f"{endpoint.model_name} v{endpoint.model_version}"
        try:
            raw = await self._channel.unary_unary(MODEL_INFER, None, None)(
                request.SerializeToString(),
                timeout=TIMEOUT_S,
                metadata=(*self._metadata, (CANARY_NODE, endpoint.node)),
            )
        except grpc.aio.AioRpcError as error:
            info = error_info(error)
            if info is not None and info.reason == UNANSWERED:
                await self._unanswered(endpoint.node, where, error.details() or "")
            else:  # the router's failure, or a node it no longer routes to: nobody to judge
                _log.info("canary for %s not sent: %s", endpoint.node, error.details())
            return
        self._silences.pop(endpoint.node, None)
        try:
            answer = service_pb2.ModelInferResponse.FromString(raw)
        except DecodeError:
            wrong = "the answer is not a ModelInferResponse"
        else:
            wrong = mismatch(service_pb2.ModelInferResponse.FromString(canary.response), answer)
        if wrong:
            await self._judge(endpoint.node, f"CANARY_FAILED: {where}: {wrong}")

    async def _unanswered(self, node: str, where: str, details: str) -> None:
        now = self._clock()
        silence = self._silences.setdefault(node, _Silence(count=0, since=now, last=""))
        silence.count += 1
        silence.last = details
        _log.info("canary to %s not answered (%d in a row): %s", node, silence.count, details)
        if silence.count >= MAX_UNANSWERED and now - silence.since >= self._patience_s:
            del self._silences[node]
            await self._judge(
                node,
                f"CANARY_UNANSWERED: {where}: {silence.count} canaries in a row over "
                f"{now - silence.since:.0f} s got no answer while the node kept its lease "
                f"(last: {details})",
            )

    async def _judge(self, node: str, reason: str) -> None:
        _log.warning("quarantining %s: %s", node, reason)
        await self._quarantine(node, reason)
