"""Human output of the CLI (rich): status, peers, limits, log lines; and parsing of human byte rates.

Kept apart from the command modules so the command definitions stay a thin layer over the control API, and
so the look of the output can change without touching the commands. ``--json`` output never comes
through here.
"""

from __future__ import annotations

import re
from typing import Any

from rich import box
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from daemon.status import Status, parse_status

__all__ = ["format_bytes", "limits_table", "log_line", "parse_rate", "peers_table", "status_panel"]

TRAINING_STYLE = {"running": "green", "paused": "yellow", "done": "blue", "disabled": "dim"}
LEVEL_STYLE = {"debug": "dim", "warning": "yellow", "error": "bold red", "critical": "bold red"}
RATE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]i?)?b?(?:/s)?\s*$", re.IGNORECASE)
_LEVEL = re.compile(r"\blevel=(\w+)")


def parse_rate(text: str) -> int:
    """ "0", "500000", "2M", "512KiB/s" -> bytes per second. Raises ValueError with the accepted forms."""
    match = _RATE.match(text)
    if match is None:
        raise ValueError(f"not a byte rate: {text!r} (e.g. 0 for no cap, 500000, 250K, 2M, 1MiB/s)")
    number, unit = match.groups()
    return int(float(number) * RATE_UNITS[(unit or "").lower()])


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def status_panel(data: Status) -> Panel:
    evaluation, initial = data.eval, data.initial_eval
    state = data.training
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    val_loss = _fmt(evaluation.val_loss)
    if initial.val_loss is not None and evaluation.val_loss is not None:
        val_loss += f"  (from {initial.val_loss:.4f})"
    limits = data.limits
    cap = limits.bandwidth_bytes_per_s
    rows: list[tuple[str, str | Text]] = [
        ("run / task", f"{data.run} / {data.task}"),
        ("training", Text(f"{state}, round {data.round}", style=TRAINING_STYLE.get(state, ""))),
        ("peers", str(len(data.peers))),
        ("contributions", str(data.contributions)),
        ("state hash", (data.state_hash or "-")[:16]),
        ("train loss", _fmt(data.train_loss)),
        ("val loss", val_loss),
        ("val accuracy", _fmt(evaluation.val_accuracy)),
        ("sent / received", f"{format_bytes(data.bytes_sent)} / {format_bytes(data.bytes_received)}"),
        (
            "limits",
            f"{limits.threads_applied} threads, "
            + (f"{format_bytes(cap)}/s sync cap" if cap else "no bandwidth cap"),
        ),
        ("reachability", data.reachability),
    ]
    # Problems a person should see without asking for JSON (SECURITY.md says what each means).
    if data.suspects:
        rows.append(("suspects", Text("\n".join(data.suspects), style="yellow")))
    if data.diverged_from:
        rows.append(("diverged from", Text("\n".join(data.diverged_from), style="red")))
    rows.append(("listening", "\n".join(data.listen_addrs) or "-"))
    for key, value in rows:
        table.add_row(key, value)
    uptime = int(data.uptime_s)
    title = f"[bold]meshtrain[/] [cyan]{data.peer_id}[/]"
    subtitle = f"up {uptime // 3600}h{uptime // 60 % 60:02d}m{uptime % 60:02d}s, pid {data.pid}"
    return Panel(Group(table), title=title, subtitle=subtitle, expand=False)


def peers_table(status: Status) -> Table:
    """Connected peers with their contributions in this node's version vector (who trains, who lags)."""
    table = Table(title=f"{len(status.peers)} connected peers", title_justify="left")
    table.add_column("peer id", style="cyan", no_wrap=True)
    table.add_column("contributions", justify="right")
    table.add_column("connection")
    for peer in sorted(status.peers):
        contributions = str(status.version_vector.get(peer, 0))
        table.add_row(peer, contributions, status.connections.get(peer, "connected"))
    table.caption = f"this node's reachability: {status.reachability}"
    return table


def limits_table(limits: dict[str, Any]) -> Table:
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    applied = limits["threads_applied"]
    pending = "" if applied == limits["threads"] else f" (applying {limits['threads']} after this round)"
    cap = limits["bandwidth_bytes_per_s"]
    table.add_row("training threads", f"{applied}{pending}")
    table.add_row("sync bandwidth cap", f"{format_bytes(cap)}/s ({cap} B/s)" if cap else "none")
    return table


def log_line(line: str) -> Text:
    match = _LEVEL.search(line)
    return Text(line, style=LEVEL_STYLE.get(match.group(1).lower(), "") if match else "")


def cluster_table(statuses: list[dict[str, Any]]) -> Table:
    """One line per node of ``Cluster.status()`` (each a status, or ``{"index", "peer_id", "error"}``)."""
    # Narrow enough for an 80-column terminal.
    table = Table(
        "#",
        "peer",
        "peers",
        "state",
        "round",
        "contribs",
        "hash",
        "train",
        "val",
        "sent",
        box=box.SIMPLE_HEAD,
        collapse_padding=True,
        pad_edge=False,
    )
    for raw in statuses:
        if "error" in raw:
            table.add_row(str(raw["index"]), raw["peer_id"][-6:], "-", "[red]down[/]", *["-"] * 6)
            continue
        s = parse_status(raw)
        table.add_row(
            str(raw["index"]),
            s.peer_id[-6:],
            str(len(s.peers)),
            s.training,
            str(s.round),
            str(s.contributions),
            (s.state_hash or "-")[:6],
            _fmt(s.train_loss),
            _fmt(s.eval.val_loss),
            format_bytes(s.bytes_sent),
        )
    return table
