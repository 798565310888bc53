import dataclasses

import pytest

import training
from training import ConfigError


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Example:
    """A Config with one field of each kind a TOML table can hold."""

    width: int = 8
    """Hidden width."""
    lr: float = 0.1
    """Learning
    rate (two lines)."""
    name: str = "x"
    flag: bool = False
    """A switch."""
    betas: tuple[float, float] = (0.9, 0.99)
    """Two numbers."""
    sizes: list[int] = dataclasses.field(default_factory=lambda: [1, 2])
    """Any number of integers."""
    limit: int | None = None
    """Optional."""


def _build(**options: object) -> Example:
    return training.build_config(Example, options, section="task")


def test_toml_values_become_the_field_types() -> None:
    c = _build(width=16, lr=1, name="y", flag=True, betas=[0.8, 1], sizes=[3], limit=4)
    assert c == Example(width=16, lr=1.0, name="y", flag=True, betas=(0.8, 1.0), sizes=[3], limit=4)
    assert isinstance(c.lr, float) and isinstance(c.betas, tuple) and isinstance(c.betas[1], float)
    assert _build(limit=None).limit is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"width": "16"}, r"task\.width must be an integer, got '16' \(str\)"),
        ({"width": 16.0}, r"task\.width must be an integer"),
        ({"width": True}, r"task\.width must be an integer"),
        ({"lr": "0.1"}, r"task\.lr must be a number"),
        ({"flag": 1}, r"task\.flag must be true or false"),
        ({"name": 3}, r"task\.name must be a string"),
        ({"betas": [0.9]}, r"task\.betas must be a list of 2 \(a number, a number\), got 1 items"),
        ({"betas": [0.9, "a"]}, r"task\.betas\[1\] must be a number"),
        ({"sizes": 3}, r"task\.sizes must be a list of \(an integer\)"),
        ({"sizes": [1, 2.5]}, r"task\.sizes\[1\] must be an integer"),
        ({"limit": "3"}, r"task\.limit must be an integer"),
        ({"widht": 3}, r"unknown option\(s\) task\.widht; known: betas, flag"),
    ],
)
def test_errors_name_the_key(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _build(**options)


def test_missing_required_field_is_a_config_error() -> None:
    @dataclasses.dataclass(kw_only=True)
    class Needs:
        size: int

    with pytest.raises(ConfigError, match=r"\[task\].*size"):
        training.build_config(Needs, {}, section="task")


def test_describe_options_reads_field_docstrings() -> None:
    rows = {r.key: r for r in training.describe_options(Example)}
    assert list(rows) == ["width", "lr", "name", "flag", "betas", "sizes", "limit"]
    assert rows["lr"].doc == "Learning rate (two lines)." and rows["lr"].type == "float"
    assert rows["name"].doc == ""  # no docstring below it
    assert rows["betas"].type == "tuple[float, float]" and rows["betas"].default == (0.9, 0.99)
    assert rows["sizes"].default == [1, 2] and rows["limit"].type == "int | None"


def test_every_builtin_option_is_documented() -> None:
    for name in ("digits", "stdlib-lm"):
        rows = training.describe_task_options(name)
        assert rows and all(r.doc for r in rows), [r.key for r in rows if not r.doc]
    diloco = training.describe_options(training.DilocoConfig)
    assert all(r.doc for r in diloco), [r.key for r in diloco if not r.doc]
    assert {"warmup_steps", "total_steps", "grad_accum", "inner_optimizer"} <= {r.key for r in diloco}
