"""Admission by proof of work: what a new author of an open run must spend before its records count.

Theory of operation
-------------------
On an open run anyone can make keys for free, and every key is an author: the author cap
(``Limits.max_authors``) bounds memory but is first come, first served, so a flood of throwaway authors
could fill it and lock honest newcomers out. A founder can make each author cost work: the genesis's
``meta["admission_bits"]`` = D asks every record to carry its author's ``admission_nonce``, a number such
that ``blake2b-256("meshtrain-admission" | genesis id | author key | nonce as u64 le)`` starts with D zero
bits. Checking is one hash; finding one takes 2**D hashes on average, once per author and run (this
loop: 2.4M hashes/s on one core here, 2026-12-01, so D = 24 is about 7 s and D = 28 about 2 minutes).
Filling the cap of 4,096 authors then costs 4,096 x 2**D hashes (8 CPU-hours at D = 24, 5 CPU-days at
D = 28), against nothing before.

It is a pure function of the record, so every replica admits the same authors (no reachability test or
vote could be: those depend on each replica's view). Rejected: requiring the author's *key* itself to
carry the work (it is the libp2p identity, made before the node knows which run it joins); admission
certificates signed by the founder (a private run's allowlist already does that, without new state).
"""

from __future__ import annotations

import hashlib
import struct

from crdt import _wire
from crdt.records import Genesis

__all__ = ["MAX_ADMISSION_BITS", "admission_bits", "check_admission", "find_admission_nonce"]

#: The most work a genesis may ask of an author: 2**40 hashes is days of a core, far beyond a sane run.
MAX_ADMISSION_BITS = 40
_TAG = b"meshtrain-admission"


def admission_bits(genesis: Genesis) -> int:
    """The genesis's ``meta["admission_bits"]`` (0: no proof of work asked).

    Raises:
        GenesisMismatchError: it is not an integer in [1, MAX_ADMISSION_BITS].
    """
    return genesis.meta_int("admission_bits", low=1, high=MAX_ADMISSION_BITS) or 0


def _prefix(genesis_id: str, author: bytes) -> hashlib._Hash:  # type: ignore[name-defined]
    h = hashlib.blake2b(_TAG, digest_size=32)
    h.update(bytes.fromhex(genesis_id))
    h.update(author)
    return h


def _zero_bits(digest: bytes) -> int:
    value = int.from_bytes(digest, "big")
    return 8 * len(digest) - value.bit_length()


def check_admission(genesis_id: str, author: bytes, nonce: int, bits: int) -> None:
    """Raise ValidationError unless ``nonce`` is ``author``'s proof of ``bits`` zero bits for this run."""
    h = _prefix(genesis_id, author)
    h.update(struct.pack("<Q", nonce))
    _wire.expect(_zero_bits(h.digest()) >= bits, "contribution",
                 f"its author is not admitted: no proof of work of {bits} bits (admission_nonce)")


def find_admission_nonce(genesis_id: str, author: bytes, bits: int) -> int:
    """The smallest nonce >= 1 that admits ``author`` (2**bits hashes on average: run it in a thread)."""
    base = _prefix(genesis_id, author)
    pack = struct.Struct("<Q").pack
    nonce = 1
    while True:
        h = base.copy()
        h.update(pack(nonce))
        if _zero_bits(h.digest()) >= bits:
            return nonce
        nonce += 1
