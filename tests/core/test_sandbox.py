"""The sandbox model code runs in, on this machine's kernel: each way out, tried from inside."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from shard_node.sandbox import Policy, landlock_abi, triton_policy


def test_this_kernel_can_sandbox_model_code() -> None:
    """Filesystem and TCP rules and scopes: Landlock ABI 6 (Linux 6.12) or later."""
    assert landlock_abi() >= 6


@pytest.fixture
def outside_tmp() -> Iterator[Path]:
    """A directory outside /tmp, where the private /tmp does not hide it: Landlock must."""
    path = Path(tempfile.mkdtemp(dir="/var/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _run(policy: Policy, code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shard_node.sandbox", policy.to_json(), "--",
         sys.executable, "-I", "-c", code],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip


def _outcome(policy: Policy, code: str) -> str:
    done = _run(
        policy, f"try:\n    {code}\n    print('GOT')\nexcept OSError as e:\n    print(e.errno)"
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_model_code_reaches_only_what_the_policy_names(tmp_path: Path, outside_tmp: Path) -> None:
    (outside_tmp / "identity.key").write_text("secret")
    readable = outside_tmp / "models"
    readable.mkdir()
    (readable / "weights").write_text("w")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (tmp_path / "neighbour").write_text("n")
    listener = socket.create_server(("127.0.0.1", 0))
    own = socket.create_server(("127.0.0.1", 0))
    own_port = own.getsockname()[1]
    own.close()
    policy = triton_policy(
        programs=[sys.prefix, sys.base_prefix],
        repository=str(readable),
        temporary=str(scratch),
        ports=[own_port],
        path="/usr/bin:/bin",
        library_path="",
    )
    try:
        assert _outcome(policy, f"open({str(readable / 'weights')!r}).read()") == "GOT"
        assert _outcome(policy, f"open({str(scratch / 'x')!r}, 'w').write('x')") == "GOT"
        # Outside the policy, Landlock says no; under /tmp, nothing is there to find.
        assert _outcome(policy, f"open({str(outside_tmp / 'identity.key')!r}).read()") == "13"
        assert _outcome(policy, f"open({str(tmp_path / 'neighbour')!r}).read()") == "2"
        assert _outcome(policy, "open('/etc/shadow').read()") == "13"
        assert _outcome(policy, f"open({str(readable / 'planted')!r}, 'w')") == "13"
        # No TCP out, to anything; listening only on its own ports.
        port = listener.getsockname()[1]
        connect = f"__import__('socket').create_connection(('127.0.0.1', {port}), timeout=2)"
        assert _outcome(policy, connect) == "13"
        bind = "__import__('socket').create_server(('127.0.0.1', {}))"
        assert _outcome(policy, bind.format(own_port)) == "GOT"
        assert _outcome(policy, bind.format(0)) == "13"
        # Its parent (the agent, here the test) cannot be signalled or read.
        assert _outcome(policy, "__import__('os').kill(__import__('os').getppid(), 0)") == "1"
        environ = f"open('/proc/{os.getpid()}/environ', 'rb').read()"
        assert _outcome(policy, environ) == "13"
    finally:
        listener.close()


def test_it_is_nobody_with_the_policy_s_environment_only() -> None:
    os.environ["SHARD_NODE_JOIN_TOKEN"] = "must-not-leak"
    try:
        policy = triton_policy(
            programs=[sys.prefix, sys.base_prefix], repository="/none", temporary="/none",
            ports=[], path="/usr/bin:/bin", library_path="",
        )  # fmt: skip
        code = "import json, os; print(json.dumps([os.getuid(), sorted(os.environ)]))"
        done = _run(policy, code)
    finally:
        del os.environ["SHARD_NODE_JOIN_TOKEN"]
    assert done.returncode == 0, done.stderr
    uid, names = json.loads(done.stdout)
    assert uid == 65534
    assert not [name for name in names if name.startswith("SHARD_")]
    assert "sandbox: user-namespace no-new-privs landlock-abi-" in done.stderr
