"""Settings shared by every service; each service extends `ServiceSettings` with its own prefix.

Settings are built once at the edge (a service's CLI) from `SHARD_<SERVICE>_*` environment
variables and passed in; nothing reads a global.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    """What every service process has: logging, metrics and, for the control plane, etcd."""

    model_config = SettingsConfigDict(frozen=True, extra="forbid")

    log_level: str = Field(default="INFO", description="Python logging level name.")
    log_json: bool = Field(default=False, description="Write logs as JSON lines.")
    metrics_host: str = Field(default="127.0.0.1", description="Prometheus /metrics address.")
    metrics_port: int | None = Field(
        default=None, ge=0, le=65535, description="Prometheus /metrics port; unset for none."
    )


class EtcdSettings(BaseSettings):
    """Where the control plane's etcd is."""

    model_config = SettingsConfigDict(frozen=True, extra="forbid")

    etcd_host: str = Field(default="127.0.0.1", description="etcd client host.")
    etcd_port: int = Field(default=2379, ge=1, le=65535, description="etcd client port.")
    etcd_prefix: str = Field(default="/shard/", description="Key prefix of all shard records.")
    etcd_timeout_s: float = Field(default=5.0, gt=0, description="Timeout of one etcd call.")
    etcd_tls_dir: Path | None = Field(
        default=None,
        description="This service's etcd client identity (ca.pem, cert.pem, key.pem; the "
        "certificate's CN is its etcd user): connect with mutual TLS and check the peer is "
        "the mesh's etcd. Unset: plaintext, loopback only.",
    )
    etcd_trust_domain: str = Field(
        default="shard.local",
        description="The mesh's trust domain: etcd's certificate names service/etcd in it.",
    )


class TlsSettings(BaseSettings):
    """A service's mesh identity: its TLS files, and where it listens with TLS."""

    model_config = SettingsConfigDict(frozen=True, extra="forbid")

    tls_dir: Path | None = Field(
        default=None,
        description="Directory with ca.pem (the mesh's CA), cert.pem and key.pem (this "
        "service's certificate and key); unset: no TLS listener.",
    )
    trust_domain: str = Field(
        default="shard.local", description="The mesh's name in its workloads' SPIFFE IDs."
    )
