"""Hostile bytes against the daemon's decoders (wire messages, config files) and the suspect tracker.

Complements tests/daemon/test_wire.py (random binary): here the garbage is *structured* (maps with the
right keys and wrong types, deep nesting, huge ints, NaN) so it gets past msgpack into field checks.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.config import Config, ConfigError, load_config
from daemon.node.wire import (
    Announcement,
    GenesisOffer,
    GenesisRequest,
    SnapshotOffer,
    SyncRequest,
    SyncResponse,
    WireError,
)

DECODERS = (
    Announcement.decode,
    SyncRequest.decode,
    SyncResponse.decode,
    GenesisRequest.decode,
    GenesisOffer.decode,
    SnapshotOffer.decode,
)
KEYS = [
    "v",
    "run",
    "genesis",
    "digest",
    "contributions",
    "snapshot_required",
    "author",
    "seq",
    "fragment",
    "size",
    "id",
    "meta",
    "fragments",
    "checkpoints",
    "blob",
    "root",
]

_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.binary(max_size=40),
)
_values = st.recursive(
    _leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=4),
    max_leaves=20,
)
_messages = st.dictionaries(st.sampled_from(KEYS), _values, max_size=8).map(
    lambda d: {**d, "v": d.get("v", 1)}
)


def _check_wire(message: dict) -> None:
    data = msgpack.packb(message, use_bin_type=True)
    for decoder in DECODERS:
        with contextlib.suppress(WireError):
            decoded = decoder(data)
            for name in getattr(decoded, "__slots__", ()):  # whatever passed has the declared types
                value = getattr(decoded, name)
                assert not isinstance(value, dict | float) or (
                    isinstance(value, float) and math.isfinite(value)
                )


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_messages)
def test_structured_wire_garbage(message: dict) -> None:
    _check_wire(message)


@pytest.mark.slow
@settings(max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_messages)
def test_structured_wire_garbage_slow(message: dict) -> None:
    _check_wire(message)


def test_deep_nesting_and_oversize() -> None:
    deep = b"\x91" * 100_000 + b"\x00"  # 100k nested arrays: must not blow the stack
    huge = msgpack.packb({"v": 1, "run": "x" * (2 << 20)})
    for data in (deep, huge, b"\xdd\xff\xff\xff\xff"):  # array32 announcing 4G items
        for decoder in DECODERS:
            with pytest.raises(WireError):
                decoder(data)


_toml_values = st.one_of(
    st.integers(-10, 10**20),
    st.floats(allow_nan=True),
    st.text(max_size=5),
    st.booleans(),
    st.lists(st.text(max_size=3), max_size=3),
    st.lists(st.integers(), max_size=2),
)
_sections = st.sampled_from(["node", "training", "sync", "api", "diloco", "log", "limits", "bogus"])
_keys = st.sampled_from(
    [
        "run",
        "listen",
        "bootstrap",
        "swarm_key",
        "allow_peers",
        "enabled",
        "task",
        "max_rounds",
        "threads",
        "interval_s",
        "socket",
        "typo",
    ]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(
        _sections, st.one_of(_toml_values, st.dictionaries(_keys, _toml_values, max_size=4)), max_size=4
    )
)
def test_config_garbage_is_config_error(data: dict) -> None:
    with contextlib.suppress(ConfigError):
        Config.from_dict(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_config_file_bytes(tmp_path_factory: pytest.TempPathFactory, raw: bytes) -> None:
    home = tmp_path_factory.mktemp("home")
    (home / "config.toml").write_bytes(raw)
    try:
        load_config(home)
    except ConfigError:
        pass
    except UnicodeDecodeError:
        pytest.fail("a non-UTF-8 config file must be a ConfigError")


def test_config_non_utf8(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_bytes(b"\xff\xfe[node]")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(tmp_path)
