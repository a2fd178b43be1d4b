"""Running row-range kernels serially for small inputs and over threads for large ones.

Every codec kernel is a serial numba function over a row range ``[lo, hi)`` plus a ``prange``
driver that splits the rows into chunks. Small matrices run the serial function directly: starting
and joining numba's thread pool costs ~0.1 ms on an idle machine and was measured at 10-30 ms per
call on this busy 2-core one, far more than decoding a small matrix (~0.2 ms for 8 x 70).
(Compiling one function both with and without ``parallel=True`` would make the two share one
numba cache entry, hence the explicit drivers.)
"""

from __future__ import annotations

import numba
import numpy as np

# Weights of work below which a kernel runs on the calling thread.
PARALLEL_MIN_WORK = 1 << 18


def row_bounds(rows: int, work: int, align: int = 1):
    """Chunk boundaries int64 ``[chunks + 1]`` over ``rows`` (each chunk start a multiple of
    ``align``), or None when the work is too small to be worth threads."""
    threads = numba.get_num_threads()
    if work < PARALLEL_MIN_WORK or threads == 1 or rows < 2 * align:
        return None
    step = -(-rows // (4 * threads))
    step = -(-step // align) * align
    return np.append(np.arange(0, rows, step, dtype=np.int64), np.int64(rows))
