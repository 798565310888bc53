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

The socket may live outside the home (``[api] socket`` absolute, e.g. ``/run/meshtrain/control.sock``
under systemd) and be shared with a group (``[api] socket_group``: mode 0660, that group), so that its
members drive a system service without sudo; the group is then the access control.

Checkpoints are written by the daemon, which under systemd has its own view of the file system (a
private /tmp, no /home): ``POST /v1/checkpoint`` checks that the daemon sees the caller's directory (the
client sends its device and inode) and may write there; if not, it writes into ``<home>/checkpoints/``
and says so, or refuses naming that directory (``if_unwritable``). ``GET /v1/checkpoint`` streams the
file instead, for a caller that writes it itself (the Python API's ``state_dict``). ``POST /v1/stop``
drains and exits like SIGTERM, through the hook the service passes in (``on_stop``).

Errors are JSON ``{"error": "..."}`` with a 4xx status for a bad request and 503 while the node is
still loading its state.
"""

from __future__ import annotations

import asyncio
import grp
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

import p2p
from daemon.config import ConfigError
from daemon.node.node import Node, NodeError
from daemon.service.auth import bearer_auth
from daemon.service.logs import RingBufferHandler
from daemon.status import to_json

__all__ = ["create_app", "open_control_site", "open_tcp_control_site"]

NODE = web.AppKey("node", Node)
LOGS = web.AppKey("logs", RingBufferHandler)
ON_STOP = web.AppKey("on_stop", Callable[[], None])
DEFAULT_LOG_LINES = 100
MAX_LOG_LINES = 5000  # the ring's capacity (daemon.service.logs.RING_CAPACITY)
CHECKPOINT_DIR = "checkpoints"  # under the home: where the daemon can always write a checkpoint
CHECKPOINT_SUFFIX = ".safetensors"
STREAM_CHUNK = 1 << 20  # bytes per read of a streamed checkpoint: 1 MiB keeps the loop responsive
IF_UNWRITABLE = ("home", "refuse")
SOCKET_MODE = 0o600
GROUP_SOCKET_MODE = 0o660  # [api] socket_group: the group's members may connect too
routes = web.RouteTableDef()


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@routes.get("/v1/status")
async def status(request: web.Request) -> web.Response:
    return web.json_response(to_json(await request.app[NODE].fresh_status()))


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
    path, dir_id = body.get("path"), body.get("dir_id")
    if_unwritable = body.get("if_unwritable", "home")
    if not isinstance(path, str) or not path.endswith(CHECKPOINT_SUFFIX):
        return _error(400, 'body must be {"path": "/absolute/path/model.safetensors"}')
    if not os.path.isabs(path):
        return _error(400, "path must be absolute (the daemon's working dir is not yours)")
    if dir_id is not None and not (
        isinstance(dir_id, list) and len(dir_id) == 2 and all(type(x) is int for x in dir_id)
    ):
        return _error(400, "dir_id must be [st_dev, st_ino] of the path's directory")
    if if_unwritable not in IF_UNWRITABLE:
        return _error(400, f"if_unwritable must be one of {', '.join(IF_UNWRITABLE)}")
    node = request.app[NODE]
    target = Path(path)
    reason = _cannot_write(target.parent, dir_id)
    extra: dict[str, str] = {}
    if reason is not None:
        fallback = node.home.path / CHECKPOINT_DIR
        if if_unwritable == "refuse":
            return _error(409, f"{reason}; the daemon can write into {fallback}/")
        fallback.mkdir(mode=0o700, exist_ok=True)
        target, extra = fallback / target.name, {"relocated_from": path, "reason": reason}
    return web.json_response(await node.export_checkpoint(target) | extra)


def _cannot_write(directory: Path, dir_id: list[int] | None) -> str | None:
    """Why the daemon cannot write a file into ``directory`` as the caller sees it (None: it can)."""
    try:
        st = directory.stat()
    except OSError as exc:
        return f"the daemon cannot see {directory} ({exc.strerror}; a service's own view of the disk?)"
    if not stat.S_ISDIR(st.st_mode):
        return f"{directory} is not a directory"
    if dir_id is not None and [st.st_dev, st.st_ino] != dir_id:
        return (f"{directory} is another directory for the daemon than for you (a service's private "
                "/tmp or home?)")
    if not os.access(directory, os.W_OK):
        return f"the daemon's user may not write to {directory}"
    return None


@routes.get("/v1/checkpoint")
async def download_checkpoint(request: web.Request) -> web.StreamResponse:
    """The merged model as safetensors bytes: exported to a private file in the home, streamed, removed."""
    node = request.app[NODE]
    directory = node.home.path / CHECKPOINT_DIR
    directory.mkdir(mode=0o700, exist_ok=True)
    temp = directory / f".download-{secrets.token_hex(8)}{CHECKPOINT_SUFFIX}"
    try:
        info = await node.export_checkpoint(temp)
        response = web.StreamResponse(headers={
            "Content-Type": "application/octet-stream",
            "X-Meshtrain-State-Hash": str(info["state_hash"]),
            "X-Meshtrain-Contributions": str(info["contributions"]),
        })
        response.content_length = temp.stat().st_size
        await response.prepare(request)
        with temp.open("rb") as f:
            while chunk := await asyncio.to_thread(f.read, STREAM_CHUNK):
                await response.write(chunk)
        await response.write_eof()
        return response
    finally:
        temp.unlink(missing_ok=True)


@routes.get("/v1/invite")
async def invite(request: web.Request) -> web.Response:
    """What a joiner needs (``meshtrain invite`` turns it into a token). Never the swarm key."""
    node = request.app[NODE]
    status = await node.fresh_status()
    if status.genesis is None:
        return _error(503, "the node has no genesis yet (still loading, or fetching it from its peers)")
    return web.json_response({
        "run": status.run,
        "genesis": status.genesis,
        "task": node.config.training.task,
        "task_options": node.config.task,
        "peer_id": status.peer_id,
        "listen_addrs": status.listen_addrs,
        "relay_addrs": status.nat.relay_addrs,
        "private": bool(node.config.node.swarm_key),
    })


@routes.post("/v1/stop")
async def stop(request: web.Request) -> web.Response:
    """Drain and exit like SIGTERM (the reply goes out first: the control socket closes in the drain)."""
    on_stop = request.app.get(ON_STOP)
    if on_stop is None:
        return _error(501, "this daemon cannot be stopped over its API (send it SIGTERM)")
    asyncio.get_running_loop().call_soon(on_stop)
    return web.json_response({"stopping": True, "pid": os.getpid()})


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
    node: Node,
    *,
    logs: RingBufferHandler | None = None,
    token: str | None = None,
    on_stop: Callable[[], None] | None = None,
) -> web.Application:
    """The control app; with ``token``, every request must carry it as a bearer token; ``on_stop``
    (the service's stop event's ``set``) serves ``POST /v1/stop``."""
    app = web.Application(middlewares=[*([bearer_auth(token)] if token is not None else []), _not_loaded])
    app[NODE] = node
    if logs is not None:
        app[LOGS] = logs
    if on_stop is not None:
        app[ON_STOP] = on_stop
    app.add_routes(routes)
    return app


async def open_control_site(
    node: Node,
    socket_path: Path,
    *,
    logs: RingBufferHandler | None = None,
    group: str = "",
    on_stop: Callable[[], None] | None = None,
) -> web.AppRunner:
    """Serve the API on ``socket_path``: mode 0600, or 0660 and owned by ``group`` (``[api]
    socket_group``) when one is named. The caller owns the runner and cleans it up.

    Raises:
        ConfigError: ``group`` does not exist or this user may not give the socket to it, or the
            socket's directory does not exist (both name the key to fix).
    """
    gid = _group_id(group) if group else None
    if not socket_path.parent.is_dir():
        raise ConfigError(f"api.socket: the directory {socket_path.parent} does not exist")
    runner = web.AppRunner(create_app(node, logs=logs, on_stop=on_stop), access_log=None)
    await runner.setup()
    socket_path.unlink(missing_ok=True)
    mode = SOCKET_MODE if gid is None else GROUP_SOCKET_MODE
    old_umask = os.umask(0o777 & ~mode)  # created with its final mode, with no window where it is wider
    try:
        await web.UnixSite(runner, str(socket_path)).start()
    finally:
        os.umask(old_umask)
    try:
        if gid is not None:
            os.chown(socket_path, -1, gid)
        os.chmod(socket_path, mode)
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(
            f"api.socket_group: cannot give {socket_path} to group {group!r}: {exc.strerror}"
        ) from exc
    return runner


def _group_id(group: str) -> int:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"api.socket_group: no group {group!r} on this machine") from None


async def open_tcp_control_site(
    node: Node,
    listen: str,
    token: str,
    *,
    logs: RingBufferHandler | None = None,
    on_stop: Callable[[], None] | None = None,
) -> web.AppRunner:
    """Serve the API on TCP ``listen`` ("host:port", already validated by the config), every request
    authenticated by ``token``; the caller owns the runner and cleans it up."""
    if len(token) < 16:
        raise ValueError("the API token must be at least 16 characters")
    host, _, port = listen.rpartition(":")
    runner = web.AppRunner(create_app(node, logs=logs, token=token, on_stop=on_stop), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host.strip("[]"), int(port)).start()
    return runner
