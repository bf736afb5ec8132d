"""What the agent keeps of the certificates the registry sends: only one for the key it asked
with, naming this node; and when it asks again."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest
from google.protobuf import timestamp_pb2

from shard.node.v1 import node_service_pb2
from shard_core import pki
from shard_node.certificate import NodeCertificates
from shard_node.settings import NodeSettings

NODE = pki.Workload(trust_domain=pki.DEFAULT_TRUST_DOMAIN, kind="node", name="nabc")
OTHER = pki.Workload(trust_domain=pki.DEFAULT_TRUST_DOMAIN, kind="node", name="nother")


def _answer(
    ca: pki.Authority, request: bytes, workload: pki.Workload = NODE
) -> node_service_pb2.NodeCertificate:
    issued = ca.sign_request(request, workload, field="csr", lifetime_s=3600)
    return node_service_pb2.NodeCertificate(
        certificate_chain=issued.chain_pem,
        trust_bundle=ca.bundle_pem,
        expire_time=timestamp_pb2.Timestamp(seconds=int(issued.not_after.timestamp())),
    )


def test_the_agent_keeps_only_the_certificate_it_asked_for(tmp_path: Path) -> None:
    ca = pki.Authority.create()
    now = [0.0]
    certificates = NodeCertificates(tmp_path, NODE, clock=lambda: now[0])
    first = certificates.request()
    assert first  # none held: due

    # A certificate for a key the agent did not ask with, or naming another node, is dropped.
    stranger = pki.certificate_request(pki.new_key(), NODE)
    certificates.accept(_answer(ca, stranger))
    assert certificates.current() is None
    again = certificates.request()
    other_ca = pki.Authority.create()
    certificates.accept(_answer(other_ca, pki.certificate_request(pki.new_key(), OTHER), OTHER))
    assert certificates.current() is None

    again = certificates.request()
    certificates.accept(_answer(ca, again))
    held = certificates.current()
    assert held is not None
    assert pki.workload_of(held) == NODE
    assert (tmp_path / "key.pem").stat().st_mode & 0o077 == 0

    # Not due before half its life; due after.
    start, end = held.not_valid_before_utc.timestamp(), held.not_valid_after_utc.timestamp()
    now[0] = start + (end - start) * 0.4
    assert certificates.request() == b""
    now[0] = start + (end - start) * 0.6
    assert certificates.request()
    # An answer that never comes leaves the held certificate in place.
    assert certificates.current() == held


def test_an_unparsable_certificate_is_dropped(tmp_path: Path) -> None:
    certificates = NodeCertificates(tmp_path, NODE)
    assert certificates.request()
    certificates.accept(node_service_pb2.NodeCertificate(certificate_chain=b"junk"))
    assert certificates.current() is None
    with pytest.raises(FileNotFoundError):
        (tmp_path / "key.pem").stat()


def test_a_node_in_a_tls_mesh_needs_the_registrys_mutual_tls_address(tmp_path: Path) -> None:
    """A node with a mesh certificate gets no bearer credential: without the address where
    it calls by certificate it could read no model file, so it is refused at start."""
    with pytest.raises(pydantic.ValidationError, match="registry_mesh_address is required"):
        NodeSettings(registry_ca_file=tmp_path / "ca.pem")
    NodeSettings(registry_ca_file=tmp_path / "ca.pem", registry_mesh_address="registry:7444")
    NodeSettings()  # no TLS: loopback plaintext and a bearer credential
