"""The control API: JSON over HTTP on a Unix socket in the node's home dir.

A Unix socket with mode 0600 means only the node's own user can drive it: the file system is the access
control. The CLI is just a client of this API (``daemon.cli.client``); scripts may use it directly
(``curl --unix-socket``). The routes are described in ``daemon/service/openapi.yaml``.

Optionally (``[api] tcp_listen``, off by default, loopback only unless ``tcp_allow_remote``) the same
routes are also served on TCP, for tools that cannot speak to a Unix socket. There the file system is no
longer the access control, so every request must carry ``Authorization: Bearer <token>`` (the token file,
0600, see ``daemon.service.auth.load_or_create_token``), compared in constant time; anything else is a 401
before any handler runs. Rejected: TLS and per-user tokens in the daemon (a reverse proxy or SSH port
forwarding does that better), and a token on the Unix socket (it would add nothing to mode 0600).

Errors are JSON ``{"error": "..."}`` with a 4xx status for a bad request and 503 while the node is
still loading its state.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from aiohttp import web

import p2p
from daemon.node.node import Node, NodeError
from daemon.service.auth import bearer_auth
from daemon.service.logs import RingBufferHandler
from daemon.status import to_json

__all__ = ["create_app", "open_control_site", "open_tcp_control_site"]

NODE = web.AppKey("node", Node)
LOGS = web.AppKey("logs", RingBufferHandler)
DEFAULT_LOG_LINES = 100
MAX_LOG_LINES = 5000  # the ring's capacity (daemon.service.logs.RING_CAPACITY)
routes = web.RouteTableDef()


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@routes.get("/v1/status")
async def status(request: web.Request) -> web.Response:
    return web.json_response(to_json(request.app[NODE].status()))


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
    rounds = request.app[NODE].parts.rounds
    action = request.match_info["action"]
    if action == "pause":
        rounds.pause()
    elif action == "resume":
        rounds.resume()
    elif action == "start":
        body = await _json_body(request) if request.can_read_body else {}
        more = body.get("rounds", 0)
        if set(body) - {"rounds"} or isinstance(more, bool) or not isinstance(more, int) or more < 0:
            return _error(400, 'body must be {"rounds": n} with n >= 0 (0 or absent: until stopped)')
        return web.json_response({"training": action, "until_round": rounds.start(more)})
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
    return web.json_response(await request.app[NODE].export_checkpoint(Path(path)))


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
    return web.json_response({"rounds": [to_json(r) for r in request.app[NODE].history()]})


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


@web.middleware
async def _not_loaded(request: web.Request, handler: Any) -> web.StreamResponse:
    """A request that needs the model state while the node is still loading it: 503."""
    try:
        return await handler(request)
    except NodeError as exc:
        return _error(503, str(exc))


def create_app(
    node: Node, *, logs: RingBufferHandler | None = None, token: str | None = None
) -> web.Application:
    """The control app; with ``token``, every request must carry it as a bearer token."""
    app = web.Application(middlewares=[*([bearer_auth(token)] if token is not None else []), _not_loaded])
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
