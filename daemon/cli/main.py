"""The ``meshtrain`` command line: a thin client of the control API, plus init, daemon, tasks and clusters.

The commands live by audience: ``init_command`` and ``local_commands`` (no daemon needed),
``task_commands`` (bring your own model), ``control_commands`` (a running daemon), ``cluster_commands``
(several daemons on this machine); ``common`` holds their shared options, output and exit codes, and
``client`` is the Python API they all go through.

Shell completion is click's: ``eval "$(_MESHTRAIN_COMPLETE=bash_source meshtrain)"`` in ~/.bashrc
(``zsh_source`` in ~/.zshrc, ``fish_source`` for fish), or write that output to a file once and source
the file, which keeps the shell's start-up fast.
"""

from __future__ import annotations

from pathlib import Path

import click

from daemon.cli import cluster_commands, control_commands, init_command, local_commands
from daemon.cli.common import EXIT_FAILED, EXIT_NOT_RUNNING

__all__ = ["EXIT_FAILED", "EXIT_NOT_RUNNING", "main"]

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


class _Main(click.Group):
    """The group, with the task commands imported only when used (they import torch)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), "task"])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name == "task":
            from daemon.cli.task_commands import task_group

            return task_group
        return super().get_command(ctx, name)


@click.group(cls=_Main, context_settings=CONTEXT)
@click.option(
    "--home", type=click.Path(file_okay=False, path_type=Path), default=None, envvar="MESHTRAIN_HOME",
    help="Node state dir [env: MESHTRAIN_HOME; default: ~/.local/state/meshtrain].",
)
@click.option(
    "--socket", type=click.Path(dir_okay=False, path_type=Path), default=None, envvar="MESHTRAIN_SOCKET",
    help="Control socket to use instead of the home's [api] socket; for `daemon`, where to serve it "
    "[env: MESHTRAIN_SOCKET].",
)
@click.option("--json", "as_json", is_flag=True, envvar="MESHTRAIN_JSON",
              help="Print one JSON document [env: MESHTRAIN_JSON=1].")
@click.version_option(package_name="meshtrain")
def main(home: Path | None, socket: Path | None, as_json: bool) -> None:
    """meshtrain: pool your machines to train one model, peer to peer.

    Global options go before the command (`meshtrain --home ~/mt status`); --home and --json are also
    accepted after it. Exit codes: 0 ok, 1 failed, 2 bad usage, 3 no daemon running."""


for module in (init_command, local_commands, control_commands, cluster_commands):
    for name in module.__all__:
        main.add_command(getattr(module, name))


if __name__ == "__main__":
    main()
