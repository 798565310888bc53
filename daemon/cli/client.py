"""A small synchronous client of the control API, for the CLI and the cluster harness.

Synchronous on purpose: the CLI does one request per command, and the harness polls several nodes in
turn; an event loop per call costs little and keeps callers simple.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp

__all__ = ["ControlClient", "DaemonNotRunning", "RequestFailed"]

DEFAULT_TIMEOUT_S = 30.0


class DaemonNotRunning(ConnectionError):
    """Nothing listens on the control socket."""


class RequestFailed(RuntimeError):
    """The daemon answered with an error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ControlClient:
    def __init__(self, socket_path: Path, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.socket_path = socket_path
        self.timeout_s = timeout_s

    def get(self, path: str) -> Any:
        return asyncio.run(self._request("GET", path, None))

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return asyncio.run(self._request("POST", path, body or {}))

    async def _request(self, method: str, path: str, body: dict[str, Any] | None) -> Any:
        if not self.socket_path.exists():
            raise DaemonNotRunning(f"no daemon is running (no control socket at {self.socket_path})")
        connector = aiohttp.UnixConnector(path=str(self.socket_path))
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        try:
            async with (
                aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
                session.request(method, f"http://meshtrain{path}", json=body) as response,
            ):
                data = await response.json(content_type=None)
                if response.status >= 400:
                    message = data.get("error") if isinstance(data, dict) else None
                    raise RequestFailed(response.status, message or f"HTTP {response.status}")
                return data
        except (aiohttp.ClientConnectionError, FileNotFoundError) as exc:
            raise DaemonNotRunning(
                f"no daemon is answering on {self.socket_path} ({exc.__class__.__name__})"
            ) from exc
