from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from daemon.config import Config, ConfigError, load_config, render_config


def test_missing_file_means_defaults(tmp_path: Path) -> None:
    assert load_config(tmp_path) == Config()


def test_rendered_config_loads_back(tmp_path: Path) -> None:
    text = render_config(run="r1", bootstrap=("/ip4/127.0.0.1/tcp/1/p2p/x",), task="digits", max_rounds=3)
    (tmp_path / "config.toml").write_text(text)
    config = load_config(tmp_path)
    assert config.node.run == "r1"
    assert config.node.bootstrap == ("/ip4/127.0.0.1/tcp/1/p2p/x",)
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
