"""Where the CLI connects: named contexts in `$XDG_CONFIG_HOME/shard/config.yaml`.

A context names the registry and router addresses, the API key and TLS settings, as kubectl's
contexts do. Flags beat `SHARD_*` environment variables, which beat the current context.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class Context(BaseModel):
    model_config = ConfigDict(extra="forbid")

    registry: str = Field(default="127.0.0.1:7070", description="gRPC address of the registry.")
    router: str = Field(default="127.0.0.1:8001", description="gRPC address of the router.")
    key: str = Field(default="", description="API key secret sent as a bearer token.")
    key_file: str = Field(default="", description="A file holding the API key secret.")
    tls: bool = Field(default=False, description="Connect with TLS.")
    ca_file: str = Field(default="", description="CA bundle for TLS; the system's when empty.")

    def secret(self) -> str:
        if self.key:
            return self.key
        return Path(self.key_file).expanduser().read_text().strip() if self.key_file else ""


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    current_context: str = ""
    contexts: dict[str, Context] = Field(default_factory=dict)


class ConfigError(Exception):
    """The config file cannot be read, or names a context that is not in it."""


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(os.environ.get("SHARD_CONFIG") or Path(base) / "shard" / "config.yaml")


def load(path: Path | None = None) -> Config:
    path = path or config_path()
    if not path.exists():
        return Config()
    try:
        return Config.model_validate(yaml.safe_load(path.read_text()) or {})
    except (yaml.YAMLError, ValidationError) as error:
        raise ConfigError(f"{path} is not a valid shard config: {error}") from None


def save(config: Config, path: Path | None = None) -> Path:
    """Write the config, readable by this user only (it may hold keys)."""
    path = path or config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(yaml.safe_dump(config.model_dump(exclude_defaults=True), sort_keys=True))
    return path


@dataclass(frozen=True, kw_only=True)
class Overrides:
    """What flags (or `SHARD_*` variables, through typer's envvar) say for this run."""

    context: str | None = None
    registry: str | None = None
    router: str | None = None
    key: str | None = None


def resolve(overrides: Overrides, path: Path | None = None) -> Context:
    """The context to use: the named or current one (defaults when there is none), with the
    overrides on top."""
    config = load(path)
    name = overrides.context or config.current_context
    if name and name not in config.contexts:
        raise ConfigError(f"no context named {name!r} (see `shard context list`)")
    context = config.contexts.get(name, Context())
    changes = {
        field: value
        for field, value in (
            ("registry", overrides.registry),
            ("router", overrides.router),
            ("key", overrides.key),
        )
        if value
    }
    return context.model_copy(update=changes)
