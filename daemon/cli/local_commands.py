"""Commands that need no running daemon: ``daemon`` (run one), ``id``, ``config show``, ``swarm-key``.

``daemon`` and ``config show`` take the same overrides of the config file (flags, or the environment
variables named in each flag's help), so ``config show`` prints what ``daemon`` would run with, and where
each value came from: default, file, flag or environment.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from daemon.cli.common import (
    EXIT_FAILED,
    console,
    echo_json,
    fail,
    home_of,
    home_option,
    json_option,
    socket_override,
)
from daemon.config import EX_CONFIG, Config, ConfigError, load_config_sources
from daemon.home import Home

__all__ = ["config_group", "daemon", "id_command", "swarm_key_group"]

SOURCES = {
    click.core.ParameterSource.COMMANDLINE: "flag",
    click.core.ParameterSource.ENVIRONMENT: "environment",
}

# ------------------------------------------------------------------------------------ config overrides

OVERRIDE_OPTIONS = (
    click.option("--listen", multiple=True, envvar="MESHTRAIN_LISTEN",
                 help="Listen multiaddr (repeatable; env: space-separated); overrides [node] listen."),
    click.option("--bootstrap", multiple=True, envvar="MESHTRAIN_BOOTSTRAP",
                 help="Bootstrap multiaddr (repeatable; env: space-separated); overrides [node] bootstrap."),
    click.option("--task", default=None, envvar="MESHTRAIN_TASK",
                 help="Task name, module:Factory or file.py:Class; overrides [training] task."),
    click.option("--max-rounds", type=click.IntRange(min=0), default=None, envvar="MESHTRAIN_MAX_ROUNDS",
                 help="Stop training after N rounds; overrides [training] max_rounds."),
    click.option("--no-train", is_flag=True, envvar="MESHTRAIN_NO_TRAIN",
                 help="Serve and merge the model without training locally ([training] enabled = false)."),
    click.option("--swarm-key", type=click.Path(dir_okay=False, path_type=Path), default=None,
                 envvar="MESHTRAIN_SWARM_KEY",
                 help="Swarm key file of a private run (`meshtrain swarm-key`); overrides [node] swarm_key."),
    click.option("--log-level", default=None, envvar="MESHTRAIN_LOG_LEVEL",
                 type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
                 help="Overrides [log] level."),
)
OVERRIDE_PARAMS = ("listen", "bootstrap", "task", "max_rounds", "no_train", "swarm_key", "log_level")


def override_options(command: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(OVERRIDE_OPTIONS):
        command = option(command)
    return command


def param_origins() -> dict[str, str]:
    """Where the current command's override options (and the global --socket) came from: "flag" or
    "environment" (absent: their defaults)."""
    ctx = click.get_current_context()
    origins = {}
    for owner, names in ((ctx, OVERRIDE_PARAMS), (ctx.find_root(), ("socket",))):
        for name in names:
            source = SOURCES.get(owner.get_parameter_source(name))  # type: ignore[arg-type]
            if source is not None:
                origins[name] = source
    return origins


def effective_config(
    home: Home, params: dict[str, Any], origins: dict[str, str]
) -> tuple[Config, dict[str, str]]:
    """The config ``daemon`` runs with: the home's file under the override flags in ``params`` (and the
    global ``--socket``), and where each key's value came from (``origins``: see ``param_origins``).

    Raises:
        ConfigError: the file or an override has a bad value (the message names the key).
    """
    config, sources = load_config_sources(home.path)
    swarm_key, socket = params["swarm_key"], socket_override()
    changes: dict[str, tuple[str, Any]] = {
        "node.listen": ("listen", params["listen"] or None),
        "node.bootstrap": ("bootstrap", params["bootstrap"] or None),
        "node.swarm_key": ("swarm_key", str(swarm_key.expanduser().absolute()) if swarm_key else None),
        "training.task": ("task", params["task"]),
        "training.max_rounds": ("max_rounds", params["max_rounds"]),
        "training.enabled": ("no_train", False if params["no_train"] else None),
        "log.level": ("log_level", params["log_level"]),
        "api.socket": ("socket", str(socket) if socket else None),
    }
    for key, (param, value) in changes.items():
        if value is not None:
            section, name = key.split(".")
            config = config.with_overrides(section, **{name: value})
            sources[key] = origins.get(param, "flag")
    return config, sources


# ------------------------------------------------------------------------------------ commands


@click.command()
@home_option
@override_options
def daemon(home: Path | None, **overrides: Any) -> None:
    """Run the node in the foreground until SIGTERM, SIGINT or `meshtrain stop`; SIGHUP reloads the
    config file (keeping these flags)."""
    from daemon.service.logs import configure_logging
    from daemon.service.service import run_daemon

    node_home = home_of(home)
    origins = param_origins()

    def load() -> Config:  # also on SIGHUP: the file again, under the same flags
        return effective_config(node_home, overrides, origins)[0]

    try:
        config = load()
    except ConfigError as exc:
        fail(str(exc), EX_CONFIG)  # systemd does not restart on it (RestartPreventExitStatus)
    configure_logging(config.log.level)
    try:
        run_daemon(node_home, config, reload_config=load)
    except Exception as exc:
        fail(f"daemon failed: {_describe(exc)}", EX_CONFIG if _is_config_error(exc) else EXIT_FAILED)


def _is_config_error(exc: BaseException) -> bool:
    """A failure the configuration caused (a restart would fail the same way)."""
    import p2p

    if isinstance(exc, BaseExceptionGroup):
        return all(_is_config_error(e) for e in exc.exceptions)
    return isinstance(exc, ConfigError | p2p.SwarmKeyError)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    return f"{exc.__class__.__name__}: {exc}"


@click.command("id")
@home_option
@json_option
def id_command(home: Path | None, as_json: bool) -> None:
    """Print this node's peer id, from its identity file (creates nothing, needs no daemon)."""
    import p2p

    node_home = home_of(home)
    path = node_home.identity_file
    try:
        identity = p2p.Identity.from_seed(path.read_bytes())
    except FileNotFoundError:
        fail(f"no identity in {node_home.path} (`meshtrain init --home {node_home.path}` makes one)",
             as_json=as_json)
    except (OSError, ValueError) as exc:
        fail(f"{path}: {getattr(exc, 'strerror', None) or exc}", as_json=as_json)
    if as_json:
        echo_json({"peer_id": identity.peer_id, "home": str(node_home.path)})
    else:
        click.echo(identity.peer_id)


@click.group("config")
def config_group() -> None:
    """The node's configuration."""


@config_group.command("show")
@home_option
@override_options
@json_option
def config_show(home: Path | None, as_json: bool, **overrides: Any) -> None:
    """Print the effective config (what `meshtrain daemon` with the same flags and environment would
    run with) and where each value came from: default, file, flag or environment."""
    node_home = home_of(home)
    try:
        config, sources = effective_config(node_home, overrides, param_origins())
    except ConfigError as exc:
        fail(str(exc), as_json=as_json)
    tables = config.to_dict().items()
    values = {f"{section}.{key}": value for section, table in tables for key, value in table.items()}
    if as_json:
        echo_json({
            "home": str(node_home.path),
            "file": str(node_home.config_file),
            "values": {key: {"value": value, "source": sources[key]} for key, value in values.items()},
        })
        return
    table = Table(title=f"{node_home.config_file}", title_justify="left", box=None)
    for column in ("key", "value", "source"):
        table.add_column(column)
    for key, value in values.items():
        source = sources[key]
        style = "dim" if source == "default" else "bold"
        shown = repr(value) if isinstance(value, str) else str(value)
        table.add_row(key, escape(shown), source, style=style)
    console.print(table)


@click.group("swarm-key")
def swarm_key_group() -> None:
    """Private runs: a shared secret that every member holds (see SECURITY.md)."""


@swarm_key_group.command("generate")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@json_option
def swarm_key_generate(path: Path, as_json: bool) -> None:
    """Write a new random swarm key to PATH (mode 0600; never overwrites). Copy it to every member
    over a secure channel and start each daemon with --swarm-key PATH (or [node] swarm_key)."""
    import p2p

    try:
        p2p.write_swarm_key(path)
    except FileExistsError:
        fail(f"{path} already exists; a run's key is never overwritten", as_json=as_json)
    except OSError as exc:
        fail(f"cannot write {path}: {exc.strerror or exc}", as_json=as_json)
    if as_json:
        echo_json({"path": str(path.absolute()), "written": True})
    else:
        click.echo(f"wrote swarm key {path}")
