"""The one place TLS credentials are built: for every gRPC server and channel in the shard, the
CLI and the client SDK.

A workload's material is a directory of three PEM files: `ca.pem` (the mesh's trust bundle),
`cert.pem` (its certificate and the chain above it) and `key.pem` (owner-only). Servers pick up
renewed files for new handshakes without a restart; a client that names the peer it expects
(`expect`) checks it by the certificate's DNS SAN, so a certificate of another workload under the
same CA is refused.

Plaintext is for loopback only: `require_loopback` refuses a plaintext listener anywhere else.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import ssl
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from shard_core.pki import Workload

CA_FILE = "ca.pem"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
# How long a connection replaced by one with a renewed certificate (or to a node gone from the
# view) lives on, for calls in flight.
RETIRE_GRACE_S = 60.0
# How often a caller on a call path looks for renewed files.
RENEWAL_CHECK_S = 1.0


@dataclass(frozen=True, kw_only=True)
class Material:
    """PEM bytes of one workload's TLS identity (no certificate: trust only, a client's)."""

    bundle: bytes
    chain: bytes = b""
    key: bytes = b""


class TlsIdentity:
    """A workload's TLS files, read again when they change."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._stamp: tuple[float, ...] = ()
        self._looked_at = 0.0
        self._material = Material(bundle=b"")
        self.material()  # fail now, not at the first handshake, when a file is missing

    @property
    def paths(self) -> tuple[Path, Path, Path]:
        return (self.directory / CA_FILE, self.directory / CERT_FILE, self.directory / KEY_FILE)

    def material(self, *, max_age_s: float = 0.0) -> Material:
        """The files' contents, re-read only when one changed; with `max_age_s`, the files are
        looked at no more often than that (for callers on a call path)."""
        if max_age_s and time.monotonic() - self._looked_at < max_age_s:
            return self._material
        self._looked_at = time.monotonic()
        ca, cert, key = self.paths
        stamp = tuple(path.stat().st_mtime for path in (ca, cert, key) if path.exists())
        with self._lock:
            if stamp != self._stamp:
                read = Material(
                    bundle=ca.read_bytes(),
                    chain=cert.read_bytes() if cert.exists() else b"",
                    key=key.read_bytes() if key.exists() else b"",
                )
                # Renewal replaces the files one by one: a key that does not match the
                # certificate yet keeps what was served until both are in place.
                if _matched(read) or not self._material.bundle:
                    self._material, self._stamp = read, stamp
            return self._material

    def server_credentials(self, *, require_client_certificate: bool) -> grpc.ServerCredentials:
        """Credentials for a TLS listener; a renewed certificate serves new handshakes."""
        served = self.material()

        def configuration() -> grpc.ServerCertificateConfiguration:
            return grpc.ssl_server_certificate_configuration(
                [(served.key, served.chain)], root_certificates=served.bundle
            )

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            nonlocal served
            current = self.material()
            if current is served:
                return None  # unchanged
            served = current
            return configuration()

        return grpc.dynamic_ssl_server_credentials(
            configuration(),
            fetch,  # type: ignore[arg-type]  # None means "unchanged", as gRPC documents
            require_client_authentication=require_client_certificate,
        )

    def ssl_context(self) -> ssl.SSLContext:
        """A server context for HTTP listeners. Each handshake checks the files: renewed ones
        serve it from a fresh context (every ClientHello reaches the callback, SNI or not)."""
        _, cert, key = self.paths
        loaded = self.material()

        def build() -> ssl.SSLContext:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(cert, key)
            context.sni_callback = choose
            return context

        def choose(connection: ssl.SSLObject, _name: str | None, _: ssl.SSLContext) -> None:
            nonlocal loaded
            current = self.material()
            if current is not loaded:
                latest[0], loaded = build(), current
            if connection.context is not latest[0]:
                connection.context = latest[0]

        latest = [build()]
        return latest[0]

    def client_context(self) -> ssl.SSLContext:
        """A client context for HTTPS to a mesh peer: trusts the mesh's CA, presents this
        workload's certificate of the moment, and checks the peer by the name the caller
        gives (`server_hostname`)."""
        material = self.material()
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cadata=material.bundle.decode()
        )
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if material.chain and material.key:
            # ssl loads a chain and key only from files: the ones `material` was read from
            # may have been replaced since, so load these bytes through a private copy.
            with tempfile.TemporaryDirectory() as scratch:
                chain, key = Path(scratch) / CERT_FILE, Path(scratch) / KEY_FILE
                _replace(chain, material.chain, 0o600)
                _replace(key, material.key, 0o600)
                context.load_cert_chain(chain, key)
        return context

    def channel_credentials(self, *, present_certificate: bool = True) -> grpc.ChannelCredentials:
        """Credentials for a channel that trusts the mesh's CA and, when it has one and
        `present_certificate`, proves who it is with its certificate."""
        material = self.material()
        if present_certificate and material.chain and material.key:
            return grpc.ssl_channel_credentials(material.bundle, material.key, material.chain)
        return grpc.ssl_channel_credentials(material.bundle)


def _matched(material: Material) -> bool:
    """Whether the key is the certificate's (trivially so without a certificate)."""
    if not material.chain and not material.key:
        return True
    try:
        leaf = x509.load_pem_x509_certificates(material.chain)[0]
        key = serialization.load_pem_private_key(material.key, password=None)
    except ValueError:
        return False
    return bool(leaf.public_key() == key.public_key())


def trusting(ca_file: Path | None) -> grpc.ChannelCredentials:
    """TLS for a client without a certificate of its own (an API key's holder), trusting
    `ca_file` (the mesh CA), or the system's roots when None."""
    return grpc.ssl_channel_credentials(ca_file.read_bytes() if ca_file else None)


def write_identity(
    directory: Path, *, chain: bytes, key: bytes, bundle: bytes | None = None
) -> None:
    """Store a workload's (renewed) material; each file is replaced whole, the key owner-only."""
    directory.mkdir(parents=True, exist_ok=True)
    if bundle is not None:
        _replace(directory / CA_FILE, bundle, 0o644)
    _replace(directory / KEY_FILE, key, 0o600)
    _replace(directory / CERT_FILE, chain, 0o644)


def _replace(path: Path, data: bytes, mode: int) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(descriptor, "wb") as out:
        out.write(data)
    os.replace(temporary, path)


def channel(
    address: str,
    credentials: grpc.ChannelCredentials | None,
    *,
    expect: Workload | None = None,
    options: Sequence[tuple[str, Any]] = (),
    interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
) -> grpc.aio.Channel:
    """A channel to `address`: TLS with `credentials` (checking the peer is `expect`, when
    given), or plaintext when None, which only a loopback address may take."""
    if credentials is None:
        require_loopback(address, what="a plaintext channel")
        return grpc.aio.insecure_channel(address, options, interceptors=interceptors)
    if expect is not None:
        options = [*options, ("grpc.ssl_target_name_override", expect.dns)]
    return grpc.aio.secure_channel(address, credentials, options, interceptors=interceptors)


class MeshChannel(grpc.aio.Channel):
    """A mutual-TLS channel from one workload to another that follows its identity's renewals:
    once the files change, calls go over a new channel presenting the renewed certificate, and
    the old one closes a minute later. Stubs made on it keep working across renewals (each call
    finds the channel of the moment)."""

    def __init__(
        self,
        address: str,
        identity: TlsIdentity,
        *,
        expect: Workload,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self._address, self._identity, self._expect = address, identity, expect
        self._options = options
        self._material = identity.material()
        self._channel = self._open()
        self._closing: set[asyncio.Task[None]] = set()

    def _open(self) -> grpc.aio.Channel:
        credentials = self._identity.channel_credentials()
        return channel(self._address, credentials, expect=self._expect, options=self._options)

    def current(self) -> grpc.aio.Channel:
        """The channel presenting the identity's certificate of now (the files looked at no
        more than once a second: this runs for every call)."""
        material = self._identity.material(max_age_s=RENEWAL_CHECK_S)
        if material is not self._material:
            old, self._material, self._channel = self._channel, material, self._open()
            task = asyncio.get_running_loop().create_task(old.close(RETIRE_GRACE_S))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        return self._channel

    # Generated stubs pass more than the three arguments (`_registered_method`): all go on.
    def unary_unary(self, *args: Any, **kwargs: Any) -> Any:
        return _Following(self, "unary_unary", args, kwargs)

    def unary_stream(self, *args: Any, **kwargs: Any) -> Any:
        return _Following(self, "unary_stream", args, kwargs)

    def stream_unary(self, *args: Any, **kwargs: Any) -> Any:
        return _Following(self, "stream_unary", args, kwargs)

    def stream_stream(self, *args: Any, **kwargs: Any) -> Any:
        return _Following(self, "stream_stream", args, kwargs)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self.current().get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self.current().wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self.current().channel_ready()

    async def close(self, grace: float | None = None) -> None:
        await asyncio.gather(self._channel.close(grace), *self._closing)

    async def __aenter__(self) -> MeshChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close(None)


class _Following:
    """A multi-callable on whichever channel is current when it is called."""

    def __init__(
        self, owner: MeshChannel, kind: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        self._owner, self._kind, self._args, self._kwargs = owner, kind, args, kwargs
        self._channel: grpc.aio.Channel | None = None
        self._callable: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        current = self._owner.current()
        if current is not self._channel:
            self._channel = current
            self._callable = getattr(current, self._kind)(*self._args, **self._kwargs)
        return self._callable(*args, **kwargs)


def peer_channel(
    address: str,
    *,
    mesh_address: str | None,
    identity: TlsIdentity | None,
    expect: Workload,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """A channel from one of the mesh's services to another: mutual TLS to the peer's
    `mesh_address` with `identity`, checking the peer is `expect` (following renewals), when
    the service has both; else plaintext to `address`, which only a loopback address may take."""
    if identity is not None and mesh_address:
        return MeshChannel(mesh_address, identity, expect=expect, options=options)
    return channel(address, None, options=options)


def is_loopback(address: str) -> bool:
    """Whether `host:port` (or a Unix socket, `unix:path`) names this machine only."""
    if address.startswith("unix:"):
        return True
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_loopback(address: str, *, what: str) -> None:
    if not is_loopback(address):
        raise ValueError(
            f"{what} may only use a loopback address, not {address}: give the service its TLS "
            "files (tls_dir) and listen with TLS"
        )
