"""Prototype of daemon changes proposed to the daemon's owner, for measurement only (not a feature).

Put this directory first on the daemons' PYTHONPATH with ``MESHTRAIN_PROTOTYPE="heartbeat_s=60,
discovery_s=300"`` and every Python process started with it patches, at interpreter start:

* ``heartbeat_s``: how often membership checks whether its heartbeat is due (``daemon.node.membership.
  HEARTBEAT_S``, 5 s; it is sent on a change of state or every HEARTBEAT_REFRESH_S);
* ``discovery_s``: the DHT discovery period (``p2p.HostConfig.discovery_interval_s``, 10 s, not exposed
  in the daemon's config).

``bench.convergence.background`` and ``bench.convergence --prototype`` use it to measure what those
changes would save on the wire. Remove it once the daemon has the changes (or config knobs for them).
"""

import os
from typing import Any

_SPEC = os.environ.get("MESHTRAIN_PROTOTYPE", "")
_OPTIONS = dict(item.split("=", 1) for item in _SPEC.split(",") if item)

if "heartbeat_s" in _OPTIONS:
    import daemon.node.membership as _membership

    _membership.HEARTBEAT_S = float(_OPTIONS["heartbeat_s"])

if "discovery_s" in _OPTIONS:
    import p2p._node as _node

    _run_discovery = _node.run_discovery

    async def _slower_discovery(*args: Any, interval_s: float, **kwargs: Any) -> None:
        await _run_discovery(*args, interval_s=float(_OPTIONS["discovery_s"]), **kwargs)

    _node.run_discovery = _slower_discovery
