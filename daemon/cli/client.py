"""The Python API of a running node: a small synchronous client of the control API, for scripts,
notebooks, the CLI and the cluster harness.

::

    from daemon.cli.client import ControlClient

    node = ControlClient.for_home("~/mt")          # or ControlClient("/run/meshtrain/control.sock")
    status = node.status()                          # a typed daemon.status.Status
    print(status.round, status.eval.val_loss, status.peers)
    losses = [r.train_loss for r in node.history()]
    node.pause(); node.resume(); node.start(rounds=50)
    model.load_state_dict(node.state_dict())        # the merged model, via safetensors
    node.checkpoint("/srv/models/run.safetensors")  # written by the daemon (see `checkpoint`)
    node.stop()                                     # drain and exit, like SIGTERM

Theory of operation
-------------------
One HTTP/1.1 request per call over the node's Unix control socket (or, with :meth:`over_tcp`, its
optional TCP listener and bearer token), with the standard library's ``http.client``: no event loop, so
the client works the same in a plain script, a thread, and a Jupyter kernel, whose own running loop makes
``asyncio.run`` fail. Every method maps to one route of ``daemon/service/openapi.yaml``; replies are
typed with ``daemon.status`` (msgspec checks them, so a reply of another shape fails loudly here, not
three calls later).

Exceptions::

    ControlError                    anything this client raises
    +-- DaemonNotRunning            no socket, nobody listening, the connection dropped (a ConnectionError)
    +-- AccessDenied                the socket exists but this user may not use it (a PermissionError)
    +-- DaemonTimeout               no reply within timeout_s (a TimeoutError)
    +-- RequestFailed               the daemon answered 4xx/5xx; .status, message from its {"error"}

Rejected: aiohttp's client under ``asyncio.run`` (what this was: it fails inside a running loop, and
costs 0.2 s of imports per CLI command), requests-unixsocket or httpx (a dependency for a socket
``http.client`` opens in six lines), an async API (every caller here is synchronous; an async program can
call these in a thread).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from daemon.status import RoundRecord, Status, parse_status

if TYPE_CHECKING:
    import torch

__all__ = [
    "AccessDenied",
    "Checkpoint",
    "ControlClient",
    "ControlError",
    "DaemonNotRunning",
    "DaemonTimeout",
    "RequestFailed",
    "process_alive",
]

DEFAULT_TIMEOUT_S = 30.0  # a checkpoint of a large model takes seconds; status takes milliseconds
STOP_WAIT_S = 45.0  # the daemon's drain bound (30 s) plus systemd's margin (TimeoutStopSec=45)
STOP_POLL_S = 0.1
DOWNLOAD_CHUNK = 1 << 20  # bytes per read of a streamed checkpoint
IfUnwritable = Literal["home", "refuse"]


class ControlError(Exception):
    """Base of every error this client raises."""


class DaemonNotRunning(ControlError, ConnectionError):
    """Nothing listens on the control socket (or the daemon went away mid-request)."""


class AccessDenied(ControlError, PermissionError):
    """The control socket exists, but this user may not connect to it (another user's daemon)."""


class DaemonTimeout(ControlError, TimeoutError):
    """The daemon did not answer within ``timeout_s``."""


class RequestFailed(ControlError):
    """The daemon answered with an error status; the message is its ``{"error": ...}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Checkpoint(msgspec.Struct, frozen=True, kw_only=True):
    """Where a checkpoint went and which model state it holds."""

    path: str
    """The file written (absolute, on the daemon's machine; for a download, on this one)."""
    state_hash: str
    contributions: int
    relocated_from: str | None = None
    """The path asked for, when the daemon could not write there and wrote into its home instead."""
    reason: str | None = None
    """Why it could not write there."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("meshtrain", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class ControlClient:
    """A running node's control API (see the module docstring). Each call is one request."""

    def __init__(self, socket_path: Path | str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.socket_path = Path(socket_path)
        self.timeout_s = timeout_s
        self._tcp: tuple[str, int] | None = None
        self._headers: dict[str, str] = {}

    @classmethod
    def for_home(
        cls, home: Path | str | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> ControlClient:
        """The node whose home dir is ``home`` (default: ``$MESHTRAIN_HOME`` or the per-user state dir);
        its config names the socket (``[api] socket``)."""
        from daemon.home import Home, default_home

        path = Path(home).expanduser() if home is not None else default_home()
        return cls(Home(path.absolute()).socket_path(), timeout_s=timeout_s)

    @classmethod
    def over_tcp(cls, listen: str, *, token: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> ControlClient:
        """The node's optional TCP listener (``[api] tcp_listen``, "host:port") with its bearer token."""
        host, _, port = listen.rpartition(":")
        client = cls(listen, timeout_s=timeout_s)
        client._tcp = (host.strip("[]"), int(port))
        client._headers = {"Authorization": f"Bearer {token}"}
        return client

    def __repr__(self) -> str:
        return f"ControlClient({str(self.socket_path)!r})"

    # -- typed calls ----------------------------------------------------------------------------------

    def status(self) -> Status:
        """``GET /v1/status``: peers, training, model state, NAT, counters."""
        return parse_status(self.get("/v1/status"))

    def history(self) -> list[RoundRecord]:
        """``GET /v1/history``: one record per local round (losses, norms, bytes)."""
        return msgspec.convert(self.get("/v1/history")["rounds"], list[RoundRecord])

    def peers(self) -> list[str]:
        """Peer ids connected right now."""
        return list(self.get("/v1/peers")["peers"])

    def logs(self, lines: int = 100) -> list[str]:
        """The daemon's last ``lines`` log lines (its in-memory ring)."""
        return list(self.get(f"/v1/logs?lines={lines}")["lines"])

    def limits(
        self, *, threads: int | None = None, bandwidth_bytes_per_s: int | None = None
    ) -> dict[str, Any]:
        """Read the runtime limits, or change those given (no restart)."""
        wanted = {"threads": threads, "bandwidth_bytes_per_s": bandwidth_bytes_per_s}
        body = {key: value for key, value in wanted.items() if value is not None}
        return self.post("/v1/limits", body) if body else self.get("/v1/limits")

    def connect(self, addr: str) -> str:
        """Dial a peer (a multiaddr ending in /p2p/<peer id>); returns its peer id."""
        return str(self.post("/v1/connect", {"addr": addr})["peer_id"])

    def start(self, rounds: int = 0) -> int:
        """Train ``rounds`` more local rounds (0: until stopped), even after max_rounds or with training
        off; returns the local round it trains until (0: no limit)."""
        return int(self.post("/v1/train/start", {"rounds": rounds})["until_round"])

    def pause(self) -> None:
        """Stop local compute; the node keeps merging and serving its peers."""
        self.post("/v1/train/pause")

    def resume(self) -> None:
        self.post("/v1/train/resume")

    def invite(self) -> dict[str, Any]:
        """``GET /v1/invite``: what a joiner needs (``daemon.cli.invite`` makes the token)."""
        return self.get("/v1/invite")

    def stop(self, *, wait_s: float | None = STOP_WAIT_S) -> bool:
        """Ask the daemon to drain and exit, as SIGTERM does. With ``wait_s``, wait up to that long for
        its process to end (same machine); returns whether it has (always False without waiting)."""
        pid = int(self.post("/v1/stop")["pid"])
        if wait_s is None:
            return False
        deadline = time.monotonic() + wait_s
        while process_alive(pid):
            if time.monotonic() > deadline:
                return False
            time.sleep(STOP_POLL_S)
        return True

    def checkpoint(self, path: Path | str, *, if_unwritable: IfUnwritable = "home") -> Checkpoint:
        """Have the daemon write the merged model to ``path`` (a .safetensors file; relative paths are
        this process's). Where the daemon cannot write there (another user, a read-only or private
        directory under systemd), ``"home"`` writes ``<its home>/checkpoints/<name>`` instead (the result
        says so) and ``"refuse"`` raises RequestFailed naming where it can write."""
        target = Path(path).expanduser().absolute()
        body: dict[str, Any] = {"path": str(target), "if_unwritable": if_unwritable}
        try:
            st = target.parent.stat()
        except OSError:
            pass  # our view has no such dir: the daemon's may (a service with its own mounts)
        else:
            body["dir_id"] = [st.st_dev, st.st_ino]  # the daemon checks it sees this same directory
        return msgspec.convert(self.post("/v1/checkpoint", body), Checkpoint)

    def download_checkpoint(self, path: Path | str) -> Checkpoint:
        """Stream the merged model (safetensors) over the socket and write it to ``path`` here, as this
        user: works whatever the daemon may write or this user may read of its files."""
        target = Path(path).expanduser().absolute()
        response, connection = self._open("GET", "/v1/checkpoint", None)
        try:
            self._check(response)
            partial = target.with_name(f".{target.name}.{os.getpid()}.part")
            with open(partial, "wb") as out:
                while chunk := response.read(DOWNLOAD_CHUNK):
                    out.write(chunk)
            os.replace(partial, target)
        except http.client.HTTPException as exc:
            raise self._translate(exc) from exc
        finally:
            connection.close()
        return Checkpoint(
            path=str(target),
            state_hash=response.headers.get("X-Meshtrain-State-Hash", ""),
            contributions=int(response.headers.get("X-Meshtrain-Contributions", "0")),
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The merged model as a torch ``state_dict`` (the model's own tensor names), downloaded."""
        from safetensors.torch import load_file

        with tempfile.TemporaryDirectory(prefix="meshtrain-") as tmp:
            return load_file(self.download_checkpoint(Path(tmp) / "model.safetensors").path)

    # -- raw requests ---------------------------------------------------------------------------------

    def get(self, path: str) -> Any:
        """``GET path`` and its JSON reply (RequestFailed on an error status)."""
        return self._json("GET", path, None)

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        """``POST path`` with a JSON body and its JSON reply (RequestFailed on an error status)."""
        return self._json("POST", path, body or {})

    def _json(self, method: str, path: str, body: dict[str, Any] | None) -> Any:
        response, connection = self._open(method, path, body)
        try:
            self._check(response)
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise self._translate(exc) from exc
        finally:
            connection.close()
        return json.loads(raw)

    def _open(
        self, method: str, path: str, body: dict[str, Any] | None
    ) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection]:
        connection: http.client.HTTPConnection
        if self._tcp is not None:
            connection = http.client.HTTPConnection(*self._tcp, timeout=self.timeout_s)
        else:
            connection = _UnixConnection(str(self.socket_path), self.timeout_s)
        headers = dict(self._headers)
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            connection.request(method, path, body=data, headers=headers)
            return connection.getresponse(), connection
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            raise self._translate(exc) from exc

    def _translate(self, exc: OSError | http.client.HTTPException) -> ControlError:
        """The control error an I/O failure of a request means."""
        where = self.socket_path
        if isinstance(exc, PermissionError):
            return AccessDenied(
                f"permission denied on the control socket {where}: the daemon runs as another user (join "
                "the group its [api] socket_group names, or run as that user)"
            )
        if isinstance(exc, FileNotFoundError):
            return DaemonNotRunning(f"no daemon is running (no control socket at {where})")
        if isinstance(exc, ConnectionRefusedError):
            return DaemonNotRunning(f"no daemon is running (nothing listens on {where})")
        if isinstance(exc, TimeoutError):
            return DaemonTimeout(f"the daemon on {where} did not answer within {self.timeout_s:.0f} s")
        return DaemonNotRunning(f"no daemon is answering on {where} ({exc.__class__.__name__}: {exc})")

    @staticmethod
    def _check(response: http.client.HTTPResponse) -> None:
        if response.status < 400:
            return
        raw = response.read()
        try:
            message = json.loads(raw).get("error")
        except (ValueError, AttributeError):
            message = None
        raise RequestFailed(response.status, message or f"HTTP {response.status}")


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a daemon of another user counts: EPERM means it does). A zombie
    child of ours (the cluster harness started it) is dead but still signalable: it is reaped here."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done == 0
