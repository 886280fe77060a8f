"""CPU thread pools of the PS and worker processes.

torch's intra-op pool is set by ``torch.set_num_threads``; numpy's and scipy's OpenBLAS keep pools
of their own, one thread per core by default. The codecs call BLAS on small vectors (QSGD's norm is
a ``np.dot``), and a multi-threaded OpenBLAS call wakes its threads for each one: on a 2-core
machine running a PS and three workers, a 48,000-entry ``np.dot`` took ~0.7 ms instead of ~5 µs,
and the waiting threads spin on the cores the other processes need. A PS or worker process runs
BLAS with the same thread count as torch.
"""

from __future__ import annotations

import os

import torch
from threadpoolctl import threadpool_limits


def limit_cpu_threads(threads: int) -> None:
    """torch and every loaded BLAS library (numpy's, scipy's) use at most ``threads`` threads."""
    threads = max(1, int(threads))
    torch.set_num_threads(threads)
    # A BLAS library loaded later (scipy's, on the first codec import) reads the variable when it loads;
    # threadpoolctl limits the ones already loaded (numpy's). Called as a function, not a context
    # manager: the limit stays for the rest of the process.
    os.environ["OPENBLAS_NUM_THREADS"] = str(threads)
    threadpool_limits(limits=threads, user_api="blas")
