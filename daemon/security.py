"""The daemon's side of SECURITY.md: membership config for the host, rejection counting, suspects.

* :func:`host_config` turns ``[node] swarm_key`` / ``allow_peers`` into a ``p2p.HostConfig`` (the swarm key
  file is read once, at start, and must be mode 0600).
* :func:`counting` wraps a request handler so that a peer's undecodable or invalid request is counted in
  ``counters.rejected_reasons`` (by exception type) and penalized, then still answered with the error.
* :class:`SuspectTracker` keeps per-author statistics of applied updates (norm, cosine with the running
  mean update) and names outliers in status (``"suspects"``). It only *reports*: excluding an author
  would have to be a deterministic function of the record set (as crdt's norm clipping is) or replicas
  would diverge.
* :func:`byzantine_round` is the TEST-ONLY attacker of ``[training] byzantine`` (see
  tests/integration/test_byzantine.py): it rewrites this node's own update before it is signed.
* :func:`load_or_create_token` is the bearer token of the optional TCP control listener (daemon/api.py).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

import p2p
from daemon import wire

__all__ = [
    "SuspectTracker",
    "TokenFileError",
    "byzantine_round",
    "counting",
    "host_config",
    "load_or_create_token",
]

log = logging.getLogger(__name__)

#: An author is suspect when its typical update norm is this many times the median author's ...
SUSPECT_NORM_RATIO = 4.0
#: ... or when its updates point, on average, against the running mean update (cosine below this).
SUSPECT_COSINE = -0.2
#: Updates an author must have sent before it can be named (one odd round is not a pattern).
SUSPECT_MIN_UPDATES = 2
_EMA = 0.2  # weight of a new update in the per-fragment running mean update
BYZANTINE_FLIP10_SCALE = -10.0  # "flip10": against the honest direction, ten times as loud
TOKEN_BYTES = 32  # 256 bits of randomness, URL-safe base64 in the file


def host_config(home: Path, node: Any) -> p2p.HostConfig:
    """HostConfig with the run's swarm key and allowlist. Raises p2p.SwarmKeyError for a bad key file."""
    swarm_key = None
    if node.swarm_key:
        path = Path(node.swarm_key).expanduser()
        swarm_key = p2p.load_swarm_key(path if path.is_absolute() else home / path)
    allow = frozenset(node.allow_peers) if node.allow_peers else None
    if swarm_key is not None or allow is not None:
        log.info(
            "private run: swarm_key=%s allow_peers=%s", swarm_key is not None, len(allow) if allow else "any"
        )
    return p2p.HostConfig(swarm_key=swarm_key, allow_peers=allow)


def counting(
    handler: Callable[[str, bytes], Awaitable[bytes]], reject: Callable[[str, Exception], None]
) -> Callable[[str, bytes], Awaitable[bytes]]:
    """Wrap a request handler: malformed requests are counted and penalized, then re-raised (the peer
    gets a RemoteError)."""
    import crdt  # local: keep this module cheap to import for the CLI

    async def guarded(peer: str, data: bytes) -> bytes:
        try:
            return await handler(peer, data)
        except (wire.WireError, crdt.ValidationError) as exc:
            reject(peer, exc)
            raise

    return guarded


class SuspectTracker:
    """Per-author statistics of applied updates, to name likely Byzantine authors in status.

    For every applied contribution: its weighted L2 norm, and its cosine with the running mean update of
    its fragment (an exponential moving average of the *other* authors' updates before this one). An
    author is suspect when its median norm is ``SUSPECT_NORM_RATIO`` times the median over authors, or its
    mean cosine is below ``SUSPECT_COSINE`` (honest DiLoCo updates agree in sign with the consensus
    direction; a sign-flipping attacker does not). Report only: see the module docstring. Memory: one
    float32 vector per fragment (the model size) plus a bounded deque of norms per author.
    """

    def __init__(self, fragment_lengths: list[int], *, window: int = 32) -> None:
        self._mean = [np.zeros(n, np.float32) for n in fragment_lengths]
        self._norms: dict[str, deque[float]] = {}
        self._cosines: dict[str, deque[float]] = {}
        self._window = window

    def observe(
        self, author: str, fragment: int, indices: np.ndarray, values: np.ndarray, weight: float
    ) -> None:
        update = np.zeros_like(self._mean[fragment])
        update[indices] = values * np.float32(weight)
        norm = float(np.sqrt(np.dot(update, update)))
        mean = self._mean[fragment]
        mean_norm = float(np.sqrt(np.dot(mean, mean)))
        if norm > 0 and mean_norm > 0:
            cosine = float(np.dot(update, mean)) / (norm * mean_norm)
            self._cosines.setdefault(author, deque(maxlen=self._window)).append(cosine)
        self._norms.setdefault(author, deque(maxlen=self._window)).append(norm)
        # Clip what enters the running mean to the median author's norm, so that one huge update (or one
        # loud author) weighs no more than a typical one in the reference direction.
        typical = self._median_norm()
        if typical > 0 and norm > typical:
            update *= np.float32(typical / norm)
        mean *= np.float32(1 - _EMA)
        mean += np.float32(_EMA) * update

    def _median_norm(self) -> float:
        medians = [float(np.median(v)) for v in self._norms.values() if v]
        return float(np.median(medians)) if medians else 0.0

    def stats(self) -> dict[str, dict[str, float]]:
        return {
            author: {
                "updates": len(norms),
                "median_norm": float(np.median(norms)),
                "mean_cosine": float(np.mean(self._cosines[author])) if self._cosines.get(author) else 0.0,
            }
            for author, norms in self._norms.items()
        }

    def suspects(self) -> list[str]:
        typical = self._median_norm()
        out = []
        for author, st in self.stats().items():
            if st["updates"] < SUSPECT_MIN_UPDATES:
                continue
            if (typical > 0 and st["median_norm"] > SUSPECT_NORM_RATIO * typical) or (
                self._cosines.get(author) and st["mean_cosine"] < SUSPECT_COSINE
            ):
                out.append(author)
        return sorted(out)


def observe(tracker: SuspectTracker | None, genesis: Any, contribution: Any) -> SuspectTracker:
    """Feed one accepted contribution to the tracker (created on first use); returns the tracker."""
    import crdt

    if tracker is None:
        tracker = SuspectTracker([stop - start for start, stop in genesis.fragments])
    length = genesis.fragment_length(contribution.fragment)
    indices, values = crdt.decode_payload(contribution.codec, length, contribution.payload)
    author = p2p.peer_id_from_public_key(contribution.author)
    tracker.observe(author, contribution.fragment, indices, values, contribution.weight)
    return tracker


def byzantine_round(mode: str, result: Any, fragment_length: int) -> Any:
    """TEST ONLY: the Byzantine attacker of ``[training] byzantine`` ("" returns ``result`` unchanged).

    "flip10" decodes the honest round's payload, multiplies the values by -10 and re-encodes them with
    the same codec. The node then signs the result with its own key, exactly what a real malicious member
    can do; every check a receiver makes (signature, format, ``max_norm``) still passes.
    """
    if not mode:
        return result
    import crdt

    if mode != "flip10":
        raise ValueError(f"unknown byzantine mode {mode!r}")
    indices, values = crdt.decode_payload(result.codec, fragment_length, result.payload)
    # A transform codec decodes to entries, not coefficients: the attacker sends those dense instead.
    codec = "dense-f32" if result.codec in crdt.TRANSFORM_CODECS else result.codec
    payload = crdt.encode_payload(
        codec,
        fragment_length,
        None if codec in crdt.DENSE_CODECS else indices,
        (values * np.float32(BYZANTINE_FLIP10_SCALE)).astype(np.float32),
    )
    return dataclasses.replace(result, codec=codec, payload=payload, payload_bytes=len(payload))


class TokenFileError(RuntimeError):
    """The API token file is unusable (readable by group/others, empty, or not a regular file)."""


def load_or_create_token(path: Path) -> str:
    """The TCP control listener's bearer token: read from ``path``, or created there (mode 0600, with no
    window where it is wider) when missing. A file that group or others may read is refused, as ssh
    refuses a private key: whoever reads the token drives the node."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(TOKEN_BYTES) + "\n")
            f.flush()
            os.fsync(f.fileno())
        log.info("created API token file=%s", path)
    mode = path.stat().st_mode
    if mode & 0o077:
        raise TokenFileError(f"{path}: mode {mode & 0o777:o}; the API token file must be 0600 (chmod 600)")
    token = path.read_text(encoding="utf-8").strip()
    if len(token) < 16:
        raise TokenFileError(f"{path}: the API token must be at least 16 characters")
    return token
