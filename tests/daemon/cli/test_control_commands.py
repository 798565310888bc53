"""The commands that talk to a daemon, against a real node's control socket: checkpoint paths land where
the user looks (or in the daemon's home, said so), stop, invite, status and doctor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ROUNDS, Served, invoke

from daemon.cli.invite import decode_invite
from daemon.service import api


async def test_checkpoint_relative_to_the_callers_working_dir(
    served_node: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = await invoke("--socket", str(served_node.socket), "checkpoint", "out/model.safetensors")
    assert result.exit_code == 2 and f"no directory {tmp_path / 'out'}" in result.output
    (tmp_path / "out").mkdir()
    result = await invoke("--socket", str(served_node.socket), "checkpoint", "out/model.safetensors")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert f"wrote {tmp_path / 'out' / 'model.safetensors'}" in result.output


async def test_checkpoint_where_the_daemon_cannot_write(
    served_node: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon does not see the caller's directory (a service's ProtectHome; the daemon's view is
    faked here, as it runs in this process): into its home, or refused."""
    monkeypatch.setattr(api, "_cannot_write", lambda directory, _: f"the daemon cannot see {directory}")
    wanted = str(tmp_path / "model.safetensors")
    sock = ["--socket", str(served_node.socket)]
    refused = await invoke(*sock, "checkpoint", wanted, "--if-unwritable", "refuse", "--json")
    assert refused.exit_code == 1
    assert str(served_node.home / "checkpoints") in json.loads(refused.stdout)["error"]
    moved = await invoke(*sock, "checkpoint", wanted)
    assert moved.exit_code == 0, moved.output
    assert f"could not write {wanted}" in moved.output and "in the daemon's home instead" in moved.output
    assert not Path(wanted).exists()
    assert (served_node.home / "checkpoints" / "model.safetensors").is_file()
    downloaded = await invoke(*sock, "checkpoint", str(tmp_path / "mine.safetensors"), "--download", "--json")
    assert json.loads(downloaded.stdout)["path"] == str(tmp_path / "mine.safetensors")
    assert (tmp_path / "mine.safetensors").read_bytes() == (
        served_node.home / "checkpoints" / "model.safetensors"
    ).read_bytes()
    bad = await invoke(*sock, "checkpoint", "model.pt")
    assert bad.exit_code == 2 and ".safetensors" in bad.output


async def test_stop(served_node: Served) -> None:
    result = await invoke("--socket", str(served_node.socket), "stop", "--no-wait")
    assert result.exit_code == 0 and "stopping" in result.output
    assert served_node.stops == ["stop"]


async def test_invite_prints_a_token_of_this_run(served_node: Served) -> None:
    sock = ["--socket", str(served_node.socket)]
    result = await invoke(*sock, "invite")
    assert result.exit_code == 1 and "--include-loopback" in result.output  # a loopback-only node
    result = await invoke(*sock, "invite", "--include-loopback", "--addr", "/dns4/mt.example/tcp/4001")
    assert result.exit_code == 0
    token = result.stdout.strip()
    invite = decode_invite(token)
    status = served_node.node.status()
    assert invite.run == "served" and invite.genesis == status.genesis and invite.task == "stdlib-lm"
    assert invite.task_options == {"hidden": 8} and invite.private is False
    assert invite.bootstrap == [f"/dns4/mt.example/tcp/4001/p2p/{status.peer_id}", *status.listen_addrs]
    assert "meshtrain init --join" in result.stderr


async def test_status_panel(served_node: Served) -> None:
    result = await invoke("--socket", str(served_node.socket), "status")
    assert result.exit_code == 0 and served_node.node.host.peer_id[:12] in result.output
    assert str(ROUNDS) in result.output


async def test_doctor_with_a_daemon_adds_its_connectivity(served_node: Served) -> None:
    result = await invoke("--socket", str(served_node.socket), "--home", str(served_node.home), "doctor",
                          "--json")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    names = [check["name"] for check in report["checks"]]
    assert names[0] == "daemon" and "ports" not in names and "last run" not in names  # it holds them
    assert report["connectivity"]["verdict"] in ("ok", "warn", "problem")
    human = await invoke("--socket", str(served_node.socket), "--home", str(served_node.home), "doctor")
    assert "connectivity" in human.output and "reachability" in human.output
