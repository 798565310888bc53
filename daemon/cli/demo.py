"""``meshtrain cluster demo`` (what ``make demo`` runs): a local cluster trains, live, then reports.

It starts N daemons on loopback, shows a live table while they train a fixed number of rounds each, waits
until every node holds the same model (one state hash over all contributions), then writes the loss
curves to ``<dir>/loss.png`` and ``<dir>/summary.json``, prints a summary and stops the cluster.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live

from daemon.cli import render
from daemon.cli.cluster import Cluster, ClusterError, converged
from daemon.status import Status, parse_status

__all__ = ["run_demo"]

TRAIN_TIMEOUT_S = 1800.0


def run_demo(group: Cluster, *, nodes: int, task: str, rounds: int, console: Console) -> dict[str, Any]:
    if group.manifest_path.exists():
        group.down()
        _remove_cluster(group.dir)
    console.print(f"[bold]meshtrain demo[/]: {nodes} nodes train [cyan]{task}[/] for {rounds} rounds each")
    console.print(f"starting the cluster in {group.dir} (logs: node*/daemon.log) ...")
    started = time.monotonic()
    group.up(nodes, task=task, run="demo", training={"max_rounds": rounds, "eval_every": 2})
    try:  # from here on the cluster runs: stop it whatever happens (up() cleans up after itself)
        target = nodes * rounds
        with Live(console=console, refresh_per_second=2) as live:
            deadline = time.monotonic() + TRAIN_TIMEOUT_S
            while True:
                statuses = group.status()
                live.update(render.cluster_table(statuses))
                if converged(statuses, contributions=target) and all(
                    parse_status(s).eval.contributions == target for s in statuses
                ):
                    break
                if time.monotonic() > deadline:
                    raise ClusterError(f"the demo did not converge within {TRAIN_TIMEOUT_S:.0f} s")
                time.sleep(0.5)
        histories = [group.client(s["index"]).get("/v1/history")["rounds"] for s in statuses]
        parsed = [parse_status(s) for s in statuses]
        summary = _summary(parsed, histories, wall_s=time.monotonic() - started)
        initial = [s.initial_eval.val_loss for s in parsed]
        plot = _plot(histories, initial, group.dir / "loss.png")
        (group.dir / "summary.json").write_text(json.dumps(summary, indent=2))
    finally:
        group.down()
    _print_summary(console, summary, plot)
    return summary


def _summary(statuses: list[Status], histories: list[list[dict]], *, wall_s: float) -> dict[str, Any]:
    first = statuses[0]
    return {
        "nodes": len(statuses),
        "task": first.task,
        "rounds_per_node": first.round,
        "contributions": first.contributions,
        "state_hash": first.state_hash,
        "all_nodes_agree": len({s.state_hash for s in statuses}) == 1,
        "first_val_loss": first.initial_eval.val_loss,
        "final_val_loss": first.eval.val_loss,
        "final_val_accuracy": first.eval.val_accuracy,
        "final_bits_per_byte": first.eval.val_bpb,
        "bytes_sent_total": sum(s.bytes_sent for s in statuses),
        "payload_bytes_total": sum(r["payload_bytes"] for h in histories for r in h),
        "wall_s": round(wall_s, 1),
    }


def _plot(histories: list[list[dict]], initial: list[float | None], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for index, history in enumerate(histories):
        rounds = [r["round"] for r in history]
        ax.plot(rounds, [r["train_loss"] for r in history], alpha=0.6, label=f"node {index} train")
        evals = [(0, initial[index])] if initial[index] is not None else []
        evals += [(r["round"], r["val_loss"]) for r in history if r.get("val_loss") is not None]
        if evals:
            ax.plot(*zip(*evals, strict=True), "o--", label=f"node {index} val (merged model)")
    ax.set_xlabel("local round")
    ax.set_ylabel("loss")
    ax.set_title("meshtrain demo: per-node training loss and validation loss of the merged model")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _print_summary(console: Console, summary: dict[str, Any], plot: Path) -> None:
    agree = "[green]yes[/]" if summary["all_nodes_agree"] else "[red]NO[/]"
    console.print()
    console.print("[bold]summary[/]")
    console.print(f"  {summary['nodes']} nodes x {summary['rounds_per_node']} rounds of {summary['task']}")
    console.print(f"  every node holds the same model: {agree} (state {summary['state_hash'][:16]})")
    if summary["first_val_loss"] is not None:
        console.print(
            f"  validation loss of the merged model: {summary['first_val_loss']:.3f} -> "
            f"{summary['final_val_loss']:.3f}"
        )
    if summary.get("final_val_accuracy") is not None:
        console.print(f"  validation accuracy: {summary['final_val_accuracy']:.1%}")
    if summary.get("final_bits_per_byte") is not None:
        console.print(f"  bits per byte: {summary['final_bits_per_byte']:.3f}")
    console.print(
        f"  update payloads: {summary['payload_bytes_total'] / 1e6:.2f} MB; total sent on the wire "
        f"{summary['bytes_sent_total'] / 1e6:.2f} MB; wall time {summary['wall_s']:.0f} s"
    )
    console.print(f"  loss curve: {plot}")


def _remove_cluster(directory: Path) -> None:
    import shutil

    shutil.rmtree(directory)
