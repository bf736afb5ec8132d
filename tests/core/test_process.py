"""Child processes never outlive the mesh: the whole process group goes."""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest

from shard_core.process import ManagedProcess

# A parent that ignores SIGTERM and leaves a grandchild behind: the worst case for cleanup.
STUBBORN = "trap '' TERM; sleep 300 & echo $! > {pidfile}; wait"


def _grandchild(pidfile: Path) -> psutil.Process:
    for _ in range(100):
        if pidfile.exists() and pidfile.read_text().strip():
            return psutil.Process(int(pidfile.read_text()))
        time.sleep(0.05)
    pytest.fail("the child never started its grandchild")


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_stop_and_kill_take_the_whole_group(tmp_path: Path, how: str) -> None:
    pidfile = tmp_path / "grandchild.pid"
    process = ManagedProcess(
        "stubborn", ["sh", "-c", STUBBORN.format(pidfile=pidfile)], log_path=tmp_path / "log"
    )
    process.start()
    grandchild = _grandchild(pidfile)

    if how == "stop":
        process.stop(timeout=0.5)
    else:
        process.kill()

    assert not process.running()
    grandchild.wait(timeout=5)
    assert not grandchild.is_running()


async def test_wait_ready_fails_fast_with_the_log_when_the_process_dies(tmp_path: Path) -> None:
    process = ManagedProcess(
        "doomed", ["sh", "-c", "echo cannot start >&2; exit 3"], log_path=tmp_path / "log"
    )
    process.start()

    async def never() -> bool:
        return False

    with pytest.raises(RuntimeError, match="exited with 3") as raised:
        await process.wait_ready(never, timeout=30)
    assert "cannot start" in str(raised.value)
