"""Optional dependencies: a command that needs a missing extra says which, in one line."""

from __future__ import annotations

import importlib.util

# module -> the pyproject extra that installs it
EXTRAS = {"matplotlib": "plots"}


def require(module: str, what: str) -> None:
    """SystemExit with one line naming the extra when ``module`` is not installed."""
    if importlib.util.find_spec(module) is None:
        extra = EXTRAS.get(module, module)
        raise SystemExit(f"{what} needs {module}: pip install 'gradwire[{extra}]' (or -e '.[{extra}]' in a checkout)")
