"""Node agent settings, from `SHARD_NODE_*` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from shard_core.settings import ServiceSettings
from shard_node.triton import Sandboxing


class NodeSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SHARD_NODE_", frozen=True, extra="forbid")

    registry_address: str = Field(
        default="127.0.0.1:7070", description="gRPC address of the registry."
    )
    registry_ca_file: Path | None = Field(
        default=None,
        description="The mesh CA's trust bundle (ca.pem, given with the join token): connect to "
        "the registry's TLS port and check it is the registry. Unset: plaintext, which only a "
        "loopback registry address may take.",
    )
    registry_mesh_address: str | None = Field(
        default=None,
        description="The registry's mutual-TLS address: once the node holds its mesh "
        "certificate, it reads model files and runs tasks there, proving who it is by it (a "
        "node with a certificate gets no bearer credential). Required with registry_ca_file.",
    )
    trust_domain: str = Field(default="shard.local", description="The mesh's trust domain.")
    state_dir: Path = Field(
        default=Path(".shard/node"), description="Where the identity key and Triton files live."
    )
    labels: dict[str, str] = Field(default_factory=dict, description="Labels for this node.")
    triton_url: str | None = Field(
        default=None,
        description="gRPC address of a running Triton to attach to; unset to launch one.",
    )
    repository: Path | None = Field(
        default=None,
        description="The Triton model repository the agent manages; default: state_dir/repository."
        " When attaching to a running Triton, that Triton's repository.",
    )
    gate_host: str = Field(
        default="0.0.0.0",
        description="Where the node's gate (Envoy, mutual TLS in front of Triton, which "
        "listens on loopback only) listens for the shard's calls. The gate runs in a mesh "
        "with TLS (registry_ca_file set).",
    )
    gate_grpc_port: int = Field(default=8001, ge=1, le=65535, description="The gate's gRPC port.")
    gate_http_port: int = Field(default=8000, ge=1, le=65535, description="The gate's HTTP port.")
    triton_control_key: SecretStr | None = Field(
        default=None,
        description="For an attached Triton: the key its --grpc-restricted-protocol and "
        "--http-restricted-api demand (header shard-node-control) for model control.",
    )
    sandbox: Sandboxing = Field(
        default="strict",
        description="The sandbox a launched Triton (and the model code in it) runs in: "
        "'strict' (Landlock filesystem and TCP rules, Linux 6.7+), 'filesystem' (no TCP rules, "
        "for older kernels), or 'off' (development only).",
    )
    triton_grpc_port: int = Field(default=8101, ge=1, le=65535)
    triton_http_port: int = Field(default=8100, ge=1, le=65535)
    triton_metrics_port: int = Field(default=8102, ge=1, le=65535)
    advertise_address: str | None = Field(
        default=None,
        description="The node's gRPC address as the shard reaches it: the gate's (default: "
        "its port on 127.0.0.1), or without TLS, Triton's own (loopback only).",
    )
    advertise_http_address: str | None = Field(
        default=None,
        description="The node's HTTP address as the shard reaches it, for the gateway; "
        "default: the HTTP port on the advertised gRPC host (none for an attached Triton "
        "without triton_http_url).",
    )
    reconnect_max_backoff_s: float = Field(default=5.0, gt=0)
    join_token: str = Field(
        default="", description="One-time join token for the node's first registration."
    )
    triton_http_url: str | None = Field(
        default=None,
        description="HTTP URL of an attached Triton, where tasks run; launched ones are known.",
    )
    max_concurrent_tasks: int = Field(
        default=2, ge=1, description="Encrypted tasks the node runs at once."
    )
    triton_metrics_url: str | None = Field(
        default=None,
        description="Prometheus metrics URL of an attached Triton; launched ones are known.",
    )
    min_free_disk_bytes: int = Field(
        default=1 << 30, ge=0, description="Self-check: free disk below this degrades the node."
    )

    @model_validator(mode="after")
    def _mesh_address_with_tls(self) -> NodeSettings:
        if self.registry_ca_file is not None and not self.registry_mesh_address:
            raise ValueError(
                "registry_mesh_address is required with registry_ca_file: a node with a mesh "
                "certificate calls the registry's mutual-TLS port with it"
            )
        return self
