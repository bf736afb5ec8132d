"""`shard up`: the whole shard from one command, a CLI context for it, and nothing left behind
after `shard down`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import tritonclient.grpc as triton
import yaml

from shard_tool.local import MeshPorts
from tests.conftest import REPO
from tests.demo import MODEL_REPOSITORY, infer_simple


def _wait_for_line(process: subprocess.Popen[str], marker: str, timeout: float) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            raise AssertionError(f"shard up exited early:\n{''.join(lines)}")
        lines.append(line)
        if marker in line:
            return lines
    raise AssertionError(f"no {marker!r} within {timeout}s:\n{''.join(lines)}")


def test_shard_up_serves_the_demo_models_and_shard_down_leaves_no_process(tmp_path: Path) -> None:
    ports = MeshPorts.free()
    config = tmp_path / "config.yaml"
    process = subprocess.Popen(
        [
            sys.executable, "-m", "shard_tool", "up",
            "--state-dir", str(tmp_path),
            "--models", str(MODEL_REPOSITORY),
            "--router-port", str(ports.router),
            "--gateway-port", str(ports.gateway),
            "--registry-port", str(ports.registry),
            "--etcd-port", str(ports.etcd),
            "--registry-tls-port", str(ports.registry_tls),
            "--registry-mesh-port", str(ports.registry_mesh),
            "--router-tls-port", str(ports.router_tls),
            "--gateway-tls-port", str(ports.gateway_tls),
        ],
        cwd=REPO,
        env={**os.environ, "SHARD_CONFIG": str(config)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        lines = _wait_for_line(process, "ready:", timeout=120)
        output = "".join(lines)
        assert f"127.0.0.1:{ports.router}" in output
        assert f"http://127.0.0.1:{ports.gateway}" in output

        infer_simple(triton.InferenceServerClient(f"127.0.0.1:{ports.router}"))

        state = json.loads((tmp_path / "mesh.json").read_text())
        launched = [psutil.Process(pid) for pid in state["processes"].values()]
        tree = launched + [child for p in launched for child in p.children(recursive=True)]
        names = {p.name() for p in tree}
        assert {"etcd", "tritonserver"} <= names
        assert len(tree) >= 6  # etcd, registry, router, gateway, node agent, Triton (+ stubs)

        # The router's TLS port serves clients that trust the mesh CA.
        ca_file = tmp_path / "ca" / "ca.pem"
        infer_simple(
            triton.InferenceServerClient(
                f"127.0.0.1:{ports.router_tls}", ssl=True, root_certificates=str(ca_file)
            )
        )

        # The CLI's `local` context points at the mesh over TLS, with the admin token's file.
        context = yaml.safe_load(config.read_text())["contexts"]["local"]
        assert context["registry"] == f"127.0.0.1:{ports.registry_tls}"
        assert context["tls"] is True
        assert context["ca_file"] == str(ca_file)
        assert Path(context["key_file"]).read_text()
        nodes = subprocess.run(
            [sys.executable, "-m", "shard_tool", "-o", "json", "node", "ls"],
            cwd=REPO, capture_output=True, text=True, check=False,
            env={**os.environ, "SHARD_CONFIG": str(config)},
        )  # fmt: skip
        assert nodes.returncode == 0, nodes.stderr
        assert json.loads(nodes.stdout)[0]["state"] == "NODE_STATE_ACTIVE"

        # `shard down` SIGTERMs the launcher, which stops everything it started.
        down = subprocess.run(
            [sys.executable, "-m", "shard_tool", "down", "--state-dir", str(tmp_path)],
            cwd=REPO, capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert down.returncode == 0, down.stderr
        assert process.wait(timeout=60) == 0
        _, alive = psutil.wait_procs(tree, timeout=10)
        assert not alive, f"left behind: {[(p.pid, p.name()) for p in alive]}"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
