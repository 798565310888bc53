"""Coverage-guided fuzzing (atheris / libFuzzer) of every decoder that reads bytes from a peer or a disk.

    python tests/fuzz/atheris_targets.py TARGET [CORPUS_DIR] -runs=20000 [more libFuzzer flags]
    python tests/fuzz/atheris_targets.py --list

Each target feeds the fuzzer's bytes to one decoder; the decoder may only answer with its documented
error type (the tuple next to it). Any other exception, or a crash, makes libFuzzer stop with a non-zero
exit code and the offending input written to ``crash-*``. A CORPUS_DIR that does not exist yet is created
and filled with the target's valid encodings (:func:`seeds`), so the mutations start from inputs that get
past msgpack and the outer checks into the field rules. ``tests/fuzz/test_atheris.py`` runs every target
for a bounded number of inputs; run one longer by hand when a decoder changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
from collections.abc import Callable
from pathlib import Path

import atheris

# Coverage feedback from crdt and the daemon's and p2p's decoding modules only. atheris includes whole
# top-level packages and excludes exact module names, so every other module of daemon and p2p is excluded
# by name: instrumenting them all (daemon.node's package imports the node, the host and the training
# handoff) took 5 of each target's 7.4 s of start-up, 21 starts per `make test` (2026-12-02).
_ROOT = Path(__file__).resolve().parents[2]
_DECODERS = {"daemon.node.wire", "daemon.node.store_files", "p2p._framing", "p2p._transfer", "p2p._security"}
_NOT_DECODERS = [
    name
    for package in ("daemon", "p2p")
    for path in (_ROOT / package).rglob("*.py")
    if (name := ".".join(path.relative_to(_ROOT).with_suffix("").parts).removesuffix(".__init__"))
    not in _DECODERS
]
with atheris.instrument_imports(include=["crdt", "daemon", "p2p"], exclude=_NOT_DECODERS):
    import msgpack
    import numpy as np

    import crdt
    from daemon.node import wire
    from daemon.node.store_files import decode_equivocation
    from p2p import _framing, _transfer
    from p2p._errors import ProtocolViolation
    from p2p._security import SwarmKeyError, parse_swarm_key

_LENGTHS = (0, 1, 7, 64, 300)  # fragment lengths the payload target picks from


def _payload(data: bytes) -> None:
    """Byte 0 picks the codec, byte 1 the fragment length, the rest is the payload."""
    if len(data) < 2:
        return
    codec, length = crdt.CODECS[data[0] % len(crdt.CODECS)], _LENGTHS[data[1] % len(_LENGTHS)]
    indices, values = crdt.decode_payload(codec, length, data[2:])
    assert indices.size == values.size and (indices.size == 0 or int(indices.max()) < length)


_GENESIS = crdt.Genesis(np.linspace(-1, 1, 64, dtype=np.float32), ((0, 32), (32, 64)), {"run": "fuzz"})


def _snapshot(data: bytes) -> None:
    """A peer's snapshot stream, fed in two pieces (the split point is the first byte)."""
    reader = crdt.SnapshotReader(_GENESIS, max_authors=64)
    cut = data[0] if data else 0
    reader.feed(data[1 : 1 + cut])
    reader.feed(data[1 + cut :])
    reader.finish()


def _frames(data: bytes) -> None:
    decoder = _framing.FrameDecoder(max_message_bytes=1 << 16, expected=frozenset(_framing.FrameKind))
    decoder.feed(data)
    while decoder.next_frame() is not None:
        pass


TARGETS: dict[str, tuple[Callable[[bytes], object], tuple[type[Exception], ...]]] = {
    "contribution": (crdt.Contribution.decode, (crdt.ValidationError,)),
    "genesis": (crdt.Genesis.decode, (crdt.ValidationError,)),
    "snapshot": (_snapshot, (crdt.ValidationError,)),
    "digest": (lambda data: crdt.Digest.decode(data, max_authors=64), (crdt.ValidationError,)),
    "version-vector": (lambda data: crdt.VersionVector.decode(data, max_authors=64), (crdt.ValidationError,)),
    "checkpoint": (lambda data: crdt.Checkpoint.decode(data, max_authors=64), (crdt.ValidationError,)),
    "payload": (_payload, (crdt.ValidationError,)),
    "wal": (crdt.scan_log, (crdt.ValidationError,)),
    "sealed-blob": (lambda data: crdt.unseal_blob(b"SNAPSHT", data), (crdt.ValidationError,)),
    "sync-request": (wire.SyncRequest.decode, (wire.WireError,)),
    "sync-response": (wire.SyncResponse.decode, (wire.WireError,)),
    "announcement": (wire.Announcement.decode, (wire.WireError,)),
    "heartbeat": (wire.Heartbeat.decode, (wire.WireError,)),
    "genesis-request": (wire.GenesisRequest.decode, (wire.WireError,)),
    "genesis-offer": (wire.GenesisOffer.decode, (wire.WireError,)),
    "snapshot-offer": (wire.SnapshotOffer.decode, (wire.WireError,)),
    "frames": (_frames, (ProtocolViolation,)),
    "blob-manifest": (_transfer.Manifest.decode, (ProtocolViolation,)),
    "blob-request": (_transfer.BlobRequest.decode, (ProtocolViolation,)),
    "swarm-key": (lambda data: parse_swarm_key(data.decode("utf-8", "replace")), (SwarmKeyError,)),
    "equivocation-proof": (decode_equivocation, (crdt.CrdtError,)),  # a sealed file's body
}


def seeds(target: str) -> list[bytes]:
    """Valid encodings for ``target``: where the mutations start."""
    signer = crdt.Signer.from_seed(hashlib.sha256(b"fuzz").digest())
    genesis = _GENESIS
    payload = crdt.encode_payload("sparse-q8", 32, np.array([1, 5, 30]), np.array([0.5, -1.0, 2.0]))
    contribution = crdt.make_contribution(
        signer, genesis_id=genesis.id, seq=1, fragment=0, codec="sparse-q8", payload=payload, weight=1.0,
        base_version=b"\0" * 32,
    )
    other = crdt.make_contribution(  # the same slot, signed again: an equivocation
        signer, genesis_id=genesis.id, seq=1, fragment=0, codec="sparse-q8", payload=payload, weight=0.5,
        base_version=b"\0" * 32,
    )
    state = crdt.ModelState(genesis)
    state.apply(contribution)
    snapshot = b"".join(state.snapshot_parts())
    digest = state.digest().encode()
    manifest = _transfer.Manifest.build(
        bytes(2 * _transfer.MIN_CHUNK_BYTES + 10), chunk_size=_transfer.MIN_CHUNK_BYTES
    )
    return {
        "contribution": [contribution.encode()],
        "genesis": [genesis.encode()],
        "snapshot": [bytes([40]) + snapshot],
        "digest": [digest],
        "version-vector": [state.version_vector.encode()],
        "checkpoint": [state.checkpoint(signer).encode()],
        "payload": [
            bytes([i, 3]) + crdt.encode_payload(codec, 64, np.array([0, 9, 63]), np.array([1.0, -2.0, 3.0]))
            for i, codec in enumerate(crdt.CODECS)
        ],
        "wal": [crdt.LOG_HEADER + crdt.frame_record(contribution.encode()) * 2],
        "sealed-blob": [crdt.seal_blob(b"SNAPSHT", snapshot)],
        "sync-request": [wire.SyncRequest(genesis=genesis.id, digest=digest).encode()],
        "sync-response": [
            wire.SyncResponse(
                digest=digest, contributions=(contribution.encode(),), snapshot_required=True
            ).encode()
        ],
        "announcement": [
            wire.Announcement(
                author=signer.public_key, seq=1, fragment=0, size=len(payload), id=contribution.id
            ).encode()
        ],
        "heartbeat": [
            wire.Heartbeat(
                round=3,
                contributions=9,
                training="running",
                reachability="public",
                task="digits",
                device="cpu",
                throughput_bps=1000,
            ).encode()
        ],
        "genesis-request": [wire.GenesisRequest(run="fuzz").encode()],
        "genesis-offer": [
            wire.GenesisOffer(id=genesis.id, meta=dict(genesis.meta), fragments=genesis.fragments,
                              ref=wire.BlobRef(blob=b"genesis/x", root=bytes(32), size=100)).encode()
        ],
        "snapshot-offer": [
            wire.SnapshotOffer(checkpoints=(state.checkpoint(signer).encode(),),
                               ref=wire.BlobRef(blob=b"snapshot/x", root=bytes(32), size=100)).encode()
        ],
        "frames": [
            _framing.encode_frame(_framing.FrameKind.REQUEST, b"hello")
            + _framing.encode_frame(_framing.FrameKind.ERROR, _framing.encode_error_payload("Oops", "why"))
        ],
        "blob-manifest": [manifest.encode()],
        "blob-request": [
            _transfer.BlobRequest(op=_transfer.Op.OPEN, blob_id=b"snapshot").encode(),
            _transfer.BlobRequest(op=_transfer.Op.READ, index=100).encode(),
        ],
        "swarm-key": [f"/key/swarm/psk/1.0.0/\n/base16/\n{'ab' * 32}\n".encode()],
        "equivocation-proof": [msgpack.packb([contribution.encode(), other.encode()])],
    }[target]


def main(argv: list[str]) -> None:
    if argv[1:] == ["--list"]:
        print("\n".join(TARGETS))
        return
    if len(argv) < 2 or argv[1] not in TARGETS:
        sys.exit(f"usage: {argv[0]} TARGET [CORPUS_DIR] [libFuzzer flags]; targets: {', '.join(TARGETS)}")
    decode, allowed = TARGETS[argv[1]]
    flags = argv[2:]
    if flags and not flags[0].startswith("-") and not Path(flags[0]).exists():
        corpus = Path(flags[0])
        corpus.mkdir(parents=True)
        for i, seed in enumerate(seeds(argv[1])):
            decode(seed)  # a seed that does not decode would be a bug in seeds() or in the decoder
            (corpus / f"seed-{i}").write_bytes(seed)

    def one_input(data: bytes) -> None:
        with contextlib.suppress(allowed):
            decode(data)

    atheris.Setup([argv[0], *flags], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
