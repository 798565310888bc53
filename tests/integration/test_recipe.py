"""The README's multi-machine recipe, step by step, with six daemons on loopback.

No ``cluster up``: the founder is set up with ``meshtrain init``, ``meshtrain invite`` prints a token on
it, five more homes are made with ``meshtrain init --join TOKEN``, and each node runs ``meshtrain
daemon``, exactly the commands a user types on six machines. The only edit to what ``init`` writes is
the one a user on a LAN makes (``[node] dial_private_addrs = true``: loopback is a private address) plus
short rounds for the test's sake. Checks: the joiners' config (bootstrap, pinned genesis, run, task) came
from the token; every node trains the whole training set in an order of its own (no shard configured,
distinct data seeds); six nodes train to ``max_rounds`` and discard no round as stale; all end on one
state hash over every contribution; ``meshtrain doctor --json`` on a node reads its running daemon.

The recipe runs once per module (``recipe``: 49 s with six daemons on 2 shared cores, so marked slow,
``make test-slow``); each test checks one promise of it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tomli_w

import crdt
import p2p
import training
from daemon.cli.cluster import Cluster, converged
from daemon.home import Home

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

NODES = 6
ROUNDS = 8
DEADLINE_S = 300.0
MESHTRAIN = Path(sys.executable).with_name("meshtrain")  # the console script `pip install` made
LAN = {"node": {"dial_private_addrs": True}}  # what a user on a LAN (here: loopback) adds
ANY = "/ip4/127.0.0.1/tcp/0"  # the OS picks; the invite carries the port the founder got
FAST = {"training": {"max_rounds": ROUNDS, "eval_every": 1000}, "diloco": {"inner_steps": 10}}


def meshtrain(*args: str) -> dict[str, Any]:
    """Run one CLI command with --json; its JSON document (failing the test, with its output, on error)."""
    proc = subprocess.run([str(MESHTRAIN), *args, "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"meshtrain {args}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout)


def edit_config(home: Path, changes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Merge ``changes`` into a home's config.toml (as a user editing it would); the config before."""
    path = Home(home).config_file
    config = tomllib.loads(path.read_text())
    before = json.loads(json.dumps(config))
    for section, values in changes.items():
        config.setdefault(section, {}).update(values)
    path.write_text(tomli_w.dumps(config))
    return before


def start_daemon(home: Path) -> None:
    """``meshtrain daemon --home HOME`` in the background, logging to HOME/daemon.log."""
    with open(home / "daemon.log", "ab") as log:
        subprocess.Popen(
            [str(MESHTRAIN), "daemon", "--home", str(home)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def watch(directory: Path, homes: list[Path], peer_ids: list[str]) -> Cluster:
    """A manifest over the homes so far, so the cluster harness can poll and stop them (it starts none)."""
    directory.mkdir(exist_ok=True)
    nodes = [
        {"index": i, "home": str(home), "port": 0, "peer_id": peer}
        for i, (home, peer) in enumerate(zip(homes, peer_ids, strict=True))
    ]
    (directory / "cluster.json").write_text(json.dumps({"nodes": nodes}))
    return Cluster(directory)


@dataclass
class Recipe:
    homes: list[Path]
    peer_ids: list[str]
    genesis: str
    final: list[dict[str, Any]]
    """Every node's status once all are done and agree."""
    doctor: dict[str, Any]
    """``meshtrain doctor --json`` on a joiner, then."""


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Recipe]:
    """The README's recipe on six homes; every daemon is stopped at the end (their log tails printed)."""
    tmp = tmp_path_factory.mktemp("recipe")
    homes = [tmp / f"machine{i}" for i in range(NODES)]
    try:
        yield _run_recipe(tmp, homes)
    finally:
        watcher = Cluster(tmp / "watch")
        if watcher.manifest_path.exists():
            watcher.down()
        for log in sorted(tmp.glob("machine*/daemon.log")):
            print(f"===== {log} (tail) =====")
            print("\n".join(log.read_text(errors="replace").splitlines()[-40:]))


def _run_recipe(tmp: Path, homes: list[Path]) -> Recipe:
    founder = homes[0]
    made = meshtrain("init", "--home", str(founder), "--run", "recipe", "--task", "digits", "--listen", ANY)
    assert made["joined"] is False and made["task"] == "digits"
    edit_config(founder, LAN | FAST)
    start_daemon(founder)
    peer_ids = [made["peer_id"]]
    watcher = watch(tmp / "watch", homes[:1], peer_ids)
    watcher.wait_until(lambda s: s[0].get("state_hash") is not None, timeout_s=DEADLINE_S, what="the founder")

    invite = meshtrain("invite", "--home", str(founder), "--include-loopback")
    assert invite["run"] == "recipe" and invite["task"] == "digits" and not invite["private"]
    genesis = invite["genesis"]
    for home in homes[1:]:
        joined = meshtrain("init", "--home", str(home), "--join", invite["token"], "--listen", ANY)
        assert joined["joined"] is True and joined["run"] == "recipe" and joined["task"] == "digits"
        written = edit_config(home, LAN | FAST)
        node = written["node"]
        # What `init --join` wrote: the run, the pinned genesis and the founder as bootstrap, from the token;
        # private addresses not dialed (the internet default: the user opts in on a LAN); no data shard.
        assert node["run"] == "recipe" and node["genesis"] == genesis
        assert [a.rpartition("/p2p/")[2] for a in node["bootstrap"]] == [peer_ids[0]]
        assert node["dial_private_addrs"] is False and written["training"]["shard"] == -1
        peer_ids.append(joined["peer_id"])
        start_daemon(home)

    watcher = watch(tmp / "watch", homes, peer_ids)
    final = watcher.wait_until(
        lambda s: all(x.get("training") == "done" for x in s) and converged(s),
        timeout_s=DEADLINE_S,
        what=f"six nodes done with {ROUNDS} rounds each, on one state hash",
    )
    doctor = meshtrain("doctor", "--home", str(homes[3]))
    return Recipe(homes, peer_ids, genesis, final, doctor)


def test_six_machines_join_train_and_agree(recipe: Recipe) -> None:
    assert len({s["state_hash"] for s in recipe.final}) == 1
    for status in recipe.final:
        assert status["genesis"] == recipe.genesis and status["run"] == "recipe"
        assert status["round"] == ROUNDS and status["contributions"] == NODES * ROUNDS
        assert status["counters"]["rejected"] == 0, status["counters"]
        assert all(status["version_vector"].get(p) == ROUNDS for p in recipe.peer_ids)


def test_every_node_trains_its_own_data_order(recipe: Recipe) -> None:
    assert all(status["shard"] == -1 for status in recipe.final)  # the whole training set, own order
    identities = [p2p.load_or_create_identity(Home(home).identity_file) for home in recipe.homes]
    keys = [crdt.Signer.from_seed(identity.seed).public_key for identity in identities]  # as node.py seeds
    assert len({training.data_seed(key) for key in keys}) == NODES  # six different orders


def test_doctor_reads_the_running_joiner(recipe: Recipe) -> None:
    checks = {c["name"]: c for c in recipe.doctor["checks"]}
    assert checks["daemon"]["verdict"] == "ok"
    connectivity = recipe.doctor["connectivity"]
    assert connectivity is not None and connectivity["findings"]
    assert connectivity["verdict"] in ("ok", "warn")  # loopback: AutoNAT may not have decided yet


@pytest.mark.xfail(
    strict=True,
    reason="daemon bug: a joiner's first round starts from the genesis before its first pull lands, and is "
    "discarded as stale (staleness = the run's contributions so far); see daemon/node/rounds.py _train",
)
def test_no_round_is_discarded_as_stale(recipe: Recipe) -> None:
    skipped = {s["index"]: s["counters"]["stale_rounds_skipped"] for s in recipe.final}
    assert not any(skipped.values()), skipped
