"""Small networking helpers."""

from __future__ import annotations

import random
import socket
from pathlib import Path

_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _below_ephemeral() -> range:
    """Ports the kernel never hands to outgoing connections on its own."""
    try:
        low = int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return range(max(1024, low - 12000), low)


def free_port() -> int:
    """A TCP port that is free right now, for processes that cannot report the port they bind.

    Chosen at random below the ephemeral range: a port the kernel picked for us from that range
    can be handed to some outgoing connection before the process that needs it binds it.
    """
    candidates = _below_ephemeral()
    for _ in range(200):
        port = random.choice(candidates)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise OSError("no free TCP port found")


def peer_host(peer: str) -> str:
    """The host of a gRPC peer string: `ipv4:1.2.3.4:5678` or `ipv6:[::1]:5678`."""
    address = peer.split(":", 1)[1] if ":" in peer else peer
    host = address.rsplit(":", 1)[0]
    return host.strip("[]")
