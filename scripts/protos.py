"""Generate, check and lint AI Shard's protobuf API.

    python scripts/protos.py generate   # write libs/api/src/shard from protos/
    python scripts/protos.py check      # fail when the committed generated code is stale
    python scripts/protos.py lint       # buf lint (STANDARD) and buf format, offline

The generated package is committed: services import it without a build step, and `check` in CI
keeps it honest. Google's common protos are read from the installed googleapis-common-protos
wheel, so nothing is fetched and nothing third-party is vendored.
"""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import grpc_tools

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
API_SRC = ROOT / "libs" / "api" / "src"
PACKAGE = "shard"
BIN = Path(sys.executable).parent


def _includes() -> list[str]:
    site_packages = Path(sysconfig.get_paths()["purelib"])
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    return [f"-I{PROTOS}", f"-I{site_packages}", f"-I{well_known}"]


def _sources() -> list[str]:
    return sorted(str(path.relative_to(PROTOS)) for path in PROTOS.rglob("*.proto"))


# protoc leaves out the imports of protos a file uses only for options (google.api's field
# behaviours and resources), yet building its descriptor needs them loaded: the package loads them
# first, so that any generated module can be imported on its own.
PACKAGE_INIT = '''"""AI Shard's generated API (shard.*.v1), from scripts/protos.py."""

from google.api import annotations_pb2, client_pb2, field_behavior_pb2, resource_pb2  # noqa: F401
'''


def _protoc(*args: str) -> None:
    command = [sys.executable, "-m", "grpc_tools.protoc", *_includes(), *args, *_sources()]
    # protoc-gen-mypy reports every file it writes; show protoc's output only when it fails.
    result = subprocess.run(command, cwd=PROTOS, capture_output=True, text=True, check=False)
    if result.returncode:
        sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit(result.returncode)


def generate(out: Path) -> None:
    """Write the Python modules, gRPC stubs and mypy stubs for every proto into `out`."""
    shutil.rmtree(out / PACKAGE, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    _protoc(
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out=only_async:{out}",
        f"--plugin=protoc-gen-mypy={BIN / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={BIN / 'protoc-gen-mypy_grpc'}",
    )
    for directory in [out / PACKAGE, *(p for p in (out / PACKAGE).rglob("*") if p.is_dir())]:
        (directory / "__init__.py").touch()
    (out / PACKAGE / "__init__.py").write_text(PACKAGE_INIT)
    (out / PACKAGE / "py.typed").touch()


def check() -> int:
    """Return 1 and name the files when the committed generated code differs from protos/."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        stale = _differences(fresh / PACKAGE, API_SRC / PACKAGE)
    if stale:
        print("generated API is stale; run `python scripts/protos.py generate`:", file=sys.stderr)
        for name in stale:
            print(f"  {name}", file=sys.stderr)
        return 1
    print("generated API is up to date")
    return 0


def _differences(fresh: Path, committed: Path) -> list[str]:
    def files(root: Path) -> set[str]:
        return {
            str(p.relative_to(root))
            for p in root.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        }

    fresh_files, committed_files = files(fresh), files(committed)
    changed = sorted(fresh_files ^ committed_files)
    changed += sorted(
        name
        for name in fresh_files & committed_files
        if not filecmp.cmp(fresh / name, committed / name, shallow=False)
    )
    return changed


def lint() -> int:
    """Run buf lint over a protoc-built image (imports resolved offline) and buf format."""
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "shard.binpb"
        _protoc("--include_imports", "--include_source_info", f"--descriptor_set_out={image}")
        buf = str(BIN / "buf")
        config = str(ROOT / "buf.yaml")
        lint_rc = subprocess.run(
            [buf, "lint", str(image), "--path", PACKAGE, "--config", config], check=False
        )
    format_rc = subprocess.run([buf, "format", "--diff", "--exit-code", str(PROTOS)], check=False)
    return 1 if lint_rc.returncode or format_rc.returncode else 0


def main() -> int:
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "generate":
        generate(API_SRC)
        return 0
    if command == "check":
        return check()
    if command == "lint":
        return lint()
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
