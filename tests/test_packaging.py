"""Packaging: one installed namespace, and every package folder is listed in pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {"gradwire": "gradwire", "gradwire.server": "server", "gradwire.worker": "worker",
          "gradwire.compressors": "compressors"}


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_package_dir_maps_the_design_card_folders_into_gradwire():
    assert _setuptools()["package-dir"] == MAPPED


def test_every_package_folder_is_listed():
    """A new folder with an __init__.py (a codec family, say) must be in `packages`, or the wheel misses it."""
    found = set()
    for name, folder in MAPPED.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]))
    assert found == set(_setuptools()["packages"])


def test_only_the_gradwire_namespace_is_importable_from_outside_the_checkout(tmp_path):
    code = (
        "import importlib, sys\n"
        "for name in ('server', 'worker', 'compressors'):\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError:\n"
        "        continue\n"
        "    sys.exit(f'top-level {name} is importable')\n"
        "import gradwire.compressors, gradwire.server, gradwire.worker\n"
        "from gradwire.compressors.registry import create_codec\n"
        "assert create_codec('fp16').spec == 'fp16'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr + done.stdout


def test_wheel_holds_only_the_gradwire_namespace(tmp_path):
    import zipfile

    import setuptools

    # Built without isolation, so with this environment's setuptools (the dev extra asks for >= 70.1).
    major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
    assert (major, minor) >= (70, 1), (
        f"setuptools {setuptools.__version__} has no bdist_wheel: pip install -e '.[dev]' (setuptools>=70.1)")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("gradwire-*.whl")
    tops = {name.split("/", 1)[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"gradwire"}
    names = zipfile.ZipFile(wheel).namelist()
    assert "gradwire/compressors/registry.py" in names and "gradwire/server/round_engine.py" in names
    assert "gradwire/py.typed" in names


def test_ranges_for_users_exact_pins_for_ci_and_the_image():
    """Issue 11: torch as a range with the exact CPU build in constraints.txt, used by CI, bootstrap and the image."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11"
    torch_req = [d for d in project["dependencies"] if d.startswith("torch")]
    assert torch_req and "==" not in torch_req[0]
    assert not any(d.startswith("matplotlib") for d in project["dependencies"])
    assert any(d.startswith("matplotlib") for d in project["optional-dependencies"]["plots"])
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text().splitlines()
    command = "python3 -m pip install -c constraints.txt -e '.[dev]' && python3 -m pytest -q"
    assert command in (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m pip install --quiet -c constraints.txt -e '.[dev]'" in ci and "\npython3 -m pytest -q" in ci
    assert '-c "$ROOT/constraints.txt"' in (ROOT / "scripts" / "bootstrap.sh").read_text()
    assert "-c /wheels/constraints.txt" in (ROOT / "Dockerfile").read_text()
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")
    assert (ROOT / "gradwire" / "py.typed").exists()
