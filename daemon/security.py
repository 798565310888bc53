"""The daemon's side of SECURITY.md: membership config for the host, rejection counting, suspects.

* :func:`host_config` turns ``[node] swarm_key`` / ``allow_peers`` into a ``p2p.HostConfig`` (the swarm key
  file is read once, at start, and must be mode 0600).
* :func:`counting` wraps a request handler so that a peer's undecodable or invalid request is counted in
  ``counters.rejected_reasons`` (by exception type) and penalized, then still answered with the error.
* :class:`SuspectTracker` keeps per-author statistics of applied updates (norm, cosine with the running
  mean update) and names outliers in status (``"suspects"``). It only *reports*: excluding an author
  would have to be a deterministic function of the record set (as crdt's norm clipping is) or replicas
  would diverge.
* :func:`byzantine_transform` is a TEST-ONLY hook (``MESHTRAIN_TEST_BYZANTINE=flip10``) that makes this
  node send sign-flipped, 10x-scaled updates, so tests can check that clipping and suspect detection work.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import p2p
from daemon import wire

__all__ = ["BYZANTINE_ENV", "counting", "host_config"]

log = logging.getLogger(__name__)

BYZANTINE_ENV = "MESHTRAIN_TEST_BYZANTINE"


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
