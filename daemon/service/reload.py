"""SIGHUP: re-read config.toml and apply what a running node can change without a restart.

The rule is a whitelist (:data:`RELOADABLE`): a key is reloadable only if every place that reads it reads
``node.config`` afresh (or is told, like the limits and the log level). Everything else that changed is
reported as "needs a restart" and keeps its running value, so ``node.config`` always describes what the
node actually does. A file that fails to load changes nothing: the error is logged and the node goes on
with its current configuration (the same contract as nginx or sshd reloads).

Rejected: restarting in place (re-exec) on any change. It drops peers and the training child's warm state
for a log-level tweak; a real restart is one ``systemctl restart`` away when it is needed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from daemon.config import Config, ConfigError
from daemon.node.limits import Limits

__all__ = ["RELOADABLE", "ReloadReport", "apply_reload", "plan_reload"]

log = logging.getLogger(__name__)

RELOADABLE: frozenset[tuple[str, str]] = frozenset(
    {
        ("log", "level"),
        ("training", "threads"),
        ("training", "max_rounds"),
        ("training", "eval_every"),
        ("limits", "bandwidth_bytes_per_s"),
        ("sync", "interval_s"),
        ("sync", "max_batch"),
        ("sync", "fanout"),
        ("sync", "request_timeout_s"),
    }
)


@dataclass
class ReloadReport:
    reloaded: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    """``section.key`` -> (old, new) for every applied change."""
    needs_restart: list[str] = field(default_factory=list)
    """``section.key`` names that changed in the file but keep their running value until a restart."""
    error: str | None = None
    """Why the file could not be loaded (then nothing changed)."""


def _flatten(config: Config) -> dict[str, Any]:
    """``section.key`` -> value for every key of every table (``diloco`` and ``task`` as whole tables)."""
    flat: dict[str, Any] = {}
    for section, values in config.to_dict().items():
        if section in ("diloco", "task"):
            flat[section] = values
        else:
            flat.update({f"{section}.{key}": value for key, value in values.items()})
    return flat


def plan_reload(running: Config, loaded: Config) -> tuple[Config, ReloadReport]:
    """The config to run with (``running`` plus the reloadable changes of ``loaded``) and the report."""
    report = ReloadReport()
    old, new = _flatten(running), _flatten(loaded)
    merged = running
    for key in sorted(old):
        if old[key] == new[key]:
            continue
        section, _, name = key.partition(".")
        if (section, name) in RELOADABLE:
            merged = merged.with_overrides(section, **{name: new[key]})
            report.reloaded[key] = (old[key], new[key])
        else:
            report.needs_restart.append(key)
    return merged, report


class _Node(Protocol):
    config: Config
    limits: Limits


def apply_reload(node: _Node, load: Callable[[], Config]) -> ReloadReport:
    """Load the config with ``load``, apply the reloadable changes to ``node``, and log what happened."""
    try:
        loaded = load()
    except ConfigError as exc:
        log.error("reload failed, configuration unchanged error=%s", exc)
        return ReloadReport(error=str(exc))
    merged, report = plan_reload(node.config, loaded)
    if "log.level" in report.reloaded:
        logging.getLogger().setLevel(merged.log.level)
    # Only keys the file changed: a limit set at runtime (`meshtrain limits`) survives an unrelated reload.
    node.limits.set(
        threads=merged.training.threads if "training.threads" in report.reloaded else None,
        bandwidth_bytes_per_s=(
            merged.limits.bandwidth_bytes_per_s if "limits.bandwidth_bytes_per_s" in report.reloaded else None
        ),
    )
    node.config = merged
    changes = " ".join(f"{k}={old!r}->{new!r}" for k, (old, new) in report.reloaded.items())
    log.info(
        "configuration reloaded changed=%d %s needs_restart=%s",
        len(report.reloaded),
        changes,
        ",".join(report.needs_restart) or "none",
    )
    if report.needs_restart:
        log.warning(
            "configuration changes need a restart to take effect keys=%s", ",".join(report.needs_restart)
        )
    return report
