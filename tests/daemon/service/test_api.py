"""The control API's checkpoint, invite and stop routes, on a stub node that records what it is asked.

The checkpoint route writes where the caller asked only if the daemon sees the caller's directory and
may write there; otherwise into ``<home>/checkpoints/`` (or a refusal naming it). Under systemd a
private /tmp is another directory with the same name (another inode), and /home is not there at all:
both are simulated here.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import msgspec
import pytest

from daemon.config import Config
from daemon.home import Home
from daemon.service.api import open_control_site
from daemon.status import Status


class _Node:
    def __init__(self, home: Path, status: Status | None, config: Config) -> None:
        self.home = Home(home)
        self.config = config
        self._status = status
        self.exported: list[Path] = []

    async def export_checkpoint(self, path: Path) -> dict[str, Any]:
        path.write_bytes(b"weights")
        self.exported.append(path)
        return {"path": str(path), "state_hash": "ab" * 32, "contributions": 4}

    def status(self) -> Status:
        assert self._status is not None
        return self._status

    async def fresh_status(self) -> Status:
        return self.status()


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Any]:
    """The app on a stub node; a test that needs its status sets ``node._status``."""
    config = Config.from_dict({"node": {"swarm_key": "swarm.key"}, "task": {"hidden": 8}})
    node = _Node(tmp_path / "home", None, config)
    node.home.create()
    stops: list[int] = []
    with tempfile.TemporaryDirectory(prefix="mt-", dir="/tmp") as short:
        socket = Path(short) / "c.sock"
        runner = await open_control_site(
            node, socket, on_stop=lambda: stops.append(1)  # type: ignore[arg-type]
        )
        connector = aiohttp.UnixConnector(path=str(socket))
        async with aiohttp.ClientSession(connector=connector) as session:

            async def request(method: str, path: str, body: Any = None) -> tuple[int, Any]:
                async with session.request(method, f"http://meshtrain{path}", json=body) as response:
                    return response.status, await response.json()

            yield SimpleNamespace(request=request, node=node, stops=stops)
        await runner.cleanup()


def _dir_id(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_dev, st.st_ino]


async def test_checkpoint_where_asked_when_the_daemon_sees_that_directory(api: Any, tmp_path: Path) -> None:
    target = tmp_path / "m.safetensors"
    body = {"path": str(target), "dir_id": _dir_id(tmp_path)}
    status, data = await api.request("POST", "/v1/checkpoint", body)
    assert status == 200 and data["path"] == str(target) and "relocated_from" not in data
    assert target.read_bytes() == b"weights"


@pytest.mark.parametrize("case", ["other directory", "invisible directory"])
async def test_checkpoint_goes_home_or_is_refused(api: Any, tmp_path: Path, case: str) -> None:
    if case == "other directory":  # same name, another inode: a service's private /tmp
        wanted = tmp_path / "m.safetensors"
        body = {"path": str(wanted), "dir_id": [_dir_id(tmp_path)[0], _dir_id(tmp_path)[1] + 1]}
        why = "another directory for the daemon"
    else:  # /home under ProtectHome: the daemon does not see it at all
        wanted = tmp_path / "not-here" / "m.safetensors"
        body = {"path": str(wanted)}
        why = "cannot see"
    home_dir = api.node.home.path / "checkpoints"
    status, data = await api.request("POST", "/v1/checkpoint", body | {"if_unwritable": "refuse"})
    assert status == 409 and why in data["error"] and str(home_dir) in data["error"]
    assert api.node.exported == []
    status, data = await api.request("POST", "/v1/checkpoint", body)  # the default: into the home
    assert status == 200 and data["path"] == str(home_dir / "m.safetensors")
    assert data["relocated_from"] == str(wanted) and why in data["reason"]
    assert (home_dir / "m.safetensors").read_bytes() == b"weights"


@pytest.mark.parametrize(
    "body",
    [
        {"path": "relative/m.safetensors"},
        {"path": "/tmp/m.pt"},
        {"path": "/tmp/m.safetensors", "dir_id": [1]},
        {"path": "/tmp/m.safetensors", "dir_id": ["1", 2]},
        {"path": "/tmp/m.safetensors", "if_unwritable": "elsewhere"},
    ],
)
async def test_checkpoint_body_is_checked_first(api: Any, body: dict[str, Any]) -> None:
    status, data = await api.request("POST", "/v1/checkpoint", body)
    assert status == 400 and data["error"]
    assert api.node.exported == []


async def test_invite_carries_the_run_never_the_swarm_key(api: Any, node_status: Status) -> None:
    api.node._status = node_status
    secret = "5ec7" * 16
    (api.node.home.path / "swarm.key").write_text(f"/key/swarm/psk/1.0.0/\n/base16/\n{secret}\n")
    status, data = await api.request("GET", "/v1/invite")
    assert status == 200
    assert data == {
        "run": node_status.run,
        "genesis": node_status.genesis,
        "task": "stdlib-lm",
        "task_options": {"hidden": 8},
        "peer_id": node_status.peer_id,
        "listen_addrs": node_status.listen_addrs,
        "relay_addrs": [],
        "private": True,
    }
    assert secret not in json.dumps(data)


async def test_invite_waits_for_the_genesis(api: Any, node_status: Status) -> None:
    api.node._status = msgspec.structs.replace(node_status, genesis=None)
    status, data = await api.request("GET", "/v1/invite")
    assert status == 503 and "genesis" in data["error"]


async def test_stop_calls_the_hook_once_per_request(api: Any) -> None:
    status, data = await api.request("POST", "/v1/stop")
    assert status == 200 and data["stopping"] is True and isinstance(data["pid"], int)
    assert api.stops == [1]


async def test_stop_without_a_hook_says_how_to_stop(tmp_path: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="mt-", dir="/tmp") as short:
        socket = Path(short) / "c.sock"
        runner = await open_control_site(object(), socket)  # type: ignore[arg-type]
        try:
            async with (
                aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(socket))) as session,
                session.post("http://meshtrain/v1/stop") as response,
            ):
                assert response.status == 501 and "SIGTERM" in (await response.json())["error"]
        finally:
            await runner.cleanup()
