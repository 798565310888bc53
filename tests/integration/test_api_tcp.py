"""The TCP control listener on real daemons: opt-in, bearer token required, absent when not configured."""

from __future__ import annotations

import asyncio
import os
import stat
import tomllib
from pathlib import Path

import aiohttp
import tomli_w

from daemon.cli.cluster import Cluster, _free_port
from daemon.home import Home


def _listening_tcp_ports(pid: int) -> set[int]:
    """Ports on which process ``pid`` has a listening TCP socket (Linux /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd) if fd.is_symlink() else ""
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: TCP_LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


async def _get(url: str, headers: dict[str, str]) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
        return response.status, await response.json()


def test_tcp_control_listener_needs_the_token_and_is_off_by_default(cluster_dir: Path) -> None:
    group = Cluster(cluster_dir)
    infos = group.create(2, task="digits", training={"enabled": False})
    api_port = _free_port()
    config_file = Home(Path(infos[0].home)).config_file
    config = tomllib.loads(config_file.read_text())
    config["api"] = {"tcp_listen": f"127.0.0.1:{api_port}"}
    config_file.write_text(tomli_w.dumps(config))
    for info in infos:
        group.start(info.index)
    group.wait_until(
        lambda s: all(x.get("state_hash") for x in s), timeout_s=180, what="both daemons to be ready"
    )

    token_file = Path(infos[0].home) / "api.token"  # created at first start
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip()
    url = f"http://127.0.0.1:{api_port}/v1/status"
    status, body = asyncio.run(_get(url, {}))
    assert status == 401, body
    status, body = asyncio.run(_get(url, {"Authorization": "Bearer " + "x" * len(token)}))
    assert status == 401, body
    status, body = asyncio.run(_get(url, {"Authorization": f"Bearer {token}"}))
    assert status == 200 and body["peer_id"] == infos[0].peer_id, body

    pids = [int((Path(i.home) / "daemon.pid").read_text()) for i in infos]
    assert _listening_tcp_ports(pids[0]) == {infos[0].port, api_port}
    # Not configured: no token file, and the only TCP listener is the libp2p one.
    assert not (Path(infos[1].home) / "api.token").exists()
    assert _listening_tcp_ports(pids[1]) == {infos[1].port}
