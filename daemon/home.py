"""The node's home (state) directory and what lives in it.

One directory holds everything a node owns, so that a node is moved, backed up or wiped as a unit::

    config.toml      settings (``meshtrain init`` writes a commented one)
    identity.key     Ed25519 seed: the peer id and the author key of every contribution (0600)
    control.sock     the control API (0600), present while the daemon runs
    daemon.pid       pid of the running daemon
    store/           write-ahead log of contributions, snapshots, genesis
    trainer.pt       optimizer momentum and error-feedback residuals, so a restart loses no progress
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from daemon.config import CONFIG_FILE, Config, load_config

__all__ = ["Home", "default_home"]


@dataclass(frozen=True)
class Home:
    path: Path

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def identity_file(self) -> Path:
        return self.path / "identity.key"

    @property
    def pid_file(self) -> Path:
        return self.path / "daemon.pid"

    @property
    def store_dir(self) -> Path:
        return self.path / "store"

    @property
    def trainer_state_file(self) -> Path:
        return self.path / "trainer.pt"

    def socket_path(self, config: Config | None = None) -> Path:
        config = config or self.load_config()
        return self.path / config.api.socket

    def load_config(self) -> Config:
        return load_config(self.path)

    def create(self) -> None:
        """Create the directory, private to its owner."""
        self.path.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)
        self.store_dir.mkdir(exist_ok=True)


def default_home() -> Path:
    """Per-user state dir (XDG), or $MESHTRAIN_HOME when set."""
    if env := os.environ.get("MESHTRAIN_HOME"):
        return Path(env)
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "meshtrain"
