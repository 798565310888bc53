"""Signed, content-addressed records: Limits, Genesis and Contribution.

Theory of operation
-------------------
``Genesis`` fixes the model: the initial flat float32 parameters, the fragment layout and free-form meta.
Its id is the blake2b-256 of its canonical encoding, so "same id" means "same starting point".

A ``Contribution`` is one author's signed update to one fragment. Authors number their contributions
1, 2, 3, ... without gaps; the pair (author, seq) is the contribution's *slot*. The signature covers a
domain-separated body (every field except the signature); the content id is blake2b-256 of that body, so
it names the content independently of the signature bytes.

Wire layout (msgpack arrays, canonical: decoders re-encode and require identical bytes)::

    Contribution = [FORMAT_VERSION, "contribution", author(bin32), genesis_id(bin32), seq(uint),
                    fragment(uint), codec(str), payload(bin), weight(float64), base_version(bin32),
                    signature(bin64), (base_count(uint), (admission_nonce(uint >= 1)))]
    signed body  = [FORMAT_VERSION, "contribution-body", author, genesis_id, seq, fragment, codec, payload,
                    weight, base_version, (base_count, (admission_nonce))]

Two optional trailing fields: ``base_count`` (the other authors' contributions in the state the update was
computed from: what a run with an influence window paces and clips by, crdt/_window.py) and
``admission_nonce`` (the author's proof of work for a run that asks for one, crdt/admission.py). They are
written only when non-zero (``base_count`` then as 0 if the nonce needs a place), so records of runs that
use neither, and every record written before they existed, keep their bytes, ids and signatures.

The genesis id is signed so that a contribution belongs to one run: replayed into another run (where its
author may also train, with the same key) it is refused as a genesis mismatch instead of filling, or
conflicting with, the author's slot there.
    Genesis      = [FORMAT_VERSION, "genesis", params(bin, <f4), [[start, stop], ...], [[key, value], ...]]

Validation is split in two: ``decode`` checks what needs no context (shape, sizes, signature);
``validate_against(genesis)`` checks the rest (fragment exists, payload decodes for that fragment length,
finite, weighted L2 norm bounded) and returns the decoded update so ``ModelState`` decodes once.

Exact norm: :func:`weighted_norm` is the one place the L2 norm of an update is computed, for the
``max_norm`` check and for ``clip_norm`` scaling alike. The sum of squares is exact and rounded once
(integer arithmetic; equal to ``math.fsum`` of the float64 squares, which are exact), and sqrt and the
weight multiply are single IEEE-754 operations, so every replica gets the same bits and accepts or
refuses the same records. numpy's
pairwise ``np.sum`` was used before for the bound; its rounding depends on the SIMD code path, so a record
at the bound could be accepted by one replica and refused by another: permanent divergence.

Memory: a Genesis holds its parameters once (4 bytes each, read-only). Its encoding is built on demand by
:meth:`Genesis.encode` and its id is hashed from the pieces, so a 100M-parameter model does not also keep
a 400 MB byte string; :meth:`Genesis.decode` keeps the parameter bytes msgpack parsed, without copies.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from types import MappingProxyType

import msgpack
import numpy as np

from crdt import _wire
from crdt.errors import GenesisMismatchError, SignatureError, ValidationError
from crdt.payload import CODECS, decode_payload
from crdt.signing import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, Signer, verify_signature

__all__ = [
    "DEFAULT_LIMITS",
    "FORMAT_VERSION",
    "MAX_AUTHORS",
    "Contribution",
    "Genesis",
    "Limits",
    "content_hash",
    "make_contribution",
    "weighted_norm",
]

#: Version of every record layout in crdt; bump on any incompatible change (decoders refuse others).
#: 3: packed version vectors, streamed compact snapshots, checkpoints.
FORMAT_VERSION = 3
#: Hard cap on authors in one state, whatever the Limits: what a replica's *own* snapshot decoder accepts,
#: so a state always reloads in the build that wrote it (2**20 authors: a 40 MiB vector, ~0.1 s to decode).
MAX_AUTHORS = 2**20
#: Hash size for content ids and version digests: blake2b-256 (fast in hashlib, 128-bit collision margin).
HASH_BYTES = 32
#: Generous framing allowance on top of the payload for the other contribution fields (~150 bytes used).
_CONTRIBUTION_OVERHEAD_BYTES = 1024


def content_hash(data: bytes) -> bytes:
    """blake2b-256, the one hash crdt uses for content addresses."""
    return hashlib.blake2b(data, digest_size=HASH_BYTES).digest()


# ---------------------------------------------------------------------------------------------------------
# Limits
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Resource limits applied to input from peers (httpx-style small value object)."""

    max_payload_bytes: int = 64 * 2**20
    """Largest payload accepted. 64 MiB = a dense-f32 fragment of 16M params; gossip layers cap lower."""
    max_norm: float = 1.0e4
    """Bound on the L2 norm of ``weight * values``. Pseudo-gradients are O(1); 1e4 still keeps the int64
    accumulator far from wrap-around (see crdt.state) while refusing garbage like 1e30."""
    max_weight: float = 1.0e6
    """Weights must be finite and in (0, max_weight]."""
    max_buffered_gap: int = 256
    """How far past an author's contiguous prefix a contribution may be buffered (seq - vv[author])."""
    max_buffered_total: int = 4096
    """Total buffered contributions over all authors (keys are free, so the per-author bound alone is not
    a memory bound)."""
    max_buffered_bytes_per_author: int = 64 * 2**20
    """Payload bytes one author may hold in the buffer: one max-size record (a bigger backlog is fetched
    in order instead, which anti-entropy does anyway)."""
    max_buffered_bytes_total: int = 256 * 2**20
    """Payload bytes buffered over all authors. The count bound alone allowed 4,096 dense fragments
    (~14 GB for the default model)."""
    max_authors: int = 4096
    """Distinct authors a state admits (applied or buffered); records of further new authors are refused
    (``CapacityError``). Keys are free: ~116,500 throwaway authors pushed the version vector past its old
    4 MiB cap, and peers could no longer decode each other's digests. Also the cap every peer-facing
    vector decoder is given. 4,096 authors: a 160 KiB digest decoded in ~1 ms. The daemon sets it from its
    admission rule; at most ``MAX_AUTHORS``."""
    max_genesis_bytes: int = 2**31
    """Largest genesis encoding accepted (2 GiB: ~500M float32 params)."""
    max_meta_items: int = 64
    """Genesis meta entries; meta is a label, not a storage area."""
    clip_norm: float | None = None
    """Robust aggregation (off when None): an applied contribution whose weighted L2 norm exceeds this is
    scaled down to exactly this norm before fixed-point conversion. The norm is computed exactly
    (``math.fsum``), so the scaling is a pure function of the record and every replica adds the same
    integers: convergence is unaffected. It must be the same on every replica of a run, so a run fixes it
    in its genesis (``meta["clip_norm"]``, see ``ModelState``); bounds one Byzantine author's influence per
    contribution to ``clip_norm`` (it does not stop many small poisoned updates)."""

    def __post_init__(self) -> None:
        if self.clip_norm is not None and not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ValueError("clip_norm must be a finite positive number or None")
        if not 1 <= self.max_authors <= MAX_AUTHORS:
            raise ValueError(f"max_authors must be in [1, {MAX_AUTHORS}]")


DEFAULT_LIMITS = Limits()


# ---------------------------------------------------------------------------------------------------------
# Genesis
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class Genesis:
    """Initial model and fragment layout. Immutable: ``params`` is stored as a read-only copy."""

    params: np.ndarray
    fragments: tuple[tuple[int, int], ...]
    meta: MappingProxyType[str, str] | dict[str, str] = field(default_factory=dict)
    _head: bytes = field(init=False, repr=False)
    _tail: bytes = field(init=False, repr=False)
    _id: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        tag = "genesis"
        params = np.asarray(self.params)
        _wire.expect(params.ndim == 1 and params.dtype == np.float32, tag, "params must be 1-D float32")
        _wire.expect(bool(np.all(np.isfinite(params))), tag, "params contain NaN or infinity")
        frags = tuple((int(a), int(b)) for a, b in self.fragments)
        _wire.expect(len(frags) > 0, tag, "at least one fragment")
        pos = 0
        for start, stop in frags:
            _wire.expect(start == pos and stop > start, tag, "fragments must be non-empty and contiguous")
            pos = stop
        _wire.expect(pos == params.size, tag, f"fragments cover {pos} entries, params have {params.size}")
        _wire.expect(isinstance(self.meta, dict | MappingProxyType), tag, "meta must be a mapping")
        items = sorted(self.meta.items())
        _wire.expect(all(type(k) is str and type(v) is str for k, v in items), tag, "meta must be str->str")
        if isinstance(params.base, bytes) and params.dtype == np.dtype("<f4"):
            frozen = params  # a view of immutable bytes (Genesis.decode): nothing can change it
        else:
            frozen = params.astype("<f4", copy=True)
            frozen.flags.writeable = False
        # The encoding is [FORMAT_VERSION, tag, params(bin), fragments, meta]: hashed from its pieces.
        head = (msgpack.Packer().pack_array_header(5) + _wire.pack(FORMAT_VERSION) + _wire.pack(tag)
                + _wire.bin_header(frozen.nbytes))
        tail = _wire.pack([list(f) for f in frags]) + _wire.pack([list(kv) for kv in items])
        h = hashlib.blake2b(head, digest_size=HASH_BYTES)
        h.update(memoryview(frozen).cast("B"))
        h.update(tail)
        object.__setattr__(self, "params", frozen)
        object.__setattr__(self, "fragments", frags)
        object.__setattr__(self, "meta", MappingProxyType(dict(items)))
        object.__setattr__(self, "_head", head)
        object.__setattr__(self, "_tail", tail)
        object.__setattr__(self, "_id", h.hexdigest())

    @property
    def id(self) -> str:
        """Hex blake2b-256 of :meth:`encode` (the content address)."""
        return self._id

    @property
    def length(self) -> int:
        return int(self.params.size)

    def fragment_length(self, fragment: int) -> int:
        start, stop = self.fragments[fragment]
        return stop - start

    def meta_int(self, key: str, *, low: int, high: int) -> int | None:
        """``meta[key]`` as an integer in [low, high] (a rule the run fixes), or None when absent.

        Raises:
            GenesisMismatchError: it is not such an integer.
        """
        raw = self.meta.get(key)
        if raw is None:
            return None
        if not raw.isdigit() or not low <= int(raw) <= high:
            raise GenesisMismatchError(f"genesis: {key} {raw!r} is not an integer in [{low}, {high}]")
        return int(raw)

    def encode(self) -> bytes:
        """The canonical encoding (built on each call: 4 bytes per parameter; cache it to serve it often)."""
        return b"".join((self._head, memoryview(self.params).cast("B"), self._tail))

    @classmethod
    def decode(cls, data: bytes | memoryview, *, limits: Limits = DEFAULT_LIMITS) -> Genesis:
        """Parse and validate. Raises ValidationError."""
        tag = "genesis"
        obj = _wire.unpack_array(data, tag=tag, version=FORMAT_VERSION, length=5,
                                 max_bytes=limits.max_genesis_bytes)
        _, _, raw, frags, meta = obj
        _wire.expect(_wire.is_bytes(raw) and len(raw) % 4 == 0, tag, "params must be bin of f32")
        _wire.expect(isinstance(frags, list) and all(
            isinstance(f, list) and len(f) == 2 and all(_wire.is_int(x) for x in f) for f in frags
        ), tag, "fragments must be [[start, stop], ...]")
        _wire.expect(isinstance(meta, list) and len(meta) <= limits.max_meta_items and all(
            isinstance(kv, list) and len(kv) == 2 for kv in meta
        ), tag, "meta must be a short list of [key, value]")
        _wire.expect(len({kv[0] for kv in meta if isinstance(kv[0], str)}) == len(meta), tag,
                     "meta keys must be unique strings")
        genesis = cls(np.frombuffer(raw, dtype="<f4"),  # a view of msgpack's bytes: no copy
                      tuple(tuple(f) for f in frags), dict((k, v) for k, v in meta))  # type: ignore[misc]
        # Canonical: the same head and tail around the params bytes (which are what msgpack parsed).
        view = memoryview(data).cast("B")
        head, tail = genesis._head, genesis._tail
        _wire.expect(len(view) == len(head) + len(raw) + len(tail) and view[: len(head)] == head
                     and view[len(view) - len(tail):] == tail, tag, "non-canonical encoding")
        return genesis

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Genesis) and other._id == self._id

    def __hash__(self) -> int:
        return hash(self._id)


# ---------------------------------------------------------------------------------------------------------
# Contribution
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Contribution:
    """One signed update. Build with :func:`make_contribution` or :meth:`decode`; the constructor does not
    verify the signature (``ModelState.apply`` does).

    A record is immutable, so the outcome of checking its signature cannot change: :meth:`verify` checks
    it once per object and remembers a success (``decode`` then ``ModelState.apply`` cost one Ed25519
    check, not two)."""

    author: bytes
    genesis_id: str
    """Hex id of the run's genesis this update belongs to (signed; 32 bytes on the wire)."""
    seq: int
    fragment: int
    codec: str
    payload: bytes
    weight: float
    base_version: bytes
    signature: bytes
    base_count: int = 0
    """Contributions of other authors in the state this update was computed from (signed; 0 = not stated:
    omitted on the wire). Only a run with an influence window uses it (crdt/state.py)."""
    admission_nonce: int = 0
    """The author's proof of work for this run (signed; 0 = none: omitted on the wire). Only a run whose
    genesis asks for one checks it (crdt/admission.py)."""
    _signature_ok: bool = field(default=False, init=False, repr=False, compare=False)

    def _optional(self) -> list[int]:
        if self.admission_nonce:
            return [self.base_count, self.admission_nonce]
        return [self.base_count] if self.base_count else []

    def _body(self) -> bytes:
        optional = self._optional()
        return _wire.pack([FORMAT_VERSION, "contribution-body", self.author, bytes.fromhex(self.genesis_id),
                           self.seq, self.fragment, self.codec, self.payload, self.weight, self.base_version,
                           *optional])

    @property
    def id(self) -> str:
        """Hex blake2b-256 of the signed body (signature excluded)."""
        return content_hash(self._body()).hex()

    @property
    def slot(self) -> tuple[bytes, int]:
        return (self.author, self.seq)

    def encode(self) -> bytes:
        return _wire.pack([FORMAT_VERSION, "contribution", self.author, bytes.fromhex(self.genesis_id),
                           self.seq, self.fragment, self.codec, self.payload, self.weight, self.base_version,
                           self.signature, *self._optional()])

    def check_fields(self, limits: Limits = DEFAULT_LIMITS) -> None:
        """Context-free field checks (types, sizes, ranges). Raises ValidationError."""
        tag = "contribution"
        _wire.expect(_wire.is_bytes(self.author, PUBLIC_KEY_BYTES), tag, "author must be 32 bytes")
        _wire.expect(_is_hex_id(self.genesis_id), tag, "genesis_id must be 64 lowercase hex digits")
        _wire.expect(_wire.is_int(self.seq) and 1 <= self.seq < 2**63, tag, "seq must be an int >= 1")
        _wire.expect(_wire.is_int(self.fragment) and 0 <= self.fragment < 2**32, tag,
                     "fragment must be a non-negative int")
        _wire.expect(type(self.codec) is str and self.codec in CODECS, tag, f"unknown codec {self.codec!r}")
        _wire.expect(_wire.is_bytes(self.payload), tag, "payload must be bytes")
        _wire.expect(len(self.payload) <= limits.max_payload_bytes, tag,
                     f"payload of {len(self.payload)} bytes exceeds {limits.max_payload_bytes}")
        _wire.expect(type(self.weight) is float and math.isfinite(self.weight)
                     and 0.0 < self.weight <= limits.max_weight, tag,
                     f"weight must be a finite float in (0, {limits.max_weight}]")
        _wire.expect(_wire.is_bytes(self.base_version, HASH_BYTES), tag, "base_version must be 32 bytes")
        _wire.expect(_wire.is_bytes(self.signature, SIGNATURE_BYTES), tag, "signature must be 64 bytes")
        _wire.expect(_wire.is_int(self.base_count) and 0 <= self.base_count < 2**63, tag,
                     "base_count must be a non-negative int")
        _wire.expect(_wire.is_int(self.admission_nonce) and 0 <= self.admission_nonce < 2**64, tag,
                     "admission_nonce must be a non-negative 64-bit int")

    def verify(self, limits: Limits = DEFAULT_LIMITS) -> None:
        """Field checks plus signature. Raises ValidationError / SignatureError."""
        self.check_fields(limits)
        if self._signature_ok:
            return
        if not verify_signature(self.author, self._body(), self.signature):
            raise SignatureError("contribution: signature does not verify for its author")
        object.__setattr__(self, "_signature_ok", True)

    def validate_against(self, genesis: Genesis, limits: Limits = DEFAULT_LIMITS
                         ) -> tuple[np.ndarray, np.ndarray, float]:
        """Check the contribution fits ``genesis``; return the decoded ``(indices, values)`` and the exact
        weighted norm (:func:`weighted_norm`).

        Raises:
            GenesisMismatchError: the fragment does not exist in this genesis.
            ValidationError: payload does not decode for the fragment, or the weighted norm is too big.
        """
        if not 0 <= self.fragment < len(genesis.fragments):
            raise GenesisMismatchError(
                f"contribution: fragment {self.fragment} not in genesis ({len(genesis.fragments)} fragments)")
        indices, values = decode_payload(self.codec, genesis.fragment_length(self.fragment), self.payload)
        norm = weighted_norm(values, self.weight)
        if not norm <= limits.max_norm:
            raise ValidationError(f"contribution: weighted update norm {norm:.3g} exceeds {limits.max_norm}")
        return indices, values, norm

    @classmethod
    def decode(cls, data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> Contribution:
        """Parse, check fields, check canonical form and verify the signature. Raises ValidationError."""
        obj = _wire.unpack_array(data, tag="contribution", version=FORMAT_VERSION, length=(11, 12, 13),
                                 max_bytes=limits.max_payload_bytes + _CONTRIBUTION_OVERHEAD_BYTES)
        _wire.expect(_wire.is_bytes(obj[3], HASH_BYTES), "contribution", "genesis id must be 32 bytes")
        c = cls(obj[2], obj[3].hex(), *obj[4:])
        c.verify(limits)
        _wire.expect(c.encode() == bytes(data), "contribution", "non-canonical encoding")
        return c


def make_contribution(signer: Signer, *, genesis_id: str, seq: int, fragment: int, codec: str,
                      payload: bytes, weight: float, base_version: bytes, base_count: int = 0,
                      admission_nonce: int = 0) -> Contribution:
    """Build and sign a contribution to the run of ``genesis_id`` (fields are checked; raises
    ValidationError on bad input)."""
    unsigned = Contribution(signer.public_key, genesis_id, seq, fragment, codec, bytes(payload),
                            float(weight), bytes(base_version), b"\x00" * SIGNATURE_BYTES, base_count,
                            admission_nonce)
    unsigned.check_fields(Limits(max_payload_bytes=2**62, max_weight=math.inf))
    return Contribution(signer.public_key, genesis_id, seq, fragment, codec, bytes(payload), float(weight),
                        bytes(base_version), signer.sign(unsigned._body()), base_count, admission_nonce)


def weighted_norm(values: np.ndarray, weight: float) -> float:
    """``||weight * values||_2``, the same bits on every replica (see "Exact norm" above): the one norm
    used for the max_norm bound and for clip_norm scaling. ``values`` are float32."""
    return math.sqrt(_exact_sum_of_squares(values)) * weight


def _exact_sum_of_squares(values: np.ndarray) -> float:
    """The sum of squares of float32 ``values``, rounded once (equal to ``math.fsum`` of the float64
    squares, 7x faster). A float32 is ``m * 2**(e - 150)`` with an integer m < 2**24, so its square is
    ``m*m`` (< 2**48) units of ``2**(2e - 300)``: the squares are summed per exponent e as integers (split
    in 24-bit halves, so float64 bincount sums stay exact up to 2**29 entries), combined in a Python int,
    and converted to float once, which rounds correctly."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    biased = (bits >> 23) & 0xFF  # 0 for subnormals, which share the scale of biased exponent 1
    m = (bits & 0x7FFFFF).astype(np.int64)
    m[biased > 0] |= 0x800000
    sq = m * m
    hi = np.bincount(biased, weights=(sq >> 24).astype(np.float64)).tolist()
    lo = np.bincount(biased, weights=(sq & 0xFFFFFF).astype(np.float64)).tolist()
    bottom = max(1, int(biased.min())) if biased.size else 1
    total = 0
    for e in range(len(hi) - 1, bottom - 1, -1):  # in units of the square of 2**(bottom - 150)
        total = (total << 2) + (int(hi[e]) << 24) + int(lo[e])
    if bottom == 1 and hi:  # subnormals (exponent field 0) have the scale of exponent 1
        total += (int(hi[0]) << 24) + int(lo[0])
    return math.ldexp(float(total), 2 * (bottom - 150))


def _is_hex_id(value: object) -> bool:
    return (type(value) is str and len(value) == 2 * HASH_BYTES
            and all(ch in "0123456789abcdef" for ch in value))
