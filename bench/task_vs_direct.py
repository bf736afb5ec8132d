"""An encrypted task against the same requests sent straight to the node's Triton.

Starts a local shard with one node, writes N `simple` requests as JSON lines, then:
- direct: posts each to the node's Triton HTTP endpoint, 8 in flight (as the agent does);
- task: seals them to the node, uploads, creates the task, waits until it SUCCEEDED, downloads
  and opens the results: everything an owner waits for, end to end.
Prints both wall times, the ratio, and where the task's time went.

    uv run python -m bench.task_vs_direct [--requests 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import aiohttp
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from bench.router_vs_direct import MODELS
from shard.task.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc
from shard_client import tasks
from shard_tool.local import LocalMesh, MeshPorts

WINDOW = 8


def _write_requests(path: Path, count: int) -> None:
    with path.open("w") as out:
        for i in range(count):
            data = {"shape": [1, 16], "datatype": "INT32", "data": [i % 1000] * 16}
            inputs = [{"name": name, **data} for name in ("INPUT0", "INPUT1")]
            out.write(json.dumps({"id": str(i), "inputs": inputs}) + "\n")


async def _direct(url: str, lines: list[bytes]) -> float:
    """Every request posted as is, WINDOW in flight (sliding), answers read."""
    slots = asyncio.Semaphore(WINDOW)
    started = time.perf_counter()
    async with aiohttp.ClientSession() as http:

        async def post(line: bytes) -> None:
            async with slots, http.post(f"{url}/v2/models/simple/infer", data=line) as reply:
                await reply.read()
                assert reply.status == 200

        await asyncio.gather(*(post(line) for line in lines))
    return time.perf_counter() - started


async def _task(mesh: LocalMesh, path: Path, work: Path) -> dict[str, float]:
    key = X25519PrivateKey.generate()
    async with mesh.admin_channel() as channel:
        node = await mesh.find_node("node-0")
        assert node is not None
        spec = tasks.TaskSpec(
            task_id=tasks.new_task_id("bench"), provider=node, model="simple", requests=path,
            max_duration_s=600, expire_in_s=600, result_key=key,
        )  # fmt: skip
        started = time.perf_counter()
        created = await tasks.submit(channel, spec, work_dir=work)
        submitted = time.perf_counter()
        stub = task_service_pb2_grpc.TaskServiceStub(channel)
        while True:
            done = (await stub.GetTask(task_service_pb2.GetTaskRequest(name=created.name))).task
            if done.state not in (task_pb2.TASK_STATE_PENDING, task_pb2.TASK_STATE_RUNNING):
                break
            await asyncio.sleep(0.02)
        finished = time.perf_counter()
        assert done.state == task_pb2.TASK_STATE_SUCCEEDED, done.state_reason
        await tasks.fetch_result(channel, done, work / "results.jsonl", key=key)
        fetched = time.perf_counter()
    run = (done.end_time.ToNanoseconds() - done.start_time.ToNanoseconds()) / 1e9
    waited = (done.start_time.ToNanoseconds() - done.create_time.ToNanoseconds()) / 1e9
    return {
        "total": fetched - started,
        "seal+upload+create": submitted - started,
        "queued until claimed": waited,
        "run on the node": run,
        "result fetch+open": fetched - finished,
    }


async def main(count: int) -> None:
    with tempfile.TemporaryDirectory() as state:
        mesh = LocalMesh(state_dir=Path(state), model_repository=MODELS, ports=MeshPorts.free())
        try:
            await mesh.start(nodes=1)
            work = Path(state) / "bench"
            work.mkdir()
            requests = work / "requests.jsonl"
            _write_requests(requests, count)
            triton = f"http://127.0.0.1:{mesh.nodes['node-0'].triton_http_port}"
            lines = requests.read_bytes().splitlines()
            await _direct(triton, lines)  # warm up
            direct = await _direct(triton, lines)
            task = await _task(mesh, requests, work)
            size = requests.stat().st_size / 2**20
            print(f"{count} requests ({size:.1f} MiB of JSON lines), {WINDOW} in flight")
            print(f"  direct to Triton HTTP : {direct:7.2f} s  {count / direct:8.0f} req/s")
            total = task["total"]
            print(
                f"  encrypted task        : {total:7.2f} s  {count / total:8.0f} req/s"
                f"  ({direct / total:.2f}x direct)"
            )
            for part, seconds in task.items():
                if part != "total":
                    print(f"    {part:<22}: {seconds:7.2f} s")
        finally:
            mesh.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000, help="requests in the batch")
    asyncio.run(main(parser.parse_args().requests))
