"""The p2p exception tree.

Every error that leaves the `p2p` package is one of these; libp2p's and trio's own exceptions are converted
at the boundary (`p2p/_node.py`, `p2p/_reqresp.py`, `p2p/_blobs.py`) and chained with ``from`` so the
original traceback survives for debugging, while callers only ever need to catch `P2PError` subclasses.

    P2PError
    ├── HostClosed            the Host is not running (never started, closing, or closed)
    ├── PeerUnreachable       dial failed / no connection / stream could not be opened
    │   └── ProtocolNotSupported   the peer is reachable but does not speak that protocol
    ├── RequestTimeout        the whole request (dial + send + remote handler + receive) exceeded timeout_s
    ├── RemoteError           the remote handler raised; `.error_type` and `.remote_message` describe it
    │   └── Busy              the remote refused at once: too many requests in flight there; retry later
    ├── ProtocolViolation     the peer sent bytes that break our framing (bad kind, oversized frame, EOF)
    │   ├── MessageTooLarge   a frame is larger than the configured `max_message_bytes`
    │   └── IntegrityError    transferred bytes do not match their blake2b digest
    ├── TransferFailed        `fetch_blob` gave up: every peer failed or time ran out (`.peer_errors`)
    │   └── BlobNotFound      no peer offered the blob (every peer answered "not found" or was unreachable)
    └── DiscoveryError        the DHT could not be started or queried

Rejected alternative: re-raising libp2p exceptions directly (hivemind style). Their tree is wide, changes
between releases, and some are raised from trio internals as ExceptionGroups; daemon code should not have to
know any of it.
"""

from __future__ import annotations

__all__ = [
    "BlobNotFound",
    "Busy",
    "DiscoveryError",
    "HostClosed",
    "IntegrityError",
    "MessageTooLarge",
    "P2PError",
    "PeerUnreachable",
    "ProtocolNotSupported",
    "ProtocolViolation",
    "RemoteError",
    "RequestTimeout",
    "TransferFailed",
]


class P2PError(Exception):
    """Base class of every error raised by the p2p package."""


class HostClosed(P2PError):
    """The Host is not running: not started yet, or already closing/closed."""


class PeerUnreachable(P2PError):
    """We could not reach the peer: dial failed, connection dropped, or the stream could not be opened."""


class ProtocolNotSupported(PeerUnreachable):
    """The peer is connected but did not agree to the protocol id (no handler registered there)."""


class RequestTimeout(P2PError):
    """The request did not complete within its ``timeout_s`` (covers dial, send, remote work and receive)."""


class RemoteError(P2PError):
    """The remote request handler raised an exception.

    Attributes:
        error_type: the remote exception's class name (e.g. ``"ValidationError"``); never imported.
        remote_message: ``str()`` of the remote exception, truncated by the remote side.
    """

    def __init__(self, error_type: str, remote_message: str) -> None:
        super().__init__(f"remote handler failed: {error_type}: {remote_message}")
        self.error_type = error_type
        self.remote_message = remote_message


class Busy(RemoteError):
    """The remote refused the request before reading it: too many requests (from us, or in total) are in
    flight there. Nothing ran; retrying after a pause is safe."""


class ProtocolViolation(P2PError):
    """The peer broke the request/response framing (unknown frame kind, truncated frame, ...)."""


class MessageTooLarge(ProtocolViolation):
    """A frame announced (or we tried to send) more than ``max_message_bytes`` of payload."""


class DiscoveryError(P2PError):
    """The Kademlia DHT could not be started or queried."""


class IntegrityError(ProtocolViolation):
    """Bytes received for a blob (one chunk, or the reassembled whole) do not match their blake2b digest."""


class TransferFailed(P2PError):
    """A blob fetch gave up: every peer failed, or the fetch's deadline passed.

    Attributes:
        peer_errors: peer id -> why that peer was dropped from the fetch (unreachable, timeout, corrupt ...).
        chunks_done / chunks_total: progress reached; with ``dest=`` the verified chunks stay in the partial
            file, so calling `fetch_blob` again resumes from them.
    """

    def __init__(
        self, message: str, *, peer_errors: dict[str, str], chunks_done: int = 0, chunks_total: int = 0
    ) -> None:
        detail = "; ".join(f"{p[-8:]}: {e}" for p, e in peer_errors.items())
        super().__init__(f"{message} ({chunks_done}/{chunks_total} chunks) [{detail}]")
        self.peer_errors = peer_errors
        self.chunks_done = chunks_done
        self.chunks_total = chunks_total


class BlobNotFound(TransferFailed):
    """No peer could provide a manifest for the blob id (not served there, or unreachable)."""
