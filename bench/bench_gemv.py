"""fast2 at Small 4's shapes, as a decode step launches them, on GGUF-ordered and on interleaved weights
(kernels.interleave, what the backend uploads): time per launch inside a CUDA graph (no launch overhead from
Python), bandwidth as a share of the device-to-device copy, and whether both layouts give the same bits.

    python bench/bench_gemv.py            # on the GPU machine; --pdl off for launches without PDL
    python bench/bench_gemv.py --warps 4,8,16,20,24   # also the interleaved launch at other block sizes

A block size other than kernels.FAST2's gets max(1, 16 // warps) blocks per SM (as many warps per SM, at most),
so the launch's warps, and how many tasks each runs, are what change.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from localmoe.backends.cuda import available  # noqa: E402


def best_graph_us(g, st, reps: int) -> float:
    """The best of `reps` replays of the captured graph g on cupy stream st, in us (CUDA events)."""
    import cupy as cp
    best = np.inf
    for _ in range(reps):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record(st)
        g.launch(st)
        b.record(st)
        b.synchronize()
        best = min(best, cp.cuda.get_elapsed_time(a, b) * 1e3)
    return best

# label, rows, cols, matrices to pick from, products per launch, fused gate+up, preload (dense weights)
CASES = [("routed+shared experts gate+up, 5 of 128", 2048, 4096, 128, 5, True, False),
         ("routed+shared experts down, 5 of 128", 4096, 2048, 128, 5, False, False),
         ("q_a+kv_a 1344x4096", 1344, 4096, 1, 1, False, True),
         ("q_b 4096x1024", 4096, 1024, 1, 1, False, True),
         ("attn_output 4096x4096", 4096, 4096, 1, 1, False, True),
         ("output head 131072x4096", 131072, 4096, 1, 1, False, True)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pdl", choices=("on", "off"), default="on")
    ap.add_argument("--launches", type=int, default=20, help="launches per graph")
    ap.add_argument("--warps", default="", help="comma-separated warps per block to time the interleaved launch at")
    args = ap.parse_args()
    ok, name = available()
    if not ok:
        sys.exit(f"bench_gemv: {name}")
    import cupy as cp
    from localmoe.backends.cuda import _stream, kernels as K
    from localmoe.backends.cuda._numba import PDL, cuda
    st = _stream()
    PDL[0] = args.pdl == "on"
    sms = cuda.get_current_device().MULTIPROCESSOR_COUNT
    rng = np.random.default_rng()
    n = args.launches

    def graph_us(fn, launches=n, reps=5) -> float:
        """Best over reps of a graph of `launches` calls fn(i), per call."""
        fn(0)
        st.synchronize()
        st.begin_capture(2)                      # relaxed
        for i in range(launches):
            fn(i)
        g = st.end_capture()
        g.launch(st)
        st.synchronize()
        return best_graph_us(g, st, reps) / launches

    src, dst = cp.ones(1 << 28, np.uint32), cp.empty(1 << 28, np.uint32)
    copy_gbs = 2 * src.nbytes / graph_us(lambda i: dst.__setitem__(slice(None), src), 5, 3) / 1e3
    del src, dst
    print(f"{name}, {sms} SMs, {time.strftime('%Y-%m-%d %H:%M')}; PDL {args.pdl}; device-to-device copy "
          f"{copy_gbs:.0f} GB/s (read + write), the yardstick")
    print(f"{'type':5} {'launch':42} {'MB':>6} {'GGUF order us':>13} {'of copy':>7} {'interleaved us':>14} "
          f"{'of copy':>7} {'speed-up':>8}  bits")
    for qt in (K.Q4_0, K.Q8_0):
        for label, rows, cols, nmat, P, fused, preload in CASES:
            assert K.interleaved_ok(qt, rows, cols)
            mb = rows * cols // 32 * K.BLOCK_BYTES[qt]
            ws = []
            for _ in range(2 if fused else 1):
                raw = rng.integers(0, 256, nmat * mb, dtype=np.uint8)
                blk = raw.reshape(-1, K.BLOCK_BYTES[qt])       # sane fp16 scales: no inf or nan
                blk[:, :2] = rng.uniform(2 ** -8, 2 ** -6, len(blk)).astype(np.float16).view(np.uint8).reshape(-1, 2)
                ws.append((cp.asarray(raw.view(np.uint32)), cp.asarray(K.interleave(raw, qt).view(np.uint32))))
                del raw, blk
            x = cp.asarray(rng.standard_normal((1, cols)).astype(np.float32))
            xidx = cp.zeros(P, np.int32)
            sets = [cp.asarray(rng.choice(nmat, P, replace=nmat < P).astype(np.int32)) for _ in range(n)]
            ys = [cp.full((P, rows), np.nan, np.float32) for _ in range(2)]

            def run(i, il, warps=None, y=None):
                W = [w[il] for w in ws]
                K.launch_fast2(qt, cols, rows, W[0], W[-1], sets[i % n], xidx, x, ys[il] if y is None else y, P, mb,
                               sms, fused, preload=preload, interleaved=bool(il), warps=warps,
                               bps=None if warps is None else max(1, 16 // warps))
            run(0, 0)
            run(0, 1)
            st.synchronize()
            same = bool((ys[0].view(np.uint32) == ys[1].view(np.uint32)).all()) and not bool(cp.isnan(ys[1]).any())
            t = [np.inf, np.inf]
            for _ in range(2):                                  # alternating, best of each
                for il in (0, 1):
                    t[il] = min(t[il], graph_us(lambda i: run(i, il)))
            nbytes = P * mb * len(ws)
            share = [nbytes / (u * 1e3) / copy_gbs for u in t]
            print(f"{'Q4_0' if qt == K.Q4_0 else 'Q8_0':5} {label:42} {nbytes / 1e6:6.1f} {t[0]:13.1f} {share[0]:7.1%} "
                  f"{t[1]:14.1f} {share[1]:7.1%} {t[0] / t[1]:7.2f}x  {'equal' if same else 'DIFFERENT'}", flush=True)
            for warps in [int(w) for w in args.warps.split(",") if w]:
                ntask = (rows * (cols // 256) + 31) // 32                  # launch_fast2's grid, per product
                gx = max(1, min((ntask + warps - 1) // warps, max(1, max(1, 16 // warps) * sms // P)))
                y = cp.full((P, rows), np.nan, np.float32)
                run(0, 1, warps, y)
                run(0, 1)
                st.synchronize()
                eq = bool((y.view(np.uint32) == ys[1].view(np.uint32)).all())
                u = min(graph_us(lambda i: run(i, 1, warps, y)) for _ in range(2))
                print(f"      {warps:2} warps/block: {u:6.1f} us {nbytes / (u * 1e3) / copy_gbs:7.1%} of copy, "
                      f"{t[1] / u:5.2f}x; tasks per warp {ntask / (warps * gx):.2f}"
                      f"{'' if eq else '  DIFFERENT'}", flush=True)
            del ws


if __name__ == "__main__":
    main()
