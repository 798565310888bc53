"""One p2p.Host in its own process, driven over stdin/stdout (for tests/netns/test_nat_netns.py).

Run inside a network namespace: ``python _netns_host.py '<json config>'``. It prints one JSON line when
listening ({"peer_id", "addrs"}), then answers one JSON line per JSON command line:

* ``{"op": "status"}``: reachability, nat_status(), connections, stats, gossip received per author;
* ``{"op": "request", "peer": ID, "bytes": N, "timeout_s": T}``: send N bytes to the peer's echo handler
  (it answers the length it got); ``{"ok": bool, "error": str}``;
* ``{"op": "publish", "data": str}``: gossip on the test topic.

Logs go to stderr (the test keeps them in a file and prints their tail). To debug, list loggers to raise
to DEBUG in ``NETNS_DEBUG``, e.g. ``NETNS_DEBUG=libp2p.relay.circuit_v2.dcutr`` (libp2p's are quiet).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from typing import Any

import p2p

TOPIC = "netns/test"
ECHO = "/netns/echo/1"


async def echo(peer_id: str, data: bytes) -> bytes:
    return str(len(data)).encode()


async def main(config: dict[str, Any]) -> None:
    host_config = p2p.HostConfig(
        nat=p2p.NatConfig(**config.get("nat", {})),
        swarm_key=bytes.fromhex(config["swarm_key"]) if config.get("swarm_key") else None,
        discovery_interval_s=config.get("discovery_interval_s", 2.0),
        dial_private_addrs=True,  # the namespaces use 10.200.0.0/16
        requests=p2p.RequestLimits(max_request_bytes=64 * 1024 * 1024),  # the echo test sends MiBs
    )
    host = p2p.Host(
        p2p.Identity.generate(),
        listen_addrs=[config["listen"]],
        bootstrap=config.get("bootstrap", []),
        run_id=config.get("run_id", "netns"),
        config=host_config,
    )
    gossip: dict[str, int] = {}
    async with host:
        host.set_request_handler(ECHO, echo)
        inbox = host.subscribe(TOPIC)

        async def count_gossip() -> None:
            while True:
                message = await inbox.get()
                gossip[message.from_peer] = gossip.get(message.from_peer, 0) + 1

        counter = asyncio.create_task(count_gossip())
        reply({"peer_id": host.peer_id, "addrs": host.listen_addrs()})
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            command = json.loads(line)
            op = command["op"]
            if op == "status":
                reply(
                    {
                        "reachability": host.reachability(),
                        "nat": host.nat_status(),
                        "connections": host.peer_connections(),
                        "stats": host.stats(),
                        "gossip": gossip,
                    }
                )
            elif op == "request":
                try:
                    got = await host.request(
                        command["peer"], ECHO, b"x" * command["bytes"], timeout_s=command["timeout_s"]
                    )
                    reply({"ok": got == str(command["bytes"]).encode(), "error": ""})
                except p2p.P2PError as exc:
                    reply({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
            elif op == "publish":
                await host.publish(TOPIC, command["data"].encode())
                reply({"ok": True})
        counter.cancel()


def reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    for name in filter(None, os.environ.get("NETNS_DEBUG", "").split(",")):
        logging.getLogger(name).setLevel(logging.DEBUG)
    asyncio.run(main(json.loads(sys.argv[1])))
