"""`shard task`: encrypted batch jobs for a provider of your choice.

`submit` seals the requests to the provider's encryption key (checked against the identity its
node id names), stores them and creates the task; `result` checks the provider's signature,
fetches the results and opens them with your task key (`$XDG_CONFIG_HOME/shard/task.key`, made on
first use, owner-only), unless you asked for them in the clear.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import tempfile
from pathlib import Path
from typing import Annotated

import grpc
import typer
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from shard.node.v1 import node_pb2, node_service_pb2, node_service_pb2_grpc
from shard.task.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc
from shard_client import tasks
from shard_core import sealing
from shard_tool.config import config_path
from shard_tool.output import Column, Format, emit, emit_data, transfer_progress
from shard_tool.session import TIMEOUT_S, all_pages, fail, resource_name, session

app = typer.Typer(help="Encrypted tasks: submit a batch to a provider, follow it, get the result.")

Stub = task_service_pb2_grpc.TaskServiceStub
DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
FINAL = {
    task_pb2.TASK_STATE_SUCCEEDED,
    task_pb2.TASK_STATE_FAILED,
    task_pb2.TASK_STATE_EXPIRED,
    task_pb2.TASK_STATE_CANCELLED,
}


def _requests(task: task_pb2.Task) -> str:
    if task.state != task_pb2.TASK_STATE_SUCCEEDED:
        return "-"
    return f"{task.result.succeeded_requests} ok, {task.result.failed_requests} failed"


def _verification(task: task_pb2.Task) -> str:
    if task.verification == task_pb2.VERIFICATION_UNSPECIFIED:
        return "-"
    return task_pb2.Verification.Name(task.verification).removeprefix("VERIFICATION_")


COLUMNS: list[Column] = [
    ("name", lambda t: t.name.removeprefix("tasks/")),
    ("state", lambda t: task_pb2.TaskState.Name(t.state).removeprefix("TASK_STATE_")),
    ("provider", lambda t: t.provider.removeprefix("nodes/")),
    ("model", lambda t: t.model),
    ("requests", _requests),
    ("verification", _verification),
    ("reason", lambda t: t.state_reason),
]
TaskName = Annotated[str, typer.Argument(help="The task id (or tasks/<id>).")]


def _seconds(value: str, option: str) -> float:
    match = DURATION.fullmatch(value.strip())
    if not match or float(match[1]) <= 0:
        raise typer.BadParameter(
            f"{value!r} is not a duration like 90s, 10m or 2h", param_hint=option
        )
    return float(match[1]) * UNITS[match[2]]


def default_key_path() -> Path:
    return config_path().parent / "task.key"


def _owner_key(path: Path | None) -> X25519PrivateKey:
    try:
        return sealing.encryption_key(path or default_key_path())
    except (OSError, ValueError) as error:
        fail(f"cannot use the task key: {error}")


@app.command("submit")
def submit(
    ctx: typer.Context,
    requests: Annotated[
        Path, typer.Argument(help="JSON lines: one KServe v2 inference request each.")
    ],
    provider: Annotated[
        list[str],
        typer.Option(
            "--provider",
            "-p",
            help="The node to run it (`shard node ls`); repeat for redundancy, each its own run.",
        ),
    ],
    model: Annotated[str, typer.Option(help="The model the requests are for.")],
    duration: Annotated[str, typer.Option(help="Longest run once started (90s, 10m, 2h).")] = "10m",
    expire_in: Annotated[str, typer.Option(help="Expires unless started within this.")] = "1h",
    gpus: Annotated[int, typer.Option(min=0, help="GPUs the provider must have.")] = 0,
    gpu_memory: Annotated[int, typer.Option(min=0, help="Bytes of memory per GPU.")] = 0,
    memory: Annotated[int, typer.Option(min=0, help="Bytes of host memory.")] = 0,
    cpu: Annotated[int, typer.Option(min=0, help="CPU in thousandths of a core.")] = 0,
    requeue: Annotated[
        bool, typer.Option(help="Run again if the provider is lost mid-run (else it fails).")
    ] = False,
    clear_result: Annotated[
        bool, typer.Option(help="Ask for the results unencrypted (anyone with the hash reads).")
    ] = False,
    key_file: Annotated[
        Path | None, typer.Option(help="Your task key. [default: task.key next to the config]")
    ] = None,
    name: Annotated[str, typer.Option(help="The task id; made up when not given.")] = "",
) -> None:
    """Seal a batch of requests so only the chosen provider can read it, store it, and create
    the task. With several --provider, each gets its own sealed copy and the shard compares
    their outputs (VERIFIED or DISPUTED) without reading them.

    Example: shard task submit batch.jsonl -p n4vyc... --model simple --duration 5m
    """
    if not requests.is_file():
        raise typer.BadParameter(f"{requests} is not a file", param_hint="REQUESTS")
    if len(set(provider)) != len(provider):
        raise typer.BadParameter("each provider once", param_hint="--provider")
    max_duration_s = _seconds(duration, "--duration")
    expire_in_s = _seconds(expire_in, "--expire-in")
    s = session(ctx)
    result_key = None if clear_result else _owner_key(key_file)
    redundant = len(provider) > 1
    group = tasks.new_task_id("g") if redundant else ""
    verify_key = tasks.new_verify_key() if redundant else b""
    base = name or tasks.new_task_id()
    size = requests.stat().st_size * len(provider)

    async def work() -> list[task_pb2.Task]:
        channel = s.channel(s.context.registry)
        nodes = node_service_pb2_grpc.NodeServiceStub(channel)
        made = []
        with (
            transfer_progress(quiet=s.output is not Format.TABLE) as progress,
            tempfile.TemporaryDirectory() as tmp,
        ):
            bar = progress.add_task("sealing and uploading", total=size)
            # Every provider is looked up and checked before anything is created.
            chosen = [await _provider(nodes, node_id) for node_id in provider]
            for index, node in enumerate(chosen):
                spec = tasks.TaskSpec(
                    task_id=f"{base}-{index}" if redundant else base,
                    provider=node,
                    model=model,
                    requests=requests,
                    max_duration_s=max_duration_s,
                    expire_in_s=expire_in_s,
                    result_key=result_key,
                    requirements=task_pb2.TaskRequirements(
                        gpus=gpus, gpu_memory_bytes=gpu_memory, memory_bytes=memory, cpu_millis=cpu
                    ),
                    on_provider_loss=(
                        task_pb2.PROVIDER_LOSS_REQUEUE if requeue else task_pb2.PROVIDER_LOSS_FAIL
                    ),
                    group=group,
                    group_size=len(provider) if redundant else 0,
                    verify_key=verify_key,
                )
                try:
                    made.append(
                        await tasks.submit(
                            channel, spec, work_dir=Path(tmp),
                            on_bytes=lambda n: progress.advance(bar, n),
                        )
                    )  # fmt: skip
                except BaseException:
                    await _cancel(channel, made, "the rest of its group could not be created")
                    raise
        return made

    emit(s.run(work), COLUMNS, s.output)


async def _cancel(channel: grpc.aio.Channel, made: list[task_pb2.Task], reason: str) -> None:
    """Cancel what a submit made before it failed: a group missing members verifies nothing."""
    stub = Stub(channel)
    for task in made:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await stub.CancelTask(
                task_service_pb2.CancelTaskRequest(name=task.name, reason=reason),
                timeout=TIMEOUT_S,
            )


async def _provider(nodes: node_service_pb2_grpc.NodeServiceStub, node_id: str) -> node_pb2.Node:
    """The node, once its encryption key checks out against its identity."""
    request = node_service_pb2.GetNodeRequest(name=resource_name("nodes", node_id))
    node = (await nodes.GetNode(request, timeout=TIMEOUT_S)).node
    try:
        sealing.node_encryption_key(node)
    except sealing.SealError as error:
        fail(f"{error}; pick another provider")
    return node


@app.command("ls")
def list_tasks(
    ctx: typer.Context,
    state: Annotated[str, typer.Option(help="Only tasks in this state (RUNNING, ...).")] = "",
    provider: Annotated[str, typer.Option(help="Only tasks of this node.")] = "",
    group: Annotated[str, typer.Option(help="Only tasks of this redundancy group.")] = "",
) -> None:
    """List the tasks you may see: yours, and those of your nodes.

    Example: shard task ls --state RUNNING
    """
    s = session(ctx)
    terms = [
        f"{k}={v}" for k, v in (("state", state), ("provider", provider), ("group", group)) if v
    ]
    request = task_service_pb2.ListTasksRequest(filter=" AND ".join(terms))
    emit(s.call(Stub, lambda stub: all_pages(stub.ListTasks, request, "tasks")), COLUMNS, s.output)


@app.command("get")
def get(
    ctx: typer.Context,
    task: TaskName,
    wait: Annotated[bool, typer.Option(help="Wait until the task has finished.")] = False,
) -> None:
    """Show a task: its state, why, and its result's reference.

    Example: shard task get t-3f2a9c --wait -o yaml
    """
    s = session(ctx)
    request = task_service_pb2.GetTaskRequest(name=resource_name("tasks", task))

    async def fetch(stub: Stub) -> task_pb2.Task:
        while True:
            found = (await stub.GetTask(request, timeout=TIMEOUT_S)).task
            if not wait or found.state in FINAL:
                return found
            await asyncio.sleep(0.5)

    emit(s.call(Stub, fetch), COLUMNS, s.output)


@app.command("result")
def result(
    ctx: typer.Context,
    task: TaskName,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-O", help="Where to write the results. [default: <task>.jsonl]"),
    ] = None,
    key_file: Annotated[
        Path | None, typer.Option(help="Your task key. [default: task.key next to the config]")
    ] = None,
) -> None:
    """Check the provider's signature, download the results and open them with your key.

    Example: shard task result t-3f2a9c -O results.jsonl
    """
    s = session(ctx)
    target = out or Path(f"{resource_name('tasks', task).removeprefix('tasks/')}.jsonl")

    async def work() -> dict[str, object]:
        channel = s.channel(s.context.registry)
        found = (
            await Stub(channel).GetTask(
                task_service_pb2.GetTaskRequest(name=resource_name("tasks", task)),
                timeout=TIMEOUT_S,
            )
        ).task
        key = None if found.plaintext_result else _owner_key(key_file)
        with transfer_progress(quiet=s.output is not Format.TABLE) as progress:
            bar = progress.add_task("downloading", total=None)
            try:
                await tasks.fetch_result(
                    channel, found, target, key=key, on_bytes=lambda n: progress.advance(bar, n)
                )
            except tasks.ResultError as error:
                fail(str(error))
        lines = sum(1 for _ in target.open("rb"))
        return {
            "task": found.name, "provider": found.provider, "signature": "verified",
            "results": str(target), "lines": lines,
        }  # fmt: skip

    emit_data(s.run(work), s.output)


@app.command("cancel")
def cancel(
    ctx: typer.Context,
    task: TaskName,
    reason: Annotated[str, typer.Option(help="Why, for the record.")] = "",
) -> None:
    """Cancel a pending or running task; its provider stops it.

    Example: shard task cancel t-3f2a9c --reason "wrong model"
    """
    s = session(ctx)
    request = task_service_pb2.CancelTaskRequest(name=resource_name("tasks", task), reason=reason)
    emit(
        s.call(Stub, lambda stub: stub.CancelTask(request, timeout=TIMEOUT_S)).task,
        COLUMNS,
        s.output,
    )
