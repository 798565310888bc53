"""The command line's shared plumbing: options, home resolution, output, exit codes, calling the API.

Every command takes ``--home`` (default: the per-user state dir) and ``--json`` (one JSON document on
stdout, for scripts). Exit codes: 0 success, 1 the operation failed, 2 bad usage (click's), 3 no daemon is
running.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console

from daemon.cli.client import ControlClient, DaemonNotRunning, RequestFailed
from daemon.config import ConfigError, default_home
from daemon.home import Home

__all__ = [
    "EXIT_FAILED",
    "EXIT_NOT_RUNNING",
    "call",
    "console",
    "echo_json",
    "fail",
    "home_of",
    "home_option",
    "json_option",
]

EXIT_FAILED = 1
EXIT_NOT_RUNNING = 3

console = Console()
home_option = click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Node state dir (default: $MESHTRAIN_HOME or ~/.local/state/meshtrain).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")


def home_of(path: Path | None) -> Home:
    return Home((path or default_home()).resolve())


def fail(message: str, code: int = EXIT_FAILED, *, as_json: bool = False) -> NoReturn:
    if as_json:
        click.echo(json.dumps({"error": message}))
    else:
        click.echo(f"error: {message}", err=True)
    sys.exit(code)


def call(home: Home, method: str, path: str, body: dict[str, Any] | None = None, *, as_json: bool) -> Any:
    try:
        client = ControlClient(home.socket_path())
        return client.get(path) if method == "GET" else client.post(path, body)
    except ConfigError as exc:
        fail(str(exc), as_json=as_json)
    except DaemonNotRunning as exc:
        fail(
            f"{exc}. Start it with `meshtrain daemon --home {home.path}`.", EXIT_NOT_RUNNING, as_json=as_json
        )
    except RequestFailed as exc:
        fail(str(exc), as_json=as_json)


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))
