"""The control socket is the access control: mode 0600, owned by the daemon's user, no TCP listener;
or 0660 for the group ``[api] socket_group`` names."""

from __future__ import annotations

import grp
import os
import stat
from pathlib import Path

import pytest

from daemon.config import ConfigError
from daemon.service.api import open_control_site


async def test_control_socket_is_private(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    os.umask(0o022)  # a permissive umask must not leak into the socket's mode
    runner = await open_control_site(object(), path)  # type: ignore[arg-type]  # routes are not called
    try:
        st = path.stat()
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == os.getuid()
        sites = [type(site).__name__ for site in runner.sites]
        assert sites == ["UnixSite"], sites  # no TCP site unless one is configured
    finally:
        await runner.cleanup()


async def test_a_socket_group_gets_a_0660_socket(tmp_path: Path) -> None:
    """[api] socket_group (a system service's socket in /run/meshtrain for the meshtrain group)."""
    group = next(g for g in grp.getgrall() if g.gr_gid != os.getgid())
    path = tmp_path / "run" / "control.sock"
    path.parent.mkdir()
    runner = await open_control_site(object(), path, group=group.gr_name)  # type: ignore[arg-type]
    try:
        st = path.stat()
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == group.gr_gid
    finally:
        await runner.cleanup()


async def test_socket_config_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"api\.socket_group: no group 'no-such-group"):
        await open_control_site(object(), tmp_path / "c.sock", group="no-such-group-here")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"api\.socket: the directory .* does not exist"):
        await open_control_site(object(), tmp_path / "absent" / "c.sock")  # type: ignore[arg-type]
