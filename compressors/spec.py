"""Codec spec strings: ``name:key=value,key=value``.

A value may itself be a spec; wrap it in parentheses when it has options of its
own, e.g. ``tpc:order=3,residual=(huffman:bits=4,coder=ans)``. A nested spec
without commas needs no parentheses: ``tpc:residual=fp16``.
"""

from __future__ import annotations

from dataclasses import dataclass


class SpecError(ValueError):
    """A codec spec string is malformed or names an unknown codec or option."""


@dataclass(frozen=True)
class ParsedSpec:
    name: str
    options: dict[str, str]


def _split_top_level(text: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in text:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
            if depth < 0:
                raise SpecError(f"unbalanced parentheses in {text!r}")
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth != 0:
        raise SpecError(f"unbalanced parentheses in {text!r}")
    parts.append("".join(current))
    return parts


def _strip_parens(value: str) -> str:
    if len(value) >= 2 and value[0] in "([" and value[-1] in ")]":
        inner = value[1:-1]
        try:
            _split_top_level(inner)
        except SpecError:
            return value
        return inner
    return value


def parse_spec(text: str) -> ParsedSpec:
    text = text.strip()
    if not text:
        raise SpecError("empty codec spec")
    name, _, rest = text.partition(":")
    name = name.strip().lower()
    if not name.replace("_", "").replace("-", "").isalnum():
        raise SpecError(f"bad codec name {name!r} in spec {text!r}")
    options: dict[str, str] = {}
    if rest.strip():
        for part in _split_top_level(rest):
            key, eq, value = part.partition("=")
            key = key.strip()
            if not eq or not key:
                raise SpecError(f"option {part!r} in spec {text!r} is not key=value")
            if key in options:
                raise SpecError(f"option {key!r} given twice in spec {text!r}")
            options[key] = _strip_parens(value.strip())
    return ParsedSpec(name, options)


def parse_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise SpecError(f"expected a boolean (0/1), got {value!r}")
