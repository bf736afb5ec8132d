"""Settings every data plane (the router, the gateway) shares."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from shard_core.settings import EtcdSettings


class DataPlaneSettings(EtcdSettings):
    """What a data plane (the router, the gateway) needs to follow the shard and check callers."""

    model_config = SettingsConfigDict(frozen=True, extra="forbid")

    admin_token: SecretStr | None = Field(
        default=None,
        description="The registry's bootstrap admin token, so it works here too (kept as a hash).",
    )
    key_rate_limit_rps: float = Field(
        default=1000.0, ge=0, description="Inference requests a second per API key (0: none)."
    )
    anonymous_rate_limit_rps: float = Field(
        default=100.0,
        ge=0,
        description="Inference requests a second per anonymous client address (0: none).",
    )
    max_attempts: int = Field(
        default=3, ge=1, le=5, description="Replicas tried per request when one is unavailable."
    )
    upstream_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="Deadline of a call forwarded to a node when the client set none (or a "
        "longer one): no node holds a call open forever.",
    )
    edge_dir: Path | None = Field(
        default=None,
        description="Where the service's edge (its Envoy) keeps its configuration, logs and the "
        "socket the service listens on for it; a new private temporary directory when not set.",
    )
    stream_timeout_s: float = Field(
        default=3600.0,
        gt=0,
        description="The same for a stream forwarded to a node (ModelStreamInfer).",
    )
