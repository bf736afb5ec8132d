"""No service imports another: what two services share lives in a library (`libs/`)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVICES = {
    path.parent.name: path.parent
    for path in (ROOT / "services").glob("*/src/*/__init__.py")
    if path.parent.name != "shard_tool"  # the CLI is every service's client and launcher
}


def _imported(source: Path) -> set[str]:
    tree = ast.parse(source.read_text(), filename=str(source))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


def test_no_service_imports_another() -> None:
    assert {"shard_gateway", "shard_inference", "shard_registry", "shard_node"} <= set(SERVICES)
    crossings = [
        f"{source.relative_to(ROOT)} imports {other}"
        for name, package in SERVICES.items()
        for source in package.rglob("*.py")
        for other in _imported(source) & (set(SERVICES) - {name})
    ]
    assert not crossings
