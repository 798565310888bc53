"""Commands that talk to a running daemon over its control socket (``daemon.cli.client``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, cast

import click
import msgspec

from daemon.cli import render
from daemon.cli.client import ControlClient, ControlError, IfUnwritable
from daemon.cli.common import (
    call,
    client_for,
    console,
    echo_json,
    fail,
    home_of,
    home_option,
    json_option,
    not_running_hint,
)
from daemon.config import ConfigError
from daemon.status import to_json

__all__ = ["checkpoint", "connect", "doctor", "invite", "limits", "logs", "peers", "status", "stop", "train"]

FOLLOW_POLL_S = 1.0  # `logs -f`: the ring buffer is polled; a second is what a person watching needs


@click.command()
@home_option
@json_option
def status(home: Path | None, as_json: bool) -> None:
    """Show the node's peers, training progress and model state."""
    result = call(home, ControlClient.status, as_json=as_json)
    if as_json:
        echo_json(to_json(result))
    else:
        console.print(render.status_panel(result))


@click.command()
@home_option
@json_option
def doctor(home: Path | None, as_json: bool) -> None:
    """Check this node: config, identity, ports, disk, torch and CUDA, clock, the last run's log; with
    its daemon running, also its connectivity (NAT, relays, what to forward, which address to share),
    its disk and the genesis offers it refused."""
    from daemon.cli.checkup import Check, local_checks, worst
    from daemon.cli.doctor import diagnose

    node_home = home_of(home)
    status = None
    try:
        status = client_for(node_home).status()
        daemon = Check("daemon", "ok", f"running: pid {status.pid}, peer id {status.peer_id}")
    except (ControlError, ConfigError) as exc:
        hint = not_running_hint(node_home, chosen=home is not None)
        daemon = Check("daemon", "warn", f"{exc}. {hint}")
    checks = [daemon, *local_checks(node_home, daemon_running=status is not None)]
    report = diagnose(status) if status is not None else None
    verdict = worst([c.verdict for c in checks] + ([report.verdict] if report else []))
    if as_json:
        echo_json({"verdict": verdict, "checks": [c.as_dict() for c in checks],
                   "connectivity": report.as_dict() if report else None})
        return
    click.echo(f"verdict: {verdict}")
    for check in checks:
        click.echo(f"{check.verdict:>7}  {check.name}: {check.detail}")
        for line in check.lines:
            click.echo(f"         | {line}")
    if report is not None:
        click.echo("\nconnectivity")
        for line in report.lines:
            click.echo(f"  {line}" if line else "")


@click.command()
@home_option
@json_option
def peers(home: Path | None, as_json: bool) -> None:
    """List connected peers (human output: with their contributions to the model)."""
    if as_json:
        echo_json({"peers": call(home, ControlClient.peers, as_json=as_json)})
    else:
        console.print(render.peers_table(call(home, ControlClient.status, as_json=as_json)))


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
    rate = None
    if bandwidth is not None:
        try:
            rate = render.parse_rate(bandwidth)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--bandwidth") from exc
    data = call(home, lambda c: c.limits(threads=threads, bandwidth_bytes_per_s=rate), as_json=as_json)
    if as_json:
        echo_json(data)
    else:
        console.print(render.limits_table(data))


@click.command()
@click.option("-n", "--lines", type=click.IntRange(1, 5000), default=50, show_default=True)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines until Ctrl-C (not with --json).")
@home_option
@json_option
def logs(lines: int, follow: bool, home: Path | None, as_json: bool) -> None:
    """Print the daemon's recent log lines (from its in-memory ring buffer)."""
    if follow and as_json:
        raise click.UsageError("--follow prints lines as they come; with --json, poll `logs -n N --json`")
    shown = call(home, lambda c: c.logs(lines), as_json=as_json)
    if as_json:
        echo_json({"lines": shown})
        return
    for line in shown:
        console.print(render.log_line(line), highlight=False, markup=False)
    while follow:
        time.sleep(FOLLOW_POLL_S)
        fresh = call(home, lambda c: c.logs(5000), as_json=False)
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
    peer = call(home, lambda c: c.connect(addr), as_json=as_json)
    if as_json:
        echo_json({"peer_id": peer})
    else:
        console.print(f"connected to [cyan]{peer}[/]")


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
    result: dict[str, Any] = {"training": action}
    if action == "start":
        result["until_round"] = call(home, lambda c: c.start(rounds), as_json=as_json)
    else:
        call(home, ControlClient.pause if action == "pause" else ControlClient.resume, as_json=as_json)
    if as_json:
        echo_json(result)
    elif action == "start":
        until = result["until_round"]
        console.print(f"training: started, {f'until local round {until}' if until else 'until stopped'}")
    else:
        console.print(f"training: {action}")


@click.command()
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--if-unwritable", type=click.Choice(["home", "refuse"]), default="home", show_default=True,
    help="Where the daemon cannot write PATH (a system service): write into its home's checkpoints/ "
    "instead, or refuse.",
)
@click.option(
    "--download", is_flag=True,
    help="Stream the model over the control socket and write PATH as yourself (any daemon, any user).",
)
@home_option
@json_option
def checkpoint(path: Path, if_unwritable: str, download: bool, home: Path | None, as_json: bool) -> None:
    """Export the merged model to a safetensors file (PATH relative to your working dir)."""
    if path.suffix != ".safetensors":
        raise click.BadParameter("must end in .safetensors", param_hint="PATH")
    if not path.absolute().parent.is_dir():
        raise click.BadParameter(f"no directory {path.absolute().parent}", param_hint="PATH")
    if download:
        result = call(home, lambda c: c.download_checkpoint(path), as_json=as_json)
    else:
        mode = cast(IfUnwritable, if_unwritable)
        result = call(home, lambda c: c.checkpoint(path, if_unwritable=mode), as_json=as_json)
    if as_json:
        echo_json(msgspec.to_builtins(result))
        return
    if result.relocated_from:
        console.print(f"[yellow]the daemon could not write {result.relocated_from}[/]: {result.reason}",
                      highlight=False)
    where = " (in the daemon's home instead)" if result.relocated_from else ""
    console.print(
        f"wrote {result.path}{where}: state {result.state_hash[:16]}, {result.contributions} contributions",
        highlight=False,
    )


@click.command()
@click.option("--no-wait", is_flag=True, help="Return at once instead of waiting for the daemon to exit.")
@home_option
@json_option
def stop(no_wait: bool, home: Path | None, as_json: bool) -> None:
    """Ask the daemon to drain and exit, as SIGTERM does (a system service: `systemctl stop` instead,
    or systemd restarts it only if it failed)."""
    exited = call(home, lambda c: c.stop(wait_s=None if no_wait else 45.0), as_json=as_json)
    if not no_wait and not exited:
        fail("the daemon was asked to stop but is still running after 45 s", as_json=as_json)
    if as_json:
        echo_json({"stopping": True, "exited": exited})
    else:
        console.print("stopped" if exited else "stopping")


@click.command()
@click.option("--include-loopback", is_flag=True, help="Also offer 127.0.0.1 (a joiner on this machine).")
@click.option(
    "--addr", "extra", multiple=True, metavar="MULTIADDR",
    help="Offer this address first, e.g. a DNS name or a forwarded port: /dns4/host.example/tcp/4001.",
)
@home_option
@json_option
def invite(include_loopback: bool, extra: tuple[str, ...], home: Path | None, as_json: bool) -> None:
    """Print a token that lets another machine join this run: `meshtrain init --join TOKEN` there.

    It carries the run, its genesis id, the task and its options, and this node's addresses and peer
    id; never the swarm key of a private run (hand that over separately, over a secure channel)."""
    from daemon.cli.invite import InviteError, encode_invite, invite_from_node

    info = call(home, ControlClient.invite, as_json=as_json)
    try:
        token = encode_invite(invite_from_node(info, include_loopback=include_loopback, extra_addrs=extra))
    except InviteError as exc:
        fail(str(exc), as_json=as_json)
    if as_json:
        echo_json({"token": token} | {key: info[key] for key in ("run", "genesis", "task", "private")})
        return
    click.echo(token)
    note = " It is a private run: send the swarm key separately." if info["private"] else ""
    click.echo(f"On the new machine: meshtrain init --join <the token above>.{note}", err=True)
