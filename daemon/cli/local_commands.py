"""Commands that need no running daemon: ``init``, ``daemon`` (run one), ``swarm-key``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from daemon.cli.common import EXIT_FAILED, console, echo_json, fail, home_of, home_option, json_option
from daemon.config import EX_CONFIG, ConfigError
from daemon.config_template import render_config

__all__ = ["daemon", "init", "swarm_key_group"]


@click.command()
@home_option
@click.option("--run", default="default", show_default=True, help="Training run name.")
@click.option("--listen", multiple=True, help="Listen multiaddr (repeatable).")
@click.option("--bootstrap", multiple=True, help="Bootstrap peer multiaddr (repeatable).")
@click.option("--task", default="stdlib-lm", show_default=True, help="Task name or module:factory.")
@click.option("--force", is_flag=True, help="Overwrite an existing config file.")
@json_option
def init(
    home: Path | None,
    run: str,
    listen: tuple[str, ...],
    bootstrap: tuple[str, ...],
    task: str,
    force: bool,
    as_json: bool,
) -> None:
    """Create the home dir, a commented config file, the node identity and the API token file."""
    import p2p
    from daemon.service.auth import load_or_create_token

    node_home = home_of(home)
    options: dict[str, Any] = {"run": run, "bootstrap": bootstrap, "task": task}
    if listen:
        options["listen"] = listen
    try:
        text = render_config(**options)
    except ConfigError as exc:  # a bad --run, --listen, --bootstrap: nothing is written
        raise click.BadParameter(str(exc)) from exc
    node_home.create()
    if node_home.config_file.exists() and not force:
        fail(f"{node_home.config_file} exists (use --force to overwrite)", as_json=as_json)
    node_home.config_file.write_text(text)
    identity = p2p.load_or_create_identity(node_home.identity_file)
    # The TCP control listener's token (used only if [api] tcp_listen is set; 0600, see SECURITY.md).
    load_or_create_token(node_home.path / node_home.load_config().api.token_file)
    result = {"home": str(node_home.path), "config": str(node_home.config_file), "peer_id": identity.peer_id}
    if as_json:
        echo_json(result)
    else:
        console.print(f"initialized [bold]{node_home.path}[/] peer id [cyan]{identity.peer_id}[/]")


@click.command()
@home_option
@click.option("--listen", multiple=True, help="Listen multiaddr (repeatable); overrides the config.")
@click.option(
    "--bootstrap", multiple=True, help="Bootstrap peer multiaddr (repeatable); overrides the config."
)
@click.option("--task", default=None, help="Task name or module:factory; overrides the config.")
@click.option("--max-rounds", type=click.IntRange(min=0), default=None, help="Stop training after N rounds.")
@click.option("--no-train", is_flag=True, help="Serve and merge the model without training locally.")
@click.option(
    "--swarm-key",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Swarm key file of a private run (see `meshtrain swarm-key`); overrides [node] swarm_key.",
)
@click.option(
    "--log-level",
    default=None,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]),
    help="Overrides [log] level of the config.",
)
def daemon(
    home: Path | None,
    listen: tuple[str, ...],
    bootstrap: tuple[str, ...],
    task: str | None,
    max_rounds: int | None,
    no_train: bool,
    swarm_key: Path | None,
    log_level: str | None,
) -> None:
    """Run the node in the foreground until SIGTERM or SIGINT; SIGHUP reloads the config file."""
    from daemon.config import Config
    from daemon.service.logs import configure_logging
    from daemon.service.service import run_daemon

    node_home = home_of(home)

    def load() -> Config:
        # Also used on SIGHUP, so that a reload keeps the flags this daemon was started with.
        config = node_home.load_config()
        config = config.with_overrides("node", listen=listen or None, bootstrap=bootstrap or None)
        if swarm_key is not None:
            config = config.with_overrides("node", swarm_key=str(swarm_key.expanduser().absolute()))
        config = config.with_overrides(
            "training", task=task, max_rounds=max_rounds, enabled=False if no_train else None
        )
        return config.with_overrides("log", level=log_level)

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


@click.group("swarm-key")
def swarm_key_group() -> None:
    """Private runs: a shared secret that every member holds (see SECURITY.md)."""


@swarm_key_group.command("generate")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def swarm_key_generate(path: Path) -> None:
    """Write a new random swarm key to PATH (mode 0600; never overwrites). Copy it to every member
    over a secure channel and start each daemon with --swarm-key PATH (or [node] swarm_key)."""
    import p2p

    try:
        p2p.write_swarm_key(path)
    except FileExistsError:
        fail(f"{path} already exists; a run's key is never overwritten")
    except OSError as exc:
        fail(f"cannot write {path}: {exc.strerror or exc}")
    click.echo(f"wrote swarm key {path}")
