"""The processes of a local shard a benchmark charges CPU to."""

from __future__ import annotations

import psutil

from shard_tool.local import LocalMesh


def node_gate(mesh: LocalMesh, node: str) -> psutil.Process:
    """The Envoy of `node`'s gate (the agent's child), which every call to the node crosses."""
    agent = psutil.Process(mesh.nodes[node].process.pid)
    return next(p for p in agent.children(recursive=True) if p.name() == "envoy")


def edge(mesh: LocalMesh) -> psutil.Process:
    """The router's edge: the Envoy every call to the router's ports crosses."""
    router = psutil.Process(mesh.services["inference"].pid)
    return next(p for p in router.children(recursive=True) if p.name() == "envoy")
