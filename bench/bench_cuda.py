"""GPU kernel bandwidth vs a measured device-to-device copy (numba.cuda), in one run.

    python bench/bench_cuda.py [--model PATH.gguf]

1. The yardstick: device-to-device copy of 1 GiB (cudaMemcpy DtoD, and our own copy kernel),
   GB/s counting bytes read + written.
2. Q4_0 / Q8_0 gemv at Mistral Small 4's shapes, weight bytes read per second:
   * `batched`: one launch over NMAT distinct matrices of that shape (>= 1 GiB in all, so nothing is
     served from L2): the kernel's streaming rate at the shape;
   * `single`: one launch per matrix, rotating over the same NMAT matrices (what one call costs,
     launch overhead included).
   Ratio = gemv GB/s / copy GB/s.
3. With --model: decode tok/s of the CUDA backend on that GGUF, launches per token.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from localmoe.backends.cuda import available  # noqa: E402

Q4_0, Q8_0 = 2, 8
SHAPES = [("attn 4096x4096", 4096, 4096), ("expert gate/up 2048x4096", 2048, 4096),
          ("expert down 4096x2048", 4096, 2048), ("head 131072x4096", 131072, 4096)]


def timeit(cuda, fn, reps: int) -> float:
    """Median seconds of fn() over reps, timed with events after a warm-up."""
    fn()
    cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = cuda.event(), cuda.event()
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(cuda.event_elapsed_time(a, b) / 1e3)
    return float(np.median(ts))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    ok, name = available()
    if not ok:
        sys.exit(f"bench_cuda: {name}")
    from localmoe.backends.cuda import kernels as K
    from localmoe.backends.cuda._numba import cuda
    dev = cuda.get_current_device()
    sms = dev.MULTIPROCESSOR_COUNT
    print(f"device: {name}, {sms} SMs, {time.strftime('%Y-%m-%d %H:%M:%S')}")

    n = 1 << 28                     # 1 GiB of uint32
    src = cuda.device_array(n, np.uint32)
    dst = cuda.device_array(n, np.uint32)
    K.copy_kernel[sms * 8, 256](src, dst)
    t_memcpy = timeit(cuda, lambda: dst.copy_to_device(src), 10)
    t_kcopy = timeit(cuda, lambda: K.copy_kernel[sms * 8, 256](src, dst), 10)
    copy_bw = 2 * 4 * n / t_memcpy / 1e9
    print(f"d2d copy (cudaMemcpy) {copy_bw:7.0f} GB/s   copy kernel {2 * 4 * n / t_kcopy / 1e9:7.0f} GB/s  (read+write)")
    del src, dst

    def sweep_bps(qt, bs, rows, cols):
        """Batched GB/s for each BLOCKS_PER_SM; returns {bps: GB/s}."""
        mat_bytes = rows * cols // 32 * bs
        nmat = max(1, min(64, (1 << 30) // mat_bytes + 1))
        host = np.random.default_rng(1).integers(0, 256, nmat * mat_bytes, dtype=np.uint8)
        host.reshape(-1, bs)[:, 1] = 0x24
        W = cuda.to_device(host.view(np.uint32))
        x = cuda.to_device(np.ones((1, cols), np.float32))
        mats = cuda.to_device(np.arange(nmat, dtype=np.int32))
        xidx = cuda.to_device(np.zeros(nmat, np.int32))
        yb = cuda.device_array((nmat, rows), np.float32)
        res = {}
        for bps in (2, 4, 8, 16):
            K.BLOCKS_PER_SM = bps
            t = timeit(cuda, lambda: K.launch_gemv(qt, cols, rows, W, W, mats, xidx, x, yb, nmat, mat_bytes // rows,
                                                   mat_bytes, sms), 10)
            res[bps] = nmat * mat_bytes / t / 1e9
        return res

    best = {}
    for qt, bs, rows, cols in ((Q4_0, 18, 4096, 4096), (Q4_0, 18, 131072, 4096), (Q8_0, 34, 131072, 4096)):
        res = sweep_bps(qt, bs, rows, cols)
        for k, v in res.items():
            best[k] = best.get(k, 0.0) + v
        print(f"BLOCKS_PER_SM sweep, type {qt} {rows}x{cols}: " + ", ".join(f"{k}: {v:.0f} GB/s" for k, v in res.items()))
    K.BLOCKS_PER_SM = max(best, key=best.get)
    _, kq4 = K.gemv_kernel(Q4_0, 4096, False)
    _, kq8 = K.gemv_kernel(Q8_0, 4096, False)
    regs = [next(iter(k.get_regs_per_thread().values())) if isinstance(k.get_regs_per_thread(), dict)
            else k.get_regs_per_thread() for k in (kq4, kq8)]
    print(f"using BLOCKS_PER_SM = {K.BLOCKS_PER_SM}; registers per thread Q4_0 {regs[0]}, Q8_0 {regs[1]}")

    rows_out = []
    for qt, qname, bs in ((Q4_0, "Q4_0", 18), (Q8_0, "Q8_0", 34)):
        for label, rows, cols in SHAPES:
            mat_bytes = rows * cols // 32 * bs
            nmat = max(1, min(64, (1 << 30) // mat_bytes + 1))
            total = nmat * mat_bytes
            rng = np.random.default_rng(0)
            host = rng.integers(0, 256, total, dtype=np.uint8)
            # sane fp16 scales (2^-6 .. 2^-5) at every block start: no inf/nan
            blk = host.reshape(-1, bs)
            blk[:, 1] = 0x24
            W = cuda.to_device(host.view(np.uint32))
            del host, blk
            x = cuda.to_device(rng.standard_normal((1, cols)).astype(np.float32))
            zero1 = cuda.to_device(np.zeros(1, np.int32))
            mats = cuda.to_device(np.arange(nmat, dtype=np.int32))
            xidx = cuda.to_device(np.zeros(nmat, np.int32))
            yb = cuda.device_array((nmat, rows), np.float32)
            y1 = cuda.device_array((1, rows), np.float32)
            row_bytes = mat_bytes // rows

            def batched():
                K.launch_gemv(qt, cols, rows, W, W, mats, xidx, x, yb, nmat, row_bytes, mat_bytes, sms)
            singles = [cuda.to_device(np.array([m], np.int32)) for m in range(nmat)]

            def single():
                for m in range(nmat):
                    K.launch_gemv(qt, cols, rows, W, W, singles[m], zero1, x, y1, 1, row_bytes, mat_bytes, sms)
            tb = timeit(cuda, batched, 10)
            ts = timeit(cuda, single, 5) / nmat
            bw_b, bw_s = total / tb / 1e9, mat_bytes / ts / 1e9
            rows_out.append((qname, label, mat_bytes / 1e6, nmat, bw_b, bw_b / copy_bw, ts * 1e6, bw_s, bw_s / copy_bw))
            del W, yb
    print(f"\n{'type':5} {'shape':26} {'MB':>7} {'n':>3} {'batched GB/s':>12} {'ratio':>6} {'single us':>9} "
          f"{'GB/s':>6} {'ratio':>6}")
    for r in rows_out:
        print(f"{r[0]:5} {r[1]:26} {r[2]:7.1f} {r[3]:3d} {r[4]:12.0f} {r[5]:6.1%} {r[6]:9.1f} {r[7]:6.0f} {r[8]:6.1%}")

    if args.model:
        import localmoe
        t0 = time.perf_counter()
        m = localmoe.load(args.model, backend="cuda")
        ids = [1] + list(range(1000, 1015))
        list(m.generate(ids, max_tokens=2, stop=()))      # upload + compile
        be = m.backend
        print(f"\nmodel {args.model}: load+warm-up {time.perf_counter() - t0:.1f} s, "
              f"weights on GPU {be.bytes_uploaded / 1e6:.1f} MB")
        l0 = be.launches
        t0 = time.perf_counter()
        n = len(list(m.generate(ids, max_tokens=args.tokens, stop=())))
        dt = time.perf_counter() - t0
        print(f"decode+prefill(16): {n} tokens in {dt:.2f} s = {n / dt:.1f} tok/s; "
              f"kernel launches per token ~{(be.launches - l0) / (n + 1):.0f}")


if __name__ == "__main__":
    main()
