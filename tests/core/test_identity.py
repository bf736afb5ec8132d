"""Node identity keys and ids."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shard_core.identity import node_id_for
from shard_node.identity import KEY_FILE, NodeIdentity


def test_key_is_made_once_kept_private_and_gives_a_stable_id(tmp_path: Path) -> None:
    first = NodeIdentity.load_or_create(tmp_path)
    assert (tmp_path / KEY_FILE).stat().st_mode & 0o777 == 0o600
    again = NodeIdentity.load_or_create(tmp_path)
    assert again.node_id == first.node_id
    assert again.public_key == first.public_key
    assert first.node_id == node_id_for(first.public_key)
    assert re.fullmatch(r"n[a-z2-7]{32}", first.node_id)


def test_different_keys_give_different_ids(tmp_path: Path) -> None:
    a = NodeIdentity.load_or_create(tmp_path / "a")
    b = NodeIdentity.load_or_create(tmp_path / "b")
    assert a.node_id != b.node_id


def test_a_key_others_can_read_is_refused(tmp_path: Path) -> None:
    NodeIdentity.load_or_create(tmp_path)
    (tmp_path / KEY_FILE).chmod(0o644)
    with pytest.raises(PermissionError, match="600"):
        NodeIdentity.load_or_create(tmp_path)


def test_node_id_needs_a_real_ed25519_key() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        node_id_for(b"too short")
