from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from daemon.config import Config, ConfigError, load_config
from daemon.config_template import render_config

PEER_ADDR = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWLRPJAA5o6xyK1kT9w8fLFE9Cj2cJhe1Dx6YUtDwkMEDK"


def test_missing_file_means_defaults(tmp_path: Path) -> None:
    assert load_config(tmp_path) == Config()


def test_rendered_config_loads_back(tmp_path: Path) -> None:
    text = render_config(run="r1", bootstrap=(PEER_ADDR,), task="digits", max_rounds=3)
    (tmp_path / "config.toml").write_text(text)
    config = load_config(tmp_path)
    assert config.node.run == "r1"
    assert config.node.bootstrap == (PEER_ADDR,)
    assert config.training.task == "digits" and config.training.max_rounds == 3
    assert "# " in text  # commented for people


@pytest.mark.parametrize(
    ("toml", "names"),
    [
        ("[node]\nrn = 'x'", "[node] unknown key 'rn'"),
        ("[nodes]\n", "unknown section [nodes]"),
        ("[training]\nmax_rounds = 'ten'", "training.max_rounds must be an integer"),
        ("[training]\nenabled = 1", "training.enabled must be true or false"),
        ("[sync]\ninterval_s = -1", "sync.interval_s must be positive"),
        ("[node]\nlisten = '/ip4/0.0.0.0/tcp/1'", "node.listen must be a list of strings"),
        ("node = 3", "[node] must be a table"),
    ],
)
def test_bad_keys_are_named(tmp_path: Path, toml: str, names: str) -> None:
    (tmp_path / "config.toml").write_text(toml)
    with pytest.raises(ConfigError, match=r".*" + names.replace("[", r"\[").replace("]", r"\]")):
        load_config(tmp_path)


def test_invalid_toml_is_reported_with_path(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("[node\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path)


def test_overrides_replace_only_given_keys() -> None:
    config = Config.from_dict(tomllib.loads("[training]\ntask = 'digits'\nmax_rounds = 5"))
    merged = config.with_overrides("training", max_rounds=9, task=None)
    assert merged.training.max_rounds == 9 and merged.training.task == "digits"
    assert config.with_overrides("diloco", inner_steps=3).diloco == {"inner_steps": 3}
    with pytest.raises(ConfigError, match="max_rounds must be an integer"):
        config.with_overrides("training", max_rounds="x")


@pytest.mark.parametrize(
    ("section", "body", "fragment"),
    [
        ("dashboard", {"listen": "0.0.0.0:8465"}, "loopback"),
        ("metrics", {"listen": "9464"}, "host:port"),
        ("log", {"level": "LOUD"}, "log.level"),
    ],
)
def test_new_sections_validate(section: str, body: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        Config.from_dict({section: body})


@pytest.mark.parametrize(
    ("toml", "names"),
    [
        ("[training]\neval_every = 0", "training.eval_every must be an integer >= 1, got 0"),
        ("[training]\nnum_shards = 0", "training.num_shards must be an integer >= 1, got 0"),
        ("[training]\nthreads = 0", "training.threads must be an integer >= 1, got 0"),
        ("[training]\nshard = 4\nnum_shards = 4", "training.shard must be below training.num_shards (4)"),
        ("[sync]\nmax_batch = 100000", "sync.max_batch must be an integer <= 4096"),
        ("[node]\nlisten = ['/ip4/1.2.3/tcp/1']", "node.listen: '/ip4/1.2.3/tcp/1' is not a multiaddr"),
        ("[node]\nlisten = ['/ip4/1.2.3.4/udp/1']", "has no /tcp/<port>"),
        ("[node]\nbootstrap = ['/ip4/1.2.3.4/tcp/4001']", "must end in /p2p/<peer id>"),
        ("[node]\nrun = 'a\"b'", "node.run must be 1-64 letters"),
        ("[node]\ngenesis = 'abc'", "node.genesis must be 64 lowercase hex digits"),
        ("[node]\nbootstrap = [3]", "node.bootstrap[0] must be a string, got 3"),
    ],
)
def test_values_that_would_break_a_started_node_are_refused(tmp_path: Path, toml: str, names: str) -> None:
    (tmp_path / "config.toml").write_text(toml)
    with pytest.raises(ConfigError) as error:
        load_config(tmp_path)
    assert names in str(error.value) and str(tmp_path) in str(error.value)


def test_an_unreadable_config_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "config.toml").mkdir()  # a directory where the file should be
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path)


def test_a_value_that_would_break_the_toml_is_refused_before_writing() -> None:
    with pytest.raises(ConfigError, match=r"node\.run"):
        render_config(run='a"b')
    text = render_config(run="r-1", genesis="ab" * 32)
    assert Config.from_dict(tomllib.loads(text)).node.genesis == "ab" * 32
