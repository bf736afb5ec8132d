"""Registry settings, from `SHARD_REGISTRY_*` environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shard_core.settings import EtcdSettings, ServiceSettings


class RegistrySettings(ServiceSettings, EtcdSettings):
    model_config = SettingsConfigDict(env_prefix="SHARD_REGISTRY_", frozen=True, extra="forbid")

    address: str = Field(default="0.0.0.0:7070", description="gRPC listen address.")
    heartbeat_interval_s: float = Field(
        default=2.0, gt=0, description="How often node agents must send a heartbeat."
    )
    lease_ttl_s: int = Field(
        default=10, ge=2, description="How long a node stays in the shard without a heartbeat."
    )
