"""The processes of a local shard a benchmark charges CPU to."""

from __future__ import annotations

import psutil

from shard_tool.local import LocalMesh


def node_gate(mesh: LocalMesh, node: str) -> psutil.Process:
    """The Envoy of `node`'s gate (the agent's child), which every call to the node crosses."""
    agent = psutil.Process(mesh.nodes[node].process.pid)
    return next(p for p in agent.children(recursive=True) if p.name() == "envoy")


def edge(mesh: LocalMesh, service: str = "inference") -> psutil.Process:
    """A service's edge (the router's, or the gateway's): the Envoy every call to the service's
    ports crosses."""
    process = psutil.Process(mesh.services[service].pid)
    return next(p for p in process.children(recursive=True) if p.name() == "envoy")
