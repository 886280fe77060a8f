"""Codec registry: spec string -> configured ``Codec``.

Every module in the ``compressors`` package, sub-packages included, is imported on
first use, so a new codec only needs the ``@register`` decorator in its own module
(docs/adding-a-codec.md). Modules whose name starts with ``_`` are skipped.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import typing

from gradwire.compressors.base import Codec
from gradwire.compressors.spec import SpecError, parse_bool, parse_spec

CODECS: dict[str, type[Codec]] = {}
_LOADED = False


def register(cls: type[Codec]) -> type[Codec]:
    if cls.name in CODECS and CODECS[cls.name] is not cls:
        raise RuntimeError(f"codec name {cls.name!r} registered twice")
    CODECS[cls.name] = cls
    return cls


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    import gradwire.compressors as package

    # walk_packages, not iter_modules: codec families may live in sub-packages (folders).
    # It imports each sub-package to look inside; _reraise makes a broken one fail loudly
    # (its default would skip a sub-package whose import raises ImportError).
    for info in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}.", onerror=_reraise):
        if not info.name.rpartition(".")[2].startswith("_"):
            importlib.import_module(info.name)
    _LOADED = True


def _reraise(_name: str) -> None:
    raise  # re-raises the current error: walk_packages calls this inside its except block


def available_codecs() -> list[str]:
    _load_all()
    return sorted(CODECS)


def _convert(raw: str, annotation: typing.Any, key: str, spec_text: str):
    kind = annotation if isinstance(annotation, type) else None
    if isinstance(annotation, str):  # postponed annotations
        kind = {"int": int, "float": float, "bool": bool, "str": str}.get(annotation, str)
    try:
        if kind is bool:
            return parse_bool(raw)
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        return raw
    except (ValueError, SpecError) as exc:
        raise SpecError(f"option {key}={raw!r} in {spec_text!r}: {exc}") from None


def create_codec(spec_text: str) -> Codec:
    """Build a codec from its spec string; raises SpecError with a reason."""
    _load_all()
    parsed = parse_spec(spec_text)
    cls = CODECS.get(parsed.name)
    if cls is None:
        raise SpecError(
            f"unknown codec {parsed.name!r}; available: {', '.join(available_codecs())}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, raw in parsed.options.items():
        if key not in fields:
            raise SpecError(
                f"codec {parsed.name!r} has no option {key!r}; options: {', '.join(fields) or 'none'}"
            )
        kwargs[key] = _convert(raw, fields[key].type, key, spec_text)
    try:
        return cls(**kwargs)
    except SpecError:
        raise
    except (ValueError, TypeError) as exc:
        raise SpecError(f"bad options in codec spec {spec_text!r}: {exc}") from None
