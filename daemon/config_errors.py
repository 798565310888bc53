"""Config errors said the way the file spells its keys: msgspec's validation messages, translated.

msgspec reports ``Expected `int` >= 1, got `int` - at `$.training.eval_every``; an operator reads
``training.eval_every must be an integer >= 1, got 0``. Kept apart from daemon/config.py, which owns what
the keys are, because this is only about how a refusal reads.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

__all__ = ["explain"]

_TYPE_WORDS = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
    "object": "a table",
}
_AT = re.compile(r"^(?P<message>.*) - at `\$(?P<path>[^`]*)`$", re.DOTALL)
_EXPECTED = re.compile(r"^Expected `(?P<type>\w+)`(?:, got `\w+`)?(?: (?P<bound>[<>]=? ?\S+))?$")
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<key>[^`]+)`$")


def explain(error: str, data: Any, config: type[msgspec.Struct]) -> str:
    """A msgspec validation message, said the way the config file spells its keys."""
    match = _AT.match(error)
    message, path = (match["message"], match["path"]) if match else (error, "")
    keys = re.findall(r"\.([A-Za-z_]\w*)|\[(\d+)\]", path)
    dotted = ".".join(k or f"[{i}]" for k, i in keys).replace(".[", "[")
    if unknown := _UNKNOWN.match(message):
        if not dotted:
            return f"unknown section [{unknown['key']}] (known: {', '.join(config.__struct_fields__)})"
        fields = _section_fields(config, dotted.split(".")[0])
        return f"[{dotted}] unknown key {unknown['key']!r} (known: {', '.join(fields)})"
    expected = _EXPECTED.match(message)
    if expected is None:
        return message if not dotted or dotted in message else f"{dotted}: {message}"
    if "." not in dotted and expected["type"] == "object":
        return f"[{dotted}] must be a table"
    got = _value_at(data, keys)
    if expected["type"] == "array":
        return f"{dotted} must be a list of strings, got {got!r}"
    word = _TYPE_WORDS.get(expected["type"], expected["type"])
    bound = expected["bound"]
    if bound in ("> 0", "> 0.0"):
        return f"{dotted} must be positive, got {got!r}"
    return f"{dotted} must be {word}{' ' + bound if bound else ''}, got {got!r}"


def _section_fields(config: type[msgspec.Struct], section: str) -> tuple[str, ...]:
    kind = msgspec.structs.fields(config)
    struct = next((f.type for f in kind if f.name == section), None)
    return getattr(struct, "__struct_fields__", ())


def _value_at(data: Any, keys: list[tuple[str, str]]) -> Any:
    for key, index in keys:
        try:
            data = data[key] if key else data[int(index)]
        except (KeyError, IndexError, TypeError):
            return None
    return data
