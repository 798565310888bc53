"""``python -m daemon.cli``: the command line (the cluster harness starts daemons this way)."""

from daemon.cli.main import main

main()
