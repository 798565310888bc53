"""Persistence *format*: write-ahead-log framing, the torn-log scanner and sealed blobs. Bytes only.

Theory of operation
-------------------
The WAL is an append-only file: an 8-byte header, then records::

    header  = b"MESHWAL" + u8 FORMAT_VERSION
    record  = u32le length | u32le crc32(length-bytes + payload) | payload

A crash can leave a *torn tail* (a partial header, a partial record, or garbage where the filesystem
extended the file without data). :func:`scan_log` walks records from the start and stops at the first one
that is incomplete, oversized or fails its checksum; everything before is the valid prefix, which the
store keeps (truncating the rest). The CRC covers the length too, so a corrupted length field cannot make
the scanner skip to a plausible-looking later position. A wrong magic or version is *not* a torn write but
a different file: that raises instead, so the store never truncates a file it does not understand.

The genesis and small files are written whole (tmp file + rename) as *sealed blobs* (snapshots are
streams of WAL-framed parts: crdt.snapshot)::

    blob = kind(7 bytes) + u8 FORMAT_VERSION + u64le length + u32le crc32(payload) + payload

Rejected alternatives: blake2b per record (crc32 detects torn/garbled writes, which is the threat here;
records from peers are already signature-checked when read back); one file with snapshots inline
(compaction would rewrite everything).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from crdt._wire import version_error
from crdt.errors import ValidationError
from crdt.records import FORMAT_VERSION

__all__ = [
    "LOG_HEADER",
    "MAX_RECORD_BYTES",
    "RECORD_HEADER",
    "LogScan",
    "frame_record",
    "record_checksum",
    "scan_log",
    "seal_blob",
    "unseal_blob",
]

#: WAL file header (magic + format version).
LOG_HEADER = b"MESHWAL" + bytes([FORMAT_VERSION])
#: Largest WAL record: a contribution is at most Limits.max_payload_bytes (64 MiB) plus framing; 256 MiB
#: leaves room while still refusing a corrupted length of ~4 GiB.
MAX_RECORD_BYTES = 256 * 2**20
#: Record framing: u32le length, u32le crc32 (shared with crdt.snapshot's parts).
RECORD_HEADER = struct.Struct("<II")
_BLOB = struct.Struct("<7sBQI")  # kind, version, length, crc32


@dataclass(frozen=True, slots=True)
class LogScan:
    """Result of :func:`scan_log`."""

    records: list[bytes]
    """Payloads of the valid prefix, in order."""
    good_length: int
    """Byte length of the valid prefix (header included); truncate the file to this."""
    error: str | None
    """Why scanning stopped early (None: the whole input was valid)."""


def record_checksum(length_bytes: bytes, payload: bytes | memoryview) -> int:
    return zlib.crc32(payload, zlib.crc32(length_bytes))


def frame_record(payload: bytes) -> bytes:
    """One WAL record. Raises ValidationError if the payload is larger than MAX_RECORD_BYTES."""
    if len(payload) > MAX_RECORD_BYTES:
        raise ValidationError(f"log record of {len(payload)} bytes exceeds {MAX_RECORD_BYTES}")
    length = struct.pack("<I", len(payload))
    return length + struct.pack("<I", record_checksum(length, payload)) + payload


def scan_log(data: bytes) -> LogScan:
    """Return the longest valid prefix of a WAL image.

    An empty input or a torn header (a strict prefix of LOG_HEADER) is an empty log with good_length 0.

    Raises:
        ValidationError: the data starts with something that is not a WAL header of this version.
    """
    view = memoryview(bytes(data))
    if len(view) < len(LOG_HEADER):
        if bytes(view) != LOG_HEADER[: len(view)]:
            raise ValidationError("log: not a meshtrain WAL (bad magic)")
        return LogScan([], 0, "torn header" if len(view) else None)
    if bytes(view[: len(LOG_HEADER)]) != LOG_HEADER:
        if bytes(view[:7]) == LOG_HEADER[:7]:
            raise version_error("log", view[7], FORMAT_VERSION)
        raise ValidationError("log: not a meshtrain WAL (bad magic)")
    pos = len(LOG_HEADER)
    records: list[bytes] = []
    error: str | None = None
    while pos < len(view):
        if len(view) - pos < RECORD_HEADER.size:
            error = f"torn record header at offset {pos}"
            break
        length, crc = RECORD_HEADER.unpack_from(view, pos)
        if length > MAX_RECORD_BYTES:
            error = f"record length {length} at offset {pos} exceeds the limit"
            break
        end = pos + RECORD_HEADER.size + length
        if end > len(view):
            error = f"torn record at offset {pos} ({end - len(view)} bytes missing)"
            break
        payload = view[pos + RECORD_HEADER.size : end]
        if record_checksum(bytes(view[pos : pos + 4]), payload) != crc:
            error = f"checksum mismatch at offset {pos}"
            break
        records.append(bytes(payload))
        pos = end
    return LogScan(records, pos, error)


def seal_blob(kind: bytes, payload: bytes) -> bytes:
    """Wrap a whole-file payload (snapshot, genesis) with kind, version, length and checksum."""
    if len(kind) != 7:
        raise ValidationError("blob kind must be 7 bytes")
    return _BLOB.pack(kind, FORMAT_VERSION, len(payload), zlib.crc32(payload)) + payload


def unseal_blob(kind: bytes, data: bytes) -> bytes:
    """Check and unwrap a sealed blob. Raises ValidationError on any mismatch (truncation included)."""
    if not isinstance(data, bytes | bytearray | memoryview) or len(data) < _BLOB.size:
        raise ValidationError("blob: shorter than its header")
    got_kind, version, length, crc = _BLOB.unpack_from(data, 0)
    if got_kind != kind:
        raise ValidationError(f"blob: expected kind {kind!r}, got {got_kind!r}")
    if version != FORMAT_VERSION:
        raise version_error("blob", version, FORMAT_VERSION)
    payload = bytes(data[_BLOB.size :])
    if len(payload) != length:
        raise ValidationError(f"blob: {len(payload)} payload bytes, header says {length}")
    if zlib.crc32(payload) != crc:
        raise ValidationError("blob: checksum mismatch")
    return payload
