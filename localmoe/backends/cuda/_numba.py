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

# Programmatic dependent launch (PDL, sm_90 and later): while PDL[0] is true, every kernel launch carries
# CUDA's programmatic-stream-serialization attribute, so the GPU may start a kernel's blocks before the
# previous kernel in the stream has finished (also inside a captured graph). Each of our kernels begins
# with kernels.grid_dependency(), which waits for that kernel before it reads or writes anything. numba-cuda
# builds each launch's cuda.core LaunchConfig in its dispatcher; wrapping that constructor here is the one
# change made to numba. PDL_WHY_NOT says why PDL is unavailable ('' when it is).
PDL = [False]


def _wrap_launch_config() -> str:
    try:
        from numba.cuda import dispatcher
        base = dispatcher.LaunchConfig
        base(grid=1, block=1, programmatic_stream_serialization=True)
    except Exception as e:  # an older cuda.core, the simulator, another numba-cuda layout
        return f"numba-cuda's launch config takes no PDL attribute ({type(e).__name__}: {e})"

    def launch_config(**kw):
        return base(programmatic_stream_serialization=True, **kw) if PDL[0] else base(**kw)
    dispatcher.LaunchConfig = launch_config
    return ""


PDL_WHY_NOT = _wrap_launch_config()

__all__ = ["cuda", "PDL", "PDL_WHY_NOT"]
