"""The ``meshtrain`` command line: a thin client of the control API, plus init, daemon and cluster.

Every command takes ``--home`` (default: the per-user state dir) and ``--json`` (one JSON document on
stdout, for scripts). Exit codes: 0 success, 1 the operation failed, 2 bad usage (click's), 3 no daemon is
running.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from daemon.cli import render
from daemon.cli.client import ControlClient, DaemonNotRunning, RequestFailed
from daemon.cli.cluster import Cluster, ClusterError
from daemon.config import ConfigError, default_home, render_config
from daemon.home import Home
from daemon.status import parse_status

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


def _home(path: Path | None) -> Home:
    return Home((path or default_home()).resolve())


def _fail(message: str, code: int = EXIT_FAILED, *, as_json: bool = False) -> None:
    if as_json:
        click.echo(json.dumps({"error": message}))
    else:
        click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _call(home: Home, method: str, path: str, body: dict[str, Any] | None = None, *, as_json: bool) -> Any:
    try:
        client = ControlClient(home.socket_path())
        return client.get(path) if method == "GET" else client.post(path, body)
    except ConfigError as exc:
        _fail(str(exc), as_json=as_json)
    except DaemonNotRunning as exc:
        _fail(
            f"{exc}. Start it with `meshtrain daemon --home {home.path}`.", EXIT_NOT_RUNNING, as_json=as_json
        )
    except RequestFailed as exc:
        _fail(str(exc), as_json=as_json)


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


@click.group()
@click.version_option(package_name="meshtrain")
def main() -> None:
    """meshtrain: pool your machines to train one model, peer to peer."""


# -- init and daemon ----------------------------------------------------------------------------------


@main.command()
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

    node_home = _home(home)
    node_home.create()
    if node_home.config_file.exists() and not force:
        _fail(f"{node_home.config_file} exists (use --force to overwrite)", as_json=as_json)
    options: dict[str, Any] = {"run": run, "bootstrap": bootstrap, "task": task}
    if listen:
        options["listen"] = listen
    node_home.config_file.write_text(render_config(**options))
    identity = p2p.load_or_create_identity(node_home.identity_file)
    # The TCP control listener's token (used only if [api] tcp_listen is set; 0600, see SECURITY.md).
    load_or_create_token(node_home.path / node_home.load_config().api.token_file)
    result = {"home": str(node_home.path), "config": str(node_home.config_file), "peer_id": identity.peer_id}
    if as_json:
        _echo_json(result)
    else:
        console.print(f"initialized [bold]{node_home.path}[/] peer id [cyan]{identity.peer_id}[/]")


@main.command()
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

    node_home = _home(home)

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
        _fail(str(exc))
    configure_logging(config.log.level)
    try:
        run_daemon(node_home, config, reload_config=load)
    except Exception as exc:
        _fail(f"daemon failed: {_describe(exc)}")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    return f"{exc.__class__.__name__}: {exc}"


# -- talking to a running daemon ----------------------------------------------------------------------


@main.command()
@home_option
@json_option
def status(home: Path | None, as_json: bool) -> None:
    """Show the node's peers, training progress and model state."""
    data = _call(_home(home), "GET", "/v1/status", as_json=as_json)
    if as_json:
        _echo_json(data)
        return
    console.print(render.status_panel(parse_status(data)))


@main.command()
@home_option
@json_option
def doctor(home: Path | None, as_json: bool) -> None:
    """Explain this node's connectivity (NAT, relays, what to forward, which address to share)."""
    from daemon.cli.doctor import diagnose

    report = diagnose(parse_status(_call(_home(home), "GET", "/v1/status", as_json=as_json)))
    if as_json:
        _echo_json(report.as_dict())
        return
    for line in report.lines:
        click.echo(line)


@main.command()
@home_option
@json_option
def peers(home: Path | None, as_json: bool) -> None:
    """List connected peers (human output: with their contributions to the model)."""
    if as_json:
        _echo_json(_call(_home(home), "GET", "/v1/peers", as_json=as_json))
    else:
        data = _call(_home(home), "GET", "/v1/status", as_json=as_json)
        console.print(render.peers_table(parse_status(data)))


@main.command()
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for training.")
@click.option(
    "--bandwidth",
    default=None,
    metavar="RATE",
    help="Cap on sync bytes/s sent to peers: 0 (no cap), 500000, 250K, 2M, 1MiB.",
)
@home_option
@json_option
def limits(threads: int | None, bandwidth: str | None, home: Path | None, as_json: bool) -> None:
    """Show or change runtime limits (training threads, sync bandwidth cap) without a restart."""
    body: dict[str, Any] = {}
    if threads is not None:
        body["threads"] = threads
    if bandwidth is not None:
        try:
            body["bandwidth_bytes_per_s"] = render.parse_rate(bandwidth)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--bandwidth") from exc
    node_home = _home(home)
    data = (
        _call(node_home, "POST", "/v1/limits", body, as_json=as_json)
        if body
        else _call(node_home, "GET", "/v1/limits", as_json=as_json)
    )
    if as_json:
        _echo_json(data)
    else:
        console.print(render.limits_table(data))


@main.command()
@click.option("-n", "--lines", type=click.IntRange(1, 5000), default=50, show_default=True)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines until Ctrl-C.")
@home_option
@json_option
def logs(lines: int, follow: bool, home: Path | None, as_json: bool) -> None:
    """Print the daemon's recent log lines (from its in-memory ring buffer)."""
    node_home = _home(home)
    data = _call(node_home, "GET", f"/v1/logs?lines={lines}", as_json=as_json)
    if as_json:
        _echo_json(data)
        return
    shown: list[str] = data["lines"]
    for line in shown:
        console.print(render.log_line(line), highlight=False, markup=False)
    while follow:
        time.sleep(1.0)
        fresh = _call(node_home, "GET", "/v1/logs?lines=5000", as_json=False)["lines"]
        # New lines are those after the last one we printed (lines carry millisecond timestamps).
        start = len(fresh) - fresh[::-1].index(shown[-1]) if shown and shown[-1] in fresh else 0
        for line in fresh[start:]:
            console.print(render.log_line(line), highlight=False, markup=False)
        shown = fresh or shown


@main.command()
@click.argument("addr")
@home_option
@json_option
def connect(addr: str, home: Path | None, as_json: bool) -> None:
    """Connect to a peer by multiaddr (ending in /p2p/<peer id>)."""
    data = _call(_home(home), "POST", "/v1/connect", {"addr": addr}, as_json=as_json)
    if as_json:
        _echo_json(data)
    else:
        console.print(f"connected to [cyan]{data['peer_id']}[/]")


@main.command()
@click.argument("action", type=click.Choice(["start", "pause", "resume"]))
@click.option(
    "--rounds", type=click.IntRange(min=0), default=0, show_default=True,
    help="start: train this many more local rounds (0: until stopped).",
)
@home_option
@json_option
def train(action: str, rounds: int, home: Path | None, as_json: bool) -> None:
    """Start, pause or resume local training (the node keeps serving its peers).

    `start` trains even where [training] enabled is false or max_rounds was reached, until the daemon
    restarts; it also resumes a paused node."""
    if rounds and action != "start":
        raise click.UsageError("--rounds applies to `train start` only")
    body = {"rounds": rounds} if action == "start" else None
    data = _call(_home(home), "POST", f"/v1/train/{action}", body, as_json=as_json)
    if as_json:
        _echo_json(data)
    elif action == "start":
        until = data["until_round"]
        console.print(f"training: started, {f'until local round {until}' if until else 'until stopped'}")
    else:
        console.print(f"training: {action}")


@main.command()
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@home_option
@json_option
def checkpoint(path: Path, home: Path | None, as_json: bool) -> None:
    """Export the merged model to a safetensors file."""
    data = _call(_home(home), "POST", "/v1/checkpoint", {"path": str(path.resolve())}, as_json=as_json)
    if as_json:
        _echo_json(data)
    else:
        console.print(
            f"wrote {data['path']} (state {data['state_hash'][:16]}, {data['contributions']} contributions)"
        )


# -- local clusters -----------------------------------------------------------------------------------

dir_option = click.option(
    "--dir", "directory", type=click.Path(file_okay=False, path_type=Path), required=True, help="Cluster dir."
)


@main.group()
def cluster() -> None:
    """Run several nodes on this machine (tests, demos)."""


@cluster.command("up")
@dir_option
@click.option("--nodes", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option("--task", default="digits", show_default=True)
@click.option("--max-rounds", type=click.IntRange(min=0), default=0, help="Rounds per node (0: unlimited).")
@json_option
def cluster_up(directory: Path, nodes: int, task: str, max_rounds: int, as_json: bool) -> None:
    """Start N daemons bootstrapped into one mesh; return when they are connected."""
    group = Cluster(directory)
    try:
        group.up(nodes, task=task, training={"max_rounds": max_rounds})
    except ClusterError as exc:
        _fail(str(exc), as_json=as_json)
    _print_cluster(group, as_json)


@cluster.command("status")
@dir_option
@json_option
def cluster_status(directory: Path, as_json: bool) -> None:
    """Each node's status (JSON: a list of status objects)."""
    try:
        _print_cluster(Cluster(directory), as_json)
    except ClusterError as exc:
        _fail(str(exc), as_json=as_json)


@cluster.command("stop")
@dir_option
@click.option("--node", "index", type=int, required=True)
@click.option(
    "--signal", "sig", type=click.Choice(["TERM", "INT", "KILL"]), default="TERM", show_default=True
)
@json_option
def cluster_stop(directory: Path, index: int, sig: str, as_json: bool) -> None:
    """Stop (or crash, with --signal KILL) one node."""
    try:
        Cluster(directory).stop(index, sig=signal.Signals[f"SIG{sig}"])
    except ClusterError as exc:
        _fail(str(exc), as_json=as_json)
    _done(as_json, {"node": index, "stopped": True, "signal": sig})


@cluster.command("start")
@dir_option
@click.option("--node", "index", type=int, required=True)
@json_option
def cluster_start(directory: Path, index: int, as_json: bool) -> None:
    """Start one node of the cluster again."""
    try:
        pid = Cluster(directory).start(index)
    except ClusterError as exc:
        _fail(str(exc), as_json=as_json)
    _done(as_json, {"node": index, "started": True, "pid": pid})


@cluster.command("down")
@dir_option
@json_option
def cluster_down(directory: Path, as_json: bool) -> None:
    """Stop every node of the cluster."""
    try:
        Cluster(directory).down()
    except ClusterError as exc:
        _fail(str(exc), as_json=as_json)
    _done(as_json, {"down": True})


@cluster.command("partition")
@dir_option
@click.argument("groups", nargs=-1, required=True)
@json_option
def cluster_partition(directory: Path, groups: tuple[str, ...], as_json: bool) -> None:
    """Split the mesh for a drill: GROUPS like `0,1 2,3` exchange no model data across groups."""
    try:
        parsed = [[int(i) for i in group.split(",")] for group in groups]
        Cluster(directory).partition(parsed)
    except ValueError:
        _fail("groups are comma-separated node indices, e.g. `0,1 2,3`", as_json=as_json)
    except (ClusterError, DaemonNotRunning, RequestFailed) as exc:
        _fail(str(exc), as_json=as_json)
    _done(as_json, {"partitioned": [list(map(int, g.split(","))) for g in groups]})


@cluster.command("heal")
@dir_option
@json_option
def cluster_heal(directory: Path, as_json: bool) -> None:
    """Undo `cluster partition`."""
    try:
        Cluster(directory).heal()
    except (ClusterError, DaemonNotRunning, RequestFailed) as exc:
        _fail(str(exc), as_json=as_json)
    _done(as_json, {"healed": True})


@cluster.command("demo")
@dir_option
@click.option("--nodes", type=click.IntRange(1, 16), default=4, show_default=True)
@click.option("--task", default="stdlib-lm", show_default=True)
@click.option("--rounds", type=click.IntRange(min=1), default=12, show_default=True, help="Rounds per node.")
def cluster_demo(directory: Path, nodes: int, task: str, rounds: int) -> None:
    """Start a cluster, train with a live table, then plot the loss curve and print a summary."""
    from daemon.cli.demo import run_demo

    try:
        run_demo(Cluster(directory), nodes=nodes, task=task, rounds=rounds, console=console)
    except ClusterError as exc:
        _fail(str(exc))


def _print_cluster(group: Cluster, as_json: bool) -> None:
    statuses = group.status()
    if as_json:
        _echo_json(statuses)
        return
    console.print(render.cluster_table(statuses))


def _done(as_json: bool, result: dict[str, Any]) -> None:
    if as_json:
        _echo_json(result)
    else:
        console.print(", ".join(f"{k}: {v}" for k, v in result.items()))


@main.group("swarm-key")
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
        _fail(f"{path} already exists; a run's key is never overwritten")
    except OSError as exc:
        _fail(f"cannot write {path}: {exc.strerror or exc}")
    click.echo(f"wrote swarm key {path}")


if __name__ == "__main__":
    main()
