"""Commands that talk to a running daemon over its control socket (``daemon.cli.client``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from daemon.cli import render
from daemon.cli.common import call, console, echo_json, home_of, home_option, json_option
from daemon.status import parse_status

__all__ = ["checkpoint", "connect", "doctor", "limits", "logs", "peers", "status", "train"]


@click.command()
@home_option
@json_option
def status(home: Path | None, as_json: bool) -> None:
    """Show the node's peers, training progress and model state."""
    data = call(home_of(home), "GET", "/v1/status", as_json=as_json)
    if as_json:
        echo_json(data)
        return
    console.print(render.status_panel(parse_status(data)))


@click.command()
@home_option
@json_option
def doctor(home: Path | None, as_json: bool) -> None:
    """Explain this node's connectivity (NAT, relays, what to forward, which address to share)."""
    from daemon.cli.doctor import diagnose

    report = diagnose(parse_status(call(home_of(home), "GET", "/v1/status", as_json=as_json)))
    if as_json:
        echo_json(report.as_dict())
        return
    for line in report.lines:
        click.echo(line)


@click.command()
@home_option
@json_option
def peers(home: Path | None, as_json: bool) -> None:
    """List connected peers (human output: with their contributions to the model)."""
    if as_json:
        echo_json(call(home_of(home), "GET", "/v1/peers", as_json=as_json))
    else:
        data = call(home_of(home), "GET", "/v1/status", as_json=as_json)
        console.print(render.peers_table(parse_status(data)))


@click.command()
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
    node_home = home_of(home)
    data = (
        call(node_home, "POST", "/v1/limits", body, as_json=as_json)
        if body
        else call(node_home, "GET", "/v1/limits", as_json=as_json)
    )
    if as_json:
        echo_json(data)
    else:
        console.print(render.limits_table(data))


@click.command()
@click.option("-n", "--lines", type=click.IntRange(1, 5000), default=50, show_default=True)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines until Ctrl-C.")
@home_option
@json_option
def logs(lines: int, follow: bool, home: Path | None, as_json: bool) -> None:
    """Print the daemon's recent log lines (from its in-memory ring buffer)."""
    node_home = home_of(home)
    data = call(node_home, "GET", f"/v1/logs?lines={lines}", as_json=as_json)
    if as_json:
        echo_json(data)
        return
    shown: list[str] = data["lines"]
    for line in shown:
        console.print(render.log_line(line), highlight=False, markup=False)
    while follow:
        time.sleep(1.0)
        fresh = call(node_home, "GET", "/v1/logs?lines=5000", as_json=False)["lines"]
        # New lines are those after the last one we printed (lines carry millisecond timestamps).
        start = len(fresh) - fresh[::-1].index(shown[-1]) if shown and shown[-1] in fresh else 0
        for line in fresh[start:]:
            console.print(render.log_line(line), highlight=False, markup=False)
        shown = fresh or shown


@click.command()
@click.argument("addr")
@home_option
@json_option
def connect(addr: str, home: Path | None, as_json: bool) -> None:
    """Connect to a peer by multiaddr (ending in /p2p/<peer id>)."""
    data = call(home_of(home), "POST", "/v1/connect", {"addr": addr}, as_json=as_json)
    if as_json:
        echo_json(data)
    else:
        console.print(f"connected to [cyan]{data['peer_id']}[/]")


@click.command()
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
    data = call(home_of(home), "POST", f"/v1/train/{action}", body, as_json=as_json)
    if as_json:
        echo_json(data)
    elif action == "start":
        until = data["until_round"]
        console.print(f"training: started, {f'until local round {until}' if until else 'until stopped'}")
    else:
        console.print(f"training: {action}")


@click.command()
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@home_option
@json_option
def checkpoint(path: Path, home: Path | None, as_json: bool) -> None:
    """Export the merged model to a safetensors file."""
    data = call(home_of(home), "POST", "/v1/checkpoint", {"path": str(path.resolve())}, as_json=as_json)
    if as_json:
        echo_json(data)
    else:
        console.print(
            f"wrote {data['path']} (state {data['state_hash'][:16]}, {data['contributions']} contributions)"
        )
