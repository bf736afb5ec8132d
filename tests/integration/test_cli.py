"""The `shard` CLI against the real local shard: every command group, JSON output parsed and
checked, and the errors a user meets (a down registry, a bad key, an unknown model, bad input)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
import yaml
from typer.testing import CliRunner

from shard_core.pki import Authority
from shard_tool.cli import app
from shard_tool.local import LocalMesh

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "infra" / "triton" / "models"
CLI_DOCS = ROOT / "docs" / "cli.md"
CLI_DOCS_SCRIPT = ROOT / "scripts" / "cli_docs.py"
Shard = Callable[..., Any]


@pytest.fixture
def shard(mesh: LocalMesh, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Shard:
    """Run `shard ...` as the mesh's admin, with a config file of the test's own; returns the
    parsed JSON for `-o json` runs, else the result."""
    monkeypatch.setenv("SHARD_CONFIG", str(tmp_path / "config.yaml"))
    for name in ("SHARD_CONTEXT", "SHARD_REGISTRY", "SHARD_ROUTER", "SHARD_KEY"):
        monkeypatch.delenv(name, raising=False)
    runner = CliRunner()
    admin = ["--registry", mesh.registry_address, "--router", mesh.router_address]
    admin += ["--key", mesh.admin_token]

    def run(*args: str, expect: int = 0, as_admin: bool = True) -> Any:
        result = runner.invoke(app, [*(admin if as_admin else []), *args])
        assert result.exit_code == expect, (args, result.output, result.stderr)
        if expect == 0 and "json" in args:
            return json.loads(result.stdout)
        return result

    return run


def test_contexts_and_overrides(shard: Shard, mesh: LocalMesh, tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(mesh.admin_token)
    shard(
        "context", "add", "here", "--registry", mesh.registry_address,
        "--router", mesh.router_address, "--key-file", str(key_file), as_admin=False,
    )  # fmt: skip
    shard("context", "add", "elsewhere", "--registry", "127.0.0.1:1", as_admin=False)
    assert shard("context", "current", as_admin=False).stdout.strip() == "here"
    listed = shard("-o", "json", "context", "list", as_admin=False)
    assert {c["name"]: c["current"] for c in listed} == {"here": True, "elsewhere": False}
    # The current context is enough to connect...
    nodes = shard("-o", "json", "node", "ls", as_admin=False)
    assert {n["state"] for n in nodes} >= {"NODE_STATE_ACTIVE"}
    # ...a flag picks another, and a flag beats what the context says.
    down = shard("--context", "elsewhere", "node", "ls", expect=1, as_admin=False)
    assert "127.0.0.1:1" in down.stderr
    shard("--context", "elsewhere", "--registry", mesh.registry_address, "--key",
          mesh.admin_token, "node", "ls", as_admin=False)  # fmt: skip
    shard("context", "use", "elsewhere", as_admin=False)
    assert shard("context", "current", as_admin=False).stdout.strip() == "elsewhere"
    missing = shard("context", "use", "nowhere", expect=1, as_admin=False)
    assert "no context named 'nowhere'" in missing.stderr
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert config["contexts"]["here"]["key_file"] == str(key_file)
    assert (tmp_path / "config.yaml").stat().st_mode & 0o077 == 0  # it may hold keys


def test_a_tls_context_reaches_the_shard_trusting_its_ca(
    shard: Shard, mesh: LocalMesh, tmp_path: Path
) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(mesh.admin_token)
    shard(
        "context", "add", "secure", "--registry", mesh.registry_tls_address,
        "--router", mesh.router_tls_address, "--key-file", str(key_file), "--tls",
        "--ca-file", str(mesh.ca_file), "--use", as_admin=False,
    )  # fmt: skip
    assert shard("-o", "json", "model", "ls", as_admin=False)
    ones = json.dumps([[1] * 16])
    answer = shard("-o", "json", "infer", "simple", "-i", f"INPUT0={ones}", "-i",
                   f"INPUT1={ones}", as_admin=False)  # fmt: skip
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert outputs["OUTPUT0"]["data"] == [[2] * 16]
    # A CA the shard's certificate does not chain to, or plaintext to a TLS port: one line.
    stranger = tmp_path / "stranger.pem"
    stranger.write_bytes(Authority.create().bundle_pem)
    shard(
        "context", "add", "spoofed", "--registry", mesh.registry_tls_address, "--tls",
        "--ca-file", str(stranger), "--use", as_admin=False,
    )  # fmt: skip
    failed = shard("node", "ls", expect=1, as_admin=False)
    assert "cannot reach the shard" in failed.stderr
    assert "local issuer certificate" in failed.stderr
    assert "Traceback" not in failed.output
    shard("context", "add", "plain", "--registry", mesh.registry_tls_address, "--use",
          as_admin=False)  # fmt: skip
    assert "cannot reach the shard" in shard("node", "ls", expect=1, as_admin=False).stderr
    # No plaintext leaves this machine.
    shard("context", "add", "remote", "--registry", "192.0.2.1:7070", "--use", as_admin=False)
    remote = shard("node", "ls", expect=1, as_admin=False)
    assert "loopback" in remote.stderr


def test_nodes(shard: Shard, mesh: LocalMesh) -> None:
    nodes = shard("-o", "json", "node", "ls", "--filter", "state=ACTIVE")
    assert nodes
    assert all(n["state"] == "NODE_STATE_ACTIVE" for n in nodes)
    name = nodes[0]["name"]
    got = shard("-o", "yaml", "node", "get", name.removeprefix("nodes/"))
    assert yaml.safe_load(got.stdout)["name"] == name
    # Labels an admin sets are facts, shown apart from what the node claims.
    node_id = name.removeprefix("nodes/")
    labelled = shard("-o", "json", "node", "label", node_id, "cli-test=yes")
    assert labelled["labels"]["cli-test"] == "yes"
    assert "cli-test" not in labelled["claimed_labels"]
    detail = shard("node", "get", node_id).stdout
    assert "claimed labels: shard.local/name=" in detail
    unlabelled = shard("-o", "json", "node", "label", node_id, "cli-test-")
    assert "cli-test" not in unlabelled["labels"]
    assert "neither" in shard("node", "label", node_id, "oops", expect=2).stderr
    table = shard("node", "ls").stdout  # a table by default
    assert "NAME" in table
    assert "TASKS" in table
    token = shard("-o", "json", "node", "token", "create", "--ttl", "60", "--description", "cli")
    assert token["name"].startswith("joinTokens/")
    assert "." in token["token"]
    unknown = shard("node", "get", "nosuchnode", expect=1)
    assert "NOT_FOUND" in unknown.stderr
    assert "Traceback" not in unknown.output
    # Quarantine needs a reason (kept in the node's history) and a node that exists.
    assert "--reason" in shard("node", "quarantine", node_id, expect=2).stderr
    missing = shard("node", "quarantine", "nosuchnode", "--reason", "X: y", expect=1)
    assert "NOT_FOUND" in missing.stderr


def test_models_deployments_and_inference(shard: Shard, tmp_path: Path) -> None:
    source = tmp_path / "cli-simple"
    shutil.copytree(MODELS / "simple", source)
    config = source / "config.pbtxt"
    config.write_text(config.read_text().replace('name: "simple"', 'name: "cli-simple"'))
    pushed = shard("-o", "json", "model", "push", str(source), "--visibility", "public")
    assert pushed == {"model": "models/cli-simple", "versions": ["1"]}
    again = shard("-o", "json", "model", "push", str(source))  # stored files are skipped
    assert again["versions"] == ["1"]
    models = {m["name"] for m in shard("-o", "json", "model", "ls")}
    assert {"models/simple", "models/cli-simple"} <= models
    assert shard("-o", "json", "model", "get", "cli-simple")["visibility"] == "VISIBILITY_PUBLIC"
    checked = shard("-o", "json", "model", "create", "cli-checked", "--verify-fraction", "0.05")
    assert checked["verify_fraction"] == 0.05
    assert "5%" in shard("model", "get", "cli-checked").stdout
    assert (
        "--verify-fraction"
        in shard("model", "create", "cli-over", "--verify-fraction", "2", expect=2).stderr
    )

    created = shard("-o", "json", "deploy", "create", "cli-simple", "-t", "1=1")
    assert created["targets"] == [{"version": "1", "replicas": 1, "weight": 1}]
    deadline = time.monotonic() + 60
    while True:
        got = shard("-o", "json", "deploy", "get", "cli-simple")
        ready = [t.get("ready_replicas", 0) for t in got.get("status", {}).get("targets", [])]
        if ready == [1]:
            break
        assert time.monotonic() < deadline, got
        time.sleep(0.5)
    decisions = shard("-o", "json", "deploy", "explain", "cli-simple")
    assert any(d["action"] == "PLACEMENT_ACTION_PLACED" for d in decisions)
    scaled = shard("-o", "json", "deploy", "scale", "cli-simple", "-r", "1=2")
    assert scaled["targets"][0]["replicas"] == 2
    split = shard("-o", "json", "deploy", "split", "cli-simple", "-w", "1=100")
    assert split["targets"][0]["weight"] == 100
    wrong = shard("deploy", "split", "cli-simple", "-w", "7=1", expect=2)
    assert "version 7 is not a target" in wrong.stderr
    assert "deployments/cli-simple" in {d["name"] for d in shard("-o", "json", "deploy", "ls")}

    b = np.full((1, 16), 3, dtype=np.int32)
    np.save(tmp_path / "b.npy", b)
    a = json.dumps([list(range(16))])
    b_file = tmp_path / "b.npy"
    answer = shard(
        "-o", "json", "infer", "cli-simple", "-i", f"INPUT0={a}", "-i", f"INPUT1={b_file}"
    )
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert outputs["OUTPUT0"]["data"] == [[v + 3 for v in range(16)]]
    assert outputs["OUTPUT1"]["shape"] == [1, 16]
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"inputs": [
        {"name": n, "datatype": "INT32", "shape": [1, 16], "data": list(range(16))}
        for n in ("INPUT0", "INPUT1")
    ]}))  # fmt: skip
    table = shard("infer", "cli-simple", "--json", str(request))
    assert "OUTPUT0 INT32 [1, 16]" in table.stdout

    shard("deploy", "rm", "cli-simple")
    shard("model", "create", "cli-empty", "--description", "nothing yet")
    assert shard("-o", "json", "model", "rm", "cli-empty") == {"deleted": "models/cli-empty"}


def test_keys(shard: Shard) -> None:
    created = shard("-o", "json", "key", "create", "cli-dev", "--role", "developer")
    secret, name = created["secret"], created["name"]
    assert created["role"] == "ROLE_DEVELOPER"
    listed = shard("-o", "json", "key", "ls")
    assert name in {k["name"] for k in listed}
    assert all("secret" not in k for k in listed)
    # The developer may list models but not make keys.
    shard("--key", secret, "model", "ls")
    denied = shard("--key", secret, "key", "create", "x", "--role", "admin", expect=1)
    assert "PERMISSION_DENIED" in denied.stderr
    revoked = shard("-o", "json", "key", "revoke", name.removeprefix("keys/"))
    assert "revoke_time" in revoked
    refused = shard("--key", secret, "model", "ls", expect=1)
    assert "UNAUTHENTICATED" in refused.stderr
    assert "shard context add --key" in refused.stderr


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (["--registry", "127.0.0.1:1", "node", "ls"], 1, "cannot reach the shard at 127.0.0.1:1"),
        (["--key", "nope", "node", "ls"], 1, "UNAUTHENTICATED"),
        (["infer", "no_such_model", "-i", "INPUT0=[1]"], 1, "no_such_model"),
        (["infer", "simple", "-i", "INPUT0=@missing.npy"], 2, "cannot read missing.npy"),
        (["infer", "simple", "-i", "INPUT0"], 2, "is not NAME=VALUE"),
        (["infer", "simple"], 2, "give inputs"),
        (["model", "push", "/nonexistent"], 2, "has no config.pbtxt"),
        (["key", "create", "x", "--role", "root"], 2, "must be one of"),
        (["deploy", "create", "simple", "-t", "one"], 2, "is not VERSION=N"),
        (["node", "frobnicate"], 2, "No such command"),
        (["node", "ls", "--bogus"], 2, "No such option: --bogus"),
        (["-o", "xml", "node", "ls"], 2, "'xml' is not one of"),
    ],
)
def test_errors_are_one_line_with_exit_codes(
    shard: Shard, args: list[str], code: int, says: str
) -> None:
    result = shard(*args, expect=code)
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: ")
    assert says in result.stderr
    if code == 2:  # usage errors say where the help is
        assert "--help`" in result.stderr


def test_bad_json_request_file(shard: Shard, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"inputs": 3}')
    result = shard("infer", "simple", "--json", str(bad), expect=2)
    assert "is not a KServe v2 request" in result.stderr


def _leaves(command: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every runnable command's words (typer's command tree: groups have `commands`)."""
    groups = getattr(command, "commands", None)
    if groups is None:
        return [path]
    return [leaf for name, sub in groups.items() for leaf in _leaves(sub, (*path, name))]


def test_every_command_has_help_with_an_example(shard: Shard) -> None:
    leaves = _leaves(typer.main.get_command(app))
    assert len(leaves) >= 30
    for path in leaves:
        help_text = shard(*path, "--help", as_admin=False).stdout
        assert "Example: shard" in help_text, path


def test_shell_completion_completes_and_installs(tmp_path: Path) -> None:
    env = {"PATH": str(Path(sys.executable).parent), "HOME": str(tmp_path), "SHELL": "/bin/bash"}
    shard_bin = str(Path(sys.executable).parent / "shard")

    def complete(words: str) -> list[str]:
        completion = {"_SHARD_COMPLETE": "complete_bash", "COMP_WORDS": words}
        completion["COMP_CWORD"] = str(len(words.split()) - 1)
        done = subprocess.run(
            [shard_bin], env=env | completion, capture_output=True, text=True, check=True
        )
        return done.stdout.split()

    assert complete("shard no") == ["node"]
    assert set(complete("shard deploy s")) == {"scale", "split"}
    installed = subprocess.run(
        [shard_bin, "--install-completion", "bash"],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    script = tmp_path / ".bash_completions" / "shard.sh"
    assert "_SHARD_COMPLETE=complete_bash" in script.read_text()
    assert str(script) in (tmp_path / ".bashrc").read_text()


def test_the_cli_reference_is_generated_from_the_app() -> None:
    assert "## `shard deploy split`" in CLI_DOCS.read_text()
    checked = subprocess.run(
        [sys.executable, str(CLI_DOCS_SCRIPT), "check"], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stderr


def test_status_and_down_of_the_local_shard(shard: Shard, mesh: LocalMesh, tmp_path: Path) -> None:
    report = shard("-o", "json", "status", "--state-dir", str(mesh.state_dir), as_admin=False)
    assert report["running"] is True
    assert report["processes"]
    assert all(p["alive"] for p in report["processes"].values())
    assert report["ports"]["router"] == mesh.ports.router
    for command in ("status", "down"):
        missing = shard(command, "--state-dir", str(tmp_path), expect=1, as_admin=False)
        assert "no local shard has run" in missing.stderr


def _batch(path: Path, count: int) -> Path:
    with path.open("w") as out:
        for i in range(count):
            data = {"shape": [1, 16], "datatype": "INT32", "data": [i] * 16}
            inputs = [{"name": name, **data} for name in ("INPUT0", "INPUT1")]
            out.write(json.dumps({"id": str(i), "inputs": inputs}) + "\n")
    return path


def _wait_verified(shard: Shard, name: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        task: dict[str, Any] = shard("-o", "json", "task", "get", name)
        if task.get("verification") != "VERIFICATION_PENDING":
            return task
        assert time.monotonic() < deadline, task
        time.sleep(0.2)


def test_tasks_submit_follow_and_fetch_results(shard: Shard, tmp_path: Path) -> None:
    batch = _batch(tmp_path / "batch.jsonl", 3)
    nodes = [
        n["name"].removeprefix("nodes/")
        for n in shard("-o", "json", "node", "ls", "--filter", "state=ACTIVE")
        if any(m["model_name"] == "simple" for m in n.get("models", []))
    ]
    assert len(nodes) >= 2
    (made,) = shard("-o", "json", "task", "submit", str(batch), "-p", nodes[0], "--model", "simple")
    assert made["state"] == "TASK_STATE_PENDING"
    assert (tmp_path / "task.key").stat().st_mode & 0o077 == 0  # made on first use, owner-only
    name = made["name"].removeprefix("tasks/")
    done = shard("-o", "json", "task", "get", name, "--wait")
    assert done["state"] == "TASK_STATE_SUCCEEDED", done
    fetched = shard("-o", "json", "task", "result", name, "-O", str(tmp_path / "out.jsonl"))
    assert fetched["signature"] == "verified"
    assert fetched["lines"] == 3
    answers = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [a["outputs"][0]["data"] for a in answers] == [[2 * i] * 16 for i in range(3)]
    listed = shard("-o", "json", "task", "ls", "--state", "SUCCEEDED")
    assert made["name"] in {t["name"] for t in listed}
    assert "SUCCEEDED" in shard("task", "ls").stdout  # a table by default

    # Only the owner's key opens the results.
    other_key = tmp_path / "other.key"
    wrong = shard("task", "result", name, "--key-file", str(other_key), "-O", str(tmp_path / "x"),
                  expect=1)  # fmt: skip
    assert "sealed to another key" in wrong.stderr

    # Redundancy: each provider runs its own sealed copy, the outputs are compared.
    pair = shard("-o", "json", "task", "submit", str(batch), "-p", nodes[0], "-p", nodes[1],
                 "--model", "simple", "--clear-result")  # fmt: skip
    assert len({t["group"] for t in pair}) == 1
    assert {t["provider"] for t in pair} == {f"nodes/{n}" for n in nodes[:2]}
    for task in pair:
        shard("task", "get", task["name"], "--wait")
    assert _wait_verified(shard, pair[0]["name"])["verification"] == "VERIFICATION_VERIFIED"
    clear = shard("-o", "json", "task", "result", pair[1]["name"], "-O", str(tmp_path / "c.jsonl"))
    assert clear["lines"] == 3


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (["task", "submit", "missing.jsonl", "-p", "n1", "--model", "simple"], 2, "is not a file"),
        (["task", "submit", "{batch}", "-p", "n1", "--model", "simple", "--duration", "soon"], 2,
         "is not a duration"),
        (["task", "submit", "{batch}", "-p", "nnosuchnode", "--model", "simple"], 1, "NOT_FOUND"),
        (["task", "get", "nosuchtask"], 1, "NOT_FOUND"),
        (["task", "ls", "--state", "SLEEPING"], 1, "is not a task state"),
    ],
)  # fmt: skip
def test_task_errors_are_one_line(
    shard: Shard, tmp_path: Path, args: list[str], code: int, says: str
) -> None:
    batch = str(_batch(tmp_path / "batch.jsonl", 1))
    result = shard(*(batch if a == "{batch}" else a for a in args), expect=code)
    assert result.stderr.count("\n") == 1, result.stderr
    assert says in result.stderr
