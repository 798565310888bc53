"""daemon.config_errors: msgspec's messages said the way the config file spells its keys."""

from __future__ import annotations

import msgspec
import pytest

from daemon.config import Config
from daemon.config_errors import explain


def _message(data: dict) -> str:
    with pytest.raises(msgspec.ValidationError) as info:
        msgspec.convert(data, Config)
    return explain(str(info.value), data, Config)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"training": {"eval_every": 0}}, "training.eval_every must be an integer >= 1, got 0"),
        ({"sync": {"interval_s": 0}}, "sync.interval_s must be positive, got 0"),
        ({"training": {"max_round": 3}}, "[training] unknown key 'max_round' (known: enabled, task,"),
        ({"trainig": {}}, "unknown section [trainig] (known: node, training,"),
        ({"node": {"bootstrap": "x"}}, "node.bootstrap must be a list of strings, got 'x'"),
        ({"sync": 3}, "[sync] must be a table"),
        ({"node": {"mdns": "yes"}}, "node.mdns must be true or false, got 'yes'"),
    ],
)
def test_a_refusal_names_the_key_as_the_file_spells_it(data: dict, expected: str) -> None:
    assert _message(data).startswith(expected)
