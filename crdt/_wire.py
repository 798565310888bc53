"""Strict msgpack helpers shared by every record codec.

Every record is a msgpack *array* whose first two items are a format version (int) and a type tag (str).
Decoders unpack with size caps, check the shape, rebuild the record and then require that re-encoding it
gives back the exact input bytes. That last rule makes every record canonical (one byte string per value),
so content ids and signatures are well defined and a peer cannot smuggle in alternative encodings.
"""

from __future__ import annotations

from typing import Any

import msgpack

from crdt.errors import ValidationError

__all__ = ["pack", "unpack_array"]


def pack(obj: Any) -> bytes:
    """Deterministic encoding: no maps with unsorted keys are ever passed in, floats are always float64."""
    return msgpack.packb(obj, use_bin_type=True, use_single_float=False, strict_types=True)


def unpack_array(data: Any, *, tag: str, version: int, length: int, max_bytes: int) -> list[Any]:
    """Unpack ``data`` into a list of ``length`` items after checking the (version, tag) header."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ValidationError(f"{tag}: expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise ValidationError(f"{tag}: {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        # unpackb caps every container/str/bin length by len(data), so the size check above bounds memory
        obj = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises a zoo of types (ExtraData, FormatError, ValueError, ...)
        raise ValidationError(f"{tag}: not valid msgpack ({type(exc).__name__})") from exc
    if not isinstance(obj, list) or len(obj) != length:
        raise ValidationError(f"{tag}: expected a msgpack array of {length} items")
    if obj[0] != version or type(obj[0]) is not int:
        raise ValidationError(f"{tag}: unsupported format version {obj[0]!r} (this build reads {version})")
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
