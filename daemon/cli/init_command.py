"""``meshtrain init``: a new node's home, for a run of its own or, with ``--join TOKEN``, for one that
exists.

A founder's init writes config.toml from its flags: the run, the task and its options (``--task-option``,
checked against the task's own Config before anything is written), and ``--from-checkpoint`` (the genesis
then starts from that safetensors file, ``[training] init_from``). A joiner's init writes it from an invite
(``meshtrain invite`` on a member, ``daemon.cli.invite``): run, task, task options, bootstrap addresses
and the pinned genesis, so that the new node accepts that run's genesis and no other; the flags the
token fixes are refused beside it. Both create the identity and the TCP API token file.

Paths on the command line are the caller's: a plug-in file given relative to the working dir is written
absolute (the daemon resolves a relative one against the home), and so is the checkpoint.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import click

from daemon.cli.common import console, echo_json, fail, home_of, home_option, json_option, parse_options
from daemon.config import ConfigError, task_path
from daemon.config_template import render_config

__all__ = ["init"]

MAX_SAFETENSORS_HEADER = 100 * 2**20  # the safetensors format's own bound on its JSON header


@click.command()
@home_option
@click.option("--run", default=None, help="Training run name (default: default).")
@click.option("--listen", multiple=True, help="Listen multiaddr (repeatable).")
@click.option("--bootstrap", multiple=True, help="Bootstrap peer multiaddr (repeatable).")
@click.option("--task", default=None, help="A name, module:Factory or file.py:Class (default: stdlib-lm).")
@click.option("--task-option", "pairs", multiple=True, metavar="KEY=VALUE",
              help="A [task] option (repeatable), checked against the task's Config; VALUE is read as TOML, "
              "else as a string.")
@click.option("--from-checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Found the run from this safetensors file's parameters.")
@click.option("--join", "token", default=None, metavar="TOKEN",
              help="Join the run of this invite (`meshtrain invite` on a member).")
@click.option("--force", is_flag=True, help="Overwrite an existing config file.")
@json_option
def init(
    home: Path | None,
    run: str | None,
    listen: tuple[str, ...],
    bootstrap: tuple[str, ...],
    task: str | None,
    pairs: tuple[str, ...],
    from_checkpoint: Path | None,
    token: str | None,
    force: bool,
    as_json: bool,
) -> None:
    """Create the home dir, a commented config file, the node identity and the API token file."""
    import p2p
    from daemon.service.auth import load_or_create_token

    node_home = home_of(home)
    notes: list[str] = []
    if token is not None:
        fixed = {"--run": run, "--bootstrap": bootstrap, "--task": task, "--task-option": pairs,
                 "--from-checkpoint": from_checkpoint}
        clash = [flag for flag, value in fixed.items() if value]
        if clash:
            raise click.UsageError(f"--join takes {', '.join(clash)} from the invite; leave them out")
        options, notes = _from_invite(token, node_home.path)
    else:
        chosen_task = _plugin_path(task or "stdlib-lm", node_home.path)
        task_options = parse_options(pairs, flag="--task-option")
        if task_options:
            from daemon.cli.task_commands import validate_task_options

            validate_task_options(task_path(chosen_task, node_home.path), task_options)
        options = {"run": run or "default", "bootstrap": bootstrap, "task": chosen_task,
                   "task_options": task_options}
        if from_checkpoint is not None:
            options["init_from"] = str(_checked_safetensors(from_checkpoint))
    if listen:
        options["listen"] = listen
    try:
        text = render_config(**options)
    except ConfigError as exc:  # a bad --run, --listen, --bootstrap: nothing is written
        raise click.BadParameter(str(exc)) from exc
    node_home.create()
    if node_home.config_file.exists() and not force:
        fail(f"{node_home.config_file} exists (use --force to overwrite)", as_json=as_json)
    node_home.config_file.write_text(text)
    identity = p2p.load_or_create_identity(node_home.identity_file)
    # The TCP control listener's token (used only if [api] tcp_listen is set; 0600, see SECURITY.md).
    load_or_create_token(node_home.path / node_home.load_config().api.token_file)
    result = {"home": str(node_home.path), "config": str(node_home.config_file), "peer_id": identity.peer_id,
              "run": options["run"], "task": options["task"], "joined": token is not None, "notes": notes}
    if as_json:
        echo_json(result)
        return
    console.print(f"initialized [bold]{node_home.path}[/] peer id [cyan]{identity.peer_id}[/]")
    for note in notes:
        console.print(note, highlight=False)
    console.print(f"start it: meshtrain --home {node_home.path} daemon", highlight=False)


def _from_invite(token: str, home: Path) -> tuple[dict[str, Any], list[str]]:
    """render_config's arguments from the invite, and what the user must know before starting."""
    from daemon.cli.invite import InviteError, decode_invite

    try:
        invite = decode_invite(token)
    except InviteError as exc:
        raise click.BadParameter(str(exc), param_hint="--join") from exc
    notes = [f"joins run {invite.run!r} (genesis {invite.genesis[:16]}, task {invite.task}, options "
             f"{json.dumps(invite.task_options, sort_keys=True)}) through "
             f"{', '.join(invite.bootstrap)}"]
    module, sep, _ = invite.task.rpartition(":")
    if sep and module.endswith(".py"):
        where = Path(task_path(invite.task, home).rpartition(":")[0])
        state = "present" if where.is_file() else "MISSING: copy it there before starting"
        notes.append(f"the run trains a plug-in: its code runs here, from {where} ({state})")
    elif sep:
        notes.append(f"the run trains the plug-in module {module}: its code runs here (must be importable)")
    if invite.private:
        notes.append("a private run: get its swarm key from the member over a secure channel, then start "
                     "with --swarm-key FILE (or [node] swarm_key)")
    options = {"run": invite.run, "bootstrap": tuple(invite.bootstrap), "task": invite.task,
               "task_options": invite.task_options, "genesis": invite.genesis}
    return options, notes


def _plugin_path(task: str, home: Path) -> str:
    """A plug-in file named relative to the working dir, absolute, unless the daemon finds it relative
    to the home (how it resolves a relative one)."""
    module, sep, attr = task.rpartition(":")
    if not sep or not module.endswith(".py") or Path(module).is_absolute() or (home / module).is_file():
        return task
    if Path(module).is_file():
        return f"{Path(module).absolute()}:{attr}"
    return task


def _checked_safetensors(path: Path) -> Path:
    """``path`` made absolute, once its header reads as a safetensors file's (8-byte length, JSON)."""
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8).ljust(8, b"\0"))
            if not 2 <= length <= MAX_SAFETENSORS_HEADER:
                raise ValueError(f"header length {length}")
            header = json.loads(f.read(length))
        if not isinstance(header, dict) or not header:
            raise ValueError("the header holds no tensors")
    except (OSError, ValueError) as exc:
        raise click.BadParameter(
            f"{path} is not a safetensors file ({exc})", param_hint="--from-checkpoint"
        ) from exc
    return path.absolute()
