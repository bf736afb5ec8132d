"""Router settings, from `SHARD_INFERENCE_*` environment variables, and what every data plane
(the router, the gateway) needs."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shard_core.settings import ServiceSettings, TlsSettings
from shard_edge.settings import DataPlaneSettings


class InferenceSettings(ServiceSettings, DataPlaneSettings, TlsSettings):
    model_config = SettingsConfigDict(env_prefix="SHARD_INFERENCE_", frozen=True, extra="forbid")

    address: str | None = Field(
        default="127.0.0.1:8001",
        description="KServe v2 gRPC plaintext listen address (Triton's port): loopback only; "
        "empty for none.",
    )
    tls_address: str = Field(
        default="0.0.0.0:8444", description="KServe v2 gRPC TLS listen address (with tls_dir)."
    )
    mesh_address: str = Field(
        default="0.0.0.0:8445",
        description="Mutual-TLS gRPC listen address (with tls_dir): the mesh's services (the "
        "gateway, the registry's canaries) call here with their certificates.",
    )
    registry_address: str = Field(
        default="127.0.0.1:7070",
        description="The registry's loopback plaintext address (RepositoryModelLoad and "
        "Unload, quarantines, client certificates); see registry_mesh_address.",
    )
    registry_mesh_address: str | None = Field(
        default=None,
        description="The registry's mutual-TLS address: with tls_dir, the router calls it there "
        "with its certificate and checks the peer is the registry, instead of registry_address.",
    )
    trusted_proxies: frozenset[str] = Field(
        default=frozenset(),
        description="Addresses (the gateways) whose x-forwarded-for names the real client. "
        "With tls_dir, a gateway calling the mutual-TLS port is trusted by its certificate "
        "wherever it is.",
    )
    response_cache_bytes: int = Field(
        default=256 << 20, ge=0, description="Memory for cached answers of cacheable versions."
    )
