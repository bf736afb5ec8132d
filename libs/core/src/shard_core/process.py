"""Child processes the shard starts for itself (etcd, Triton, services), stopped without leftovers.

Each child runs in its own process group and gets SIGTERM if its parent dies, so neither a
Ctrl-C, a SIGTERM nor a crash of the parent leaves a process behind. The parent-death signal is
set by util-linux's `setpriv --pdeathsig`, which then execs the command: setting it from Python
between fork and exec (`preexec_fn`) can crash the child of a process with gRPC threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path

_log = logging.getLogger(__name__)


_SETPRIV = shutil.which("setpriv")


def _dying_with_parent(argv: list[str]) -> list[str]:
    return [_SETPRIV, "--pdeathsig", "TERM", "--", *argv] if _SETPRIV else argv


class ManagedProcess:
    """One child process in its own process group, with its output in a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(os.environ if env is None else env)
        self.cwd = cwd
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self._popen is None:
            raise RuntimeError(f"{self.name} has not been started")
        return self._popen.pid

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._popen = subprocess.Popen(
                _dying_with_parent(self.argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        _log.info("started %s (pid %d)", self.name, self._popen.pid)

    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def returncode(self) -> int | None:
        return None if self._popen is None else self._popen.poll()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    async def wait_ready(
        self, probe: Callable[[], Awaitable[bool]], *, timeout: float, interval: float = 0.1
    ) -> None:
        """Poll `probe` until it answers True; fail early, with the log, if the process exits."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.running():
                raise RuntimeError(
                    f"{self.name} exited with {self.returncode()} before it was ready:\n"
                    f"{self.log_tail()}"
                )
            try:
                if await probe():
                    return
            except Exception as error:  # a probe may fail in any way until the process is up
                _log.debug("%s not ready yet: %s", self.name, error)
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.name} not ready after {timeout:.0f}s:\n{self.log_tail()}"
                )
            await asyncio.sleep(interval)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL it if it has not exited within `timeout`."""
        if self._popen is None:
            return
        self._signal_group(signal.SIGTERM)
        try:
            self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            _log.warning("%s ignored SIGTERM for %.0fs; killing it", self.name, timeout)
        # Whatever the leader did, no member of its group may outlive it.
        self._signal_group(signal.SIGKILL)
        self._popen.wait()

    def kill(self) -> None:
        """SIGKILL the process group at once, as a crash or an operator's kill -9 would."""
        if self._popen is None:
            return
        self._signal_group(signal.SIGKILL)
        self._popen.wait()

    def _signal_group(self, signum: int) -> None:
        assert self._popen is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._popen.pid, signum)
