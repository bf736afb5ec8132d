"""Triton direct, the node's gate, the shard's front door and client-side routing, side by side.

Starts a local shard with one node, then drives `simple` at concurrency 1 and 16: with
tritonclient's asyncio gRPC client straight at the node's Triton (on loopback), the same client
through the node's gate (mutual TLS, presenting the router's certificate: the hop every call to
a node now crosses), through the router's ports (its edge, Envoy, which sends the call straight
to the node's gate: loopback plaintext, anonymous and with a developer's API key, then TLS
trusting the mesh CA, what every client off this machine uses), through the Python router
behind the edge (its Unix socket: the path the edge leaves to it, and what every call took
before the edge), and `shard_client.aio` (the same API, routing in the client, calling the
node's gate with its client certificate; its watch of the router in plaintext, then over TLS).
Prints throughput, p50/p99 latency, the ratios to direct, and the CPU time per request of each
of the shard's processes on the way: the edge, the Python router and the node's gate.

    uv run python -m bench.router_vs_direct [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import tritonclient.grpc.aio as triton

from bench.mesh import edge, node_gate
from bench.report import Result, Watched, cpu_seconds, measured, print_header, print_rows
from shard.auth.v1 import api_key_pb2, key_service_pb2_grpc
from shard.auth.v1 import key_service_pb2 as key_api
from shard_client.aio import InferenceServerClient as ShardClient
from shard_core import pki
from shard_core.limits import MAX_RATE_RPS
from shard_core.tls import TlsIdentity
from shard_node.identity import NodeIdentity
from shard_tool.local import LocalMesh, MeshPorts

MODELS = Path(__file__).resolve().parent.parent / "infra" / "triton" / "models"


def _inputs() -> list[triton.InferInput]:
    data = np.arange(16, dtype=np.int32).reshape(1, 16)
    inputs = []
    for name in ("INPUT0", "INPUT1"):
        tensor = triton.InferInput(name, [1, 16], "INT32")
        tensor.set_data_from_numpy(data)
        inputs.append(tensor)
    return inputs


Opened = Callable[[], triton.InferenceServerClient | ShardClient]


async def _drive(
    opened: Opened,
    concurrency: int,
    seconds: float,
    watched: Watched,
    headers: dict[str, str] | None = None,
) -> Result:
    """Drive the client `opened` makes at `concurrency` for `seconds`, sending `headers`."""
    async with opened() as client:
        inputs = _inputs()
        for _ in range(50):  # warm up channels and Triton
            await client.infer("simple", inputs, headers=headers)
        latencies: list[float] = []
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                await client.infer("simple", inputs, headers=headers)
                latencies.append((time.perf_counter() - start) * 1000)

        cpu_before = cpu_seconds(watched)
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return measured(len(latencies), elapsed, latencies, cpu_before, watched)


async def main(seconds: float) -> None:
    with tempfile.TemporaryDirectory() as state:
        # Keys as fast as the edge lets them be (the bench measures the check, not the limit).
        mesh = LocalMesh(
            state_dir=Path(state),
            model_repository=MODELS,
            ports=MeshPorts.free(),
            registry_settings={"default_key_rate_limit_rps": 0},
        )
        try:
            await mesh.start(nodes=1)
            node = mesh.nodes["node-0"]
            watched = {
                "edge": edge(mesh),
                "router": psutil.Process(mesh.services["inference"].pid),
                "gate": node_gate(mesh, "node-0"),
            }
            direct_url = f"127.0.0.1:{node.triton_grpc_port}"
            ca = str(mesh.ca_file)
            key = mesh.admin_token
            router_identity = TlsIdentity(mesh.tls_path("router"))
            node_name = pki.node_workload(
                "shard.local", NodeIdentity.load_or_create(node.state_dir).node_id
            ).dns
            # A developer's key: the edge checks it (its SHA-256, in Lua) on every call.
            async with mesh.admin_channel() as channel:
                made = await key_service_pb2_grpc.KeyServiceStub(channel).CreateApiKey(
                    key_api.CreateApiKeyRequest(
                        api_key=api_key_pb2.ApiKey(
                            principal="bench",
                            role=api_key_pb2.ROLE_DEVELOPER,
                            rate_limit_rps=MAX_RATE_RPS,
                        )
                    )
                )
            keyed = {"authorization": f"Bearer {made.secret}"}
            clients: dict[str, Opened] = {
                "direct": lambda: triton.InferenceServerClient(direct_url),
                "gate": lambda: triton.InferenceServerClient(
                    node.address,
                    creds=router_identity.channel_credentials(),
                    channel_args=[("grpc.ssl_target_name_override", node_name)],
                ),
                "router": lambda: triton.InferenceServerClient(mesh.router_address),
                "router key": lambda: triton.InferenceServerClient(mesh.router_address),
                "python": lambda: triton.InferenceServerClient(f"unix:{mesh.router_socket}"),
                "router tls": lambda: triton.InferenceServerClient(
                    mesh.router_tls_address, ssl=True, root_certificates=ca
                ),
                "client": lambda: ShardClient(mesh.router_address, api_key=key),
                "client tls": lambda: ShardClient(
                    mesh.router_tls_address,
                    api_key=key,
                    ssl=True,
                    root_certificates=mesh.ca_file,
                ),
            }
            print_header(watched)
            for concurrency in (1, 16):
                results = {
                    name: await _drive(
                        opened,
                        concurrency,
                        seconds,
                        watched,
                        headers=keyed if name == "router key" else None,
                    )
                    for name, opened in clients.items()
                }
                print_rows(concurrency, results, baseline="direct")
        finally:
            mesh.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each run")
    asyncio.run(main(parser.parse_args().seconds))
