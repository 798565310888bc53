"""Options: TOML tables into typed, validated Config dataclasses, and the rows that document them.

Theory of operation
-------------------
A config file's `[task]` and `[diloco]` tables arrive as TOML values: int, float, str, bool, list (and
nested tables, which no Config uses). `build_config(Config, options, section=...)` checks every key
against the dataclass fields, converts each value to its field's annotated type, and calls the
constructor, whose `__post_init__` checks ranges and relations. Every error is a ConfigError that names
the key the user has to fix, spelled as in the file: "task.n_embd", "diloco.inner_betas[1]".

Conversions are deliberately few and lossless: an int is accepted where a float is expected (TOML
writes `lr = 1` happily), a list where a tuple is expected, None for an optional field (only from
Python: TOML has no null). Nothing else is converted: "3" for an int, 1.0 for an int or 1 for a bool
are errors, because a silent conversion hides a typo in a file that runs for days.

`describe_options(Config)` returns one (key, type, default, doc) row per field for `meshtrain task
options`; the doc is the field's docstring (the string literal below the field, torchtitan style),
read from the class source with `ast` because Python keeps no attribute docstrings at runtime.

Rejected: pydantic or cattrs (a dependency for six conversion rules, and their error texts name
Python types, not TOML keys); `dataclasses.field(metadata={"doc": ...})` (docs would no longer read as
docstrings in the source, which is where a plug-in author looks first).
"""

import ast
import dataclasses
import inspect
import itertools
import textwrap
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from training._errors import ConfigError

C = TypeVar("C")

_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class OptionInfo:
    """One documented option of a Config: what `meshtrain task options` prints per row."""

    key: str
    """The option's name as written in the TOML table."""
    type: str
    """Its type, Python spelling ("int", "tuple[float, float]", "int | None")."""
    default: Any
    """The value used when the option is absent."""
    doc: str
    """The field's docstring, whitespace-normalized ("" when the source is not available)."""


def build_config(config_cls: type[C], options: Mapping[str, Any], *, section: str) -> C:
    """`config_cls(**options)` with keys checked, values converted to the field types, errors named.

    Raises:
        ConfigError: an unknown key, a value of the wrong type, or whatever `__post_init__` rejects;
            the message names `section.key`.
    """
    fields = {f.name: f for f in dataclasses.fields(config_cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(options) - set(fields))
    if unknown:
        names = ", ".join(f"{section}.{k}" for k in unknown)
        raise ConfigError(f"unknown option(s) {names}; known: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(config_cls)
    values = {k: coerce(v, hints[k], key=f"{section}.{k}") for k, v in options.items()}
    try:
        return config_cls(**values)
    except TypeError as e:  # a required field missing: the dataclass says which
        raise ConfigError(f"[{section}]: {e}") from e


def coerce(value: Any, kind: Any, *, key: str) -> Any:
    """`value` (a TOML value) as an instance of the annotation `kind`, or ConfigError naming `key`."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arm in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arm, key=key)
            except ConfigError:
                continue
        raise ConfigError(f"{key} must be {_describe(kind)}, got {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be {_describe(kind)}, got {value!r}")
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(f"{key} must be {_describe(kind)}, got {len(value)} items: {value!r}")
            pairs = enumerate(zip(value, args, strict=True))
            items = [coerce(v, a, key=f"{key}[{i}]") for i, (v, a) in pairs]
        else:
            items = [coerce(v, args[0] if args else Any, key=f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if kind is Any:
        return value
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind in _KINDS:
        if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
            return value
        raise ConfigError(f"{key} must be {_KINDS[kind]}, got {value!r} ({type(value).__name__})")
    if isinstance(kind, type) and isinstance(value, kind):
        return value
    raise ConfigError(f"{key} must be {_describe(kind)}, got {value!r} ({type(value).__name__})")


def _describe(kind: Any) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None))
    if origin in (tuple, list):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} ({', '.join(_describe(a) for a in args)})"
        return f"a list of ({_describe(args[0]) if args else 'anything'})"
    return _KINDS.get(kind, getattr(kind, "__name__", str(kind)))


def _type_name(kind: Any) -> str:
    return kind.__name__ if isinstance(kind, type) and not typing.get_args(kind) else str(kind)


# ------------------------------------------------------------------------------------------ documenting


def describe_options(config_cls: type) -> list[OptionInfo]:
    """One row per init field of the dataclass `config_cls`, in declaration order."""
    docs = _field_docs(config_cls)
    hints = typing.get_type_hints(config_cls)
    rows = []
    for f in dataclasses.fields(config_cls):
        if not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        doc = docs.get(f.name, "")
        rows.append(OptionInfo(key=f.name, type=_type_name(hints[f.name]), default=default, doc=doc))
    return rows


def _field_docs(config_cls: type) -> dict[str, str]:
    """{field: docstring} from the sources of the class and its bases (a subclass's doc wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(config_cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs |= _own_field_docs(klass)
    return docs


def _own_field_docs(klass: type) -> dict[str, str]:
    """{field: docstring} of the fields the class body declares; {} without source (a REPL class)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for stmt, after in itertools.pairwise(body):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[stmt.target.id] = " ".join(after.value.value.split())
    return docs
