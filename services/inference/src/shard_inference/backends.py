"""The router's connections to node Tritons: one channel per node, reused by every request."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import grpc

from shard_core.grpc.server import SERVER_OPTIONS

SERVICE = "inference.GRPCInferenceService"


@dataclass(eq=False, kw_only=True)
class NodeChannel:
    """A channel to one node's Triton with per-method raw-bytes callables."""

    address: str
    in_flight: int = 0
    channel: grpc.aio.Channel = field(repr=False)
    _methods: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, address: str) -> NodeChannel:
        return cls(address=address, channel=grpc.aio.insecure_channel(address, SERVER_OPTIONS))

    def method(self, name: str) -> Any:
        """The unary callable for `name`, passing serialized bytes both ways."""
        callable_ = self._methods.get(name)
        if callable_ is None:
            callable_ = self._methods[name] = self.channel.unary_unary(
                f"/{SERVICE}/{name}", request_serializer=None, response_deserializer=None
            )
        return callable_

    def close_later(self, grace_s: float = 5.0) -> None:
        """Close once requests in flight have had `grace_s` to finish."""
        asyncio.get_running_loop().create_task(self.channel.close(grace_s))
