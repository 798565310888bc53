"""`POST /v1/train/start`: the body is checked before the node is touched (a stub node records calls)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner

from daemon.cli.main import main
from daemon.service.api import open_control_site


class _Rounds:
    def __init__(self) -> None:
        self.started: list[int] = []

    def start(self, rounds: int = 0) -> int:
        self.started.append(rounds)
        return 10 + rounds if rounds else 0


class _Node:
    def __init__(self) -> None:
        self.parts = SimpleNamespace(rounds=_Rounds())
        self.started = self.parts.rounds.started


@pytest.mark.parametrize(
    ("body", "status", "reply"),
    [
        (None, 200, {"training": "start", "until_round": 0}),
        ({}, 200, {"training": "start", "until_round": 0}),
        ({"rounds": 3}, 200, {"training": "start", "until_round": 13}),
        ({"rounds": -1}, 400, None),
        ({"rounds": True}, 400, None),
        ({"rounds": 2.5}, 400, None),
        ({"rounds": 1, "extra": 1}, 400, None),
        ([1], 400, None),
    ],
)
async def test_start_validates_its_body(tmp_path: Path, body: Any, status: int, reply: Any) -> None:
    node = _Node()
    path = tmp_path / "control.sock"
    runner = await open_control_site(node, path)  # type: ignore[arg-type]
    try:
        connector = aiohttp.UnixConnector(path=str(path))
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.post("http://meshtrain/v1/train/start", json=body) as response,
        ):
            assert response.status == status
            data = await response.json()
    finally:
        await runner.cleanup()
    if reply is None:
        assert "rounds" in data["error"] or "JSON object" in data["error"]
        assert node.started == []
    else:
        assert data == reply and len(node.started) == 1


def test_rounds_is_for_start_only(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["train", "pause", "--rounds", "2", "--home", str(tmp_path)])
    assert result.exit_code == 2 and "train start" in result.output
    result = CliRunner().invoke(main, ["train", "start", "--rounds", "-1", "--home", str(tmp_path)])
    assert result.exit_code == 2 and "-1" in result.output
