"""Triton's own HTTP endpoint against the shard's gateway (KServe v2 REST), side by side.

Starts a local shard with one node, then drives `simple` with tritonclient's asyncio HTTP client
(binary tensors, as it sends by default) at concurrency 1 and 16: first at the node's Triton HTTP
port (on loopback), then at the gateway's port (its edge, an Envoy, which sends the body on to
the node's gate over mutual TLS), in plaintext on loopback and over HTTPS trusting the mesh CA
(what every client off this machine uses). Prints throughput, p50/p99 latency, the ratios to
Triton, and the CPU time per request of each process on the path: the gateway's edge, the Python
gateway behind it (idle unless the edge leaves it a request) and the node's gate.

    uv run python -m bench.gateway_vs_triton [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import tritonclient.http.aio as triton_http

from bench.mesh import edge, node_gate
from bench.report import Result, Watched, cpu_seconds, measured, print_header, print_rows
from bench.router_vs_direct import MODELS
from shard_tool.local import LocalMesh, MeshPorts


def _inputs() -> list[triton_http.InferInput]:
    data = np.arange(16, dtype=np.int32).reshape(1, 16)
    inputs = []
    for name in ("INPUT0", "INPUT1"):
        tensor = triton_http.InferInput(name, [1, 16], "INT32")
        tensor.set_data_from_numpy(data)
        inputs.append(tensor)
    return inputs


async def _drive(
    url: str,
    concurrency: int,
    seconds: float,
    watched: Watched,
    *,
    trusted: ssl.SSLContext | None = None,
) -> Result:
    """Drive `url` (HTTPS trusting `trusted`, when given) at `concurrency` for `seconds`."""
    async with triton_http.InferenceServerClient(
        url, conn_limit=concurrency, ssl=trusted is not None, ssl_context=trusted
    ) as client:
        inputs = _inputs()
        for _ in range(50):  # warm up connections and Triton
            await client.infer("simple", inputs)
        latencies: list[float] = []
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                await client.infer("simple", inputs)
                latencies.append((time.perf_counter() - start) * 1000)

        cpu_before = cpu_seconds(watched)
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return measured(len(latencies), elapsed, latencies, cpu_before, watched)


async def main(seconds: float) -> None:
    with tempfile.TemporaryDirectory() as state:
        mesh = LocalMesh(state_dir=Path(state), model_repository=MODELS, ports=MeshPorts.free())
        try:
            await mesh.start(nodes=1)
            hops = {
                "edge": edge(mesh, "gateway"),
                "gateway": psutil.Process(mesh.services["gateway"].pid),
                "gate": node_gate(mesh, "node-0"),
            }
            triton_url = f"127.0.0.1:{mesh.nodes['node-0'].triton_http_port}"
            gateway_url = mesh.gateway_url.removeprefix("http://")
            gateway_tls_url = mesh.gateway_tls_url.removeprefix("https://")
            trusted = ssl.create_default_context(cafile=str(mesh.ca_file))
            print_header(hops)
            for concurrency in (1, 16):
                results = {
                    "triton": await _drive(triton_url, concurrency, seconds, hops),
                    "gateway": await _drive(gateway_url, concurrency, seconds, hops),
                    "gateway tls": await _drive(
                        gateway_tls_url, concurrency, seconds, hops, trusted=trusted
                    ),
                }
                print_rows(concurrency, results, baseline="triton")
        finally:
            mesh.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each run")
    asyncio.run(main(parser.parse_args().seconds))
