"""Every command takes --json and then prints exactly one JSON document on stdout, success or error.

The test walks the whole command tree, so a new command fails it until it is listed here with
arguments it can run with (against a real node's control socket, a fresh home, a fake cluster).
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from conftest import Served, invoke

from daemon.cli.main import main

EXEMPT = {("daemon",): "runs until stopped; what it prints is its log"}


def _leaves(group: click.Group, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], click.Command]:
    ctx = click.Context(group)
    leaves: dict[tuple[str, ...], click.Command] = {}
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None
        if isinstance(command, click.Group):
            leaves |= _leaves(command, (*prefix, name))
        else:
            leaves[(*prefix, name)] = command
    return leaves


def _argv(tmp: Path, served: Served) -> dict[tuple[str, ...], list[str]]:
    """Each command's full command line (global options first)."""
    sock = ["--socket", str(served.socket)]
    home = ["--home", str(served.home)]
    fresh = ["--home", str(tmp / "fresh")]
    cluster = ["--dir", str(tmp / "cluster")]
    peer = served.node.host.peer_id
    return {
        ("status",): [*sock, "status"],
        ("peers",): [*sock, "peers"],
        ("limits",): [*sock, "limits", "--threads", "2"],
        ("logs",): [*sock, "logs", "-n", "5"],
        ("doctor",): [*sock, *home, "doctor"],
        ("connect",): [*sock, "connect", f"/ip4/127.0.0.1/tcp/9/p2p/{peer}"],
        ("train",): [*sock, "train", "pause"],
        ("checkpoint",): [*sock, "checkpoint", str(tmp / "m.safetensors")],
        ("invite",): [*sock, "invite", "--include-loopback"],
        ("stop",): [*sock, "stop", "--no-wait"],
        ("init",): [*fresh, "init", "--task", "digits"],
        ("id",): [*home, "id"],
        ("config", "show"): [*home, "config", "show"],
        ("swarm-key", "generate"): ["swarm-key", "generate", str(tmp / "swarm.key")],
        ("task", "options"): ["task", "options", "digits"],
        ("task", "new"): ["task", "new", "mine", "--dir", str(tmp)],
        ("task", "check"): ["task", "check", "no-such-task"],
        ("cluster", "up"): ["cluster", "up", *cluster, "--nodes", "1"],
        ("cluster", "status"): ["cluster", "status", *cluster],
        ("cluster", "stop"): ["cluster", "stop", *cluster, "--node", "0"],
        ("cluster", "start"): ["cluster", "start", *cluster, "--node", "0"],
        ("cluster", "down"): ["cluster", "down", *cluster],
        ("cluster", "partition"): ["cluster", "partition", *cluster, "0"],
        ("cluster", "heal"): ["cluster", "heal", *cluster],
        ("cluster", "demo"): ["cluster", "demo", *cluster],
    }


def test_every_command_has_json() -> None:
    missing = [" ".join(path) for path, command in _leaves(main).items()
               if path not in EXEMPT and not any(p.name == "as_json" for p in command.params)]
    assert missing == []


async def test_every_command_prints_one_json_document(
    served_node: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A cluster dir with an empty manifest: the cluster commands answer without starting a daemon.
    (tmp_path / "cluster").mkdir()
    (tmp_path / "cluster" / "cluster.json").write_text('{"nodes": []}')
    monkeypatch.setattr("daemon.cli.demo.run_demo", lambda *a, **k: {"nodes": 1, "all_nodes_agree": True})
    argv = _argv(tmp_path, served_node)
    leaves = set(_leaves(main)) - set(EXEMPT)
    assert leaves == set(argv), "list the new command's arguments in _argv"
    outcomes = {}
    for path in sorted(leaves):
        result = await invoke(*argv[path], "--json")
        assert result.exception is None or isinstance(result.exception, SystemExit), (path, result.output)
        try:
            document = json.loads(result.stdout)
        except ValueError:
            pytest.fail(f"`meshtrain {' '.join(path)} --json`: not one JSON document:\n{result.stdout}")
        outcomes[path] = (result.exit_code, document)
    # Spot checks that these are the commands' real answers, not only their errors.
    assert outcomes[("status",)][1]["peer_id"] == served_node.node.host.peer_id
    assert outcomes[("id",)][1]["peer_id"] == served_node.node.host.peer_id
    assert outcomes[("invite",)][1]["token"].startswith("mtinv1-")
    assert outcomes[("stop",)][1] == {"stopping": True, "exited": False} and served_node.stops == ["stop"]
    assert outcomes[("task", "check")] [0] == 1 and outcomes[("task", "check")][1]["ok"] is False
    assert outcomes[("cluster", "up")][1]["error"].endswith("(`meshtrain cluster down` first)")
    assert outcomes[("cluster", "demo")][1] == {"nodes": 1, "all_nodes_agree": True}
    succeeded = {path for path, (code, _) in outcomes.items() if code == 0}
    assert succeeded >= {("status",), ("peers",), ("limits",), ("logs",), ("doctor",), ("train",),
                         ("checkpoint",), ("invite",), ("stop",), ("init",), ("id",), ("config", "show"),
                         ("swarm-key", "generate"), ("task", "options"), ("task", "new")}


async def test_global_json_is_the_same_as_the_commands(served_node: Served) -> None:
    before = await invoke("--socket", str(served_node.socket), "--json", "peers")
    after = await invoke("--socket", str(served_node.socket), "peers", "--json")
    env = await invoke("--socket", str(served_node.socket), "peers", env={"MESHTRAIN_JSON": "1"})
    assert json.loads(before.stdout) == json.loads(after.stdout) == json.loads(env.stdout) == {"peers": []}
