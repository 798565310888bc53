"""The ``meshtrain`` command line: a thin client of the control API, plus init, daemon and cluster.

The commands live by audience: ``local_commands`` (no daemon needed), ``control_commands`` (a running
daemon), ``cluster_commands`` (several daemons on this machine); ``common`` holds their shared options,
output and exit codes.
"""

from __future__ import annotations

import click

from daemon.cli import cluster_commands, control_commands, local_commands
from daemon.cli.common import EXIT_FAILED, EXIT_NOT_RUNNING

__all__ = ["EXIT_FAILED", "EXIT_NOT_RUNNING", "main"]


@click.group()
@click.version_option(package_name="meshtrain")
def main() -> None:
    """meshtrain: pool your machines to train one model, peer to peer."""


for module in (local_commands, control_commands, cluster_commands):
    for name in module.__all__:
        main.add_command(getattr(module, name))


if __name__ == "__main__":
    main()
