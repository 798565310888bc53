"""Identity files: 32-byte seed, 0600, stable peer id."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from p2p import Identity, load_or_create_identity, peer_id_from_public_key


def test_create_then_load_is_stable(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "identity.key"
    first = load_or_create_identity(path)
    assert path.read_bytes() == first.seed and len(first.seed) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    second = load_or_create_identity(path)
    assert second == first
    assert first.peer_id.startswith("12D3KooW")  # identity-multihash of an Ed25519 key
    assert peer_id_from_public_key(first.public_key) == first.peer_id
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # no temp file left behind


def test_from_seed_is_deterministic() -> None:
    a = Identity.from_seed(bytes(range(32)))
    assert a == Identity.from_seed(bytes(range(32)))
    assert a != Identity.from_seed(bytes(32))
    assert "seed" not in repr(a)


def test_bad_inputs(tmp_path: Path) -> None:
    bad = tmp_path / "bad.key"
    bad.write_bytes(b"short")
    with pytest.raises(ValueError, match="expected 32"):
        load_or_create_identity(bad)
    with pytest.raises(ValueError):
        Identity.from_seed(b"x" * 31)
    with pytest.raises(ValueError):
        peer_id_from_public_key(b"x" * 33)


def test_a_peer_id_gives_back_its_public_key() -> None:
    import pytest

    from p2p import Identity, peer_id_from_public_key, public_key_from_peer_id

    identity = Identity.generate()
    assert public_key_from_peer_id(identity.peer_id) == identity.public_key
    assert peer_id_from_public_key(public_key_from_peer_id(identity.peer_id)) == identity.peer_id
    with pytest.raises(ValueError, match="not a peer id"):
        public_key_from_peer_id("12D3KooWnot-a-peer-id")
