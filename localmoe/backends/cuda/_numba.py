"""The one place that imports numba.cuda.

numba-cuda 0.30.4 calls `numpy.row_stack` at import time, which numpy 2.5 removed; we alias it to
`numpy.vstack` (the same function) before the import instead of pinning numpy below 2.5.
"""
from __future__ import annotations

import os

import numpy as np

# Small grids are normal here (tiny models, per-token kernels): no warning per launch.
os.environ.setdefault("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", "0")
# The backend passes cupy arrays to the kernels; cupy and numba both use the legacy default stream, so
# numba need not synchronize on the stream each array's __cuda_array_interface__ names (a sync per launch).
os.environ.setdefault("NUMBA_CUDA_ARRAY_INTERFACE_SYNC", "0")

if not hasattr(np, "row_stack"):
    np.row_stack = np.vstack

from numba import cuda  # noqa: E402

__all__ = ["cuda"]
