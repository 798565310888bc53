"""The buffer of early contributions: verified records waiting for a gap in their author's seqs to fill.

Bounded in four ways (``Limits``): how far ahead of its author's prefix a record may be, how many records
in all, and how many payload bytes per author and in all. Keys are free, so the per-author bounds alone
are no memory bound; records are free too (up to ``max_payload_bytes`` each), so neither is the count:
4,096 buffered dense fragments were ~14 GB for the default model. Nothing expires inside crdt (no clock):
the owner drops the buffer on its own schedule, which is harmless because anti-entropy re-delivers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from crdt.errors import GapTooLargeError
from crdt.records import Contribution, Limits

__all__ = ["PendingBuffer"]


class PendingBuffer:
    """Buffered contributions by author and seq, with their count and payload bytes."""

    def __init__(self) -> None:
        self._by_author: dict[bytes, dict[int, Contribution]] = {}
        self._bytes: dict[bytes, int] = {}
        self.count = 0
        self.total_bytes = 0

    def __contains__(self, author: bytes) -> bool:
        return author in self._by_author

    def authors(self) -> Iterator[bytes]:
        return iter(self._by_author)

    def get(self, author: bytes, seq: int) -> Contribution | None:
        return self._by_author.get(author, {}).get(seq)

    def records(self) -> list[Contribution]:
        """Every buffered record, by author then seq."""
        return [c for _, waiting in sorted(self._by_author.items()) for _, c in sorted(waiting.items())]

    def add(
        self,
        c: Contribution,
        *,
        gap: int,
        limits: Limits,
        before_insert: Callable[[Contribution], None] | None = None,
    ) -> None:
        """Buffer ``c``, ``gap`` seqs ahead of its author's prefix. ``before_insert`` runs once every
        bound is checked; if it raises, nothing is buffered.

        Raises:
            GapTooLargeError: too far ahead, or a count or byte bound is reached.
        """
        size = len(c.payload)
        if gap > limits.max_buffered_gap:
            raise GapTooLargeError(f"contribution: seq {c.seq} is {gap} ahead of the author's prefix "
                                   f"(limit {limits.max_buffered_gap})")
        if self.count >= limits.max_buffered_total:
            raise GapTooLargeError(f"contribution: buffer full ({limits.max_buffered_total} records)")
        if self._bytes.get(c.author, 0) + size > limits.max_buffered_bytes_per_author:
            raise GapTooLargeError(
                f"contribution: the author's buffer is full ({limits.max_buffered_bytes_per_author} bytes)")
        if self.total_bytes + size > limits.max_buffered_bytes_total:
            raise GapTooLargeError(f"contribution: buffer full ({limits.max_buffered_bytes_total} bytes)")
        if before_insert is not None:
            before_insert(c)
        self._by_author.setdefault(c.author, {})[c.seq] = c
        self._bytes[c.author] = self._bytes.get(c.author, 0) + size
        self.count += 1
        self.total_bytes += size

    def pop(self, author: bytes, seq: int) -> Contribution | None:
        """Remove and return the buffered record of (author, seq), if any."""
        waiting = self._by_author.get(author)
        c = waiting.pop(seq, None) if waiting else None
        if c is not None:
            self._forget(c)
            if not waiting:
                del self._by_author[author]
        return c

    def drop(self, authors: Iterable[bytes] | None = None) -> int:
        """Forget the records of ``authors`` (all if None); returns how many."""
        dropped = 0
        for author in list(self._by_author) if authors is None else list(authors):
            for c in self._by_author.pop(author, {}).values():
                self._forget(c)
                dropped += 1
        return dropped

    def copy(self) -> PendingBuffer:
        other = PendingBuffer()
        other._by_author = {a: dict(m) for a, m in self._by_author.items()}
        other._bytes = dict(self._bytes)
        other.count, other.total_bytes = self.count, self.total_bytes
        return other

    def _forget(self, c: Contribution) -> None:
        self.count -= 1
        self.total_bytes -= len(c.payload)
        left = self._bytes.pop(c.author) - len(c.payload)
        if left:
            self._bytes[c.author] = left
