"""Registry settings, from `SHARD_REGISTRY_*` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from shard_core.settings import EtcdSettings, ServiceSettings, TlsSettings


class RegistrySettings(ServiceSettings, EtcdSettings, TlsSettings):
    model_config = SettingsConfigDict(env_prefix="SHARD_REGISTRY_", frozen=True, extra="forbid")

    address: str | None = Field(
        default="127.0.0.1:7070",
        description="Plaintext gRPC listen address: loopback only; empty for none.",
    )
    tls_address: str = Field(
        default="0.0.0.0:7443", description="TLS gRPC listen address (with tls_dir)."
    )
    mesh_address: str = Field(
        default="0.0.0.0:7444",
        description="Mutual-TLS gRPC listen address (with tls_dir): node agents call here with "
        "their mesh certificates.",
    )
    ca_dir: Path | None = Field(
        default=None,
        description="The mesh CA that issues node certificates: ca.pem (roots), ca-cert.pem "
        "(the signing certificate, then any intermediates) and ca-key.pem.",
    )
    node_certificate_lifetime_s: float = Field(
        default=4 * 3600,
        gt=0,
        le=24 * 3600,
        description="How long a node certificate lives; agents renew at half its life.",
    )
    admin_token: SecretStr = Field(
        description="The token admin calls (cordon, drain, delete, join tokens, model and "
        "deployment writes) must carry; required: there is no unauthenticated mode."
    )
    heartbeat_interval_s: float = Field(
        default=2.0, gt=0, description="How often node agents must send a heartbeat."
    )
    lease_ttl_s: int = Field(
        default=10, ge=2, description="How long a node stays in the shard without a heartbeat."
    )
    control_period_s: float = Field(
        default=2.0, gt=0, description="How often the scheduler reconciles the shard."
    )
    leader_ttl_s: int = Field(
        default=6, ge=2, description="How long a dead scheduler leader keeps the role."
    )
    attest_interval_s: float = Field(
        default=300.0, gt=0, description="How often connected nodes must attest again."
    )
    node_credential_ttl_s: float = Field(
        default=900.0,
        gt=0,
        description="How long a node's credential works; a new one comes with each accepted "
        "attestation, so this must be longer than attest_interval_s.",
    )
    canary_interval_s: float = Field(
        default=30.0, gt=0, description="About how often each node gets a known-answer request."
    )
    router_address: str = Field(
        default="127.0.0.1:8001",
        description="A router (KServe v2 gRPC) the canaries go through, like any request: its "
        "loopback plaintext address; see router_mesh_address.",
    )
    router_mesh_address: str | None = Field(
        default=None,
        description="The router's mutual-TLS address: with tls_dir, canaries go there with the "
        "registry's certificate, checking the peer is the router.",
    )
    trust_node_addresses: bool = Field(
        default=False,
        description="Accept a node's Triton address even if it is not where the node connects "
        "from (for nodes behind NAT); by default a node can only point traffic at itself.",
    )
    trusted_label_claims: frozenset[str] = Field(
        default=frozenset(),
        description="Keys of the labels nodes claim (SHARD_NODE_LABELS) that node selectors "
        "match as if an admin had set them; by default none: an admin sets labels (UpdateNode).",
    )
    require_join_token: bool = Field(
        default=True, description="New nodes need a one-time join token made by an admin."
    )
    min_gpu_memory_bytes: int = Field(
        default=0, ge=0, description="Policy: every GPU of a node has at least this memory."
    )
    allowed_gpu_models: list[str] = Field(
        default_factory=list, description="Policy: the GPU models a node may have; empty for any."
    )
    min_agent_version: str = Field(default="0", description="Policy: the oldest node agent.")
    require_gpu_cross_check: bool = Field(
        default=True, description="Policy: every GPU NVML reports must be on the PCI bus."
    )
    max_connecting_nodes: int = Field(
        default=256,
        ge=1,
        description="Connect streams that have not registered yet, in all; more are refused.",
    )
    max_connecting_nodes_per_address: int = Field(
        default=16, ge=1, description="The same, from one client address."
    )
    max_message_bytes: int = Field(
        default=4 << 20,
        ge=2 << 20,
        description="The largest message a client may send (blobs travel in 1 MiB chunks).",
    )
    max_keys_per_principal: int = Field(
        default=100, ge=1, description="Working API keys one principal may have."
    )
    default_key_rate_limit_rps: float = Field(
        default=1000.0,
        ge=0,
        description="What a key without a rate of its own gets at the data planes (their "
        "SHARD_*_KEY_RATE_LIMIT_RPS): the ceiling of the keys it makes.",
    )
    key_retention_s: float = Field(
        default=7 * 24 * 3600, gt=0, description="How long revoked or expired keys are kept."
    )
    join_token_retention_s: float = Field(
        default=7 * 24 * 3600, gt=0, description="How long join tokens are kept past expiry."
    )
    enrollment_retention_s: float = Field(
        default=90 * 24 * 3600,
        gt=0,
        description="How long a node that stays away keeps its enrollment (then it needs a "
        "new join token).",
    )
    max_blob_bytes: int = Field(
        default=32 << 30, gt=0, description="The largest blob one upload may store."
    )
    blob_quota_bytes: int = Field(
        default=256 << 30, gt=0, description="The blob bytes one principal may hold (not admins)."
    )
    blob_gc_grace_s: float = Field(
        default=24 * 3600,
        gt=0,
        description="How long a blob nothing refers to is kept after it was stored.",
    )
    housekeeping_interval_s: float = Field(
        default=600.0,
        gt=0,
        description="How often the leader prunes old keys, join tokens, enrollments and "
        "unreferenced blobs.",
    )
    max_open_tasks_per_owner: int = Field(
        default=1000, ge=1, description="Tasks one principal may have PENDING or RUNNING at once."
    )
    task_retention_s: float = Field(
        default=30 * 24 * 3600, gt=0, description="How long finished tasks stay readable."
    )
    blob_dir: Path = Field(
        default=Path(".shard/registry/blobs"),
        description="Local directory of the blob store, used unless blob_bucket is set.",
    )
    blob_bucket: str | None = Field(
        default=None, description="S3 bucket of the blob store; unset for the local directory."
    )
    blob_prefix: str = Field(default="", description="Key prefix of blobs in the bucket.")
    s3_endpoint: str | None = Field(
        default=None, description="S3-compatible endpoint URL; unset for AWS."
    )
    s3_region: str = Field(default="us-east-1")
    s3_access_key_id: str | None = Field(default=None)
    s3_secret_access_key: SecretStr | None = Field(default=None)
    s3_allow_http: bool = Field(default=False, description="Allow a plain-HTTP S3 endpoint.")

    @model_validator(mode="after")
    def _credentials_outlive_attestations(self) -> RegistrySettings:
        if self.node_credential_ttl_s <= self.attest_interval_s:
            raise ValueError(
                "node_credential_ttl_s must be longer than attest_interval_s: nodes get a new "
                "credential with each attestation"
            )
        return self
