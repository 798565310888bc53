"""The optional TCP control listener: same routes, bearer token required; the token file is private."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest

from daemon.config import Config, ConfigError
from daemon.service.api import open_tcp_control_site
from daemon.service.auth import TokenFileError, load_or_create_token


class _Host:
    def connected_peers(self) -> list[str]:
        return ["12D3KooWpeer"]


def test_token_file_is_created_private_and_reused(tmp_path: Path) -> None:
    os.umask(0o022)  # a permissive umask must not leak into the file's mode
    path = tmp_path / "api.token"
    token = load_or_create_token(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(token) >= 40 and load_or_create_token(path) == token
    path.chmod(0o644)
    with pytest.raises(TokenFileError, match="0600"):
        load_or_create_token(path)


def test_tcp_listener_is_off_by_default_and_loopback_only() -> None:
    assert Config().api.tcp_listen == ""
    with pytest.raises(ConfigError, match="loopback"):
        Config.from_dict({"api": {"tcp_listen": "0.0.0.0:8466"}})
    allowed = Config.from_dict({"api": {"tcp_listen": "0.0.0.0:8466", "tcp_allow_remote": True}})
    assert allowed.api.tcp_listen == "0.0.0.0:8466"


async def test_tcp_listener_refuses_requests_without_the_token(tmp_path: Path) -> None:
    token = load_or_create_token(tmp_path / "api.token")
    node = SimpleNamespace(host=_Host())
    runner = await open_tcp_control_site(node, "127.0.0.1:0", token)  # type: ignore[arg-type]
    try:
        host, port = runner.addresses[0][:2]
        url = f"http://{host}:{port}/v1/peers"
        async with aiohttp.ClientSession() as session:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token}):
                async with session.get(url, headers=headers) as response:
                    assert response.status == 401, headers
                    assert response.headers["WWW-Authenticate"].startswith("Bearer")
                    assert "error" in await response.json()
            async with session.post(f"http://{host}:{port}/v1/train/pause") as response:
                assert response.status == 401  # refused before any handler runs
            async with session.get(url, headers={"Authorization": f"Bearer {token}"}) as response:
                assert response.status == 200
                assert await response.json() == {"peers": ["12D3KooWpeer"]}
    finally:
        await runner.cleanup()
