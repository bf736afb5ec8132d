"""Behaviour validation: requests with known answers, sent at random times to every node that
serves a model version that has them. A node whose Triton answers one wrong is quarantined: it
stops getting traffic and its replicas move. A node that does not answer is not judged here;
liveness is the lease's business.

Runs on the registry replica that leads, beside the scheduler.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

import grpc
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2

from shard.model.v1 import model_pb2
from shard.node.v1 import node_pb2
from shard_core import keys
from shard_core.etcd.store import EtcdStore

_log = logging.getLogger(__name__)

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
PARALLEL_PROBES = 8


def mismatch(
    expected: service_pb2.ModelInferResponse, actual: service_pb2.ModelInferResponse
) -> str:
    """What differs between the known answer and the node's, or an empty string."""
    got = {
        output.name: (output, actual.raw_output_contents[index])
        for index, output in enumerate(actual.outputs)
        if index < len(actual.raw_output_contents)
    }
    for index, output in enumerate(expected.outputs):
        if output.name not in got:
            return f"output {output.name} is missing"
        tensor, contents = got[output.name]
        if tensor.datatype != output.datatype or list(tensor.shape) != list(output.shape):
            return f"output {output.name} is {tensor.datatype}{list(tensor.shape)}"
        if contents != expected.raw_output_contents[index]:
            return f"output {output.name} has other values"
    return ""


class CanaryProber:
    def __init__(
        self,
        *,
        store: EtcdStore,
        quarantine: Callable[[str, str], Awaitable[object]],
        interval_s: float,
    ) -> None:
        self._store = store
        self._quarantine = quarantine
        self._interval_s = interval_s
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def run(self) -> None:
        """Probe at random times, about once an interval, for as long as this replica leads."""
        try:
            while True:
                await asyncio.sleep(self._interval_s * random.uniform(0.5, 1.5))
                try:
                    await self.probe_all()
                except Exception:
                    _log.exception("canary pass failed")
        finally:
            for channel in self._channels.values():
                await channel.close(None)
            self._channels.clear()

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
        live = {endpoint.inference_address for endpoint in endpoints}
        for address in [a for a in self._channels if a not in live]:
            await self._channels.pop(address).close(None)

    async def _probe(self, endpoint: node_pb2.ModelEndpoint, canary: model_pb2.Canary) -> None:
        request = service_pb2.ModelInferRequest.FromString(canary.request)
        request.model_name, request.model_version = endpoint.model_name, endpoint.model_version
        channel = self._channels.get(endpoint.inference_address)
        if channel is None:
            channel = self._channels[endpoint.inference_address] = grpc.aio.insecure_channel(
                endpoint.inference_address
            )
        try:
            raw = await channel.unary_unary(MODEL_INFER, None, None)(
                request.SerializeToString(), timeout=10
            )
        except grpc.aio.AioRpcError as error:
            _log.info("canary to %s not answered: %s", endpoint.node, error.code().name)
            return
        try:
            answer = service_pb2.ModelInferResponse.FromString(raw)
        except DecodeError:
            wrong = "the answer is not a ModelInferResponse"
        else:
            wrong = mismatch(service_pb2.ModelInferResponse.FromString(canary.response), answer)
        if wrong:
            reason = f"CANARY_FAILED: {endpoint.model_name} v{endpoint.model_version}: {wrong}"
            _log.warning("quarantining %s: %s", endpoint.node, reason)
            await self._quarantine(endpoint.node, reason)
