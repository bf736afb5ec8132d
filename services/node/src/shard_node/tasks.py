"""Running the encrypted tasks addressed to this node.

The registry pushes the node's open tasks on its stream (`offer`). For each new PENDING one the
runner claims it (exactly one claim wins), fetches the sealed job and checks its hash, opens it
with the node's encryption key under the task's name, this node and the expiry (anything else,
or any change to the bytes, does not open), checks the header against the task, and sends each
request to the model on its own Triton over HTTP. The results are sealed to the owner's key
(unless the owner asked for them in the clear), stored, and the task completed with the node's
signature over task, input and output. A task that leaves the offer (cancelled, expired) is
stopped; a run longer than `max_duration` is stopped and reported. Plaintext only ever exists in
an owner-only directory of the run, removed when the run ends.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import logging
import re
import shutil
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import BinaryIO, TypeVar

import aiohttp
import grpc

from shard.task.v1 import task_pb2, task_service_pb2_grpc
from shard.task.v1 import task_service_pb2 as task_api
from shard_client.blobs import BlobError, download, upload_file
from shard_core import sealing, taskjob
from shard_core.errors import error_info
from shard_node.identity import NodeIdentity
from shard_node.registry_calls import RegistryCalls

_log = logging.getLogger(__name__)

TIMEOUT_S = 30.0
# Registry calls are tried again while the registry or its store is away (a restart, an etcd
# outage): for about half a minute, or, for a completion, as long as the task can still end.
# CANCELLED: the registry went away mid-call (a restart).
TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
    }
)
# A credential the registry no longer takes (the node's session ended, in a registry restart
# say, or it expired) is renewed when the agent reconnects and attests: calls made with it are
# tried again, with the new one.
RENEWABLE = frozenset({"CREDENTIAL_REVOKED", "CREDENTIAL_EXPIRED"})
RETRY_FOR_S = 30.0
MAX_BACKOFF_S = 5.0
# Requests of one task in flight at once on the node's Triton, and read ahead at once.
WINDOW = 8
BATCH = 256
BATCH_BYTES = 64 << 20
MAX_LINE_BYTES = 16 << 20
MAX_REASON_CHARS = 1000
# Task ids as the registry makes them; anything else is not used as a path.
TASK_NAME = re.compile(r"tasks/[a-z0-9][a-z0-9_-]{0,62}")
T = TypeVar("T")


class TaskRefusedError(Exception):
    """The task cannot run as given; `reason` says why in UPPER_SNAKE."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _requests(path: Path) -> Iterator[bytes]:
    """The job's non-empty lines; a line longer than MAX_LINE_BYTES comes as one too-long
    marker (empty bytes), never whole in memory."""
    with path.open("rb") as file:
        while line := file.readline(MAX_LINE_BYTES + 1):
            if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
                while (rest := file.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                    pass
                yield b""
            elif line.strip():
                yield line


def _batches(lines: Iterator[bytes]) -> Iterator[list[bytes]]:
    """Up to BATCH lines and BATCH_BYTES at a time."""
    batch: list[bytes] = []
    size = 0
    for line in lines:
        batch.append(line)
        size += len(line)
        if len(batch) >= BATCH or size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _transient(error: grpc.aio.AioRpcError) -> bool:
    if error.code() in TRANSIENT:
        return True
    info = error_info(error)
    return (
        error.code() == grpc.StatusCode.UNAUTHENTICATED
        and info is not None
        and info.reason in RENEWABLE
    )


async def retrying(call: Callable[[], Awaitable[T]], *, for_s: float = RETRY_FOR_S) -> T:
    """`call()`, made again on a transient failure for about `for_s` seconds."""
    deadline = time.monotonic() + for_s
    for attempt in itertools.count():
        try:
            return await call()
        except grpc.aio.AioRpcError as error:
            delay = min(0.2 * 2**attempt, MAX_BACKOFF_S)
            if not _transient(error) or time.monotonic() + delay > deadline:
                raise
            _log.info("registry call failed (%s); trying again", error.code().name)
        await asyncio.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def _time_left(task: task_pb2.Task) -> float:
    """How long a finished run's results are worth trying to deliver: until the task would
    expire, and at least the usual half minute."""
    ends = task.start_time.ToNanoseconds() / 1e9 + task.max_duration.ToNanoseconds() / 1e9
    return max(RETRY_FOR_S, ends - time.time())


class TaskRunner:
    def __init__(
        self,
        *,
        identity: NodeIdentity,
        registry: RegistryCalls,
        triton_http_url: str | None,
        work_dir: Path,
        max_concurrent: int = 2,
    ) -> None:
        self._identity = identity
        self._registry = registry
        self._triton = triton_http_url.rstrip("/") if triton_http_url else None
        self._work_dir = work_dir
        self._slots = asyncio.Semaphore(max_concurrent)
        self._running: dict[str, asyncio.Task[None]] = {}
        # What this process claimed, by task, with the attempt it claimed.
        self._claimed: dict[str, int] = {}
        self._offered: list[task_pb2.Task] = []
        # Claims and reports the registry refused, by task, with the attempt offered: not
        # tried again until the registry offers the tasks afresh.
        self._refused: dict[str, int] = {}
        shutil.rmtree(work_dir, ignore_errors=True)  # what a killed agent left behind
        work_dir.mkdir(parents=True, mode=0o700, exist_ok=True)

    def offer(self, tasks: list[task_pb2.Task]) -> None:
        """Take the registry's complete list of this node's open tasks."""
        self._offered = [task for task in tasks if TASK_NAME.fullmatch(task.name)]
        self._refused.clear()
        self._schedule()

    def _schedule(self) -> None:
        """Start, stop or report runs to match the latest offer."""
        offered = {task.name: task for task in self._offered}
        for name, run in list(self._running.items()):
            task = offered.get(name)
            # Gone (cancelled, expired), or requeued behind this run's back (its attempt ended).
            stale = task is None or (
                task.state == task_pb2.TASK_STATE_PENDING
                and task.attempts >= self._claimed.get(name, task.attempts + 1)
            )
            if stale:
                _log.info("task %s is no longer ours to run: stopping it", name)
                run.cancel()
        self._claimed = {n: a for n, a in self._claimed.items() if n in offered}
        for task in self._offered:
            if task.name in self._running or self._refused.get(task.name) == task.attempts:
                continue
            if task.state == task_pb2.TASK_STATE_PENDING:
                job = self._run(task)
            elif task.state == task_pb2.TASK_STATE_RUNNING and task.name not in self._claimed:
                # Held by this node, yet not claimed by this process: the agent restarted
                # mid-task (or a claim's answer was lost). The owner's choice decides: FAILED,
                # or PENDING to run again.
                job = self._complete(task, failure="PROVIDER_LOST: the node agent lost the run")
            else:
                continue
            run = asyncio.ensure_future(job)
            self._running[task.name] = run
            run.add_done_callback(functools.partial(self._ended, task.name))

    def _ended(self, name: str, run: asyncio.Task[None]) -> None:
        """A run ended: look at the latest offer again (the task may be back, requeued)."""
        if self._running.get(name) is run:
            del self._running[name]
            self._schedule()

    async def stop(self) -> None:
        for run in self._running.values():
            run.cancel()
        await asyncio.gather(*self._running.values(), return_exceptions=True)

    async def _run(self, offered: task_pb2.Task) -> None:
        async with self._slots:
            task = await self._claim(offered)
            if task is None:
                return
            work = self._work_dir / task.name.removeprefix("tasks/")
            work.mkdir(mode=0o700, exist_ok=True)
            duration = task.max_duration.ToNanoseconds() / 1e9
            try:
                result = await asyncio.wait_for(self._execute(task, work), duration)
            except TaskRefusedError as error:
                _log.warning("task %s refused: %s: %s", task.name, error.reason, error)
                await self._complete(task, failure=f"{error.reason}: {error}")
            except TimeoutError:
                await self._complete(task, failure="DEADLINE: it ran longer than max_duration")
            except (aiohttp.ClientError, grpc.aio.AioRpcError, OSError) as error:
                _log.warning("task %s failed: %s", task.name, error)
                await self._complete(task, failure=f"TASK_ERROR: {error}")
            except Exception as error:  # a bug here must not leave the task RUNNING
                _log.exception("task %s failed unexpectedly", task.name)
                await self._complete(task, failure=f"TASK_ERROR: {type(error).__name__}")
            else:
                await self._complete(task, result=result)
            finally:
                shutil.rmtree(work, ignore_errors=True)

    async def _call(
        self,
        rpc: Callable[[task_service_pb2_grpc.TaskServiceStub], Callable[..., Awaitable[T]]],
        request: object,
        *,
        for_s: float = RETRY_FOR_S,
    ) -> T:
        """`rpc` of the registry's TaskService, retried. Each attempt takes the stub afresh: a
        renewed certificate (after a registration, say) brings a new channel, and an attempt
        on the old one would be refused until the retries ran out."""
        return await retrying(
            lambda: rpc(self._registry.tasks)(
                request, timeout=TIMEOUT_S, metadata=self._registry.metadata
            ),
            for_s=for_s,
        )

    async def _claim(self, task: task_pb2.Task) -> task_pb2.Task | None:
        try:
            reply = await self._call(
                lambda tasks: tasks.ClaimTask, task_api.ClaimTaskRequest(name=task.name)
            )
        except grpc.aio.AioRpcError as error:
            _log.info("task %s not claimed: %s", task.name, error.details())
            self._refused[task.name] = task.attempts
            return None
        self._claimed[task.name] = reply.task.attempts
        _log.info("task %s claimed (attempt %d)", task.name, reply.task.attempts)
        return reply.task

    async def _complete(
        self, task: task_pb2.Task, *, result: task_pb2.TaskResult | None = None, failure: str = ""
    ) -> None:
        request = task_api.CompleteTaskRequest(
            name=task.name,
            state=task_pb2.TASK_STATE_SUCCEEDED if result else task_pb2.TASK_STATE_FAILED,
            result=result,
            reason=failure[:MAX_REASON_CHARS],
            attempt=task.attempts,
        )
        # A finished run is not lost to an outage: it is reported for as long as the task
        # could still end well.
        try:
            reply = await self._call(
                lambda tasks: tasks.CompleteTask, request, for_s=_time_left(task)
            )
        except grpc.aio.AioRpcError as error:
            _log.warning("completing task %s failed: %s", task.name, error.details())
            self._refused[task.name] = task.attempts
            if result is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                # The registry refused the result itself: report that, not nothing.
                await self._complete(task, failure=f"RESULT_REFUSED: {error.details()}")
            return
        _log.info("task %s: %s", task.name, task_pb2.TaskState.Name(reply.task.state))

    async def _execute(self, task: task_pb2.Task, work: Path) -> task_pb2.TaskResult:
        if self._triton is None:
            raise TaskRefusedError("NO_TRITON_HTTP", "this node runs no Triton HTTP endpoint")
        sealed, job = work / "input.sealed", work / "input.jsonl"
        try:
            await retrying(
                lambda: download(
                    self._registry.artifacts, task.input, sealed, metadata=self._registry.metadata
                )
            )
        except BlobError as error:
            raise TaskRefusedError("INPUT_UNVERIFIED", str(error)) from error
        context = sealing.task_input_context(
            task.name, task.provider, task.expire_time.ToMilliseconds()
        )
        try:
            await asyncio.to_thread(
                sealing.open_file, sealed, job, self._identity.encryption_key, context
            )
        except sealing.SealError as error:
            raise TaskRefusedError("DECRYPT_FAILED", str(error)) from error
        lines = _requests(job)
        try:
            verify_key = taskjob.check_header(
                next(lines, b""), task=task.name, provider=task.provider, model=task.model,
                result_key=task.result_public_key,
            )  # fmt: skip
        except taskjob.JobError as error:
            raise TaskRefusedError("BAD_JOB", str(error)) from error
        if task.group and not verify_key:
            raise TaskRefusedError("BAD_JOB", "a task of a group needs a verify_key in its job")
        output = work / "output.jsonl"
        with output.open("wb") as out:
            succeeded, failed = await self._infer_all(task.model, lines, out)
        result = task_pb2.TaskResult(succeeded_requests=succeeded, failed_requests=failed)
        if verify_key:
            result.output_digest = await asyncio.to_thread(
                taskjob.output_digest, verify_key, output
            )
        stored = output
        if not task.plaintext_result:
            stored = work / "output.sealed"
            owner = sealing.x25519_public_key(task.result_public_key)
            context = sealing.task_output_context(task.name, task.provider, task.input)
            await asyncio.to_thread(sealing.seal_file, output, stored, owner, context)
        sha256, _ = await retrying(
            lambda: upload_file(self._registry.artifacts, stored, metadata=self._registry.metadata),
            for_s=_time_left(task),
        )
        result.output = f"blobs/{sha256}"
        result.signature = self._identity.private_key.sign(
            sealing.result_message(task.name, task.input, result.output, task.result_public_key)
        )
        return result

    async def _infer_all(
        self, model: str, lines: Iterator[bytes], out: BinaryIO
    ) -> tuple[int, int]:
        """Every request against the model, WINDOW in flight, answers written in order."""
        url = f"{self._triton}/v2/models/{model}/infer"
        succeeded = failed = 0
        slots = asyncio.Semaphore(WINDOW)

        async def infer(line: bytes) -> tuple[bool, bytes]:
            async with slots:
                return await self._infer(http, url, line)

        async with aiohttp.ClientSession() as http:
            for batch in _batches(lines):
                for ok, answer in await asyncio.gather(*(infer(line) for line in batch)):
                    succeeded, failed = (succeeded + 1, failed) if ok else (succeeded, failed + 1)
                    out.write(answer + b"\n")
        return succeeded, failed

    async def _infer(
        self, http: aiohttp.ClientSession, url: str, line: bytes
    ) -> tuple[bool, bytes]:
        """Whether Triton answered the request, and the result line: Triton's JSON answer as
        it sent it, or `{"id": ..., "error": ...}`."""
        if not line:
            error = f"the request is longer than {MAX_LINE_BYTES} bytes"
            return False, json.dumps({"id": "", "error": error}).encode()
        try:
            async with http.post(
                url, data=line, timeout=aiohttp.ClientTimeout(total=TIMEOUT_S)
            ) as reply:
                body = await reply.read()
                binary = "Inference-Header-Content-Length" in reply.headers
                if reply.status == 200 and not binary and b"\n" not in body:
                    return True, body
                error = (
                    "binary outputs cannot go in a results file; ask for JSON outputs"
                    if binary
                    else _field(body, "error") or f"Triton answered HTTP {reply.status}"
                )
        except (aiohttp.ClientError, TimeoutError) as failure:
            error = f"Triton did not answer: {failure}"
        line_id = _field(line, "id")
        return False, json.dumps({"id": line_id, "error": error}, separators=(",", ":")).encode()


def _field(document: bytes, name: str) -> str:
    """A top-level string field of a JSON object, or an empty string."""
    try:
        found = json.loads(document)
    except (ValueError, RecursionError):
        return ""
    return str(found.get(name, "")) if isinstance(found, dict) else ""
