"""Strict msgpack helpers shared by every record codec.

Every record is a msgpack *array* whose first two items are a format version (int) and a type tag (str).
Decoders unpack with size caps, check the shape, rebuild the record and then require that re-encoding it
gives back the exact input bytes. That last rule makes every record canonical (one byte string per value),
so content ids and signatures are well defined and a peer cannot smuggle in alternative encodings.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from crdt.errors import ValidationError

__all__ = ["bin_header", "pack", "unpack_array", "version_error"]


def pack(obj: Any) -> bytes:
    """Deterministic encoding: no maps with unsorted keys are ever passed in, floats are always float64."""
    return msgpack.packb(obj, use_bin_type=True, use_single_float=False, strict_types=True)


def unpack_array(data: Any, *, tag: str, version: int, length: int | tuple[int, ...], max_bytes: int
                 ) -> list[Any]:
    """Unpack ``data`` into a list of ``length`` items (one of them, for a record with an optional trailing
    field) after checking the (version, tag) header."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ValidationError(f"{tag}: expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise ValidationError(f"{tag}: {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        # unpackb caps every container/str/bin length by len(data), so the size check above bounds memory
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises a zoo of types (ExtraData, FormatError, ValueError, ...)
        raise ValidationError(f"{tag}: not valid msgpack ({type(exc).__name__})") from exc
    lengths = (length,) if isinstance(length, int) else length
    if not isinstance(obj, list) or len(obj) not in lengths:
        raise ValidationError(f"{tag}: expected a msgpack array of {' or '.join(map(str, lengths))} items")
    if obj[0] != version or type(obj[0]) is not int:
        raise version_error(tag, obj[0], version)
    if obj[1] != tag:
        raise ValidationError(f"{tag}: wrong record type {obj[1]!r}")
    return obj


def expect(cond: bool, tag: str, reason: str) -> None:
    """Raise ValidationError(f"{tag}: {reason}") unless ``cond``."""
    if not cond:
        raise ValidationError(f"{tag}: {reason}")


def is_int(x: Any) -> bool:
    return type(x) is int


def is_bytes(x: Any, n: int | None = None) -> bool:
    return type(x) is bytes and (n is None or len(x) == n)


def version_error(tag: str, found: object, expected: int) -> ValidationError:
    """The error for data of another format version: pre-1.0 layouts are not migrated; it says what to do."""
    return ValidationError(
        f"{tag}: written in format version {found!r}, this build reads only version {expected}; meshtrain "
        "does not migrate data across format versions before 1.0: move the node's store directory away "
        "and restart it, it resyncs the run from its peers"
    )


def bin_header(n: int) -> bytes:
    """The canonical msgpack header of a ``bin`` of ``n`` bytes (what ``pack`` writes before the bytes),
    for encoders that stream a large bin without building it."""
    if n < 2**8:
        return struct.pack(">BB", 0xC4, n)
    if n < 2**16:
        return struct.pack(">BH", 0xC5, n)
    return struct.pack(">BI", 0xC6, n)
