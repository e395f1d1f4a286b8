"""Micro-benchmark of the CPU matvec kernels (decode, n = 1) on GGUF blocks.

Prints a markdown table: GB/s of weight bytes read per call for Q8_0 and Q4_0 (and F16/BF16 with
--all-types), and numpy float32 `x @ W.T` on the same shape (float32 bytes), with ratios.

    NUMBA_CACHE_DIR=.numba_cache .venv/bin/python bench/bench_kernels.py --threads 2
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SHAPES = [(131072, 1024), (2048, 1024), (1024, 2048), (4096, 4096)]


def machine_name() -> str:
    model = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{platform.node()} ({model}, {os.cpu_count()} CPUs)"


def timeit(fn, min_time: float = 0.4, min_reps: int = 5) -> float:
    """Median seconds per call over repeated runs after a warm-up."""
    fn()
    times = []
    t_end = time.perf_counter() + min_time
    while len(times) < min_reps or time.perf_counter() < t_end:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--all-types", action="store_true", help="also F16 and BF16")
    ap.add_argument("--min-time", type=float, default=0.4, help="seconds of timing per case")
    args = ap.parse_args()

    import numba
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    from localmoe.backends.cpu import kernels as K

    numba.set_num_threads(args.threads)
    t0 = time.perf_counter()
    compile_s = K.compile_all()
    types = [T.Q8_0, T.Q4_0] + ([T.F16, T.BF16] if args.all_types else [])

    print(f"machine: {machine_name()}")
    print(f"numba {numba.__version__}, threading layer {K.threading_layer()}, "
          f"{args.threads} threads; numpy BLAS threads as configured (OMP/OPENBLAS_NUM_THREADS)")
    print(f"compile_all: {compile_s:.2f} s (first call in this process, {time.perf_counter() - t0:.2f} s)")
    print()
    print("| shape (rows x cols) | type | weight MB | ms/call | GB/s | numpy f32 GB/s | ratio to numpy |")
    print("|---|---|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for rows, cols in SHAPES:
        w = rng.standard_normal((rows, cols), dtype=np.float32)
        x = rng.standard_normal(cols, dtype=np.float32)
        t_np = timeit(lambda: x @ w.T, args.min_time)
        np_gbs = w.nbytes / t_np / 1e9
        for qt in types:
            if qt == T.F16:
                raw = w.astype(np.float16).view(np.uint8)
            else:
                raw = quants.quantize(w, qt)
            t = timeit(lambda: K.matmul(raw, qt, x), args.min_time)
            gbs = raw.nbytes / t / 1e9
            print(f"| {rows} x {cols} | {qt.name} | {raw.nbytes / 1e6:.1f} | {t * 1e3:.3f} | "
                  f"{gbs:.2f} | {np_gbs:.2f} | {gbs / np_gbs:.2f} |", flush=True)
            del raw
        del w


if __name__ == "__main__":
    main()
