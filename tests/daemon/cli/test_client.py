"""daemon.cli.client: the Python API over a real node's control socket (the client runs in a thread, as
a script or a notebook would run it beside the daemon's loop)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import ROUNDS, Served
from node_testlib import until

from daemon.cli.client import (
    AccessDenied,
    ControlClient,
    DaemonNotRunning,
    RequestFailed,
    process_alive,
)
from daemon.service.api import open_tcp_control_site
from daemon.status import RoundRecord, Status, TrainingState


async def test_typed_status_and_history(served_node: Served) -> None:
    client = ControlClient(served_node.socket)
    status = await asyncio.to_thread(client.status)
    assert isinstance(status, Status)
    assert status.peer_id == served_node.node.host.peer_id
    assert status.round == ROUNDS and status.training == TrainingState.DONE
    history = await asyncio.to_thread(client.history)
    assert [r.round for r in history] == list(range(1, ROUNDS + 1))
    assert all(isinstance(r, RoundRecord) and r.train_loss > 0 for r in history)
    assert await asyncio.to_thread(client.peers) == []


async def test_pause_resume_start(served_node: Served) -> None:
    client, node = ControlClient(served_node.socket), served_node.node
    gate = node.trainer.round_gate = asyncio.Event()  # each round waits for the test
    assert await asyncio.to_thread(client.start, 3) == ROUNDS + 3  # the node had finished its rounds
    await until(lambda: node.status().training == TrainingState.RUNNING)
    await asyncio.to_thread(client.pause)
    gate.set()  # the round in flight ends; the next one waits for resume
    await until(lambda: node.status().training == TrainingState.PAUSED)
    assert node.status().round == ROUNDS + 1
    await asyncio.to_thread(client.resume)
    gate.set()
    await until(lambda: node.status().round == ROUNDS + 2)


async def test_checkpoint_to_a_file_and_to_a_state_dict(served_node: Served, tmp_path: Path) -> None:
    client = ControlClient(served_node.socket)
    state = served_node.node.status()
    written = await asyncio.to_thread(client.checkpoint, tmp_path / "model.safetensors")
    assert written.path == str(tmp_path / "model.safetensors") and written.relocated_from is None
    assert written.state_hash == state.state_hash and written.contributions == state.contributions
    state_dict = await asyncio.to_thread(client.state_dict)
    assert list(state_dict) == ["weight"]
    from safetensors.numpy import load_file

    assert np.array_equal(state_dict["weight"].numpy(), load_file(written.path)["weight"])
    # The streamed export's temporary file leaves the daemon's home (once the handler has finished).
    await until(lambda: not any((served_node.home / "checkpoints").iterdir()))


async def test_stop_calls_the_services_hook(served_node: Served) -> None:
    client = ControlClient(served_node.socket)
    assert await asyncio.to_thread(lambda: client.stop(wait_s=None)) is False
    assert served_node.stops == ["stop"]


async def test_errors_say_what_happened(served_node: Served, tmp_path: Path) -> None:
    with pytest.raises(DaemonNotRunning, match="no control socket"):
        ControlClient(tmp_path / "absent.sock").status()
    client = ControlClient(served_node.socket)
    with pytest.raises(RequestFailed, match="lines must be") as failed:
        await asyncio.to_thread(client.logs, 0)
    assert failed.value.status == 400


async def test_a_socket_of_another_user_is_access_denied(
    served_node: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EACCES from connect (root bypasses file modes, so the error is injected)."""

    def refuse(self: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("daemon.cli.client._UnixConnection.connect", refuse)
    with pytest.raises(AccessDenied, match="another user"):
        ControlClient(served_node.socket).status()


async def test_over_tcp_with_the_bearer_token(served_node: Served) -> None:
    token = "t" * 32
    runner = await open_tcp_control_site(served_node.node, "127.0.0.1:0", token)
    try:
        port = runner.addresses[0][1]
        good = ControlClient.over_tcp(f"127.0.0.1:{port}", token=token)
        assert (await asyncio.to_thread(good.status)).peer_id == served_node.node.host.peer_id
        bad = ControlClient.over_tcp(f"127.0.0.1:{port}", token="x" * 32)
        with pytest.raises(RequestFailed, match="bearer token") as failed:
            await asyncio.to_thread(bad.status)
        assert failed.value.status == 401
    finally:
        await runner.cleanup()


def test_for_home_reads_the_socket_from_the_config(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text('[api]\nsocket = "/run/meshtrain/control.sock"\n')
    assert ControlClient.for_home(tmp_path).socket_path == Path("/run/meshtrain/control.sock")
    (tmp_path / "config.toml").write_text("")
    assert ControlClient.for_home(tmp_path).socket_path == tmp_path / "control.sock"


def test_process_alive() -> None:
    assert process_alive(os.getpid())
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    assert not process_alive(pid)
