"""The control API: JSON over HTTP on a Unix socket in the node's home dir.

A Unix socket with mode 0600 means only the node's own user can drive it: the file system is the access
control. The CLI is just a client of this API (``daemon.client``); scripts may use it directly
(``curl --unix-socket``). The routes are described in ``daemon/openapi.yaml``.

Optionally (``[api] tcp_listen``, off by default, loopback only unless ``tcp_allow_remote``) the same
routes are also served on TCP, for tools that cannot speak to a Unix socket. There the file system is no
longer the access control, so every request must carry ``Authorization: Bearer <token>`` (the token file,
0600, see ``daemon.security.load_or_create_token``), compared in constant time; anything else is a 401
before any handler runs. Rejected: TLS and per-user tokens in the daemon (a reverse proxy or SSH port
forwarding does that better), and a token on the Unix socket (it would add nothing to mode 0600).

Errors are JSON ``{"error": "..."}`` with a 4xx status for a bad request and 503 while the node is
still loading its state.
"""

from __future__ import annotations

import dataclasses
import hmac
import os
from pathlib import Path
from typing import Any

from aiohttp import web

import p2p
from daemon.logs import RingBufferHandler
from daemon.node import Node, NodeError

__all__ = ["create_app", "full_status", "open_control_site", "open_tcp_control_site"]

NODE = web.AppKey("node", Node)
LOGS = web.AppKey("logs", RingBufferHandler)
DEFAULT_LOG_LINES = 100
MAX_LOG_LINES = 5000  # the ring's capacity (daemon.logs.RING_CAPACITY)
routes = web.RouteTableDef()


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def full_status(node: Node) -> dict[str, Any]:
    """The node's status plus the runtime knobs (limits, reloadable config) the service layer owns."""
    limits = node.limits.as_dict() | {"waited_s": round(node.limits.bucket.waited_s, 3)}
    training = node.config.training
    return node.status() | {
        "limits": limits,
        "config": {
            "log_level": node.config.log.level,
            "max_rounds": training.max_rounds,
            "eval_every": training.eval_every,
            "sync_interval_s": node.config.sync.interval_s,
        },
    }


@routes.get("/v1/status")
async def status(request: web.Request) -> web.Response:
    return web.json_response(full_status(request.app[NODE]))


@routes.get("/v1/limits")
async def get_limits(request: web.Request) -> web.Response:
    return web.json_response(request.app[NODE].limits.as_dict())


@routes.post("/v1/limits")
async def set_limits(request: web.Request) -> web.Response:
    body = await _json_body(request)
    unknown = set(body) - {"threads", "bandwidth_bytes_per_s"}
    if unknown or not body:
        return _error(400, 'body must be {"threads": n, "bandwidth_bytes_per_s": x} (either or both)')
    node = request.app[NODE]
    try:
        node.limits.set(threads=body.get("threads"), bandwidth_bytes_per_s=body.get("bandwidth_bytes_per_s"))
    except ValueError as exc:
        return _error(400, str(exc))
    return web.json_response(node.limits.as_dict())


@routes.get("/v1/logs")
async def logs(request: web.Request) -> web.Response:
    raw = request.query.get("lines", str(DEFAULT_LOG_LINES))
    if not raw.isdigit() or not 0 < int(raw) <= MAX_LOG_LINES:
        return _error(400, f"lines must be an integer in 1..{MAX_LOG_LINES}, got {raw!r}")
    ring = request.app.get(LOGS)
    return web.json_response({"lines": ring.tail(int(raw)) if ring is not None else []})


@routes.get("/v1/peers")
async def peers(request: web.Request) -> web.Response:
    node = request.app[NODE]
    return web.json_response({"peers": node.host.connected_peers()})


@routes.post("/v1/connect")
async def connect(request: web.Request) -> web.Response:
    body = await _json_body(request)
    addr = body.get("addr")
    if not isinstance(addr, str) or "/p2p/" not in addr:
        return _error(400, 'body must be {"addr": "<multiaddr ending in /p2p/<peer id>>"}')
    try:
        peer = await request.app[NODE].host.connect(addr)
    except p2p.P2PError as exc:
        return _error(502, f"could not connect to {addr}: {exc}")
    return web.json_response({"peer_id": peer})


@routes.post("/v1/train/{action}")
async def train(request: web.Request) -> web.Response:
    node = request.app[NODE]
    action = request.match_info["action"]
    if action == "pause":
        node.pause_training()
    elif action == "resume":
        node.resume_training()
    elif action == "start":
        body = await _json_body(request) if request.can_read_body else {}
        rounds = body.get("rounds", 0)
        if set(body) - {"rounds"} or isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
            return _error(400, 'body must be {"rounds": n} with n >= 0 (0 or absent: until stopped)')
        return web.json_response({"training": action, "until_round": node.start_training(rounds)})
    else:
        return _error(404, f"unknown training action {action!r} (start, pause, resume)")
    return web.json_response({"training": action})


@routes.post("/v1/checkpoint")
async def checkpoint(request: web.Request) -> web.Response:
    body = await _json_body(request)
    path = body.get("path")
    if not isinstance(path, str) or not path.endswith(".safetensors"):
        return _error(400, 'body must be {"path": "/absolute/path/model.safetensors"}')
    if not os.path.isabs(path):
        return _error(400, "path must be absolute (the daemon's working dir is not yours)")
    try:
        result = await request.app[NODE].export_checkpoint(Path(path))
    except NodeError as exc:
        return _error(503, str(exc))
    return web.json_response(result)


@routes.post("/v1/faults")
async def faults(request: web.Request) -> web.Response:
    """Fault injection for tests and drills: exchange no model data with the listed peers."""
    body = await _json_body(request)
    block = body.get("block")
    if not isinstance(block, list) or not all(isinstance(p, str) for p in block):
        return _error(400, 'body must be {"block": ["<peer id>", ...]} (an empty list heals)')
    request.app[NODE].set_blocked_peers(set(block))
    return web.json_response({"blocked_peers": sorted(block)})


@routes.get("/v1/history")
async def history(request: web.Request) -> web.Response:
    node = request.app[NODE]
    return web.json_response({"rounds": [dataclasses.asdict(r) for r in node.history]})


async def _json_body(request: web.Request) -> dict:
    try:
        body = await request.json()
    except ValueError as exc:
        raise web.HTTPBadRequest(
            text='{"error": "body is not JSON"}', content_type="application/json"
        ) from exc
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(
            text='{"error": "body must be a JSON object"}', content_type="application/json"
        )
    return body


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


def create_app(
    node: Node, *, logs: RingBufferHandler | None = None, token: str | None = None
) -> web.Application:
    """The control app; with ``token``, every request must carry it as a bearer token."""
    app = web.Application(middlewares=[bearer_auth(token)] if token is not None else [])
    app[NODE] = node
    if logs is not None:
        app[LOGS] = logs
    app.add_routes(routes)
    return app


async def open_control_site(
    node: Node, socket_path: Path, *, logs: RingBufferHandler | None = None
) -> web.AppRunner:
    """Serve the API on ``socket_path`` (mode 0600); the caller owns the runner and cleans it up."""
    runner = web.AppRunner(create_app(node, logs=logs), access_log=None)
    await runner.setup()
    socket_path.unlink(missing_ok=True)
    old_umask = os.umask(0o177)  # the socket is created 0600, with no window where it is wider
    try:
        await web.UnixSite(runner, str(socket_path)).start()
    finally:
        os.umask(old_umask)
    os.chmod(socket_path, 0o600)
    return runner


async def open_tcp_control_site(
    node: Node, listen: str, token: str, *, logs: RingBufferHandler | None = None
) -> web.AppRunner:
    """Serve the API on TCP ``listen`` ("host:port", already validated by the config), every request
    authenticated by ``token``; the caller owns the runner and cleans it up."""
    if len(token) < 16:
        raise ValueError("the API token must be at least 16 characters")
    host, _, port = listen.rpartition(":")
    runner = web.AppRunner(create_app(node, logs=logs, token=token), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host.strip("[]"), int(port)).start()
    return runner
