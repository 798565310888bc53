"""Who may drive the node over TCP: the bearer token of the optional TCP control listener.

The Unix control socket needs no token: its mode (0600) is the access control. A TCP listener
(``[api] tcp_listen``, opt-in) has no such guard, so every request must carry ``Authorization: Bearer
<token>``; the token lives in a 0600 file made by ``meshtrain init`` or at first start.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from pathlib import Path
from typing import Any

from aiohttp import web

__all__ = ["TokenFileError", "bearer_auth", "load_or_create_token"]

log = logging.getLogger(__name__)

TOKEN_BYTES = 32  # 256 bits of randomness, URL-safe base64 in the file


class TokenFileError(RuntimeError):
    """The API token file is unusable (readable by group/others, empty, or not a regular file)."""


def load_or_create_token(path: Path) -> str:
    """The TCP control listener's bearer token: read from ``path``, or created there (mode 0600, with no
    window where it is wider) when missing. A file that group or others may read is refused, as ssh
    refuses a private key: whoever reads the token drives the node."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(TOKEN_BYTES) + "\n")
            f.flush()
            os.fsync(f.fileno())
        log.info("created API token file=%s", path)
    mode = path.stat().st_mode
    if mode & 0o077:
        raise TokenFileError(f"{path}: mode {mode & 0o777:o}; the API token file must be 0600 (chmod 600)")
    token = path.read_text(encoding="utf-8").strip()
    if len(token) < 16:
        raise TokenFileError(f"{path}: the API token must be at least 16 characters")
    return token


def bearer_auth(token: str) -> Any:
    """Middleware: refuse (401) any request without ``Authorization: Bearer <token>``.

    ``hmac.compare_digest`` on bytes takes the same time wherever the first difference is, so the
    response time does not leak the token byte by byte."""
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Any) -> web.StreamResponse:
        got = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(got, expected):
            return web.json_response(
                {"error": "missing or wrong bearer token (see [api] token_file)"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="meshtrain"'},
            )
        return await handler(request)

    return check
