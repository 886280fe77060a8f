"""gradwire/memory.py: a model-sized block freed and allocated again reuses mapped pages."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gradwire import memory

PROBE = r"""
import json, resource, sys
from gradwire.memory import keep_large_blocks
took = keep_large_blocks()
size = 40 * 2**20  # above glibc's largest mmap threshold (32 MiB): mmapped unless kept in the heap
block = b"x" * size
del block
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = b"y" * size
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"took": took, "faults": faults}))
"""


def _probe(env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60,
                         env={**env, "PYTHONPATH": ":".join(sys.path)})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_freed_large_block_is_reused_without_page_faults():
    import os

    env = {k: v for k, v in os.environ.items() if k != memory.ENV}
    kept = _probe(env)
    if not kept["took"]:
        pytest.skip("not glibc: nothing to set")
    default = _probe({**env, memory.ENV: "default"})
    pages = 40 * 2**20 // 4096
    assert not default["took"] and default["faults"] > pages // 2  # mmapped afresh: every page faults in
    assert kept["faults"] < pages // 20  # the heap's pages, already mapped
