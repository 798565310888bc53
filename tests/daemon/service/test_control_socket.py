"""The control socket is the access control: mode 0600, owned by the daemon's user, no TCP listener."""

from __future__ import annotations

import os
import stat
from pathlib import Path

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
