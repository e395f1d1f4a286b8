"""Can kernels read streamed experts straight from host memory? PCIe rates measured in one run.

    python bench/bench_zero_copy.py [--file-gib 2] [--dir /dev/shm]

A streamed expert miss today is a DMA (cudaMemcpyAsync) issued by the host after it has read the
layer's ids. A kernel that reads mapped host memory itself needs no host in the loop. This prints,
each as GB/s of host bytes moved and as a share of the pinned DMA:
1. the yardstick: pinned host -> device DMA of 1 GiB (cudaMemcpyAsync);
2. a copy kernel reading pinned (cudaHostAlloc'd, mapped) host memory into device memory, over a sweep
   of grid sizes and 16-byte loads in flight per thread;
3. the same, reading a read-only memory map of a file (on a tmpfs, registered with CUDA: mapped +
   read-only), which is how the model's GGUF is held;
4. fast2's expert kernels (fused gate+up, and down) with their weights in that mapped file: 4 experts
   of Small 4's Q4_0 shape per launch;
5. the DMA and the copy kernel at once (do they add up, or share the link?);
6. with --gguf PATH (e.g. the full-scale Small 4 file on a tmpfs): what a streamed layer's misses cost, 1-4
   random experts (three 4.7 MB matrices each, anywhere in the registered file) per "layer", copied by
   kernels.expert_copy_kernel at several grid sizes and by cudaMemcpyAsync DMAs of the same matrices.
"""
from __future__ import annotations

import argparse
import mmap
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from numba import int64  # noqa: E402

from localmoe.backends.cuda import available  # noqa: E402

REGISTER_MAPPED, REGISTER_READ_ONLY = 0x02, 0x08


def host_view(cp, ptr: int, nbytes: int, owner):
    """A cupy uint32 array over nbytes of host memory the device can address at ptr."""
    mem = cp.cuda.UnownedMemory(ptr, nbytes, owner, device_id=0)
    return cp.ndarray((nbytes // 4,), np.uint32, cp.cuda.MemoryPointer(mem, 0))


def make_copy_kernel(cuda, K, loads: int):
    """dst[i] = src[i] in 16-byte vectors; each thread issues `loads` vector loads before its stores."""
    ldg4a, gaddr = K.ldg4a, K.gaddr
    src = ["def kern(src, dst, nvec):",
           "    t = cuda.grid(1)",
           "    n = cuda.gridsize(1)",
           "    a = gaddr(src, 0)",
           f"    v = t",
           f"    while v + {loads - 1} * n < nvec:"]
    for j in range(loads):
        src.append(f"        w{j} = ldg4a(a + int64(v + {j} * n) * 16)")
    for j in range(loads):
        src += [f"        i = (v + {j} * n) * 4"] + [f"        dst[i + {k}] = w{j}[{k}]" for k in range(4)]
    src += [f"        v += {loads} * n",
            "    while v < nvec:",
            "        w = ldg4a(a + int64(v) * 16)",
            "        for k in range(4):",
            "            dst[v * 4 + k] = w[k]",
            "        v += n"]
    ns = dict(cuda=cuda, ldg4a=ldg4a, gaddr=gaddr, int64=int64)
    exec("\n".join(src), ns)
    return cuda.jit(ns["kern"])


def timed(cp, fn, reps: int = 5) -> float:
    """Best seconds of fn() over reps (events on the current stream), after one warm-up."""
    fn()
    cp.cuda.get_current_stream().synchronize()
    best = float("inf")
    for _ in range(reps):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        fn()
        b.record()
        b.synchronize()
        best = min(best, cp.cuda.get_elapsed_time(a, b) / 1e3)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--file-gib", type=float, default=2.0)
    ap.add_argument("--dir", default="/dev/shm")
    ap.add_argument("--gguf", help="a large file to read random expert-sized pieces from (section 6)")
    ap.add_argument("--layers-only", action="store_true", help="sections 1 and 6 only")
    args = ap.parse_args()
    ok, why = available()
    if not ok:
        sys.exit(f"no CUDA GPU: {why}")
    import cupy as cp
    import cupyx
    from localmoe.backends.cuda import kernels as K
    from localmoe.backends.cuda._numba import cuda
    Q4_0 = K.Q4_0
    rng = np.random.default_rng(0)
    GiB = 1 << 30
    sms = cuda.get_current_device().MULTIPROCESSOR_COUNT
    print(f"device: {available()[1]}, {sms} SMs")

    # 1. the pinned DMA
    n = GiB
    pin = cupyx.empty_pinned(n, np.uint8)
    pin[:] = rng.integers(0, 256, n, dtype=np.uint8)
    dev = cp.empty(n // 4, np.uint32)
    rt = cp.cuda.runtime
    st = cp.cuda.get_current_stream()
    dma = n / timed(cp, lambda: rt.memcpyAsync(dev.data.ptr, pin.ctypes.data, n, rt.memcpyHostToDevice, st.ptr)) / 1e9
    print(f"1. pinned DMA host->device: {dma:.1f} GB/s")
    if args.layers_only and args.gguf:
        del pin, dev
        layer_misses(cp, K, rng, args.gguf, dma, sms)
        return

    # 2. a copy kernel reading the pinned memory
    src = host_view(cp, pin.ctypes.data, n, pin)
    kerns = {L: make_copy_kernel(cuda, K, L) for L in (1, 2, 4, 8)}
    best2 = (0.0, None)
    print("2. copy kernel over pinned host memory (GB/s, share of the DMA):")
    for threads in (256, 512):
        for per_sm in (1, 2, 4, 8):
            row = []
            for L, kern in kerns.items():
                g = per_sm * sms
                s = timed(cp, lambda: kern[g, threads](src, dev, n // 16))
                bw = n / s / 1e9
                row.append(f"{L} loads {bw:5.1f} ({bw / dma:4.0%})")
                best2 = max(best2, (bw, (threads, per_sm, L)))
            print(f"   {threads} threads x {per_sm} blocks/SM: " + ", ".join(row))
    assert bool((dev[: 1 << 20] == src[: 1 << 20]).all()), "the copy kernel copied wrong bytes"
    print(f"   best {best2[0]:.1f} GB/s ({best2[0] / dma:.0%} of the DMA) at threads, blocks/SM, loads = {best2[1]}")

    # 3. a read-only map of a file on a tmpfs, registered (mapped, read-only)
    fb = int(args.file_gib * GiB) // GiB * GiB
    path = os.path.join(args.dir, "zero_copy_bench.bin")
    with open(path, "wb") as f:
        for _ in range(fb // GiB):
            f.write(rng.integers(0, 256, GiB, dtype=np.uint8).tobytes())
    fd = os.open(path, os.O_RDONLY)
    mm = mmap.mmap(fd, fb, prot=mmap.PROT_READ)
    arr = np.frombuffer(mm, np.uint8)
    addr = arr.__array_interface__["data"][0]
    for flags in (REGISTER_MAPPED | REGISTER_READ_ONLY, REGISTER_READ_ONLY):
        try:
            rt.hostRegister(addr, fb, flags)
            break
        except Exception as e:
            print(f"3. hostRegister(flags {flags:#x}) failed: {e}")
    else:
        sys.exit("could not register the file")
    from cuda.bindings import driver
    err, dptr = driver.cuMemHostGetDevicePointer(addr, 0)
    assert int(err) == 0, err
    dptr = int(dptr)
    print(f"3. registered {fb / GiB:.0f} GiB file map, flags {flags:#x}: device pointer == host pointer: {dptr == addr}")
    fsrc = host_view(cp, dptr, fb, arr)
    fdma = n / timed(cp, lambda: rt.memcpyAsync(dev.data.ptr, addr, n, rt.memcpyHostToDevice, st.ptr)) / 1e9
    threads, per_sm, L = best2[1]
    fk = n / timed(cp, lambda: kerns[L][per_sm * sms, threads](fsrc, dev, n // 16)) / 1e9
    print(f"   DMA from the file map {fdma:.1f} GB/s; copy kernel {fk:.1f} GB/s ({fk / dma:.0%} of the pinned DMA)")
    assert bool((dev[: 1 << 20] == fsrc[: 1 << 20]).all())

    # 4. fast2 expert kernels with their weights in the file map (Small 4: hidden 4096, expert width 2048)
    H, I = 4096, 2048
    mb = I * H // 32 * 18
    E = fb // (2 * mb)
    x = cp.asarray(rng.standard_normal((1, H)).astype(np.float32))
    xi = cp.zeros(4, np.int32)
    y = cp.empty((4, I), np.float32)
    sets = [cp.asarray(rng.choice(E, 4, replace=False).astype(np.int32)) for _ in range(16)]
    G, U = fsrc[: E * mb // 4], fsrc[E * mb // 4: 2 * E * mb // 4]
    it = iter(range(10 ** 9))
    s = timed(cp, lambda: K.launch_fast2(Q4_0, H, I, G, U, sets[next(it) % 16], xi, x, y, 4, mb, sms, True), 8)
    gu = 8 * mb / s / 1e9
    Gd = cp.asarray(G[: 8 * mb // 4])               # the same experts resident, for the HBM figure
    Ud = cp.asarray(U[: 8 * mb // 4])
    sd = [cp.asarray(rng.choice(8, 4, replace=False).astype(np.int32)) for _ in range(4)]
    s_hbm = timed(cp, lambda: K.launch_fast2(Q4_0, H, I, Gd, Ud, sd[next(it) % 4], xi, x, y, 4, mb, sms, True), 8)
    D = fsrc[: E * mb // 4]                          # down: [H, I] rows of I columns, the same bytes
    h = cp.asarray(rng.standard_normal((4, I)).astype(np.float32))
    hi = cp.arange(4, dtype=np.int32)
    yd = cp.empty((4, H), np.float32)
    s2 = timed(cp, lambda: K.launch_fast2(Q4_0, I, H, D, D, sets[next(it) % 16], hi, h, yd, 4, mb, sms), 8)
    dn = 4 * mb / s2 / 1e9
    print(f"4. fast2 from the file map, 4 experts: gate+up {8 * mb / 1e6:.0f} MB in {s * 1e6:.0f} us = {gu:.1f} GB/s "
          f"({gu / dma:.0%}); down {4 * mb / 1e6:.0f} MB in {s2 * 1e6:.0f} us = {dn:.1f} GB/s ({dn / dma:.0%}); "
          f"gate+up resident: {s_hbm * 1e6:.0f} us")

    # 5. DMA and copy kernel at once, on two streams
    other = cp.cuda.Stream(non_blocking=True)
    half = n // 2
    dev2 = cp.empty(n // 4, np.uint32)

    def both():
        ev = cp.cuda.Event()
        ev.record()
        other.wait_event(ev)
        rt.memcpyAsync(dev2.data.ptr, addr + half, half, rt.memcpyHostToDevice, other.ptr)
        kerns[L][per_sm * sms, threads](fsrc[: half // 4], dev, half // 16)
        done = cp.cuda.Event()
        done.record(other)
        cp.cuda.get_current_stream().wait_event(done)
    sb = timed(cp, both)
    print(f"5. DMA of 0.5 GiB beside the copy kernel on 0.5 GiB: {n / sb / 1e9:.1f} GB/s together")
    rt.hostUnregister(addr)
    del fsrc, mm
    os.close(fd)
    os.unlink(path)
    if args.gguf:
        layer_misses(cp, K, rng, args.gguf, dma, sms)


def graph_seconds(cp, enqueue, n: int) -> float:
    """GPU seconds per call of enqueue(i, stream) for i < n, captured into one CUDA graph and replayed (no host
    launch latency in the time, as in a captured decode step); best of 3 replays."""
    st = cp.cuda.Stream(non_blocking=True)
    with st:                          # current: cupy's waits for numba's launch arguments stay inside the capture
        st.begin_capture()
        for i in range(n):
            enqueue(i, st)
        g = st.end_capture()
    g.launch(st)
    st.synchronize()
    best = float("inf")
    for _ in range(3):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record(st)
        g.launch(st)
        b.record(st)
        b.synchronize()
        best = min(best, cp.cuda.get_elapsed_time(a, b) / 1e3)
    return best / n


def layer_misses(cp, K, rng, path: str, dma: float, sms: int) -> None:
    """Section 6: copy m random experts' matrices from the registered file per call, by kernel and by DMA."""
    from localmoe.backends.cuda._numba import cuda
    rt = cp.cuda.runtime
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    arr = np.frombuffer(mm, np.uint8)
    addr = arr.__array_interface__["data"][0]
    rt.hostRegister(addr, size, REGISTER_MAPPED | REGISTER_READ_ONLY)
    mb = 4096 * 2048 // 32 * 18                           # a Small 4 Q4_0 expert matrix
    third = size // 3 // 4096 * 4096
    n = third // mb                                       # experts per region (one region per matrix)
    S, calls = 16, 24
    pools = [cp.empty(S * mb // 4, np.uint32) for _ in range(3)]
    words = (mb // 4,) * 3
    srcs = [addr + j * third for j in range(3)]
    from localmoe.backends.cuda.streaming import device_cache_state
    d = device_cache_state(cp, K, 1, n, S)                # (no prefetch record: cur -1)
    print(f"6. random experts from {path} ({size / 2 ** 30:.1f} GiB, registered): GB/s per layer of m misses, "
          f"{calls} layers replayed from a CUDA graph")
    for m in (1, 2, 3, 4):
        pairs = [np.array([(int(e), s, 0) for s, e in enumerate(rng.choice(n, m, replace=False))], np.int32).reshape(-1)
                 for _ in range(calls)]
        lists = [cp.asarray(p) for p in pairs]
        cnt = cp.asarray(np.array([m], np.int32))
        row = []
        for blocks in (8, 16, 32, sms):
            s = graph_seconds(cp, lambda i, st: K.expert_copy_kernel[blocks, K.COPY_THREADS, cuda.external_stream(st.ptr)](
                lists[i], cnt, *srcs, *pools, words, (0, 0, 0), d["state"], d["pf"], -1, d["key_of"], d["have"],
                -1, 0, 0, 0, -1, 0, 0, 0), calls)
            row.append(f"kernel on {blocks} SMs {3 * m * mb / s / 1e9:5.1f}")

        def by_dma(i, st):
            for e, sl, _ in pairs[i].reshape(-1, 3).tolist():
                for j in range(3):
                    rt.memcpyAsync(pools[j].data.ptr + sl * mb, srcs[j] + e * mb, mb, rt.memcpyHostToDevice, st.ptr)
        s = graph_seconds(cp, by_dma, calls)
        row.append(f"DMA {3 * m * mb / s / 1e9:5.1f}")
        print(f"   {m} misses ({3 * m * mb / 1e6:.0f} MB): " + ", ".join(row) + f"  (pinned DMA yardstick {dma:.1f})")
    rt.hostUnregister(addr)
    del arr
    mm.close()
    os.close(fd)


if __name__ == "__main__":
    main()
