"""The router's connections to node Tritons: one channel per node, reused by every request.

With a mesh identity, each channel is mutual TLS to the node's gate: the router proves it is the
router with its certificate, and checks the peer's certificate names the node the endpoint
record is for. Without one (a development mesh), plaintext, to loopback addresses only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from shard_core import tls
from shard_core.pki import node_workload
from shard_core.tls import RETIRE_GRACE_S

SERVICE = "inference.GRPCInferenceService"
# No keepalive pings: Triton's defaults answer pings more often than every 5 minutes with GOAWAY
# too_many_pings. Large tensors need the message limits raised.
CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
)


@dataclass(eq=False, kw_only=True)
class NodeChannel:
    """A channel to one node's Triton with per-method raw-bytes callables."""

    node: str
    address: str
    in_flight: int = 0
    channel: grpc.aio.Channel = field(repr=False)
    _methods: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def opener(
        cls, identity: tls.TlsIdentity | None, trust_domain: str
    ) -> Callable[[str, str], NodeChannel]:
        """What opens a node's channel: mutual TLS with `identity`'s certificate of the
        moment, or plaintext without one."""

        def open_channel(address: str, node: str) -> NodeChannel:
            credentials = identity.channel_credentials() if identity else None
            expect = node_workload(trust_domain, node)
            channel = tls.channel(address, credentials, expect=expect, options=CHANNEL_OPTIONS)
            return cls(node=node, address=address, channel=channel)

        return open_channel

    def connected(self) -> bool:
        state = self.channel.get_state(try_to_connect=True)
        return state == grpc.ChannelConnectivity.READY

    def method(self, name: str) -> Any:
        """The unary callable for `name`, passing serialized bytes both ways."""
        callable_ = self._methods.get(name)
        if callable_ is None:
            callable_ = self._methods[name] = self.channel.unary_unary(
                f"/{SERVICE}/{name}", request_serializer=None, response_deserializer=None
            )
        return callable_

    def stream(self, name: str) -> Any:
        """The bidirectional-streaming callable for `name`, passing serialized bytes both ways."""
        return self.channel.stream_stream(
            f"/{SERVICE}/{name}", request_serializer=None, response_deserializer=None
        )

    def close_later(self, grace_s: float = RETIRE_GRACE_S) -> None:
        """Close once requests in flight have had `grace_s` to finish."""
        task = asyncio.get_running_loop().create_task(self.channel.close(grace_s))
        _closing.add(task)
        task.add_done_callback(_closing.discard)


_closing: set[asyncio.Task[None]] = set()
