"""FrozenState: a ModelState as it was at one moment, for a worker thread while the owner goes on applying.

Hashing, encoding and materializing a whole state are the slow whole-model passes (at 100M parameters
about 1.7 s to hash, 2.5 s to encode and 1.1 s to materialize on one core here, tens of seconds at 1B);
done on the thread that applies records they stall everything else it does for that long.
:meth:`ModelState.freeze` returns this object instead: the vector, bases and flags are copied (small), the
accumulator is shared copy-on-write by block (crdt/_packed.py: the owner saves a block before changing it
if the frozen view has not read it yet). One other thread may then compute :attr:`state_hash`,
:meth:`snapshot_parts` or :meth:`materialize`; the owner keeps the hash with :meth:`ModelState.take_hash`
if nothing changed meanwhile. Close it when done (a context manager; one dropped unclosed is closed when
collected): until then every block the owner changes before the reader reaches it is held twice.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from types import TracebackType

import numpy as np

from crdt._accumulator import FrozenAccumulator
from crdt.checkpoint import Checkpoint, make_checkpoint, require_self_verified
from crdt.signing import Signer
from crdt.snapshot import SnapshotHeader, combine_state_hash
from crdt.vv import Digest, VersionVector

__all__ = ["FrozenState"]


class FrozenState:
    """See the module docstring. Its methods may run in one thread other than the owner's."""

    def __init__(self, genesis_id: str, vector: VersionVector, bases: VersionVector | None,
                 self_verified: bool, acc: FrozenAccumulator, state_hash: str | None) -> None:
        self.genesis_id = genesis_id
        self.version_vector = vector
        self.self_verified = self_verified
        self._bases = bases
        self._acc = acc
        self._hash = state_hash
        self._closing = weakref.finalize(self, acc.close)  # dropped unclosed: closed when collected

    @property
    def generation(self) -> int:
        """The owner's accumulator generation when frozen (the owner compares it in take_hash)."""
        return self._acc.generation

    @property
    def state_hash(self) -> str:
        """ModelState.state_hash of the frozen state (computed on first use: the slow part)."""
        if self._hash is None:
            self._hash = combine_state_hash(self.genesis_id, self.version_vector, self._acc.fragment_hashes(),
                                            self._bases)
        return self._hash

    def digest(self) -> Digest:
        """ModelState.digest of the frozen state (hashing it first if need be)."""
        return Digest(self.version_vector, self.state_hash, self.version_vector.total)

    @property
    def fragment_hashes(self) -> list[bytes | None]:
        return self._acc.hashes

    def checkpoint(self, signer: Signer) -> Checkpoint:
        """ModelState.checkpoint of the frozen state (hashing it first if need be: call it where that may
        take long)."""
        require_self_verified(self.self_verified)
        return make_checkpoint(signer, genesis_id=self.genesis_id, version_vector=self.version_vector,
                               state_hash=self.state_hash)

    def materialize(self, out: np.ndarray | None = None) -> np.ndarray:
        """ModelState.materialize of the frozen state."""
        return self._acc.materialize(out)

    def snapshot_parts(self) -> Iterator[bytes]:
        """ModelState.snapshot_parts of the frozen state."""
        header = SnapshotHeader(self.genesis_id, self.version_vector, self.state_hash, self.self_verified,
                                self._bases or VersionVector())
        return self._acc.parts(header)

    def close(self) -> None:
        self._closing()

    def __enter__(self) -> FrozenState:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
