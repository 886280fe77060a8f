"""docs/adding-a-codec.md stays true: its codec is found by the registry with no other edit.

The doc's two code blocks (the codec module and its test) are extracted, the codec is written
into a temporary folder, and a fresh interpreter appends that folder to
``gradwire.compressors.__path__`` before the registry first loads. That is the discovery path a
file dropped into compressors/ takes: ``_load_all`` walks the package path. The second case puts
the codec into a sub-package (a folder with ``__init__.py``), where codec families go.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "adding-a-codec.md"
# A fenced block whose info string names the file it holds: ```python compressors/x.py
BLOCK = re.compile(r"^```python (\S+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)

# Runs in the fresh interpreter; argv: folder to append, module name, codec name, test file.
CHILD = textwrap.dedent(
    """
    import contextlib, io, sys

    import numpy as np

    import gradwire.compressors as package

    folder, module, name, test_file = sys.argv[1:5]
    from gradwire.compressors import registry

    assert not registry._LOADED, "the registry loaded before the folder was added"
    package.__path__.append(folder)

    names = registry.available_codecs()
    assert name in names, f"{name} not found: {names}"
    loaded = sys.modules[module]
    assert loaded.__file__.startswith(folder), loaded.__file__

    from gradwire.compressors.base import RoundContext, TensorSpec

    codec = registry.create_codec(name)
    x = np.linspace(-3.0, 2.0, 35, dtype=np.float32).reshape(5, 7)
    ctx = RoundContext(round=0, rank=0)
    msg = codec.make_encoder().encode(x, TensorSpec("w", x.shape), ctx)
    out = codec.make_decoder().decode(msg, ctx)
    assert out.shape == x.shape and 0 < len(msg.payload) < 4 * x.size
    assert np.abs(out - x).max() <= 0.5 * 3.0 / 127 * (1 + 1e-5), np.abs(out - x).max()

    from gradwire.cli import main

    listing = io.StringIO()
    with contextlib.redirect_stdout(listing):
        assert main(["codecs"]) == 0
    lines = [line.split(None, 1) for line in listing.getvalue().splitlines()]
    assert any(parts[0] == name and len(parts) == 2 for parts in lines), listing.getvalue()

    import pytest

    sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", test_file]))
    """
)


def doc_blocks() -> dict[str, str]:
    blocks = dict(BLOCK.findall(DOC.read_text()))
    assert len(blocks) == 2, f"expected a codec block and a test block in {DOC.name}, found {sorted(blocks)}"
    return blocks


def codec_and_test() -> tuple[str, str, str, str]:
    """(codec file name, codec source, codec name, test source) from the doc."""
    blocks = doc_blocks()
    (codec_path,) = [p for p in blocks if p.startswith("compressors/")]
    (test_path,) = [p for p in blocks if p.startswith("tests/")]
    source = blocks[codec_path]
    match = re.search(r'^    name = "(\w+)"$', source, re.MULTILINE)
    assert match, "the doc's codec declares no name"
    return Path(codec_path).name, source, match.group(1), blocks[test_path]


def test_doc_codec_is_not_a_real_module():
    # The doc's codec is an example: were it in the package, the test below would prove nothing.
    filename, _, name, _ = codec_and_test()
    assert not (ROOT / "compressors" / filename).exists()
    assert not list((ROOT / "compressors").rglob(filename))


@pytest.mark.parametrize("subpackage", ["", "docfamily"], ids=["module", "subpackage"])
def test_registry_finds_the_doc_codec(tmp_path, subpackage):
    filename, source, name, test_source = codec_and_test()
    folder = tmp_path / "dropped"
    target = folder / subpackage if subpackage else folder
    target.mkdir(parents=True)
    if subpackage:
        (target / "__init__.py").write_text('"""A codec family in a folder."""\n')
    (target / filename).write_text(source)
    module = ".".join(["gradwire.compressors", *filter(None, [subpackage]), Path(filename).stem])
    test_file = tmp_path / "tests" / f"test_{name}.py"
    test_file.parent.mkdir()
    test_file.write_text(test_source)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), module, name, str(test_file)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"\b\d+ passed\b", done.stdout) and "failed" not in done.stdout, done.stdout
