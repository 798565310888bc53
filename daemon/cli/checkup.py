"""`meshtrain doctor`'s local checks: what can be told about a node without its daemon.

Each check reads one thing of this machine and gives a :class:`Check` (``ok`` / ``warn`` / ``problem``
and one line saying why): the config loads; the identity exists; the ports the config names are free
(only when no daemon holds them); the home's disk has room; torch imports and sees CUDA or not; the clock
is plausible and synchronized; what the last run left behind (a stale pid file, the tail of the home's
``daemon.log``). The connectivity report of a running daemon is ``daemon.cli.doctor``'s.

torch is probed in a child process with a time limit: a broken CUDA install can hang or crash the
process that imports it, and the report must still come out.

Rejected: asking the network for the time (doctor must work offline; ``timedatectl`` already knows
whether NTP is synchronized).
"""

from __future__ import annotations

import datetime
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass

from daemon.config import Config, ConfigError, load_config_sources
from daemon.home import Home

__all__ = ["Check", "local_checks", "worst"]

MIN_FREE_BYTES = 512 * 2**20  # below this a snapshot of a 100M-parameter model (~350 MB) cannot be written
LOW_FREE_BYTES = 4 * 2**30  # below this, warn: the log and snapshots of a large run grow past it
TORCH_PROBE_TIMEOUT_S = 60.0  # importing torch with CUDA takes seconds on 2 cores; a hang is a problem
CLOCK_FLOOR = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)  # earlier than this build: a wrong clock
LOG_FILE = "daemon.log"  # where `meshtrain cluster` and `meshtrain daemon 2>> daemon.log` log
LOG_TAIL_LINES = 15
VERDICTS = ("ok", "warn", "problem")

_TORCH_PROBE = """\
import json, torch
cuda = torch.cuda.is_available()
print(json.dumps({"version": torch.__version__, "cuda": cuda,
                  "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                  if cuda else []}))
"""


@dataclass(frozen=True, slots=True)
class Check:
    """One local check: its name, its verdict (ok, warn, problem), and one line on what it found."""

    name: str
    verdict: str
    detail: str
    lines: tuple[str, ...] = ()
    """Supporting lines (the log tail)."""

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "verdict": self.verdict, "detail": self.detail, "lines": list(self.lines)}


def worst(verdicts: list[str]) -> str:
    return max(verdicts, key=VERDICTS.index, default="ok")


def local_checks(home: Home, *, daemon_running: bool) -> list[Check]:
    """Every local check of ``home``'s node; the port check only when no daemon is running (it holds
    them)."""
    config_check, config = _config(home)
    checks = [config_check, _identity(home)]
    if config is not None and not daemon_running:
        checks.append(_ports(config))
    checks += [_disk(home), _torch(), _clock(datetime.datetime.now(datetime.UTC), _ntp_synchronized())]
    if not daemon_running:
        checks.append(_last_run(home))
    return checks


def _config(home: Home) -> tuple[Check, Config | None]:
    try:
        config, sources = load_config_sources(home.path)
    except ConfigError as exc:
        return Check("config", "problem", str(exc)), None
    if not home.config_file.exists():
        return Check("config", "warn", f"no {home.config_file}: defaults (`meshtrain init`)"), config
    set_keys = sum(source == "file" for source in sources.values())
    return Check("config", "ok", f"{home.config_file} loads ({set_keys} keys set, the rest default)"), config


def _identity(home: Home) -> Check:
    try:
        size = home.identity_file.stat().st_size
    except FileNotFoundError:
        return Check("identity", "warn", f"no {home.identity_file} (`meshtrain init` makes one)")
    if size != 32:
        return Check("identity", "problem", f"{home.identity_file} holds {size} bytes, not a 32-byte seed")
    return Check("identity", "ok", f"{home.identity_file} (`meshtrain id` prints the peer id)")


def _ports(config: Config) -> Check:
    from multiaddr import Multiaddr

    from p2p import check_tcp_ports_free  # the daemon's own probe (SO_REUSEPORT-safe)

    wanted = list(config.node.listen)
    for enabled, listen in ((bool(config.api.tcp_listen), config.api.tcp_listen),
                            (config.metrics.enabled, config.metrics.listen),
                            (config.dashboard.enabled, config.dashboard.listen)):
        if enabled:
            host, _, port = listen.rpartition(":")
            wanted.append(f"/{'ip6' if ':' in host else 'ip4'}/{host.strip('[]')}/tcp/{port}")
    taken = []
    for addr in wanted:
        try:
            check_tcp_ports_free([Multiaddr(addr)])
        except Exception as exc:  # P2PError for a taken port; a name that is no IP address
            taken.append(str(exc))
    if taken:
        return Check("ports", "problem", "; ".join(taken) + " (another daemon, or another program?)")
    return Check("ports", "ok", f"free: {', '.join(wanted)}")


def _disk(home: Home) -> Check:
    where = home.path
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    detail = f"{free / 2**30:.1f} GiB free on the disk of {home.path}"
    if free < MIN_FREE_BYTES:
        return Check("disk", "problem", detail + ": the node cannot write snapshots; free some space")
    if free < LOW_FREE_BYTES:
        return Check("disk", "warn", detail + ": low for a long run (its log and snapshots grow)")
    return Check("disk", "ok", detail)


def _torch() -> Check:
    try:
        done = subprocess.run([sys.executable, "-c", _TORCH_PROBE], capture_output=True, text=True,
                   timeout=TORCH_PROBE_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return Check("torch", "problem", f"importing torch took over {TORCH_PROBE_TIMEOUT_S:.0f} s")
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return Check("torch", "problem", f"torch does not import: {last}")
    info = json.loads(done.stdout.strip().splitlines()[-1])
    if info["cuda"]:
        return Check("torch", "ok", f"torch {info['version']}, CUDA: {', '.join(info['devices'])}")
    return Check("torch", "ok", f"torch {info['version']}, no CUDA device: training runs on the CPU")


def _ntp_synchronized() -> bool | None:
    """Whether systemd-timesyncd/chrony keep the clock synchronized (None: cannot tell here)."""
    try:
        done = subprocess.run(["timedatectl", "show", "-p", "NTPSynchronized", "--value"],
                              capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    answer = done.stdout.strip()
    return None if done.returncode != 0 or answer not in ("yes", "no") else answer == "yes"


def _clock(now: datetime.datetime, synchronized: bool | None) -> Check:
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    if now < CLOCK_FLOOR:
        return Check("clock", "problem", f"the clock says {stamp}, before this meshtrain was built: set it")
    if synchronized is False:
        return Check("clock", "warn", f"{stamp}, not synchronized (log times will not line up with peers': "
                     "enable NTP, `timedatectl set-ntp true`)")
    sync = "NTP synchronized" if synchronized else "synchronization unknown"
    return Check("clock", "ok", f"{stamp}, {sync}")


def _last_run(home: Home) -> Check:
    verdict, notes = "ok", []
    if home.pid_file.exists():
        verdict = "warn"
        notes.append(f"{home.pid_file} remains: the last daemon did not exit cleanly (killed or crashed)")
    log = home.path / LOG_FILE
    try:
        tail = tuple(log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])
    except OSError:
        notes.append(f"no {log} (a system service logs to the journal: `journalctl -u meshtrain`)")
        return Check("last run", verdict, "; ".join(notes))
    if any("level=error" in line or "Traceback" in line for line in tail):
        verdict = "warn"
        notes.append("its log ends with errors")
    notes.append(f"the tail of {log}:")
    return Check("last run", verdict, " ".join(notes), tail)
