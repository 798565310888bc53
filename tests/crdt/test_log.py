"""WAL framing and scan_log: every truncation or corruption yields a valid prefix."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crdt import LOG_HEADER, ValidationError, frame_record, scan_log, seal_blob, unseal_blob

RECORDS = [b"", b"a", b"hello world" * 3, bytes(range(256)), b"\x00" * 17]
LOG = LOG_HEADER + b"".join(frame_record(r) for r in RECORDS)
BOUNDARIES = [len(LOG_HEADER)]
for r in RECORDS:
    BOUNDARIES.append(BOUNDARIES[-1] + 8 + len(r))


def test_clean_log() -> None:
    scan = scan_log(LOG)
    assert scan.records == RECORDS and scan.good_length == len(LOG) and scan.error is None
    assert scan_log(b"").records == [] and scan_log(b"").error is None


def test_truncation_at_every_offset() -> None:
    for cut in range(len(LOG) + 1):
        scan = scan_log(LOG[:cut])
        kept = [b for b in BOUNDARIES if b <= cut]
        expect_len = kept[-1] if kept else 0
        assert scan.good_length == expect_len, cut
        assert scan.records == RECORDS[: max(len(kept) - 1, 0)]
        assert (scan.error is None) == (cut == expect_len)


@settings(max_examples=300, deadline=None)
@given(pos=st.integers(0, len(LOG) - 1), byte=st.integers(0, 255), tail=st.binary(max_size=30))
def test_corruption_yields_valid_prefix(pos: int, byte: int, tail: bytes) -> None:
    data = bytearray(LOG)
    data[pos] = byte
    data = bytes(data) + tail
    try:
        scan = scan_log(data)
    except ValidationError:
        assert pos < len(LOG_HEADER)  # only a damaged header is refused outright
        return
    # what survives is a prefix of the real records (corruption is caught by the crc) ...
    n = len(scan.records)
    if pos >= len(LOG_HEADER) and data[pos] != LOG[pos]:
        first_bad = max(i for i, b in enumerate(BOUNDARIES) if b <= pos)
        assert n == first_bad  # crc32 catches every single-byte error, length field included
        assert scan.records == RECORDS[:n]
    # ... and the prefix it reports re-scans cleanly to the same records
    again = scan_log(data[: scan.good_length])
    assert again.records == scan.records and again.error is None


def test_foreign_files_refused() -> None:
    with pytest.raises(ValidationError, match="magic"):
        scan_log(b"SQLite format 3\x00")
    with pytest.raises(ValidationError, match="version"):
        scan_log(LOG_HEADER[:7] + b"\x63" + LOG[8:])
    assert scan_log(LOG_HEADER[:3]).error == "torn header"


def test_blobs() -> None:
    blob = seal_blob(b"SNAPSHT", b"payload")
    assert unseal_blob(b"SNAPSHT", blob) == b"payload"
    for bad in (blob[:-1], blob[:10], blob + b"x", blob[:-1] + b"X"):
        with pytest.raises(ValidationError):
            unseal_blob(b"SNAPSHT", bad)
    with pytest.raises(ValidationError, match="kind"):
        unseal_blob(b"GENESIS", blob)
