"""Prototype of daemon changes proposed to the daemon's owner, for measurement only (not a feature).

Put this directory first on the daemons' PYTHONPATH with ``MESHTRAIN_PROTOTYPE="heartbeat_s=60,
discovery_s=300"`` and every Python process started with it patches, at interpreter start:

* ``heartbeat_s``: how often membership checks whether its heartbeat is due (``daemon.node.membership.
  HEARTBEAT_S``, 5 s; it is sent on a change of state or every HEARTBEAT_REFRESH_S);
* ``discovery_s``: a fixed DHT discovery period (``p2p.HostConfig.discovery_interval_s``, 10 s doubling
  to ``discovery_max_interval_s``, 300 s, while settled; neither is in the daemon's config).

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

    _Pace = _node.DiscoveryPace

    def _fixed_pace(base_s: float, max_s: float) -> Any:
        return _Pace(float(_OPTIONS["discovery_s"]), float(_OPTIONS["discovery_s"]))

    _node.DiscoveryPace = _fixed_pace
