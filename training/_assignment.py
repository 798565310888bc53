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
    count, re-derived whenever the member list changes, the stream resuming at the
    batches already consumed.

(a) is the default. Measured 2026-12-01 (val loss after 30 lockstep rounds at equal samples, mean of
3 draws of peer ids; digits: 10 steps x batch 32 per round; stdlib-lm: 2 x 64 wide, 10 x 16):

    task       peers   hash%4   whole (a)   rank (b)
    digits     4       0.222    0.131       0.157
    digits     6       0.185    0.133       0.175
    digits     churn   0.179    0.121       0.142
    stdlib-lm  4       2.253    2.189       2.189
    stdlib-lm  6       2.208    2.172       2.161
    stdlib-lm  churn   2.187    2.158       2.149

(a) beat (b) by 15-24 % on digits (1,437 training images: a quarter of them per peer is small enough
for H local steps to drift toward it) and was within the spread of its own trials on stdlib-lm
(2.154-2.185 at 6 peers). Under churn (b) needs every peer's member list to agree, which a gossiped
heartbeat only approximates: in the lagging views of the churn scenario 2 % of the data went untrained
and 2 % was trained twice, every change reshuffles every peer's data, and a real network's views lag
more. (a) has nothing to agree on. With independent uniform orders the expected share of examples
nobody has seen after the peers together drew k·|train| examples is e^-k, as for one process sampling
with replacement; the old hash%4 rule left 25-53 % of the data untrained with 4 peers in these
draws (0-26 % with 6).

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
