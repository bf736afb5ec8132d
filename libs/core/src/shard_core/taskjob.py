"""What an encrypted task's job and results are, in the clear (only the owner and the provider
ever see them).

A job is JSON lines. The first line is the header,
`{"shard_task": "v1", "task": "tasks/t1", "provider": "nodes/n...", "model": "simple",
"result_key": "<64 hex digits, or empty for results in the clear>", "verify_key": "<hex>"}`.
It repeats what the task says, so the provider checks it is asked to do what the task record
says; in particular the results go sealed to the owner's key, or in the clear, only as the
owner's own sealed header says: the shard cannot change that. `verify_key` (only with
redundancy) keys the digest the providers of a group report, so the shard compares outputs
without learning anything about them.
Every later line is one KServe v2 inference request in JSON (`{"id": ..., "inputs": [...]}`).

The results are JSON lines too: one per request, in order: Triton's answer, or
`{"id": ..., "error": "..."}` for a request that failed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

FORMAT = "v1"
HEADER_KEY = "shard_task"
VERIFY_KEY_BYTES = 32
READ_BYTES = 1 << 20


class JobError(ValueError):
    """A job that is not what its task says, or not a job at all."""


def header(
    *, task: str, provider: str, model: str, result_key: bytes, verify_key: bytes = b""
) -> bytes:
    """The header line of a job, newline included."""
    line: dict[str, Any] = {
        HEADER_KEY: FORMAT, "task": task, "provider": provider, "model": model,
        "result_key": result_key.hex(),
    }  # fmt: skip
    if verify_key:
        line["verify_key"] = verify_key.hex()
    return json.dumps(line, separators=(",", ":")).encode() + b"\n"


def check_header(line: bytes, *, task: str, provider: str, model: str, result_key: bytes) -> bytes:
    """The job's verify key (empty without one), once its header matches the task."""
    try:
        found = json.loads(line)
    except (ValueError, RecursionError) as error:
        raise JobError(f"the first line is not JSON: {error}"[:200]) from error
    if not isinstance(found, dict) or found.get(HEADER_KEY) != FORMAT:
        raise JobError(f'the first line is not a job header ({{"{HEADER_KEY}": "{FORMAT}", ...}})')
    expected = {"task": task, "provider": provider, "model": model, "result_key": result_key.hex()}
    for field, value in expected.items():
        if found.get(field) != value:
            raise JobError(
                f"the job is for {field} {str(found.get(field))[:100]!r}, but the task says "
                f"{value!r}"
            )
    try:
        key = bytes.fromhex(str(found.get("verify_key", "")))
    except ValueError as error:
        raise JobError("verify_key is not hex") from error
    if key and len(key) != VERIFY_KEY_BYTES:
        raise JobError(f"verify_key must be {VERIFY_KEY_BYTES} bytes")
    return key


def output_digest(verify_key: bytes, path: Path) -> bytes:
    """HMAC-SHA256 of the results file under the group's verify key."""
    mac = hmac.new(verify_key, digestmod=hashlib.sha256)
    with path.open("rb") as file:
        while chunk := file.read(READ_BYTES):
            mac.update(chunk)
    return mac.digest()
