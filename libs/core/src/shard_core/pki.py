"""The mesh's certificate authority: short-lived X.509 certificates with SPIFFE-style names.

Every workload (a node, a service) is named `spiffe://<trust domain>/<kind>/<name>` in a URI SAN,
and also `<name>.<kind>.<trust domain>` in a DNS SAN, so a client that expects one peer checks it
with ordinary hostname verification (gRPC's `ssl_target_name_override`). The CA decides the names
and the lifetime; a certificate request only contributes its public key, and one asking for
anything else (a CA, another name, a wildcard) is refused.

The authority is a root made by `shard up`, or an operator's CA given as files: a signing
certificate (root or intermediate) with its chain, its key, and the trust bundle of roots.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shard_core.errors import InvalidArgumentError

DEFAULT_TRUST_DOMAIN = "shard.local"
# Workload certificates live hours, not months; they are renewed at half their life.
DEFAULT_LIFETIME_S = 4 * 3600
MAX_LIFETIME_S = 24 * 3600
CA_LIFETIME_S = 10 * 365 * 24 * 3600
KINDS = ("node", "service", "client")
# Certificates start this long before they are issued, for peers whose clocks run behind.
BACKDATE_S = 300
_CLOCK_SKEW = datetime.timedelta(seconds=BACKDATE_S)

CURVES = ("secp256r1", "secp384r1")
# A client certificate allows a model by carrying this URI with the model's name after it.
MODEL_GRANT_PREFIX = "urn:shard:model:"
# The most models one client certificate allows (each is a URI in it).
MAX_GRANTS = 256


def model_grant(model_name: str) -> str:
    return MODEL_GRANT_PREFIX + model_name


def spiffe_id(trust_domain: str, kind: str, name: str) -> str:
    return f"spiffe://{trust_domain}/{kind}/{name}"


def dns_name(trust_domain: str, kind: str, name: str) -> str:
    """The DNS SAN a workload's certificate carries: what a client names as the server it
    expects."""
    return f"{name}.{kind}.{trust_domain}"


@dataclass(frozen=True, kw_only=True)
class Workload:
    """Who a certificate names."""

    trust_domain: str
    kind: str
    name: str

    @property
    def uri(self) -> str:
        return spiffe_id(self.trust_domain, self.kind, self.name)

    @property
    def dns(self) -> str:
        return dns_name(self.trust_domain, self.kind, self.name)

    @classmethod
    def parse(cls, uri: str) -> Workload | None:
        """The workload a SPIFFE URI names, or None when it is not one of ours in shape."""
        rest = uri.removeprefix("spiffe://")
        parts = rest.split("/")
        if rest == uri or len(parts) != 3 or parts[1] not in KINDS or not all(parts):
            return None
        return cls(trust_domain=parts[0], kind=parts[1], name=parts[2])


def node_workload(trust_domain: str, node: str) -> Workload:
    """The workload of a node by its resource name (`nodes/{id}`) or id: what its certificate
    names."""
    return Workload(trust_domain=trust_domain, kind="node", name=node.removeprefix("nodes/"))


def issued_at(certificate: x509.Certificate) -> float:
    """When the CA issued `certificate` (seconds; X.509 keeps whole seconds, so up to one
    second early)."""
    return certificate.not_valid_before_utc.timestamp() + BACKDATE_S


def workload_of(certificate: x509.Certificate) -> Workload | None:
    """The workload a certificate's URI SAN names (exactly one SPIFFE URI), if any."""
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    uris = names.value.get_values_for_type(x509.UniformResourceIdentifier)
    spiffe = [uri for uri in uris if uri.startswith("spiffe://")]
    return Workload.parse(spiffe[0]) if len(spiffe) == 1 else None


@dataclass(frozen=True, kw_only=True)
class Issued:
    """A workload certificate: the leaf and the chain up to (not including) the root."""

    chain_pem: bytes
    serial: int
    not_after: datetime.datetime


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def new_key() -> ec.EllipticCurvePrivateKey:
    """A workload's private key: ECDSA P-256, which every TLS stack here speaks."""
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def certificate_request(key: ec.EllipticCurvePrivateKey, workload: Workload | None) -> bytes:
    """A CSR for `workload`, or naming nothing (a client, whose name the CA decides); the CA
    takes only its key: names are the CA's to decide."""
    builder = x509.CertificateSigningRequestBuilder()
    if workload is None:
        builder = builder.subject_name(x509.Name([]))
    else:
        builder = builder.subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, workload.name)])
        ).add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(workload.uri)]),
            critical=False,
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


class Authority:
    """Issues workload certificates under one signing certificate."""

    def __init__(
        self,
        *,
        certificate: x509.Certificate,
        key: ec.EllipticCurvePrivateKey,
        intermediates: Sequence[x509.Certificate] = (),
        roots: Sequence[x509.Certificate],
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
    ) -> None:
        if certificate.public_key() != key.public_key():
            raise ValueError("the CA key does not match the CA certificate")
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
        if not constraints.value.ca:
            raise ValueError("the CA certificate is not a CA (basicConstraints CA:FALSE)")
        self.certificate = certificate
        self._key = key
        self.intermediates = list(intermediates)
        self.roots = list(roots)
        self.trust_domain = trust_domain

    @property
    def bundle_pem(self) -> bytes:
        """The trust bundle: what every verifier in the mesh trusts."""
        return b"".join(_pem(root) for root in self.roots)

    @classmethod
    def create(cls, *, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> Authority:
        """A new self-signed root (what `shard up` makes for a local mesh)."""
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{trust_domain} mesh CA")])
        now = _now()
        root = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(now + datetime.timedelta(seconds=CA_LIFETIME_S))
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(certificate=root, key=key, roots=[root], trust_domain=trust_domain)

    def write(self, directory: Path) -> None:
        """Keep the CA in `directory`: `ca.pem` (bundle), `ca-cert.pem` (signing cert and its
        chain), `ca-key.pem` (owner-only)."""
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "ca.pem").write_bytes(self.bundle_pem)
        chain = b"".join(_pem(c) for c in [self.certificate, *self.intermediates])
        (directory / "ca-cert.pem").write_bytes(chain)
        key_path = directory / "ca-key.pem"
        descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as out:
            out.write(key_pem(self._key))

    @classmethod
    def load(
        cls,
        *,
        certificate: Path,
        key: Path,
        bundle: Path | None = None,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
    ) -> Authority:
        """An operator's CA: `certificate` holds the signing certificate first, then any
        intermediates; `bundle` the roots (the signing certificate itself when it is one)."""
        chain = x509.load_pem_x509_certificates(certificate.read_bytes())
        loaded = serialization.load_pem_private_key(key.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key}: the CA key must be ECDSA (P-256 or P-384)")
        roots = x509.load_pem_x509_certificates(bundle.read_bytes()) if bundle else chain[-1:]
        return cls(
            certificate=chain[0],
            key=loaded,
            intermediates=chain[1:],
            roots=roots,
            trust_domain=trust_domain,
        )

    def workload(self, kind: str, name: str) -> Workload:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}")
        return Workload(trust_domain=self.trust_domain, kind=kind, name=name)

    def issue(
        self,
        public_key: ec.EllipticCurvePublicKey,
        workload: Workload,
        *,
        lifetime_s: float = DEFAULT_LIFETIME_S,
        addresses: Sequence[str] = (),
        grants: Sequence[str] = (),
    ) -> Issued:
        """A certificate for `workload`'s key, good for `lifetime_s` (at most a day), usable
        as a TLS client and server (a client's: as a TLS client only). `addresses` (IPs or DNS
        names) are added for clients that connect by address without naming the workload;
        `grants` are URIs after the workload's (what a client certificate allows)."""
        if not 0 < lifetime_s <= MAX_LIFETIME_S:
            raise ValueError(f"lifetime must be within (0, {MAX_LIFETIME_S}] seconds")
        if any(grant.startswith("spiffe:") for grant in grants):
            raise ValueError("a certificate names one workload; grants are not SPIFFE IDs")
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(workload.uri)]
        names += [x509.UniformResourceIdentifier(grant) for grant in grants]
        names.append(x509.DNSName(workload.dns))
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if workload.kind != "client":
            usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
        for address in addresses:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(address)))
            except ValueError:
                names.append(x509.DNSName(address))
        now = _now()
        not_after = min(
            now + datetime.timedelta(seconds=lifetime_s), self.certificate.not_valid_after_utc
        )
        serial = x509.random_serial_number()
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, workload.name)]))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(serial)
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), False
            )
            .sign(self._key, hashes.SHA256())
        )
        chain = b"".join(_pem(c) for c in [leaf, self.certificate, *self.intermediates])
        # The root is the verifier's, from its bundle; a chain never carries it.
        if self.certificate in self.roots:
            chain = b"".join(_pem(c) for c in [leaf, *self.intermediates])
        return Issued(chain_pem=chain, serial=serial, not_after=not_after)

    def sign_request(
        self, request_pem: bytes, workload: Workload, *, field: str, lifetime_s: float
    ) -> Issued:
        """Issue for a CSR that may name only `workload`; anything else is refused, naming
        `field`."""
        key = self.check_request(request_pem, workload, field=field)
        return self.issue(key, workload, lifetime_s=lifetime_s)

    def check_request(
        self, request_pem: bytes, workload: Workload, *, field: str
    ) -> ec.EllipticCurvePublicKey:
        """The public key of a CSR that may name only `workload`; anything else is refused,
        naming `field`."""
        try:
            request = x509.load_pem_x509_csr(request_pem)
        except ValueError as error:
            raise _refused(field, "is not a PEM certificate request") from error
        try:
            signed = request.is_signature_valid
            public_key = request.public_key()
        except (ValueError, UnsupportedAlgorithm) as error:
            raise _refused(field, "uses a key or signature this CA does not take") from error
        if not signed:
            raise _refused(field, "is not signed by its own key")
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or (
            public_key.curve.name not in CURVES
        ):
            raise _refused(field, "must hold an ECDSA P-256 or P-384 key")
        try:
            extensions = list(request.extensions)
        except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as error:
            raise _refused(field, f"has extensions that do not parse ({error})") from error
        for extension in extensions:
            value = extension.value
            if isinstance(value, x509.BasicConstraints) and value.ca:
                raise _refused(field, "asks for a CA certificate")
            if isinstance(value, x509.SubjectAlternativeName):
                for name in value:
                    wanted = str(name.value)
                    if "*" in wanted:
                        raise _refused(field, f"asks for a wildcard name {wanted!r}")
                    if wanted not in (workload.uri, workload.dns):
                        raise _refused(field, f"names {wanted!r}; it may name only {workload.uri}")
            elif not isinstance(value, x509.BasicConstraints | x509.KeyUsage):
                oid = extension.oid.dotted_string
                raise _refused(field, f"asks for an extension the CA does not grant ({oid})")
        return public_key


def _refused(field: str, why: str) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"{field} {why}", reason="BAD_CERTIFICATE_REQUEST", metadata={"field": field}
    )
