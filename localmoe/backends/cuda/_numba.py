"""The one place that imports numba.cuda.

numba-cuda 0.30.4 calls `numpy.row_stack` at import time, which numpy 2.5 removed; we alias it to
`numpy.vstack` (the same function) before the import instead of pinning numpy below 2.5.
"""
from __future__ import annotations

import numpy as np

if not hasattr(np, "row_stack"):
    np.row_stack = np.vstack

from numba import cuda  # noqa: E402

__all__ = ["cuda"]
