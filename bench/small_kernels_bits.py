"""The router, combine and MLA rope kernels of two trees, bit for bit, on fresh random inputs.

    PYTHONPATH=/tmp/old python3 bench/small_kernels_bits.py /tmp/old.npz    # on the GPU machine, each tree
    PYTHONPATH=$PWD     python3 bench/small_kernels_bits.py /tmp/new.npz
    python3 bench/small_kernels_bits.py --compare /tmp/old.npz /tmp/new.npz

Kernels that only reorder their loads must give the same bits; where the float differs (a compiler may fuse
another multiply into an FMA), the comparison prints how far, in ulps and absolutely. Both runs use one seed,
so they see the same inputs. (Either tree's API: route_warp_kernel and combine_kernel were kernels before
session 16, and are functions returning one per expert count and k since; mla_rope_kernel one per W_kb
folded in, since session 19.)"""
import sys
import types

import numpy as np


def run(path: str) -> None:
    from localmoe.backends.cuda import kernels as K
    kern = lambda obj, *a: obj(*a) if isinstance(obj, types.FunctionType) else obj
    out, rng = {}, np.random.default_rng(5)
    for E, k, norm in [(8, 2, True), (128, 4, True), (128, 4, False), (40, 6, True)]:
        n = 9
        logits = (3 * rng.standard_normal((n, E))).astype(np.float32)
        logits[0, 5] = logits[0, 6]                    # a tie: the lower id wins
        ids, w = np.zeros((n, k), np.int32), np.zeros((n, k), np.float32)
        slots, sw = np.zeros((n, k + 1), np.int32), np.zeros((n, k + 1), np.float32)
        kern(K.route_warp_kernel, E)[(n + K.WARPS - 1) // K.WARPS, K.THREADS](logits, k, norm, np.float32(2.5), ids, w,
                                                                              slots, sw)
        out[f"route E={E} k={k} norm={norm}"] = np.concatenate([a.view(np.uint32) for a in (ids, w, slots, sw)], 1)
    for k, add in [(5, False), (2, True), (3, False)]:
        n = 2
        yp = rng.standard_normal((n * k, 600)).astype(np.float32)
        wts = rng.random((n, k)).astype(np.float32)
        plus, y = rng.standard_normal((n, 600)).astype(np.float32), np.full((n, 600), np.nan, np.float32)
        kern(K.combine_kernel, k)[(3, n), K.THREADS](yp, wts, y, plus if add else y, add)
        out[f"combine k={k} add={add}"] = y.view(np.uint32)
    for beta in (0.0, 0.3):
        n, heads, nope, half, kvr = 2, 3, 64, 32, 256
        q = rng.standard_normal((n, heads, nope + 2 * half)).astype(np.float32)
        kv = rng.standard_normal((n, kvr + 2 * half)).astype(np.float32)
        pos = np.array([7, 300], np.int32)
        ang = rng.random((512, half)).astype(np.float32)
        w = rng.random(kvr).astype(np.float32)
        cache = np.full((512, kvr + 2 * half), np.nan, np.float32)
        qn = np.full((n, heads, nope), np.nan, np.float32)
        query = np.full((n, heads, kvr + 2 * half), np.nan, np.float32)
        args = (q, kv, pos, np.cos(ang), np.sin(ang), w, np.float32(1e-6), np.float64(beta), 7, cache, qn, query)
        if isinstance(K.mla_rope_kernel, types.FunctionType):     # session 19: W_kb's words (here unused) last
            args += (query,)
        kern(K.mla_rope_kernel, None)[(n, heads + 1), K.THREADS](*args)
        out[f"mla_rope beta={beta}"] = np.concatenate([cache[pos].ravel(), qn.ravel(), query[..., kvr:].ravel()]).view(np.uint32)
    np.savez(path, **out)
    print(f"{K.__file__}: {len(out)} cases -> {path}")


def compare(a_path: str, b_path: str) -> None:
    a, b = np.load(a_path), np.load(b_path)
    differ = 0
    for k in a.files:
        x, y = a[k], b[k]
        if np.array_equal(x, y):
            print(f"{k}: bitwise equal")
            continue
        differ += 1
        ulps = np.abs(x.astype(np.int64) - y.astype(np.int64))
        fx, fy = x.view(np.float32), y.view(np.float32)
        print(f"{k}: DIFFERENT in {np.sum(ulps != 0)} of {ulps.size} values: at most {ulps.max()} ulp, "
              f"|diff| <= {np.nanmax(np.abs(fx - fy)):.3g}, NaN in one only: {int(np.sum(np.isnan(fx) != np.isnan(fy)))}")
    print("all bitwise equal" if not differ else f"{differ} of {len(a.files)} cases differ")


if __name__ == "__main__":
    compare(*sys.argv[2:4]) if sys.argv[1] == "--compare" else run(sys.argv[1])
