"""One running node: the replica of the model, sync, training rounds, membership. No HTTP, no CLI.

Modules: ``node`` (wiring, founding and joining, status), ``replica`` (the one door: accept, counters,
proofs), ``replication`` (sans-IO pull decisions), ``sync`` (serving and pulling), ``offers`` (the
genesis and snapshots offered by request and moved as blobs), ``rounds`` (the local training loop),
``membership`` (heartbeats, goodbye), ``store`` (WAL, snapshots, genesis on disk),
``wire`` (the daemon's protocol messages), ``trainer_process`` (the training child), ``limits``
(bandwidth cap, threads), ``suspects`` (per-author update statistics), ``byzantine`` (test-only attacker).
"""

from daemon.node.node import Node, NodeError

__all__ = ["Node", "NodeError"]
