"""meshtrain's daemon: composes ``p2p``, ``crdt`` and ``training``.

Three wings over shared ground (``config``, ``home``, ``status``): ``node/`` runs one node, ``service/``
serves it (systemd, control API, metrics, logs), ``cli/`` is the client side (command line, cluster
harness). ``node`` imports neither of the others; ``cli`` imports no node code.
"""
