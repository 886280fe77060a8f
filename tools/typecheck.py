"""Type-check the installed package ``gradwire`` with mypy (run from anywhere).

Why a link tree: server/, worker/ and compressors/ install as ``gradwire.server``,
``gradwire.worker`` and ``gradwire.compressors`` through setuptools' package-dir mapping,
and every import in the code uses those installed names. mypy resolves modules from
folders only: it cannot run the import hook of a PEP 660 editable install (so
``mypy -p gradwire`` finds no ``gradwire.server``), and pointed at the checkout it would
call ``server/coordinator.py`` ``server.coordinator`` and fail to find
``gradwire.server.*``. So this script lays the installed layout out as symbolic links
in a temporary folder (``gradwire/`` with the checkout's gradwire/ entries plus
``server``, ``worker`` and ``compressors``), the same mapping as
``[tool.setuptools.package-dir]`` in pyproject.toml, and runs ``mypy -p gradwire``
there with the ``[tool.mypy]`` settings of pyproject.toml. Error paths are printed
relative to the link tree, i.e. as installed names (``gradwire/server/coordinator.py``
is ``server/coordinator.py`` in the checkout).

Usage: ``python3 tools/typecheck.py [extra mypy arguments]``; the exit status is mypy's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def package_dirs() -> dict[str, Path]:
    """Installed package name -> checkout folder, from pyproject.toml's package-dir mapping."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mapping = config["tool"]["setuptools"]["package-dir"]
    return {name: ROOT / folder for name, folder in mapping.items()}


def build_link_tree(target: Path) -> None:
    """``target/gradwire/...`` laid out as installed, every entry a link into the checkout."""
    dirs = package_dirs()
    top = target / "gradwire"
    top.mkdir()
    for entry in dirs["gradwire"].iterdir():
        if entry.name != "__pycache__":
            (top / entry.name).symlink_to(entry)
    for name, folder in dirs.items():
        if name != "gradwire":
            parent, _, leaf = name.rpartition(".")
            if parent != "gradwire":
                raise SystemExit(f"typecheck: {name} is not a direct subpackage of gradwire")
            (top / leaf).symlink_to(folder, target_is_directory=True)


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="gradwire-typecheck-") as tmp:
        build_link_tree(Path(tmp))
        cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
               "--cache-dir", os.path.join(tmp, ".mypy_cache"), "-p", "gradwire", *argv]
        return subprocess.run(cmd, cwd=tmp).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
