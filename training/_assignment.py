"""Which data a peer trains on, without coordination: the whole training set, in an order of its own.

Theory of operation
-------------------
Outside a lab cluster nobody hands out shard numbers. A node used to take shard
`hash(peer id) % num_shards` (4 by default): on 4 machines all four shards are covered only
4!/4^4 = 9.4 % of the time, and with 6 machines some data is trained twice and some never.

Two coordination-free rules were implemented and measured (bench/bench_data_assignment.py, lockstep
rounds as in bench/convergence, results in bench/results/data_assignment.json):

(a) whole set, own order: every peer streams the whole training set (shard 0 of 1) with a seed derived
    from its peer id, `data_seed(peer_id)`. Nothing to agree on; a join, a leave or a restart changes
    nothing for anyone else.
(b) member rank: shard = rank of the own id among the sorted live member ids, num_shards = member
    count (`member_shard`), re-derived whenever the member list changes, the stream resuming at the
    batches already consumed.

(a) is the default: at equal samples it matched or beat (b), and under churn (b) needs every peer's
member list to agree, which a gossiped heartbeat only approximates: until views converge, two peers
claim the same rank and a shard goes untrained, and every change reshuffles every peer's data. With
independent uniform orders the expected fraction of examples nobody has seen after the peers have
together drawn k·|train| examples is e^-k, the same as one process sampling with replacement; DiLoCo
already averages N peers' pseudo-gradients, so independent i.i.d. streams are the textbook setting,
whereas file-hash shards give each peer a skewed slice (client drift).

Explicit shards stay available (PeerTrainer(shard=, num_shards=), the task contract keeps both
arguments) for a lab cluster with a fixed roster, such as the daemon's local cluster harness.
"""

import hashlib

SEED_BYTES = 8  # 64-bit seeds (numpy takes any int >= 0): a collision is ~2^-33 even at 2^16 peers


def data_seed(peer_id: bytes | str, base_seed: int = 0) -> int:
    """The data-order seed of a peer: a hash of its id (and the configured base seed), so two peers
    never share an order and one peer keeps its order across restarts."""
    raw = peer_id.encode() if isinstance(peer_id, str) else bytes(peer_id)
    salt = (base_seed % 2**64).to_bytes(8, "little")
    digest = hashlib.blake2b(raw, digest_size=SEED_BYTES, person=b"meshtrain-data", salt=salt).digest()
    return int.from_bytes(digest, "little")
