"""Triton's own HTTP endpoint against the shard's gateway (KServe v2 REST), side by side.

Starts a local shard with one node, then drives `simple` with tritonclient's asyncio HTTP client
(binary tensors, as it sends by default) at concurrency 1 and 16: first at the node's Triton HTTP
port, then at the gateway (which goes on to the router and the node over gRPC). Prints throughput,
p50/p99 latency, the ratios to Triton, and the gateway's and router's CPU time per request.

    uv run python -m bench.gateway_vs_triton [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import tritonclient.http.aio as triton_http

from bench.router_vs_direct import MODELS, Result
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
    url: str, concurrency: int, seconds: float, watched: list[psutil.Process]
) -> Result:
    async with triton_http.InferenceServerClient(url, conn_limit=concurrency) as client:
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

        cpu_before = sum(sum(p.cpu_times()[:2]) for p in watched)
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        cpu = sum(sum(p.cpu_times()[:2]) for p in watched) - cpu_before
    return Result(
        requests=len(latencies), seconds=elapsed, latencies_ms=latencies, router_cpu_s=cpu
    )


async def main(seconds: float) -> None:
    with tempfile.TemporaryDirectory() as state:
        mesh = LocalMesh(state_dir=Path(state), model_repository=MODELS, ports=MeshPorts.free())
        try:
            await mesh.start(nodes=1)
            hops = [psutil.Process(mesh.services[name].pid) for name in ("gateway", "inference")]
            triton_url = f"127.0.0.1:{mesh.nodes['node-0'].triton_http_port}"
            gateway_url = mesh.gateway_url.removeprefix("http://")
            print(
                f"{'target':<8} {'conc':>4} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
                f"{'x triton':>9} {'+p50 ms':>8} {'gw+router µs/req':>17}"
            )
            for concurrency in (1, 16):
                triton = await _drive(triton_url, concurrency, seconds, hops)
                gateway = await _drive(gateway_url, concurrency, seconds, hops)
                for name, result in (("triton", triton), ("gateway", gateway)):
                    ratio = result.throughput / triton.throughput
                    added = result.percentile(50) - triton.percentile(50)
                    cpu_us = result.router_cpu_s / result.requests * 1e6
                    print(
                        f"{name:<8} {concurrency:>4} {result.throughput:>9.0f} "
                        f"{result.percentile(50):>8.2f} {result.percentile(99):>8.2f} "
                        f"{ratio:>9.2f} {added:>8.2f} "
                        f"{cpu_us if name == 'gateway' else 0:>17.0f}"
                    )
        finally:
            mesh.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each run")
    asyncio.run(main(parser.parse_args().seconds))
