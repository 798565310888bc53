"""The command line's shared plumbing: global options, home and socket resolution, output, exit codes,
and calling the control API through ``daemon.cli.client``.

Options. ``--home``, ``--socket`` and ``--json`` are global (``meshtrain --home X status``) and, for the
first and last, also accepted after the command (``meshtrain status --home X --json``; the command's
own wins). Environment variables are explicit ``envvar=`` on the options, one name per option whatever
the command, so that ``meshtrain daemon`` and ``meshtrain config show`` read the same ones (click's
``auto_envvar_prefix`` would name them per command, ``MESHTRAIN_DAEMON_LISTEN`` against
``MESHTRAIN_CONFIG_SHOW_LISTEN``): ``MESHTRAIN_HOME``, ``MESHTRAIN_SOCKET``, ``MESHTRAIN_JSON`` (any of
1/true/yes), and the daemon's overrides (``daemon.cli.local_commands``).

Exit codes: 0 success, 1 the operation failed, 2 bad usage (click's), 3 no daemon is running. With
``--json`` every command prints exactly one JSON document on stdout, an error included
(``{"error": ...}``).

A user whose own home has no daemon while the system service runs (``contrib/systemd``: home
``/var/lib/meshtrain``, socket ``/run/meshtrain/control.sock``) is told how to reach that one, never
to start a second daemon beside it.
"""

from __future__ import annotations

import json
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console

from daemon.cli.client import AccessDenied, ControlClient, ControlError, DaemonNotRunning
from daemon.config import ConfigError
from daemon.home import Home, default_home

__all__ = [
    "EXIT_FAILED",
    "EXIT_NOT_RUNNING",
    "call",
    "client_for",
    "console",
    "echo_json",
    "fail",
    "home_of",
    "home_option",
    "json_option",
    "not_running_hint",
    "parse_options",
    "root_param",
    "socket_override",
]

EXIT_FAILED = 1
EXIT_NOT_RUNNING = 3
SYSTEM_HOME = Path("/var/lib/meshtrain")  # contrib/systemd/meshtrain.service: StateDirectory=meshtrain
SYSTEM_SOCKET = Path("/run/meshtrain/control.sock")  # its RuntimeDirectory and [api] socket
SYSTEM_UNIT = "meshtrain.service"
T = TypeVar("T")

console = Console(soft_wrap=True)  # ids and paths stay on one line, copy-pasteable


def _from_root(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """A command's --home/--json not given: the global one (``meshtrain --home X status``)."""
    if value in (None, False) and ctx.parent is not None:
        return ctx.find_root().params.get(param.name or "", value)
    return value


home_option = click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    callback=_from_root,
    help="Node state dir (default: $MESHTRAIN_HOME or ~/.local/state/meshtrain).",
)
json_option = click.option(
    "--json", "as_json", is_flag=True, callback=_from_root, help="Print one JSON document."
)


def root_param(name: str) -> Any:
    """A global option's value (None outside a command line)."""
    ctx = click.get_current_context(silent=True)
    return ctx.find_root().params.get(name) if ctx is not None else None


def socket_override() -> Path | None:
    """The global ``--socket`` (``$MESHTRAIN_SOCKET``), made absolute."""
    socket = root_param("socket")
    return Path(socket).expanduser().absolute() if socket else None


def home_of(path: Path | None) -> Home:
    return Home((path or default_home()).expanduser().absolute())


def client_for(home: Home) -> ControlClient:
    """The client of the node in ``home`` (or on the global ``--socket``). Raises ConfigError when the
    home's config cannot say where its socket is."""
    return ControlClient(socket_override() or home.socket_path())


def fail(message: str, code: int = EXIT_FAILED, *, as_json: bool = False) -> NoReturn:
    if as_json:
        click.echo(json.dumps({"error": message}))
    else:
        click.echo(f"error: {message}", err=True)
    sys.exit(code)


def call(home_path: Path | None, request: Callable[[ControlClient], T], *, as_json: bool) -> T:
    """``request(client)`` against the node of ``home_path``; every failure becomes a message and an exit
    code (3 when no daemon runs, 1 otherwise)."""
    home = home_of(home_path)
    try:
        return request(client_for(home))
    except ConfigError as exc:
        hint = ""
        if "Permission denied" in str(exc) and socket_override() is None:
            hint = f" (another user's home: name its socket instead, e.g. --socket {SYSTEM_SOCKET})"
        fail(f"{exc}{hint}", as_json=as_json)
    except DaemonNotRunning as exc:
        fail(f"{exc}. {not_running_hint(home, chosen=home_path is not None)}", EXIT_NOT_RUNNING,
             as_json=as_json)
    except AccessDenied as exc:
        fail(str(exc), as_json=as_json)
    except ControlError as exc:
        fail(str(exc), as_json=as_json)


def not_running_hint(home: Home, *, chosen: bool) -> str:
    """What to do when no daemon answers: reach the system service if that is what runs here."""
    if socket_override() is None and not chosen and home.path != SYSTEM_HOME:
        if SYSTEM_SOCKET.exists():
            return (
                f"The system service {SYSTEM_UNIT} runs a node with home {SYSTEM_HOME}: reach it with "
                f"`meshtrain --socket {SYSTEM_SOCKET} ...` (as a member of the meshtrain group) or `sudo -u "
                f"meshtrain meshtrain --home {SYSTEM_HOME} ...`; `systemctl status meshtrain` shows it"
            )
        if SYSTEM_HOME.is_dir():
            return (
                f"The system service {SYSTEM_UNIT} has its home in {SYSTEM_HOME}, but its socket "
                f"{SYSTEM_SOCKET} is absent: is it stopped? `systemctl status meshtrain` says"
            )
    return f"Start one with `meshtrain daemon --home {home.path}`"


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def parse_options(pairs: tuple[str, ...], *, flag: str) -> dict[str, Any]:
    """``("n_layer=4", "name=gpt2")`` -> ``{"n_layer": 4, "name": "gpt2"}``: each value is read as a TOML
    value (``4``, ``1e-3``, ``true``, ``[64, 64]``, ``"quoted"``), and anything that is not one as a plain
    string, so names need no quotes. Raises click.BadParameter naming ``flag``."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint=flag)
        if key in options:
            raise click.BadParameter(f"{key} is given twice", param_hint=flag)
        try:
            options[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            options[key] = raw
    return options
