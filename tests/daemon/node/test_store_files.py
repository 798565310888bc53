"""daemon.node.store_files: whole files replaced atomically, side files decoded strictly."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest

import crdt
from daemon.node.store_files import (
    StoreError,
    atomic_write,
    decode_checkpoints,
    decode_equivocation,
    decode_peer_vectors,
    read_genesis,
)


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    atomic_write(path, b"old")

    def parts():
        yield b"new, half"
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(path, parts())
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]
    atomic_write(path, iter([b"ne", b"w"]))
    assert path.read_bytes() == b"new"


@pytest.mark.parametrize(
    "decode",
    [decode_peer_vectors, decode_checkpoints, decode_equivocation],
)
@pytest.mark.parametrize("data", [b"", b"\xc1", msgpack.packb({"x": 1}), msgpack.packb([b"a", b"b", b"c"])])
def test_side_file_decoders_refuse_junk_with_one_named_error(decode, data: bytes) -> None:
    with pytest.raises(crdt.ValidationError):
        decode(data)


def test_a_genesis_file_that_fails_its_checksum_is_a_store_error(tmp_path: Path) -> None:
    empty, junk = tmp_path / "empty", tmp_path / "junk"
    empty.write_bytes(b"")
    junk.write_bytes(b"\x00" * 64)
    for path in (empty, junk):
        with pytest.raises(StoreError, match=str(path)):
            read_genesis(path)
