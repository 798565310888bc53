"""Shared fixtures of the daemon tests: a small genesis and signed histories, and in-memory stand-ins for
the libp2p host and the training process, so that whole nodes run in one event loop without sockets.

``FakeNet`` links ``FakeHost``s: a request calls the target's handler directly (its exceptions come back
as ``p2p.RemoteError`` with the type name, as over libp2p), gossip is delivered to every linked host's
subscription after its topic validator, and a blob fetch reads the serving hosts' files chunk by chunk
with the real host's checks (pinned root, every chunk's digest, the whole blob's, a part file resumed)
and its blame (a peer that is not linked, does not serve the blob, stalls or sends a bad chunk is
dropped with a reason and the others finish). ``FakeTrainer`` stands for the training child: a fixed model of
``PARAMS`` entries, and rounds whose updates are small, deterministic sparse-q8 payloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

import crdt
import p2p
from daemon.config import Config
from daemon.home import Home
from daemon.node.node import Node
from daemon.node.trainer_process import Fill, TrainerError
from p2p._transfer import chunk_digest
from training import RoundResult, StalenessPolicy

# -- records ------------------------------------------------------------------------------------------


def signer(index: int) -> crdt.Signer:
    return crdt.Signer.from_seed(hashlib.sha256(b"store-%d" % index).digest())


SIGNER = signer(99)
"""The checkpoint signer of the test genesis's run (quorum 1)."""
POLICY = crdt.CheckpointPolicy(frozenset({SIGNER.public_key}), 1)


def genesis(length: int = 96, n_fragments: int = 3, seed: int = 0) -> crdt.Genesis:
    params = np.random.default_rng(seed).standard_normal(length).astype(np.float32)
    step = length // n_fragments
    bounds = [*[*range(0, length - step + 1, step)][:n_fragments], length]
    return crdt.Genesis(params, tuple(itertools.pairwise(bounds)), {"run": "t"} | POLICY.to_meta())


def history(g: crdt.Genesis, n_authors: int, per_author: int, *, first: int = 0) -> list[crdt.Contribution]:
    """``per_author`` signed sparse-q8 records of each of ``n_authors`` authors (signers first, ...)."""
    out = []
    for a in range(first, first + n_authors):
        author = signer(a)
        for seq in range(1, per_author + 1):
            rng = np.random.default_rng([a, seq])
            frag = int(rng.integers(len(g.fragments)))
            n = g.fragment_length(frag)
            idx = np.sort(rng.choice(n, size=n // 4, replace=False)).astype(np.uint32)
            payload = crdt.encode_payload("sparse-q8", n, idx, rng.standard_normal(idx.size) * 0.01)
            out.append(
                crdt.make_contribution(
                    author,
                    genesis_id=g.id,
                    seq=seq,
                    fragment=frag,
                    codec="sparse-q8",
                    payload=payload,
                    weight=1.0,
                    base_version=b"\0" * 32,
                )
            )
    return out


G = genesis(length=96, n_fragments=3)
HIST = history(G, n_authors=3, per_author=4)


def state_of(cs: list[crdt.Contribution]) -> crdt.ModelState:
    s = crdt.ModelState(G)
    for c in cs:
        s.apply(c)
    return s


def attested(state: crdt.ModelState) -> tuple[crdt.Snapshot, list[crdt.Checkpoint]]:
    """``state``'s snapshot as a peer would serve it, and the run signer's checkpoint of it."""
    reader = crdt.SnapshotReader(state.genesis, max_authors=crdt.MAX_AUTHORS)
    for part in state.snapshot_parts():
        reader.feed(part)
    return reader.finish(), [state.checkpoint(SIGNER)]


# -- an in-memory network -----------------------------------------------------------------------------

Handler = Callable[[str, bytes], Awaitable[bytes]]


class FakeNet:
    """Hosts by peer id and which pairs are connected."""

    def __init__(self) -> None:
        self.hosts: dict[str, FakeHost] = {}
        self.links: set[frozenset[str]] = set()

    def add(self, peer_id: str) -> FakeHost:
        host = FakeHost(self, peer_id)
        self.hosts[peer_id] = host
        return host

    def link(self, a: str, b: str) -> None:
        self.links.add(frozenset((a, b)))

    def unlink(self, a: str, b: str) -> None:
        self.links.discard(frozenset((a, b)))

    def linked(self, a: str, b: str) -> bool:
        return frozenset((a, b)) in self.links


class FakeHost:
    """The part of ``p2p.Host`` a node uses, over a FakeNet."""

    def __init__(self, net: FakeNet, peer_id: str) -> None:
        self.net = net
        self.peer_id = peer_id
        self.handlers: dict[str, Handler] = {}
        self.validators: dict[str, Callable[[str, bytes], bool]] = {}
        self.topics: dict[str, asyncio.Queue[p2p.GossipMessage]] = {}
        self.penalized: list[str] = []
        self.admission: Callable[[str], bool] | None = None
        self.requests: list[tuple[str, str]] = []
        """(peer, protocol) of every request this host sent."""
        self.bytes_sent = 0
        self.bytes_received = 0
        self.blobs: dict[bytes, p2p.BlobSource] = {}
        self.blob_fault: str | None = None
        """What this host does when asked for a chunk: None (serve it), "stall" or "corrupt"."""
        self.fetches: list[p2p.BlobProgress] = []
        """Every fetch this host made, in order."""

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        self.handlers.clear()

    def set_request_handler(self, protocol: str, handler: Handler, *, keep_streams: bool = False) -> None:
        self.handlers[protocol] = handler

    def set_topic_validator(self, topic: str, validator: Callable[[str, bytes], bool]) -> None:
        self.validators[topic] = validator

    def set_gossip_admission(self, predicate: Callable[[str], bool] | None) -> None:
        self.admission = predicate

    def subscribe(self, topic: str) -> asyncio.Queue[p2p.GossipMessage]:
        return self.topics.setdefault(topic, asyncio.Queue())

    async def publish(self, topic: str, data: bytes) -> None:
        for peer in self.connected_peers():
            other = self.net.hosts[peer]
            valid = other.validators.get(topic, lambda _p, _d: True)(self.peer_id, data)
            admitted = other.admission is None or other.admission(self.peer_id)
            if topic in other.topics and valid and admitted:
                other.topics[topic].put_nowait(p2p.GossipMessage(self.peer_id, data))

    async def request(
        self, peer: str, protocol: str, data: bytes, *, timeout_s: float, keep_stream: bool = False
    ) -> bytes:
        self.requests.append((peer, protocol))
        await asyncio.sleep(0)  # a request always yields to the loop, as real I/O does
        if not self.net.linked(self.peer_id, peer):
            raise p2p.PeerUnreachable(f"not connected to {peer}")
        handler = self.net.hosts[peer].handlers.get(protocol)
        if handler is None:
            raise p2p.ProtocolNotSupported(protocol)
        self.bytes_sent += len(data)
        try:
            async with asyncio.timeout(timeout_s):
                answer = await handler(self.peer_id, data)
        except TimeoutError as exc:
            raise p2p.RequestTimeout(f"{protocol} to {peer}") from exc
        except Exception as exc:  # what the real host sends back: the remote exception's name and text
            raise p2p.RemoteError(type(exc).__name__, str(exc)) from exc
        self.bytes_received += len(answer)
        return answer

    def connected_peers(self) -> list[str]:
        return sorted(p for p in self.net.hosts if p != self.peer_id and self.net.linked(self.peer_id, p))

    def listen_addrs(self) -> list[str]:
        return [self.addr]

    @property
    def addr(self) -> str:
        """A multiaddr for this host, for other nodes' ``[node] bootstrap`` (only its peer id matters)."""
        return f"/ip4/127.0.0.1/tcp/1/p2p/{self.peer_id}"

    def stats(self) -> dict[str, Any]:
        return {"bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received}

    def reachability(self) -> str:
        return "unknown"

    def peer_connections(self) -> dict[str, str]:
        return dict.fromkeys(self.connected_peers(), "direct")

    def nat_status(self) -> dict[str, Any]:
        return {"connections": self.peer_connections()}

    def penalize(self, peer: str) -> None:
        self.penalized.append(peer)

    # -- blobs (the real ones: p2p/_blobs.py, p2p/_blobserve.py) --

    async def serve_file(
        self, blob_id: bytes, path: Path, *, manifest: p2p.Manifest | None = None, pace: Any = None
    ) -> p2p.Manifest:
        self.blobs[blob_id] = p2p.BlobSource.from_file(path, manifest=manifest, pace=pace)
        return self.blobs[blob_id].manifest

    def unserve_blob(self, blob_id: bytes) -> None:
        self.blobs.pop(blob_id, None)

    def blob_fetches(self) -> list[dict[str, Any]]:
        return [p.as_dict() for p in self.fetches if p.state not in ("done", "failed")]

    async def fetch_blob(
        self,
        blob_id: bytes,
        *,
        peers: list[str],
        root: bytes,
        size: int,
        max_bytes: int,
        dest: Path,
        progress: p2p.BlobProgress,
    ) -> Path:
        self.fetches.append(progress)
        progress.blob_id = blob_id
        sources: dict[str, p2p.BlobSource] = {}
        for peer in peers:
            source = self.net.hosts[peer].blobs.get(blob_id) if self.net.linked(self.peer_id, peer) else None
            if source is None:
                progress.dropped[peer] = "unreachable or NotServed"
            elif source.manifest.root != root or source.manifest.size != size or size > max_bytes:
                progress.dropped[peer] = "manifest is not the pinned one"
            else:
                sources[peer] = source
        if not sources:
            progress.state = "failed"
            raise p2p.BlobNotFound("no acceptable manifest", peer_errors=dict(progress.dropped))
        manifest = next(iter(sources.values())).manifest
        progress.state, progress.bytes_total = "fetching", size
        progress.chunks_total = manifest.chunk_count
        part = dest.with_name(dest.name + ".part")
        fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.truncate(fd, size)
            for index in range(manifest.chunk_count):
                offset, length = manifest.chunk_range(index)
                if chunk_digest(os.pread(fd, length, offset)) == manifest.chunk_digests[index]:
                    progress.bytes_resumed += length  # verified in the part file: not fetched again
                    progress.bytes_done += length
                    continue
                await self._fetch_chunk(sources, index, fd, manifest, progress)
        finally:
            os.close(fd)
        os.replace(part, dest)
        progress.state, progress.finished_at = "done", time.monotonic()
        return dest

    async def _fetch_chunk(
        self, sources: dict[str, p2p.BlobSource], index: int, fd: int, manifest: p2p.Manifest,
        progress: p2p.BlobProgress,
    ) -> None:
        while sources:
            await asyncio.sleep(0)  # I/O yields to the loop
            peer = next(iter(sources))
            fault = self.net.hosts[peer].blob_fault
            data = sources[peer].read_chunk(index) if fault != "stall" else b""
            if fault == "corrupt":
                data = bytes(len(data))
            if fault == "stall" or chunk_digest(data) != manifest.chunk_digests[index]:
                progress.dropped[peer] = "stalled" if fault == "stall" else f"chunk {index} failed its digest"
                del sources[peer]
                continue
            os.pwrite(fd, data, manifest.chunk_range(index)[0])
            progress.bytes_done += len(data)
            progress.chunks_done += 1
            progress.sources = set(sources)
            return
        progress.state = "failed"
        raise p2p.TransferFailed("every peer was dropped", peer_errors=dict(progress.dropped))


# -- a stand-in for the training process --------------------------------------------------------------

PARAMS = 64
FRAGMENTS = ((0, 32), (32, 64))


class FakeTrainer:
    """Rounds of ``PARAMS`` parameters in two fragments; each update moves 4 entries by a small step."""

    def __init__(self, *, seed: int = 0, scale: float = 1.0) -> None:
        self.info: dict[str, Any] = {}
        self.seed = seed
        self.scale = scale
        """Initial parameters are ``scale * linspace(-1, 1)``: two scales found two different geneses."""
        self.rounds = 0
        self.commits = 0
        self.threads = 1
        self.peers_per_round: list[int | None] = []
        """The live peer count the node passed with each round."""
        self.round_gate: asyncio.Event | None = None
        """When set by a test, each round waits for it (then clears it): rounds in lockstep with the test."""

    async def start(self) -> None:
        self.info = {"device": "cpu", "task": "fake"}

    async def aclose(self) -> None:
        pass

    async def initial_params(self) -> np.ndarray:
        return (self.scale * np.linspace(-1, 1, PARAMS)).astype(np.float32)

    async def fragment_ranges(self) -> tuple[tuple[int, int], ...]:
        return FRAGMENTS

    async def params_from_checkpoint(self, path: Path) -> np.ndarray:
        """What `export` wrote (raw float32 here; the real trainer reads safetensors)."""
        params = np.frombuffer(path.read_bytes(), dtype=np.float32)
        if params.size != PARAMS:
            raise TrainerError(f"{path} is not a checkpoint of this task's model")
        return params.copy()

    async def run_round(self, fill: Fill, size: int, fragment: int, peers: int | None = None) -> RoundResult:
        fill(np.empty(size, np.float32))
        self.peers_per_round.append(peers)
        if self.round_gate is not None:
            await self.round_gate.wait()
            self.round_gate.clear()
        self.rounds += 1
        start, stop = FRAGMENTS[fragment]
        rng = np.random.default_rng([self.seed, self.rounds])
        idx = np.sort(rng.choice(stop - start, size=4, replace=False)).astype(np.uint32)
        values = (rng.standard_normal(4) * 0.01).astype(np.float32)
        payload = crdt.encode_payload("sparse-q8", stop - start, idx, values)
        await asyncio.sleep(0)
        return RoundResult(
            fragment=fragment,
            codec="sparse-q8",
            payload=payload,
            weight=1.0,
            train_loss=1.0 / self.rounds,
            update_norm=float(np.linalg.norm(values)),
            residual_norm=0.0,
            density=4 / (stop - start),
            payload_bytes=len(payload),
            staleness_policy=StalenessPolicy(expected_peers=4, max_staleness=16),
        )

    async def evaluate(self, fill: Fill, size: int) -> dict[str, float]:
        params = np.empty(size, np.float32)
        fill(params)
        return {"val_loss": float(np.abs(params).mean()), "val_accuracy": 0.5}

    async def commit(self) -> None:
        self.commits += 1

    async def set_threads(self, threads: int) -> None:
        self.threads = threads

    async def export(self, fill: Fill, size: int, path: Path) -> None:
        params = np.empty(size, np.float32)
        fill(params)
        path.write_bytes(params.tobytes())


def host_for(home: Path, net: FakeNet) -> FakeHost:
    """The host of the node whose home is ``home`` (its identity is created there if new)."""
    home.mkdir(parents=True, exist_ok=True)
    peer_id = p2p.load_or_create_identity(home / "identity.key").peer_id
    return net.hosts.get(peer_id) or net.add(peer_id)


def node_config(**sections: dict[str, Any]) -> Config:
    """A config for nodes of the unit tests: 3 rounds evaluated each, a fast anti-entropy period, and
    ``sections`` merged in (``training={...}``, ``node={...}``)."""
    base: dict[str, Any] = {"training": {"max_rounds": 3, "eval_every": 1}, "sync": {"interval_s": 0.05}}
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return Config.from_dict(base)


@contextlib.asynccontextmanager
async def running_node(
    home: Path, net: FakeNet, config: Config | None = None, *, trainer: FakeTrainer | None = None
) -> AsyncIterator[Node]:
    """A node on ``net`` running in a task until the block ends; entered once its state is loaded."""
    host = host_for(home, net)
    node = Node(Home(home), config or Config(), host=host, trainer=trainer or FakeTrainer())  # type: ignore[arg-type]
    ready = asyncio.Event()

    async def on_ready() -> None:
        ready.set()

    task = asyncio.create_task(node.run(on_ready=on_ready))
    waiting = asyncio.create_task(ready.wait())
    await asyncio.wait({task, waiting}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        waiting.cancel()
        task.result()  # raises what stopped the node
    try:
        yield node
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def records(node: Node, author: int, seqs: range) -> Iterator[crdt.Contribution]:
    """Signed records of a stranger author for ``node``'s genesis (small sparse updates), made lazily."""
    genesis = node.parts.replica.state.genesis
    n = genesis.fragment_length(0)
    return (
        crdt.make_contribution(
            signer(author),
            genesis_id=genesis.id,
            seq=seq,
            fragment=0,
            codec="sparse-q8",
            payload=crdt.encode_payload("sparse-q8", n, [seq % n], [0.01]),
            weight=1.0,
            base_version=b"\0" * 32,
        )
        for seq in seqs
    )


async def until(predicate: Callable[[], bool], *, timeout_s: float = 10.0) -> None:
    """Yield to the event loop until ``predicate()`` holds (a deadline, not a sleep: fails on timeout)."""
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)
