"""``meshtrain cluster ...``: several daemons on this machine (tests, demos), over ``daemon.cli.cluster``."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from daemon.cli import render
from daemon.cli.client import ControlError
from daemon.cli.cluster import Cluster, ClusterError
from daemon.cli.common import console, echo_json, fail, json_option

__all__ = ["cluster"]


dir_option = click.option(
    "--dir", "directory", type=click.Path(file_okay=False, path_type=Path), required=True, help="Cluster dir."
)


@click.group()
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
        fail(str(exc), as_json=as_json)
    _print_cluster(group, as_json)


@cluster.command("status")
@dir_option
@json_option
def cluster_status(directory: Path, as_json: bool) -> None:
    """Each node's status (JSON: a list of status objects)."""
    try:
        _print_cluster(Cluster(directory), as_json)
    except ClusterError as exc:
        fail(str(exc), as_json=as_json)


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
        fail(str(exc), as_json=as_json)
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
        fail(str(exc), as_json=as_json)
    _done(as_json, {"node": index, "started": True, "pid": pid})


@cluster.command("down")
@dir_option
@json_option
def cluster_down(directory: Path, as_json: bool) -> None:
    """Stop every node of the cluster."""
    try:
        Cluster(directory).down()
    except ClusterError as exc:
        fail(str(exc), as_json=as_json)
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
        fail("groups are comma-separated node indices, e.g. `0,1 2,3`", as_json=as_json)
    except (ClusterError, ControlError) as exc:
        fail(str(exc), as_json=as_json)
    _done(as_json, {"partitioned": [list(map(int, g.split(","))) for g in groups]})


@cluster.command("heal")
@dir_option
@json_option
def cluster_heal(directory: Path, as_json: bool) -> None:
    """Undo `cluster partition`."""
    try:
        Cluster(directory).heal()
    except (ClusterError, ControlError) as exc:
        fail(str(exc), as_json=as_json)
    _done(as_json, {"healed": True})


@cluster.command("demo")
@dir_option
@click.option("--nodes", type=click.IntRange(1, 16), default=4, show_default=True)
@click.option("--task", default="stdlib-lm", show_default=True)
@click.option("--rounds", type=click.IntRange(min=1), default=12, show_default=True, help="Rounds per node.")
@json_option
def cluster_demo(directory: Path, nodes: int, task: str, rounds: int, as_json: bool) -> None:
    """Start a cluster, train with a live table, then plot the loss curve and print a summary (--json:
    the progress goes to stderr, the summary to stdout)."""
    from daemon.cli.demo import run_demo

    shown = Console(stderr=True) if as_json else console
    try:
        summary = run_demo(Cluster(directory), nodes=nodes, task=task, rounds=rounds, console=shown)
    except ClusterError as exc:
        fail(str(exc), as_json=as_json)
    if as_json:
        echo_json(summary)


def _print_cluster(group: Cluster, as_json: bool) -> None:
    statuses = group.status()
    if as_json:
        echo_json(statuses)
        return
    console.print(render.cluster_table(statuses))


def _done(as_json: bool, result: dict[str, Any]) -> None:
    if as_json:
        echo_json(result)
    else:
        console.print(", ".join(f"{k}: {v}" for k, v in result.items()))
