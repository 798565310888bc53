"""The local cluster harness's manifest and configs (no daemon started): loopback and namespaced nodes."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from daemon.cli.cluster import Cluster, ClusterError
from daemon.home import Home


def _config(info_home: str) -> dict:
    return tomllib.loads(Home(Path(info_home)).config_file.read_text())


def test_loopback_nodes_bootstrap_from_node_0(tmp_path: Path) -> None:
    infos = Cluster(tmp_path / "c").create(3, task="digits")
    assert [i.host for i in infos] == ["127.0.0.1"] * 3 and not any(i.netns for i in infos)
    node = _config(infos[2].home)["node"]
    assert node["listen"] == [f"/ip4/127.0.0.1/tcp/{infos[2].port}"]
    assert node["bootstrap"] == [f"/ip4/127.0.0.1/tcp/{infos[0].port}/p2p/{infos[0].peer_id}"]
    assert _config(infos[0].home)["node"]["bootstrap"] == []


def test_namespaced_nodes_listen_on_their_own_addresses(tmp_path: Path) -> None:
    group = Cluster(tmp_path / "c")
    group.create(2, hosts=["10.201.1.2", "10.202.4.2"], netns=["mts1", "mtn4"])
    infos = group.nodes()  # read back from the manifest: what `start` uses
    assert [(i.host, i.netns) for i in infos] == [("10.201.1.2", "mts1"), ("10.202.4.2", "mtn4")]
    node = _config(infos[1].home)["node"]
    assert node["listen"] == [f"/ip4/10.202.4.2/tcp/{infos[1].port}"]
    assert node["bootstrap"] == [f"/ip4/10.201.1.2/tcp/{infos[0].port}/p2p/{infos[0].peer_id}"]
    assert node["dial_private_addrs"] is True


def test_one_host_and_namespace_per_node(tmp_path: Path) -> None:
    with pytest.raises(ClusterError, match="one entry per node"):
        Cluster(tmp_path / "c").create(3, hosts=["10.201.1.2"], netns=["a", "b", "c"])
