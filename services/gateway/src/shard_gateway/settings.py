"""Gateway settings, from `SHARD_GATEWAY_*` environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shard_core.settings import ServiceSettings, TlsSettings
from shard_edge.settings import DataPlaneSettings


class GatewaySettings(ServiceSettings, DataPlaneSettings, TlsSettings):
    model_config = SettingsConfigDict(env_prefix="SHARD_GATEWAY_", frozen=True, extra="forbid")

    host: str = Field(default="127.0.0.1", description="HTTP listen host: loopback only.")
    port: int | None = Field(
        default=8000, ge=0, le=65535, description="HTTP listen port; empty for none."
    )
    tls_host: str = Field(default="0.0.0.0", description="HTTPS listen host (with tls_dir).")
    tls_port: int = Field(default=8443, ge=0, le=65535, description="HTTPS listen port.")
    router_address: str = Field(
        default="127.0.0.1:8001",
        description="The router's loopback plaintext gRPC address; see router_mesh_address.",
    )
    router_mesh_address: str | None = Field(
        default=None,
        description="The router's mutual-TLS address: with tls_dir, the gateway calls it there "
        "with its certificate and checks the peer is the router.",
    )
    registry_address: str = Field(
        default="127.0.0.1:7070",
        description="The registry's loopback plaintext gRPC address; see registry_mesh_address.",
    )
    registry_mesh_address: str | None = Field(
        default=None,
        description="The registry's mutual-TLS address: with tls_dir, the gateway calls it "
        "there with its certificate and checks the peer is the registry.",
    )
    max_body_bytes: int = Field(
        default=64 << 20, gt=0, description="Largest request body accepted (413 beyond)."
    )
