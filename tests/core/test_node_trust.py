"""Pure pieces of node trust: GPU cross-checks against sysfs, the policy, signed attestations."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shard.node.v1 import node_pb2, node_service_pb2
from shard_core.attestation import evidence_nonce, signature_valid, signed_bytes
from shard_node.inventory import on_pci_bus
from shard_registry.enrollment import NodePolicy

GIB = 1 << 30


def _pci_device(sysfs: Path, address: str, vendor: str) -> None:
    device = sysfs / address
    device.mkdir(parents=True)
    (device / "vendor").write_text(vendor + "\n")


def test_gpu_must_be_an_nvidia_device_on_the_pci_bus(tmp_path: Path) -> None:
    _pci_device(tmp_path, "0000:65:00.0", "0x10de")
    _pci_device(tmp_path, "0000:66:00.0", "0x8086")
    assert on_pci_bus(node_pb2.GpuDevice(pci_bus_id="00000000:65:00.0"), tmp_path)
    assert not on_pci_bus(node_pb2.GpuDevice(pci_bus_id="00000000:66:00.0"), tmp_path)
    assert not on_pci_bus(node_pb2.GpuDevice(pci_bus_id="00000000:99:00.0"), tmp_path)


def test_policy_names_every_violation() -> None:
    policy = NodePolicy(
        min_gpu_memory_bytes=40 * GIB, allowed_gpu_models=["NVIDIA H100"], min_agent_version="1.2"
    )
    inventory = node_pb2.Inventory(
        gpus=[node_pb2.GpuDevice(model="NVIDIA T4", memory_bytes=16 * GIB)],
        gpus_cross_checked=False,
        agent_version="1.1.9",
    )
    reasons = [violation.split(":")[0] for violation in policy.violations(inventory)]
    assert reasons == [
        "GPU_MEMORY_TOO_SMALL",
        "GPU_MODEL_NOT_ALLOWED",
        "GPU_NOT_ON_PCI_BUS",
        "AGENT_TOO_OLD",
    ]
    cpu_only = node_pb2.Inventory(agent_version="1.2.0", gpus_cross_checked=True)
    assert policy.violations(cpu_only) == []


def test_a_signature_binds_nonce_inventory_time_and_node() -> None:
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes_raw()
    inventory = node_pb2.Inventory(cpu_cores=8)
    signed = {"nonce": b"n" * 32, "inventory": inventory, "time_ms": 1_000, "node_id": "nabc"}
    signature = key.sign(signed_bytes(**signed))  # type: ignore[arg-type]
    assert signature_valid(public_key=public, signature=signature, **signed)  # type: ignore[arg-type]
    changed_inventory = node_pb2.Inventory(cpu_cores=16)
    for change in (
        {"nonce": b"m" * 32},
        {"inventory": changed_inventory},
        {"time_ms": 1_001},
        {"node_id": "nother"},
    ):
        assert not signature_valid(
            public_key=public,
            signature=signature,
            **{**signed, **change},  # type: ignore[arg-type]
        )


def test_a_signature_binds_hardware_evidence_made_for_this_challenge() -> None:
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes_raw()
    nonce = b"n" * 32
    quote = node_service_pb2.HardwareEvidence(
        kind=node_service_pb2.EVIDENCE_KIND_NVIDIA_CC, evidence=evidence_nonce(nonce, "nabc")
    )
    signed = {
        "nonce": nonce,
        "inventory": node_pb2.Inventory(cpu_cores=8),
        "time_ms": 1_000,
        "node_id": "nabc",
        "evidence": [quote],
    }
    signature = key.sign(signed_bytes(**signed))  # type: ignore[arg-type]
    assert signature_valid(public_key=public, signature=signature, **signed)  # type: ignore[arg-type]
    other_kind = node_service_pb2.HardwareEvidence(
        kind=node_service_pb2.EVIDENCE_KIND_TPM_QUOTE, evidence=quote.evidence
    )
    changes: list[dict[str, object]] = [
        {"evidence": []},
        {"evidence": [other_kind]},
        {"evidence": [quote, quote]},
    ]
    for change in changes:
        assert not signature_valid(
            public_key=public,
            signature=signature,
            **{**signed, **change},  # type: ignore[arg-type]
        )
    # Evidence is tied to one challenge and one node.
    assert evidence_nonce(nonce, "nabc") != evidence_nonce(b"m" * 32, "nabc")
    assert evidence_nonce(nonce, "nabc") != evidence_nonce(nonce, "nabd")
