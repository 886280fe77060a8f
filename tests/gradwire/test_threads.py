"""The PS and worker processes run BLAS single-threaded (gradwire/threads.py)."""

from __future__ import annotations

import json
import subprocess
import sys

# In a fresh interpreter: numpy is loaded before the limit, scipy's BLAS (the codecs') after it.
PROBE = """
import json, numpy
from gradwire.threads import limit_cpu_threads
limit_cpu_threads(1)
import scipy.optimize, scipy.linalg
from gradwire.compressors.registry import available_codecs
available_codecs()
import torch
from threadpoolctl import threadpool_info
print(json.dumps({"blas": [(i["filepath"], i["num_threads"]) for i in threadpool_info() if i["user_api"] == "blas"],
                  "torch": torch.get_num_threads()}))
"""


def test_every_blas_library_runs_one_thread():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True)
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["torch"] == 1
    assert len(found["blas"]) >= 2, found  # numpy's and scipy's OpenBLAS
    assert all(n == 1 for _path, n in found["blas"]), found


def test_server_and_worker_entry_points_limit_threads():
    from gradwire.server import app
    from gradwire.worker import loop

    assert app.limit_cpu_threads is loop.limit_cpu_threads
