"""GRADWIRE_* environment variables as the defaults of command-line flags (PS and worker alike)."""

from __future__ import annotations

import os


def env(name: str, default):
    value = os.environ.get(f"GRADWIRE_{name}")
    return default if value is None or value == "" else type(default)(value) if default is not None else value
