"""GRADWIRE_* environment variables as the defaults of command-line flags (PS and worker alike)."""

from __future__ import annotations

import os


def env(name: str, default):
    """GRADWIRE_<name> as the text the user gave, else ``default``.

    The text is converted by the flag's argparse ``type`` when (and only when) a command parses
    that flag, so a bad GRADWIRE_ROUNDS fails `gradwire server` with one line and leaves
    `gradwire status` alone.
    """
    value = os.environ.get(f"GRADWIRE_{name}")
    return default if value is None or value == "" else value
