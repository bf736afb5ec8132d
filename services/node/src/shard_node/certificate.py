"""The node's mesh certificate: asked for with attestations, kept in `state_dir/tls`.

The agent asks (a CSR in its attestation) when it has no certificate or the one it has is past
half its life; the registry answers with a certificate naming the node once the attestation is
accepted. The key is made for each request and kept in memory until its certificate arrives, so
a key is only ever written beside the certificate that matches it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from shard.node.v1 import node_service_pb2
from shard_core import pki
from shard_core.tls import CERT_FILE, write_identity

_log = logging.getLogger(__name__)


class NodeCertificates:
    def __init__(
        self, directory: Path, workload: pki.Workload, clock: Callable[[], float] = time.time
    ) -> None:
        self.directory = directory
        self._workload = workload
        self._clock = clock
        self._pending: ec.EllipticCurvePrivateKey | None = None

    def current(self) -> x509.Certificate | None:
        path = self.directory / CERT_FILE
        if not path.exists():
            return None
        return x509.load_pem_x509_certificates(path.read_bytes())[0]

    def request(self, *, renew: bool = False) -> bytes:
        """A CSR when a certificate is due (none yet, past half its life, or `renew`: a new
        registration, whose certificate must postdate it); else nothing."""
        held = self.current()
        if held is not None and not renew:
            start, end = held.not_valid_before_utc.timestamp(), held.not_valid_after_utc.timestamp()
            if self._clock() < start + (end - start) / 2:
                return b""
        self._pending = pki.new_key()
        return pki.certificate_request(self._pending, self._workload)

    def accept(self, certificate: node_service_pb2.NodeCertificate) -> bool:
        """Keep a certificate that answers the last request (for our key, naming this node);
        whether it was kept."""
        key, self._pending = self._pending, None
        try:
            leaf = x509.load_pem_x509_certificates(certificate.certificate_chain)[0]
        except ValueError:
            _log.warning("the registry sent a certificate that does not parse; ignored")
            return False
        if key is None or leaf.public_key() != key.public_key():
            _log.warning("the registry sent a certificate for a key this node did not ask for")
            return False
        if pki.workload_of(leaf) != self._workload:
            _log.warning(
                "the registry sent a certificate naming %s; ignored", pki.workload_of(leaf)
            )
            return False
        write_identity(
            self.directory,
            chain=certificate.certificate_chain,
            key=pki.key_pem(key),
            bundle=certificate.trust_bundle,
        )
        _log.info(
            "mesh certificate %x, valid until %s", leaf.serial_number, leaf.not_valid_after_utc
        )
        return True
