"""The README's multi-machine recipe, step by step, with six daemons on loopback.

No ``cluster up``: the founder is set up with ``meshtrain init``, ``meshtrain invite`` prints a token on
it, five more homes are made with ``meshtrain init --join TOKEN``, and each node runs ``meshtrain
daemon``, exactly the commands a user types on six machines. The only edit to what ``init`` writes is
the one a user on a LAN makes (``[node] dial_private_addrs = true``: loopback is a private address) plus
short rounds for the test's sake. Checks: the joiners' config (bootstrap, pinned genesis, run, task) came
from the token; every node trains the whole training set in an order of its own (no shard configured,
distinct data seeds); six nodes train to ``max_rounds`` and discard no round as stale; all end on one
state hash over every contribution; ``meshtrain doctor --json`` on a node reads its running daemon.

Marked slow: 49 s with six daemons on 2 shared cores (``make test-slow``). The commands run through
cli_steps.meshtrain (the CLI in-process, as typed) and the ``daemons`` fixture (``meshtrain daemon``).
"""

from __future__ import annotations

import json
import subprocess
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from cli_steps import meshtrain, wait_for

import crdt
import p2p
import training
from daemon.home import Home
from daemon.status import Status

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

NODES = 6
ROUNDS = 8
DEADLINE_S = 300.0
ANY = "/ip4/127.0.0.1/tcp/0"  # the OS picks; the invite carries the port the founder got
LAN = {"node": {"dial_private_addrs": True}}  # what a user on a LAN (here: loopback) adds
FAST = {"training": {"max_rounds": ROUNDS, "eval_every": 1000}, "diloco": {"inner_steps": 10}}


def cli(*args: str) -> dict[str, Any]:
    """One command with --json, as typed; its JSON document."""
    return json.loads(meshtrain(*args, "--json"))


def edit_config(home: Path, changes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Merge ``changes`` into a home's config.toml (as a user editing it would); the config before."""
    path = Home(home).config_file
    config = tomllib.loads(path.read_text())
    before = json.loads(json.dumps(config))
    for section, values in changes.items():
        config.setdefault(section, {}).update(values)
    path.write_text(tomli_w.dumps(config))
    return before


def all_done_on_one_hash(statuses: list[Status]) -> bool:
    return all(s.training == "done" for s in statuses) and len({s.state_hash for s in statuses}) == 1


def test_six_machines_by_the_readme_recipe(
    tmp_path: Path, daemons: Callable[..., subprocess.Popen[bytes]]
) -> None:
    homes = [tmp_path / f"machine{i}" for i in range(NODES)]
    founder = homes[0]
    made = cli("init", "--home", str(founder), "--run", "recipe", "--task", "digits", "--listen", ANY)
    assert made["joined"] is False and made["task"] == "digits"
    edit_config(founder, LAN | FAST)
    daemons(founder)
    wait_for([founder], lambda s: s[0].state_hash is not None, timeout_s=DEADLINE_S, what="the founder")

    invite = cli("invite", "--home", str(founder), "--include-loopback")
    assert invite["run"] == "recipe" and invite["task"] == "digits" and not invite["private"]
    genesis = invite["genesis"]
    peer_ids = [made["peer_id"]]
    for home in homes[1:]:
        joined = cli("init", "--home", str(home), "--join", invite["token"], "--listen", ANY)
        assert joined["joined"] is True and joined["run"] == "recipe" and joined["task"] == "digits"
        written = edit_config(home, LAN | FAST)
        node = written["node"]
        # What `init --join` wrote: the run, the pinned genesis and the founder as bootstrap, from the token;
        # private addresses not dialed (the internet default: the user opts in on a LAN); no data shard.
        assert node["run"] == "recipe" and node["genesis"] == genesis
        assert [a.rpartition("/p2p/")[2] for a in node["bootstrap"]] == [peer_ids[0]]
        assert node["dial_private_addrs"] is False and written["training"]["shard"] == -1
        peer_ids.append(joined["peer_id"])
        daemons(home)

    what = f"six nodes done with {ROUNDS} rounds each, on one state hash"
    final = wait_for(homes, all_done_on_one_hash, timeout_s=DEADLINE_S, what=what)
    for status in final:
        assert status.genesis == genesis and status.run == "recipe"
        assert status.round == ROUNDS and status.contributions == NODES * ROUNDS
        assert status.counters.rejected == 0, status.counters
        assert all(status.version_vector.get(p) == ROUNDS for p in peer_ids)

    # Six data orders: no shard configured, and a data seed of each node's own key.
    assert all(status.shard == -1 for status in final)
    identities = [p2p.load_or_create_identity(Home(home).identity_file) for home in homes]
    keys = [crdt.Signer.from_seed(identity.seed).public_key for identity in identities]  # as node.py seeds
    assert len({training.data_seed(key) for key in keys}) == NODES

    report = cli("doctor", "--home", str(homes[3]))
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["daemon"]["verdict"] == "ok"
    connectivity = report["connectivity"]
    assert connectivity is not None and connectivity["findings"]
    assert connectivity["verdict"] in ("ok", "warn")  # loopback: AutoNAT may not have decided yet

    # Joiners that start together once dropped their first rounds as stale (fixed in daemon/node/rounds.py:
    # catch-up before a round, N from heartbeats, a drop bound from connected peers).
    stale = {s.peer_id[-6:]: n for s in final if (n := s.counters.stale_rounds_skipped)}
    assert not stale, f"rounds discarded as stale: {stale}"
