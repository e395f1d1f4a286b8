"""GPU kernel bandwidth vs a measured device-to-device copy (numba.cuda), in one run.

    python bench/bench_cuda.py [--sweep] [--model PATH.gguf] [--prefill N]
    python bench/bench_cuda.py --full-scale PATH.gguf --tokenizer tekken_240718.json [--prefill 2048]

On the device machine (numba-cuda needs `numpy.row_stack`, aliased in localmoe/backends/cuda/_numba.py;
gguf from the carried wheel):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
    python3 bench/bench_cuda.py --sweep

1. The yardstick: device-to-device copy of 1 GiB (cudaMemcpy DtoD), GB/s counting bytes read + written.
2. Correctness of every gemv variant on fresh random blocks (vs a float64 numpy reference) and its
   bandwidth at Mistral Small 4's shapes, weight bytes read per second:
   * `batched`: one launch over n distinct matrices of the shape (>= 1 GiB in all, so nothing is
     served from L2): the kernel's streaming rate at the shape;
   * `single`: one launch per matrix, rotating over the same n matrices (launch overhead included);
   * `experts`: fused gate+up (silu(g) * u) of 4 random experts of a [128, 2048, 4096] tensor per launch.
   Ratio = gemv GB/s / copy GB/s. --sweep times every variant (warps per block, blocks per SM,
   direct / staged loads) and then uses the best per type.
3. With --model: decode tok/s of the CUDA backend on that GGUF (all weights resident, warmed up),
   bytes read per token (dense weights + the routed experts' share k/E of each expert tensor + one
   embedding row) and the HBM roofline copy GB/s / bytes per token, kernel launches and backend calls
   per token, the host cost of one launch (and the launches' share of the step), --profile: a cProfile
   breakdown of the decode step's host time (launch, copies, allocations), and with --prefill N the
   prompt tok/s for an N-token prompt (batches of 128, progress printed; it stops after
   --prefill-budget seconds and reports the part done).
4. --full-scale PATH: first writes a random-weight GGUF with Mistral Small 4's exact shapes
   (convert.synthetic.write_random_gguf: 36 layers, 128 experts top-4 + shared, MLA, 131072 vocab;
   --quant q4_0 is ~67 GB) to PATH unless it exists, then runs 3. on it (no kernel sweep). PATH must be
   on a filesystem with room: on the 64 GB-disk GPU machine, a tmpfs, e.g.
       mkdir -p /mnt/lm && mount -t tmpfs -o size=100G tmpfs /mnt/lm
       python3 bench/bench_cuda.py --full-scale /mnt/lm/small4-q4_0.gguf \
           --tokenizer .scratch/fullscale/tekken_240718.json --prefill 2048 --tokens 32 --profile
   (the tekken file is mistral_common/data/tekken_240718.json, copied into the ignored, carried folder).
   Decode is timed twice in one run: "eager" (every kernel launched from Python) and "graph" (the step
   replayed from its captured CUDA graph, the default), with the graph's kernel count.
5. --gpu-mem SIZE (with --model / --full-scale): the routed experts stream into a SIZE cache of VRAM
   slots (localmoe/backends/cuda/streaming.py) instead of being resident; decode under the model's own
   routing and under a replayed Zipf routing (--zipf S, --locality RHO: bench_cache.synthetic_routes),
   the latter once per --guess (the next-layer guesses replayed with it: off, or the share guessed right,
   guess_table), each with hit rate, host->GPU bytes per token, and the PCIe roofline at the misses'
   traffic (a pinned host->device copy's GB/s, measured in the run, / the bytes of the experts that were
   not resident at their lookup; what a wrong guess moved does not count). --host-register ab (the default)
   runs both once per way the misses are copied, on a fresh cache each: "off" (staged: a host memcpy into
   pinned buffers, then the DMA) and "on" (the mapped file registered with CUDA, DMA'd from directly; the
   registration's seconds are printed), then the on/off ratio; auto|on|off runs one way. --pipelined
   ab (the default) runs each way twice: the host deciding each layer's experts in turn (off: it launches
   the next segment once its copies are enqueued) and a layer ahead (on: every segment enqueued ahead, each
   waiting on the device for its layer's slots), then the on/off ratio.
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
BS = {Q4_0: 18, Q8_0: 34}
NAME = {Q4_0: "Q4_0", Q8_0: "Q8_0"}
SHAPES = [("attn 4096x4096", 4096, 4096), ("expert gate/up 2048x4096", 2048, 4096),
          ("expert down 4096x2048", 4096, 2048), ("head 131072x4096", 131072, 4096)]
VARIANTS = [dict(warps=w, direct=True, bps=b) for w in (4, 8, 16) for b in (2, 4, 8)] + \
           [dict(warps=w, direct=False, bps=b) for w in (2, 4) for b in (4, 8)]


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


def random_blocks(rng, qt, nbytes):
    """Random Q4_0/Q8_0 blocks with sane fp16 scales (2^-8 .. 2^-6): no inf/nan."""
    host = rng.integers(0, 256, nbytes, dtype=np.uint8)
    blk = host.reshape(-1, BS[qt])
    blk[:, :2] = (rng.uniform(2 ** -8, 2 ** -6, len(blk)).astype(np.float16)).view(np.uint8).reshape(-1, 2)
    return host


def dequant(raw, qt, rows, cols):
    b = raw.reshape(rows, cols // 32, BS[qt])
    d = b[..., :2].copy().view(np.float16).astype(np.float64)
    if qt == Q4_0:
        q = b[..., 2:]
        v = np.concatenate([(q & 15).astype(np.int64) - 8, (q >> 4).astype(np.int64) - 8], -1)
    else:
        v = b[..., 2:].view(np.int8).astype(np.int64)
    return (v * d).reshape(rows, cols)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=0)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--no-kernels", action="store_true")
    ap.add_argument("--full-scale", metavar="PATH", help="write (unless present) and benchmark a random Small 4 GGUF")
    ap.add_argument("--quant", default="q4_0", help="--full-scale's quant type")
    ap.add_argument("--tokenizer", help="--full-scale's tekken .json (default: mistral_common's)")
    ap.add_argument("--dims", default="", help="--full-scale's shape overrides, e.g. num_hidden_layers=2,vocab_size=4096 "
                    "(convert.synthetic.SMALL4 keys; for smoke runs)")
    ap.add_argument("--kernel-times", action="store_true", help="GPU time of each backend call of a decode step")
    ap.add_argument("--profile", action="store_true", help="cProfile 8 decode steps: where the host time goes")
    ap.add_argument("--timeline", nargs="?", const=True, metavar="NPZ",
                    help="--gpu-mem's device mode: GPU timestamps around each MoE layer's lookup, copy and hits, and "
                    "the link's account of a step (the stamps saved to NPZ, if given)")
    ap.add_argument("--prefill-budget", type=float, default=300.0, help="seconds after which prefill stops")
    ap.add_argument("--gpu-mem", help="stream the routed experts through a VRAM cache of this size (e.g. 24G)")
    ap.add_argument("--zipf", type=float, default=0.6, help="--gpu-mem's replayed routing: Zipf exponent")
    ap.add_argument("--locality", type=float, default=0.25, help="... and P(an expert repeats from the last token)")
    ap.add_argument("--guess", default="off,0.7,0.7/0.5",
                    help="... and the next-layer guesses it replays, a comma list: off (no prefetch) or the share of "
                    "ids guessed right (guess_table), then optionally /the share for the layer after. Its targets are "
                    "asked for at about that rate; bench/bench_guess.py measures the device mode's guesses on the "
                    "demo: its first target is asked for 0.71 of the time, the layer after's 0.50")
    ap.add_argument("--host-register", choices=("ab", "auto", "on", "off"), default="ab",
                    help="--gpu-mem's copies: DMA straight from the registered file (on), staged (off), on if "
                    "the file fits in RAM (auto), or off then on with the ratio (ab)")
    ap.add_argument("--pipelined", choices=("ab", "on", "off"), default="ab",
                    help="--gpu-mem's replay: the host a layer ahead (on), in turn (off), or both with the ratio (ab)")
    ap.add_argument("--copy-blocks", default="",
                    help="--gpu-mem's device mode: SMs of the copy kernel beside the hits, a comma list to compare "
                         "(default kernels.COPY_BLOCKS)")
    ap.add_argument("--decide", choices=("ab", "device", "host"), default="ab",
                    help="--gpu-mem's cache: kernels decide and copy (device; the file registered), the host decides "
                    "and DMAs (host: --host-register, --pipelined), or both (ab)")
    args = ap.parse_args()
    ok, name = available()
    if not ok:
        sys.exit(f"bench_cuda: {name}")
    if args.full_scale:
        write_full_scale(args)
    from localmoe.backends.cuda import kernels as K
    from localmoe.backends.cuda._numba import cuda
    dev = cuda.get_current_device()
    sms = dev.MULTIPROCESSOR_COUNT
    print(f"device: {name}, {sms} SMs, {time.strftime('%Y-%m-%d %H:%M:%S')}", flush=True)

    n = 1 << 28                     # 1 GiB of uint32
    src = cuda.to_device(np.random.default_rng(0).integers(0, 2 ** 32, n, dtype=np.uint32))
    dst = cuda.device_array(n, np.uint32)
    bws = [2 * 4 * n / timeit(cuda, lambda: dst.copy_to_device(src), 10) / 1e9 for _ in range(3)]
    print(f"d2d copy (cudaMemcpy, 1 GiB, read+write) " + ", ".join(f"{b:.0f}" for b in bws) + " GB/s; the best is the "
          f"yardstick", flush=True)
    copy_bw = max(bws)
    del src, dst
    if args.no_kernels:
        return model_bench(args, copy_bw)

    rng = np.random.default_rng(1)
    # -- correctness of each variant (fresh random data, poisoned output) --------------------------
    bad = 0
    failed = set()
    for qt in (Q4_0, Q8_0):
        for rows, cols, P, fused in ((300, 4096, 3, False), (96, 2048, 2, True), (40, 256, 2, False),
                                     (8, 8192, 1, False), (64, 1024, 5, True), (6, 16384, 2, True)):
            E = 3
            raw = random_blocks(rng, qt, E * rows * cols // 32 * BS[qt])
            raw2 = random_blocks(rng, qt, E * rows * cols // 32 * BS[qt])
            x = rng.standard_normal((P, cols)).astype(np.float32)
            mats = rng.integers(0, E, P).astype(np.int32)
            wf = [dequant(raw.reshape(E, -1)[e], qt, rows, cols) for e in range(E)]
            wf2 = [dequant(raw2.reshape(E, -1)[e], qt, rows, cols) for e in range(E)]
            ref = np.stack([wf[m] @ x[p].astype(np.float64) for p, m in enumerate(mats)])
            if fused:
                u = np.stack([wf2[m] @ x[p].astype(np.float64) for p, m in enumerate(mats)])
                ref = ref / (1 + np.exp(-ref)) * u
            W, W2 = cuda.to_device(raw.view(np.uint32)), cuda.to_device(raw2.view(np.uint32))
            dm, dx = cuda.to_device(mats), cuda.to_device(x)
            dxi = cuda.to_device(np.arange(P, dtype=np.int32))
            il = K.interleaved_ok(qt, rows, cols)          # the product's layout too, on the same blocks
            Wi, W2i = (cuda.to_device(K.interleave(r, qt).view(np.uint32)) for r in (raw, raw2)) if il else (W, W2)
            for v in VARIANTS + ([dict(K.FAST2[qt], bps=K.FAST2[qt]["bps"][fused], interleaved=True)] if il else []):
                y = cuda.to_device(np.full((P, rows), np.nan, np.float32))
                w1, w2 = (Wi, W2i) if v.get("interleaved") else (W, W2)
                try:
                    K.launch_fast2(qt, cols, rows, w1, w2, dm, dxi, dx, y, P, rows * cols // 32 * BS[qt], sms, fused,
                                   **v)
                except Exception as e:          # e.g. too many threads for the kernel's registers
                    if str(v) not in failed:
                        print(f"  launch failed {NAME[qt]} fused={fused} {v}: {str(e)[:60]}")
                    failed.add(str(v))
                    continue
                out = y.copy_to_host()
                err = float(np.abs(out - ref).max() / np.abs(ref).max()) if np.isfinite(out).all() else np.inf
                if not err < 1e-4:
                    bad += 1
                    print(f"  WRONG {NAME[qt]} {rows}x{cols} P={P} fused={fused} {v}: rel err {err:.2e}")
    print(f"correctness: {bad} failures over {2 * 6 * len(VARIANTS)} (type, shape, variant) checks + the interleaved "
          f"product variant where the shape allows", flush=True)

    # -- bandwidth ---------------------------------------------------------------------------------
    def setup(qt, rows, cols):
        mat_bytes = rows * cols // 32 * BS[qt]
        nmat = max(1, min(64, (1 << 30) // mat_bytes + 1))
        W = cuda.to_device(random_blocks(rng, qt, nmat * mat_bytes).view(np.uint32))
        return W, mat_bytes, nmat

    results = {}
    for qt in (Q4_0, Q8_0):
        for label, rows, cols in SHAPES:
            W, mat_bytes, nmat = setup(qt, rows, cols)
            x = cuda.to_device(rng.standard_normal((1, cols)).astype(np.float32))
            mats = cuda.to_device(np.arange(nmat, dtype=np.int32))
            xidx = cuda.to_device(np.zeros(nmat, np.int32))
            yb = cuda.device_array((nmat, rows), np.float32)
            row_bytes = mat_bytes // rows
            old = timeit(cuda, lambda: K.launch_gemv_v1(qt, cols, rows, W, W, mats, xidx, x, yb, nmat,
                                                                  row_bytes, mat_bytes, sms), 10)
            res = {"old": nmat * mat_bytes / old / 1e9}
            # the product's variant reads interleaved blocks (random either way: the timing is the layout's)
            il = K.interleaved_ok(qt, rows, cols)
            for v in (VARIANTS if args.sweep else [dict(K.FAST2[qt], bps=K.FAST2[qt]["bps"][0], interleaved=il)]):
                if str(v) in failed:
                    continue
                t = timeit(cuda, lambda: K.launch_fast2(qt, cols, rows, W, W, mats, xidx, x, yb, nmat, mat_bytes, sms,
                                                        False, **v), 10)
                res[(v["warps"], v["direct"], v["bps"])] = nmat * mat_bytes / t / 1e9
            results[(qt, label)] = (res, W, mat_bytes, nmat, rows, cols)
            best = max((k for k in res if k != "old"), key=res.get)
            print(f"{NAME[qt]} {label:26} old {res['old']:6.0f} GB/s, best {best} {res[best]:6.0f} GB/s "
                  f"({res[best] / copy_bw:.1%})", flush=True)
            del W, yb
    if args.sweep:
        print("\nsweep (GB/s; key = warps/block, direct loads, blocks/SM):")
        for qt in (Q4_0, Q8_0):
            keys = [k for k in results[(qt, SHAPES[0][0])][0] if k != "old"]
            tot = {k: sum(results[(qt, s[0])][0][k] / copy_bw for s in SHAPES) for k in keys}
            for k in sorted(keys, key=lambda k: -tot[k])[:6]:
                print(f"  {NAME[qt]} {k}: " + ", ".join(f"{results[(qt, s[0])][0][k]:.0f}" for s in SHAPES)
                      + f"  (mean ratio {tot[k] / len(SHAPES):.1%})")
            k = max(keys, key=tot.get)
            K.FAST2[qt] = dict(K.FAST2[qt], warps=k[0], direct=k[1], bps=(k[2], k[2]))
            print(f"  -> {NAME[qt]} uses {K.FAST2[qt]}")

    rows_out = []
    for qt in (Q4_0, Q8_0):
        for label, rows, cols in SHAPES:
            mat_bytes = rows * cols // 32 * BS[qt]
            W, mat_bytes, nmat = setup(qt, rows, cols)
            x = cuda.to_device(rng.standard_normal((1, cols)).astype(np.float32))
            mats = cuda.to_device(np.arange(nmat, dtype=np.int32))
            xidx = cuda.to_device(np.zeros(nmat, np.int32))
            yb = cuda.device_array((nmat, rows), np.float32)
            y1 = cuda.device_array((1, rows), np.float32)
            zero1 = cuda.to_device(np.zeros(1, np.int32))
            singles = [cuda.to_device(np.array([m], np.int32)) for m in range(nmat)]
            il = K.interleaved_ok(qt, rows, cols)
            tb = timeit(cuda, lambda: K.launch_fast2(qt, cols, rows, W, W, mats, xidx, x, yb, nmat, mat_bytes, sms,
                                                     interleaved=il), 10)

            def single():
                for m in range(nmat):
                    K.launch_fast2(qt, cols, rows, W, W, singles[m], zero1, x, y1, 1, mat_bytes, sms, interleaved=il)
            ts = timeit(cuda, single, 5) / nmat
            bw_b, bw_s = nmat * mat_bytes / tb / 1e9, mat_bytes / ts / 1e9
            rows_out.append((NAME[qt], label, mat_bytes / 1e6, nmat, bw_b, bw_b / copy_bw, ts * 1e6, bw_s, bw_s / copy_bw))
            del W, yb
    # routed experts: fused gate+up of 4 random experts per launch out of a 128-expert tensor
    ex = []
    for qt in (Q4_0, Q8_0):
        E, I, H = 128, 2048, 4096
        mat_bytes = I * H // 32 * BS[qt]
        G = cuda.to_device(random_blocks(rng, qt, E * mat_bytes).view(np.uint32))
        Uw = cuda.to_device(random_blocks(rng, qt, E * mat_bytes).view(np.uint32))
        x = cuda.to_device(rng.standard_normal((1, H)).astype(np.float32))
        xidx = cuda.to_device(np.zeros(4, np.int32))
        y = cuda.device_array((4, I), np.float32)
        sets = [cuda.to_device(rng.choice(E, 4, replace=False).astype(np.int32)) for _ in range(32)]
        it = iter(range(10 ** 9))
        t = timeit(cuda, lambda: K.launch_fast2(qt, H, I, G, Uw, sets[next(it) % 32], xidx, x, y, 4, mat_bytes, sms,
                                                True, interleaved=True), 30)
        ex.append((NAME[qt], 8 * mat_bytes / 1e6, t * 1e6, 8 * mat_bytes / t / 1e9))
        del G, Uw
    print(f"\ncopy {copy_bw:.0f} GB/s; variants in use: Q4_0 {K.FAST2[Q4_0]}, Q8_0 {K.FAST2[Q8_0]}")
    print(f"{'type':5} {'shape':26} {'MB':>7} {'n':>3} {'batched GB/s':>12} {'ratio':>6} {'single us':>9} "
          f"{'GB/s':>6} {'ratio':>6}")
    for r in rows_out:
        print(f"{r[0]:5} {r[1]:26} {r[2]:7.1f} {r[3]:3d} {r[4]:12.0f} {r[5]:6.1%} {r[6]:9.1f} {r[7]:6.0f} {r[8]:6.1%}")
    for r in ex:
        print(f"{r[0]:5} experts: fused gate+up, 4 of 128, {r[1]:.1f} MB per launch: {r[2]:.1f} us = {r[3]:.0f} GB/s "
              f"({r[3] / copy_bw:.1%})")
    model_bench(args, copy_bw)


def write_full_scale(args) -> None:
    """Write the random Small 4-shaped GGUF to args.full_scale unless it is there; benchmark it."""
    path = Path(args.full_scale)
    args.model, args.no_kernels = str(path), True
    if path.exists():
        print(f"full scale: using existing {path} ({path.stat().st_size / 1e9:.2f} GB)", flush=True)
        return
    from convert.synthetic import write_random_gguf
    done = [0, 0]
    t0 = time.perf_counter()

    def progress(n):
        done[0] += n
        if done[0] - done[1] >= 8e9:
            done[1] = done[0]
            print(f"  written {done[0] / 1e9:.0f} GB, {time.perf_counter() - t0:.0f} s", flush=True)
    dims = {k: int(v) for k, v in (kv.split("=") for kv in args.dims.split(",") if kv)}
    write_random_gguf(path, args.quant, seed=0, tokenizer=args.tokenizer, progress=progress, **dims)
    dt = time.perf_counter() - t0
    print(f"full scale: wrote {path} ({path.stat().st_size / 1e9:.2f} GB, random {args.quant}, Small 4 shapes) "
          f"in {dt:.0f} s", flush=True)


def active_bytes(f, k: int, n_experts: int) -> tuple[int, int, int]:
    """Weight bytes one decode token reads: (dense incl. head, routed experts = k/E of each expert
    tensor, one embedding row)."""
    dense = routed = 0
    emb = 0
    for name, ti in f.tensors.items():
        if name.endswith("_exps.weight"):
            routed += ti.nbytes * k // n_experts
        elif name == "token_embd.weight":
            emb = ti.row_bytes
        else:
            dense += ti.nbytes
    return dense, routed, emb


def model_bench(args, copy_bw) -> None:
    if not args.model:
        return
    import localmoe
    from localmoe.backends.cuda._numba import cuda
    t0 = time.perf_counter()
    from localmoe.cli import parse_size
    m = localmoe.load(args.model, backend="cuda", n_ctx=max(4096, args.prefill + args.tokens + 64),
                      gpu_mem=parse_size(args.gpu_mem))
    if args.gpu_mem:
        return stream_bench(args, m)
    t_open = time.perf_counter() - t0
    ids = [1] + list(range(1000, 1015))
    list(m.generate(ids, max_tokens=2, stop=()))      # upload every weight + compile
    be, c = m.backend, m.config
    free, total = cuda.current_context().get_memory_info()
    print(f"\nmodel {args.model} ({m.file.size / 1e9:.2f} GB): open {t_open:.1f} s, upload + compile + 2 tokens "
          f"{time.perf_counter() - t0 - t_open:.1f} s; weights on GPU {be.bytes_uploaded / 1e9:.2f} GB, "
          f"GPU memory free {free / 2 ** 30:.1f} of {total / 2 ** 30:.1f} GiB", flush=True)

    calls = {}                                          # backend calls by method (each: upload + copy back)
    for meth in ("linear", "linear_heads", "rmsnorm", "expert_ffn", "attention"):
        def counted(*a, _f=getattr(be, meth), _n=meth, **kw):
            calls[_n] = calls.get(_n, 0) + 1
            return _f(*a, **kw)
        setattr(be, meth, counted)

    rng = np.random.default_rng(0)
    dense, routed, emb = active_bytes(m.file, c.num_experts_per_tok, c.n_experts)
    per_tok = dense + routed + emb
    roof = copy_bw * 1e9 / per_tok
    steps = args.tokens
    timed = {}
    for mode in ("eager", "graph"):                     # the same decode steps, launched one by one / replayed
        be.use_graphs = mode == "graph"
        cache = m.new_cache()
        m.prefill(np.array(ids), cache)
        for _ in range(4):                              # warm-up decode steps (the graph is captured here)
            m.net.forward(np.array([int(rng.integers(1000, c.vocab_size))]), cache, last_only=True)
        cuda_sync(be)
        toks = rng.integers(1000, c.vocab_size, steps)
        l0, b0, calls0, u0 = be.launches, m.stats.expert_bytes, dict(calls), be.bytes_uploaded
        t0 = time.perf_counter()
        for t in toks:
            m.net.forward(np.array([int(t)]), cache, last_only=True)
        cuda_sync(be)
        dt = (time.perf_counter() - t0) / steps
        launches = (be.launches - l0) / steps
        per_call = {k: (calls[k] - calls0.get(k, 0)) / steps for k in calls}
        timed[mode] = dt
        print(f"decode {mode} (single stream, resident, context {len(ids) + 4}..{len(ids) + 4 + steps}): "
              f"{1 / dt:.2f} tok/s ({dt * 1e3:.2f} ms/token) over {steps} tokens = {1 / dt / roof:.2%} of the HBM "
              f"roofline; launches from Python per token {launches:.0f}; weight bytes uploaded meanwhile "
              f"{be.bytes_uploaded - u0}", flush=True)
        if mode == "eager":
            n_calls = sum(per_call.values())
            eager_launches = launches
            print(f"  backend calls per token {n_calls:.0f} (" + ", ".join(f"{k} {v:.0f}" for k, v in per_call.items())
                  + f"); numba kernel launches per token {launches:.0f}")
    nodes = graph_nodes(be)
    print(f"  graph: one launch per token replaying {nodes} kernel nodes ({be.graph_kernels} numba kernels, the "
          f"rest cupy's elementwise glue); graph / eager = {timed['eager'] / timed['graph']:.1f}x", flush=True)
    print(f"bytes read per token: {per_tok / 1e9:.3f} GB = dense {dense / 1e9:.3f} (incl. head) + routed experts "
          f"{routed / 1e9:.3f} ({c.num_experts_per_tok} of {c.n_experts} x {c.num_hidden_layers} layers) "
          f"+ embedding row; counted by m.stats: {(m.stats.expert_bytes - b0) / steps / 1e9:.3f} GB of experts/token")
    print(f"HBM roofline: copy {copy_bw:.0f} GB/s / {per_tok / 1e9:.3f} GB = {roof:.0f} tok/s; "
          f"graph decode {1 / timed['graph']:.2f} tok/s = {1 / timed['graph'] / roof:.2%} of it")
    dt, launches = timed["eager"], eager_launches
    if be.pdl_why_not:
        print(f"programmatic dependent launch: off ({be.pdl_why_not})")
    else:
        pdl_compare(m, rng, ids, steps)
    if args.kernel_times:
        kernel_times(m, cache, int(rng.integers(1000, c.vocab_size)))

    # host-side cost of one launch and of one tiny backend call (GPU work negligible)
    K = be.K
    eps = np.float32(c.rms_norm_eps)
    xh = np.ones((1, c.hidden_size), np.float32)
    wv = np.ones(c.hidden_size, np.float32)
    xd, wd = cuda.to_device(xh), be._vector(wv)
    out = cuda.device_array_like(xd)
    K.rmsnorm_kernel[1, K.THREADS](xd, wd, out, eps)
    cuda.synchronize()
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        K.rmsnorm_kernel[1, K.THREADS](xd, wd, out, eps)
    cuda.synchronize()
    t_launch = (time.perf_counter() - t0) / n
    rms = calls.get("rmsnorm")
    be.rmsnorm(xh, wv, eps)
    n = 500
    t0 = time.perf_counter()
    for _ in range(n):
        be.rmsnorm(xh, wv, eps)
    t_call = (time.perf_counter() - t0) / n
    calls["rmsnorm"] = rms
    print(f"launches per token {launches:.0f}; backend calls per token {n_calls:.0f} ("
          + ", ".join(f"{k} {v:.0f}" for k, v in per_call.items()) + ")")
    print(f"host cost: {t_launch * 1e6:.1f} us per kernel launch from Python (4 preallocated array args): the "
          f"launches alone {launches * t_launch * 1e3:.1f} ms/token = {launches * t_launch / dt:.0%} of the step; "
          f"{t_call * 1e6:.0f} us per tiny backend call (upload + launch + copy back; varies between runs: "
          f"--profile gives the breakdown); HBM time at copy speed {per_tok / copy_bw / 1e6:.2f} ms/token "
          f"= {per_tok / copy_bw / 1e9 / dt:.1%} of the step", flush=True)

    if args.profile:
        try:
            profile_decode(m, cache, rng, 8)
        except Exception as e:          # a diagnostic: never lose the prefill figure to it
            print(f"profile failed: {e!r}")

    if args.prefill:
        prompt = np.concatenate([[1], rng.integers(1000, c.vocab_size, args.prefill - 1)])
        cache = m.new_cache()
        from localmoe.model import PREFILL_BATCH
        t0 = time.perf_counter()
        done = 0
        for s in range(0, len(prompt), PREFILL_BATCH):
            chunk = prompt[s:s + PREFILL_BATCH]
            m.net.forward(chunk, cache, last_only=s + PREFILL_BATCH >= len(prompt))
            cuda_sync(be)
            done += len(chunk)
            el = time.perf_counter() - t0
            print(f"  prefill {done}/{len(prompt)} tokens: {el:.1f} s ({done / el:.0f} tok/s)", flush=True)
            if el > args.prefill_budget and done < len(prompt):
                print(f"  prefill stopped after {el:.0f} s (--prefill-budget)")
                break
        dt = time.perf_counter() - t0
        print(f"prefill {done} tokens{'' if done == len(prompt) else f' of {len(prompt)}'} in batches of "
              f"{PREFILL_BATCH}: {dt:.2f} s = {done / dt:.1f} tok/s", flush=True)


def pinned_h2d_gbs(nbytes: int = 1 << 29, rounds: int = 8) -> float:
    """Host->device copy rate from pinned memory (the PCIe yardstick), GB/s: the best of `rounds` copies of
    nbytes (one round alone moved between 43 and 55 GB/s on the same H100 machine)."""
    import cupy as cp
    host = cp.cuda.alloc_pinned_memory(nbytes)
    src = np.frombuffer(host, np.uint8, nbytes)
    src[:] = 1
    dst = cp.empty(nbytes, np.uint8)
    dst.set(src)
    cp.cuda.Device().synchronize()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        dst.set(src)
        cp.cuda.Device().synchronize()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


class ReplayedRouting:
    """Wraps be.route: decode steps (one row) take their expert ids from routes [T, L, k] (token t,
    routed layer l), weights as the model's router gives them; prefill keeps the model's own routing.
    The table and the token counter live on the device, so a captured decode step replays it too.
    guesses: a list of [T, L, k] (else no prefetch: the random router's own guesses carry no signal about replayed
    ids): the i-th is be.guess_route's picks for layer l of token t made at layer l - 1 - i, see `guess_table`
    (be.guess_layers is set to how many there are)."""

    def __init__(self, be, routes: np.ndarray, guesses: list[np.ndarray] = ()):
        xp = be.xp
        self.be, self.route, self.layer, self.L = be, be.route, 0, routes.shape[1]
        self.routes = xp.asarray(routes.reshape(len(routes), -1).astype(np.int32))     # [T, L * k]
        self.t = xp.zeros(1, np.int64)
        if not guesses:
            be.next_experts = {}
        else:
            self.guesses = [xp.asarray(g.reshape(len(g), -1).astype(np.int32)) for g in guesses]
            be.guess_route, be.guess_layers = self.guess, len(guesses)

    def guess(self, logits, k, layers=1):
        if logits.shape[0] != 1:                   # prefill: the model's own
            return self.route(logits, k)[0]
        at = self.layer + layers - 1               # (route() has moved self.layer on to the next layer)
        return self.be.xp.take(self.guesses[layers - 1], self.t, axis=0)[:, at * k:(at + 1) * k]

    def __call__(self, logits, k, *a, out=None):
        xp = self.be.xp
        ids, w = self.route(logits, k, *a, out=out)
        if logits.shape[0] == 1:
            ids[...] = xp.take(self.routes, self.t, axis=0)[:, self.layer * k:(self.layer + 1) * k]
            self.layer = (self.layer + 1) % self.L
            if self.layer == 0:
                xp.remainder(self.t + 1, len(self.routes), out=self.t)
        return ids, w


def guess_table(routes: np.ndarray, recall: float, rng) -> np.ndarray:
    """Replayed next-layer guesses [T, L, k] for routes [T, L, k]: each of a token's k ids guessed right with
    probability `recall`, else replaced by the same slot of another random token at that layer (so wrong
    guesses follow the layer's own popularity), so the targets (the guesses not resident) are right at about
    that rate too. The recall to use is a measured one: how often the device mode's targets are asked for on the
    demo (bench/bench_guess.py: 0.71 for the first target of the next layer's guess, 0.50 for the layer after's)."""
    T = len(routes)
    other = routes[(np.arange(T)[:, None] + rng.integers(1, T, (T, routes.shape[1])))[:, :, None] % T,
                   np.arange(routes.shape[1])[None, :, None], np.arange(routes.shape[2])[None, None, :]]
    return np.where(rng.random(routes.shape) < recall, routes, other)


def stream_bench(args, m) -> None:
    """Decode with the routed experts streamed through the --gpu-mem cache: model routing, then Zipf; once per
    --host-register way of copying the misses (a fresh streamer each), then the ratio of the two."""
    import bench_cache
    be, c = m.backend, m.config
    pcie = pinned_h2d_gbs()
    routed_layers = sum(1 for L in m.net.layers if L.experts is not None)
    st = be.streamer
    cache_args = (st.budget, st.n_layers, st.n_experts, st.policy)
    del st                                                # its pools are freed when it is replaced
    route0, next0, layers0 = be.route, dict(be.next_experts), be.guess_layers
    ids = [1] + list(range(1000, 1015))
    print(f"\nstreaming: --gpu-mem {args.gpu_mem}; pinned host->device copy {pcie:.1f} GB/s (the PCIe yardstick); "
          f"file {m.file.size / 2 ** 30:.1f} GiB", flush=True)
    onoff = {"ab": (False, True), "on": (True,), "off": (False,)}
    modes = {"auto": (None,), **onoff}[args.host_register]
    blocks = [int(b) for b in args.copy_blocks.split(",")] if args.copy_blocks else [None]
    configs = [(True, True, None, b) for b in blocks] if args.decide in ("ab", "device") else []
    if args.decide in ("ab", "host"):
        configs += [(False, a, b, None) for a in modes for b in onoff[args.pipelined]]
    rates = {}
    for on_device, mode, pipelined, cb in configs:
        be.route, be.next_experts = route0, dict(next0)
        be.stream_experts(*cache_args, host_buffer=m.file.data, host_register=mode,   # closes the last one
                          on_device=on_device, copy_blocks=cb)
        if pipelined and not be.pipelined:
            print(f" pipelined replay unavailable: {be.pipelined_why_not}", flush=True)
            continue
        be.pipelined = bool(pipelined)
        st0 = m.net.stats.expert_cache = m._streamer = be.streamer
        rng = np.random.default_rng(0)
        zipf = bench_cache.synthetic_routes(args.tokens + 64, routed_layers, c.n_experts, c.num_experts_per_tok,
                                            args.zipf, args.locality, rng)
        print(f" decided on the device (kernels look up and copy; copy kernel beside the hits on "
              f"{be.streamer.copy_blocks()} SMs):" if on_device else
              f" decided on the host: host_register={ {None: 'auto', True: 'on', False: 'off'}[mode]}, "
              f"pipelined={pipelined}:", flush=True)
        replayed = f"Zipf s={args.zipf}, locality {args.locality} (replayed)"
        for i, (name, recall) in enumerate([("model's own routing", None)] + [(replayed, g) for g in args.guess.split(",")]):
            be.route, be.next_experts, be.guess_layers = route0, dict(next0), layers0
            be.__dict__.pop("guess_route", None)
            if i:                                             # a fresh expert cache: the last run's would warm it
                be.stream_experts(*cache_args, host_buffer=m.file.data, host_register=mode, on_device=on_device,
                                  copy_blocks=cb)
                be.pipelined = bool(pipelined)
                st0 = m.net.stats.expert_cache = m._streamer = be.streamer
            if recall is not None:
                shares = [] if recall == "off" else [float(r) for r in recall.split("/")]
                be.route = ReplayedRouting(be, zipf, [guess_table(zipf, r, rng) for r in shares])
                name += (", no prefetch" if not shares else f", guesses {shares[0]:.0%} right" +
                         "".join(f", {r:.0%} for the layer after" for r in shares[1:]))
            cache = m.new_cache()
            t0 = time.perf_counter()
            m.prefill(np.array(ids), cache)
            for _ in range(32):                               # warm the cache
                m.net.forward(np.array([int(rng.integers(1000, c.vocab_size))]), cache, last_only=True)
            cuda_sync(be)
            warm = time.perf_counter() - t0
            s0, tok0 = st0.stats(), m.stats.tokens
            if on_device and not s0["on_device"]:
                print(f"  the device mode is unavailable: {s0['device_why_not']}", flush=True)
                break
            if not name.startswith("Zipf"):                   # registered (or not) at the first fetch
                print("  copies: " + ("by kernels reading the registered file" if on_device else
                                       "direct DMA from the registered file" if s0["host_registered"] else
                                       f"staged ({s0['register_why_not']})") +
                      (f" (registered in {s0['register_s']:.2f} s, within the warm-up)" if s0["host_registered"] else ""),
                      flush=True)
            t0 = time.perf_counter()
            for t in rng.integers(1000, c.vocab_size, args.tokens):
                m.net.forward(np.array([int(t)]), cache, last_only=True)
            cuda_sync(be)
            dt = (time.perf_counter() - t0) / args.tokens
            s1 = st0.stats()
            hits, misses = s1["hits"] - s0["hits"], s1["misses"] - s0["misses"]
            h2d = (s1["bytes_h2d"] - s0["bytes_h2d"]) / args.tokens
            direct = (s1["bytes_direct"] - s0["bytes_direct"]) / args.tokens
            ahead = (s1["prefetch_loads"] - s0["prefetch_loads"]) / args.tokens
            found = (s1["prefetch_hits"] - s0["prefetch_hits"]) / args.tokens
            # the roofline's traffic: every expert not whole at its lookup, in full (the device counts those
            # a prefetch began as misses, the host's cache as hits), not the bytes a wrong guess moved
            need = (misses / args.tokens + (0 if on_device else found)) * s1["slot_bytes"]
            roof = pcie * 1e9 / need if need else float("inf")
            rates[on_device, mode, pipelined, name.split(" (")[0] + ("" if recall is None else f" {recall}"), cb] = 1 / dt
            if args.profile and name.startswith("Zipf"):
                profile_decode(m, cache, rng, 8)
            if on_device and recall is not None:
                step_gaps(m, cache, rng, 16)
            if args.timeline and on_device:
                stream_timeline(m, cache, rng, dump=None if args.timeline is True else
                                f"{args.timeline}.{len(rates)}.npz")
            print(f"  {name}: {1 / dt:.2f} tok/s ({dt * 1e3:.1f} ms/token) over {args.tokens} tokens after {warm:.0f} s of "
                  f"warm-up; {s1['slots']} slots ({s1['pool_bytes'] / 2 ** 30:.1f} GiB) hit rate {hits / max(1, hits + misses):.1%}"
                  f"; misses {need / 1e6:.0f} MB/token, host->GPU {h2d / 1e6:.0f} MB/token ({direct / max(h2d, 1):.0%} "
                  f"direct; prefetch targets {ahead:.1f}/token, {found:.1f} of them asked for, "
                  f"{(s1['bytes_prefetch'] - s0['bytes_prefetch']) / args.tokens / 1e6:.0f} MB/token); PCIe roofline at the "
                  f"misses' traffic {roof:.2f} tok/s; measured = {1 / dt / roof:.0%} of it; host waits "
                  f"{s1['host_waits'] - s0['host_waits']}", flush=True)
    for i, what in ((1, "direct (on) / staged (off)"), (2, "pipelined (on) / in turn (off)")):
        pairs = [(k, k[:i] + (True,) + k[i + 1:]) for k in rates if k[i] is False]
        if any(b in rates for _, b in pairs):
            print(f" {what}: " + "; ".join(f"{a[3]} ({('pipelined', 'host_register')[i - 1]}={a[3 - i]}) "
                                           f"{rates[b] / rates[a]:.2f}x" for a, b in pairs if b in rates), flush=True)
    for name in sorted({k[3] for k in rates if k[0]}):
        host = [v for k, v in rates.items() if not k[0] and k[3] == name]
        for cb in blocks:
            if host and (True, True, None, name, cb) in rates:
                print(f" device ({be.streamer.copy_blocks() if cb is None else cb} copy SMs) / the best host way, {name}: "
                      f"{rates[True, True, None, name, cb] / max(host):.2f}x", flush=True)


def step_gaps(m, cache, rng, tokens: int) -> None:
    """The GPU's time of each decode step (stamps at the step's first and last kernel, in its graph) and the idle
    between two steps (the host's part: waiting for the step, copying the logits out, embedding the next token,
    launching), over the same `tokens` steps (after one that captures the stamped graph)."""
    from localmoe.backends.cuda import kernels as K
    from localmoe.backends.cuda._numba import cuda
    be, net = m.backend, m.net

    @cuda.jit
    def stamp(buf, n, end):
        K.grid_dependency()
        buf[n[0], end] = K.globaltimer()
        if end:
            n[0] += 1

    buf, n = be.xp.zeros((tokens + 2, 2), np.int64), be.xp.zeros(1, np.int64)   # (the capture runs the step twice)
    step0 = net.step

    def step(*a, **kw):
        stamp[1, 1, K.STREAM[0]](buf, n, 0)
        out = step0(*a, **kw)
        stamp[1, 1, K.STREAM[0]](buf, n, 1)
        return out

    net.step = step
    be._graphs.clear()
    try:
        first, *toks = rng.integers(1000, m.config.vocab_size, tokens + 1)
        net.forward(np.array([int(first)]), cache, last_only=True)     # captures the stamped graph: not timed
        t0 = time.perf_counter()
        for t in toks:
            net.forward(np.array([int(t)]), cache, last_only=True)
        cuda_sync(be)
        wall = (time.perf_counter() - t0) / tokens
    finally:
        del net.step
        be._graphs.clear()
    s = be.to_host(buf)[2:].astype(np.float64) / 1e3                    # us, the replayed steps
    busy, idle = s[:, 1] - s[:, 0], s[1:, 0] - s[:-1, 1]
    print(f"  {tokens} more steps, {wall * 1e3:.2f} ms each: the GPU {busy.mean() / 1e3:.2f} ms (step's first to "
          f"last kernel), idle between steps {idle.mean():.0f} us (median {np.median(idle):.0f}: the host's part)",
          flush=True)


def stream_timeline(m, cache, rng, tokens: int = 4, dump: str | None = None) -> None:
    """The device mode's MoE layers on the GPU's clock (%globaltimer), for the last of `tokens` decode steps
    captured with one-thread stamp kernels (each after the kernel before it, PDL's wait) at: the router done
    (the lookup starts), the lookup and copy launched (the hits start), the copy done (on the copy stream; not where a
    prefetch follows the misses), the hits and guesses done (the join), the join done (the misses are in), the
    layer done, and the guesses' targets placed (after the hits); and on the copy stream before each lookup, where
    the last copy kernel (misses, then its prefetch until this lookup stops it) has ended. From those, the link's
    account of a step: demand copies, prefetch, and the time it idles (a copy kernel waiting for its targets, one
    with nothing to prefetch, the kernel boundaries, the token boundary). The stamps cost ~a few us each."""
    from localmoe.backends.cuda import kernels as K
    from localmoe.backends.cuda._numba import cuda
    be, st = m.backend, m.backend.streamer

    @cuda.jit
    def stamp(buf, i):
        K.grid_dependency()
        buf[i] = K.globaltimer()

    @cuda.jit
    def keep(buf, src, dst):
        K.grid_dependency()
        buf[dst] = buf[src]

    L = st.n_layers
    W = 9                                         # stamps per layer (7: the copy stream free; 8: the last step's end)
    buf = be.xp.zeros(W * L, np.int64)
    lookup0, join0, ffn0 = st.lookup_on_device, st.join, be.expert_ffn
    cur = [0]
    first, last = min(ly for ly, _ in st._bufs), max(ly for ly, _ in st._bufs)

    def lookup(layer, *a, **kw):
        cur[0] = layer
        if layer == first:                        # the last step's last layer's end, before this step overwrites it
            keep[1, 1, K.STREAM[0]](buf, W * last + 4, W * first + 8)
        st._wait(st._record(on_copy=False), on_copy=True)
        stamp[1, 1, st._copy_launch](buf, W * layer + 7)   # the copy stream is free: the last copy kernel ended
        stamp[1, 1, K.STREAM[0]](buf, W * layer)
        r = lookup0(layer, *a, **kw)
        stamp[1, 1, K.STREAM[0]](buf, W * layer + 1)
        if r is None:
            return r
        if r[4] is not None:                          # after the hits: the guesses, their targets

            def place(guesses, place0=r[4]):
                place0(guesses)
                stamp[1, 1, K.STREAM[0]](buf, W * layer + 6)
            r = (*r[:4], place)
        if r[2] is None or r[2] == "ready":           # the copy is not beside the hits, or a prefetch follows it
            return r                                  # (no copy-done stamp)
        stamp[1, 1, st._copy_launch](buf, W * layer + 2)
        return (*r[:2], st._record(on_copy=True), *r[3:])   # the join waits for the stamp too (a joined capture)

    def join(done):
        stamp[1, 1, K.STREAM[0]](buf, W * cur[0] + 3)
        join0(done)
        stamp[1, 1, K.STREAM[0]](buf, W * cur[0] + 5)

    def ffn(*a, **kw):
        y = ffn0(*a, **kw)
        stamp[1, 1, K.STREAM[0]](buf, W * cur[0] + 4)
        return y

    st.lookup_on_device, st.join, be.expert_ffn = lookup, join, ffn
    be._graphs.clear()
    try:
        t0 = time.perf_counter()
        for tok in rng.integers(1000, m.config.vocab_size, tokens):
            m.net.forward(np.array([int(tok)]), cache, last_only=True)
        cuda_sync(be)
    finally:
        del st.lookup_on_device, st.join, be.expert_ffn
        be._graphs.clear()
    s = be.to_host(buf).reshape(L, W).astype(np.float64) / 1e3          # us
    moe = [i for i in range(L) if s[i, 0] > 0]
    s = s[moe]
    prev = np.concatenate([[np.nan], s[:-1, 4]])
    parts = {"attention + router (last layer's end -> lookup start)": s[:, 0] - prev,
             "lookup": s[:, 1] - s[:, 0],
             "hits, then the guesses and their targets (lookup done -> targets placed)":
                 np.where(s[:, 6] > 0, s[:, 6] - s[:, 1], np.nan),
             "copy (lookup done -> copy stream done)": np.where(s[:, 2] > 0, s[:, 2] - s[:, 1], np.nan),
             "misses in (lookup done -> join done)": s[:, 5] - s[:, 1],
             "hits (lookup done -> join)": s[:, 3] - s[:, 1],
             "after the join (misses, combine)": s[:, 4] - s[:, 5]}
    print(f"  timeline of one decode step, {len(moe)} MoE layers, first lookup -> last layer end "
          f"{s[-1, 4] - s[0, 0]:.0f} us (with stamps; 4 tokens took {(time.perf_counter() - t0) * 1e3:.0f} ms incl. capture):")
    for what, v in parts.items():
        print(f"   {what}: mean {np.nanmean(v):.1f} us, median {np.nanmedian(v):.1f}, sum {np.nansum(v):.0f} us")
    nm = {layer: int(be.to_host(b[3])[0]) for (layer, Q), b in st._bufs.items() if Q <= 8}   # the decode steps' lookups
    misses = np.array([nm.get(i, -1) for i in moe])
    if dump:
        np.savez(dump, stamps=s, misses=misses)
    link_account(s, misses)
    copy = np.where(s[:, 2] > 0, s[:, 2], s[:, 5]) - s[:, 1]
    print("   copy time by the layer's misses (the last step): " + "; ".join(
        f"{m}: {np.mean(copy[misses == m]):.0f} us x {int(np.sum(misses == m))}" for m in sorted(set(misses.tolist()))))
    head = "   first 6 layers (us from the first stamp: start, lookup done, copy done, hits done, misses in, end): "
    print(head + "; ".join(", ".join(f"{x - s[0, 0]:.0f}" if x > 0 else "-" for x in r[[0, 1, 2, 3, 5, 4]])
                           for r in s[:6]), flush=True)


def link_account(s, misses) -> None:
    """What the link did in the timeline's last step (stamps s [layers, 9] in us, see stream_timeline; misses: each
    layer's count). Copy kernel j starts once its lookup is done and kernel j - 1 has ended (the copy stream free),
    copies its misses until the join, then prefetches (from when its targets are placed) until lookup j + 1 stops it
    and its blocks finish their items. The link idles where kernel j - 1 ended before lookup j was done, while a
    kernel with no misses waits for its targets, and between the steps (no guess crosses a token)."""
    # kernel j - 1's end: the copy stream's stamp, unless that only waited for the compute stream (the kernel had
    # ended before: it had nothing to prefetch), then its misses' join
    ended = np.where(s[:, 7] > s[:, 0] + 3, s[:, 7], np.concatenate([[np.nan], np.maximum(s[:-1, 5], s[:-1, 6])]))
    start = np.maximum(s[:, 1], ended)                     # each kernel's start (its launch latency not included)
    end = np.append(ended[1:], np.nan)
    has = misses > 0
    demand = np.where(has, s[:, 5] - start, 0.0)
    wait = np.where(has, 0.0, np.maximum(s[:, 6] - start, 0.0))   # no misses: waits for its targets
    ahead = np.where(has, np.maximum(end - np.maximum(s[:, 5], s[:, 6]), 0.0), np.maximum(end - s[:, 6], 0.0))
    idle_before = np.maximum(s[:, 1] - ended, 0.0)         # kernel j - 1 ended before lookup j was done
    drain = np.maximum(ended - s[:, 1], 0.0)               # ... or after it: its blocks finishing their items
    step = s[-1, 4] - s[0, 8] if s[0, 8] > 0 else np.nan
    last_tail = s[-1, 4] - s[-1, 5]                        # the last layer after its misses (no prefetch follows)
    head = s[0, 1] - s[0, 8]                               # the head, the next step's launch, layer 0 to its lookup
    print(f"   link account of a step ({step:.0f} us, last step's end -> this one's): demand copies {np.nansum(demand):.0f} us"
          f"; prefetch {np.nansum(ahead):.0f} us; idle: no-miss layers waiting for their "
          f"targets {wait.sum():.0f} us ({int((~has).sum())} layers), a kernel done before the next lookup "
          f"{idle_before[1:].sum():.0f} us, the step boundary {last_tail + head:.0f} us (last layer's tail "
          f"{last_tail:.0f}, head + layer 0 {head:.0f}); drains after a lookup {drain[1:].sum():.0f} us "
          f"(mean {drain[1:].mean():.1f})", flush=True)


def profile_decode(m, cache, rng, steps: int) -> None:
    """cProfile `steps` decode steps; print the host time by category and the top functions."""
    import cProfile
    import pstats

    from localmoe.backends.cuda._numba import cuda
    toks = rng.integers(1000, m.config.vocab_size, steps)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for t in toks:
        m.net.forward(np.array([int(t)]), cache, last_only=True)
    cuda_sync(m.backend)
    prof.disable()
    wall = time.perf_counter() - t0
    st = pstats.Stats(prof)
    # cumulative seconds of the outermost entry points of each kind (numba-cuda's own functions)
    cats = {"kernel launch (numba dispatch, incl. launch config)": ("dispatcher", ("__call__",)),
            "host->device copies (to_device)": ("", ("to_device",)),
            "device->host copies (copy_to_host)": ("", ("copy_to_host",)),
            "device allocations (device_array, device_array_like)": ("", ("device_array", "device_array_like")),
            "CUDA backend methods, total": ("backends/cuda/__init__", ("linear", "linear_heads", "rmsnorm",
                                                                        "expert_ffn", "attention"))}
    print(f"\nprofile of {steps} decode steps (cProfile inflates Python-heavy code): {wall / steps * 1e3:.1f} ms/token")
    for label, (where, names) in cats.items():
        tot = 0.0
        for (fn, _line, name), (_cc, _nc, _tt, ct, _callers) in st.stats.items():
            if name in names and where in fn.replace("\\", "/") and ("numba" in fn or where):
                tot += ct
        print(f"  {label:55} {tot / steps * 1e3:8.2f} ms/token  {tot / wall:6.1%}")
    st.sort_stats("tottime").print_stats(18)


KERNEL_METHODS = ("rmsnorm", "linear", "linear_heads", "glu", "mla_rope", "attention", "route",
                  "expert_ffn")


def kernel_times(m, cache, token: int, reps: int = 10) -> None:
    """GPU time of each backend call one decode step makes: the calls are recorded in an eager step,
    then each is captured `reps` times into a graph, each repetition after a 256 MB read that flushes
    the L2 (so weights come from HBM, as in a real step), and replayed; the flush-only graph's time is
    subtracted. Prints a table by call (weights named without their layer) and the sum."""
    be = m.backend
    cp = be.xp
    calls, depth = [], [0]
    orig = {n: getattr(be, n) for n in KERNEL_METHODS}

    def recorder(name):
        def call(*a, **k):
            if depth[0] == 0:       # (with the router's slot rows of the moment: expert_ffn reads the latest)
                calls.append((name, a, k, getattr(be, "_slot_rows", None)))
            depth[0] += 1
            try:
                return orig[name](*a, **k)
            finally:
                depth[0] -= 1
        return call
    for n in KERNEL_METHODS:
        setattr(be, n, recorder(n))
    graphs = be.use_graphs
    be.use_graphs = False
    try:
        m.net.forward(np.array([token]), cache, last_only=True)
    finally:
        for n in KERNEL_METHODS:
            setattr(be, n, orig[n])
        be.use_graphs = graphs
    flush_buf = cp.ones(64 << 20, np.float32)
    sink = cp.empty((), np.float32)

    def timed(fn) -> float:
        pool = cp.cuda.MemoryPool()
        with cp.cuda.using_allocator(pool.malloc):
            fn()
            be.stream.begin_capture(getattr(cp.cuda.runtime, "streamCaptureModeRelaxed", 2))
            try:
                for _ in range(reps):
                    cp.sum(flush_buf, out=sink)
                    fn()
            finally:
                graph = be.stream.end_capture()
            graph.launch(be.stream)
            e0, e1 = cp.cuda.Event(), cp.cuda.Event()
            e0.record(be.stream)
            for _ in range(3):
                graph.launch(be.stream)
            e1.record(be.stream)
            e1.synchronize()
        return cp.cuda.get_elapsed_time(e0, e1) * 1e3 / (3 * reps)          # us per repetition

    flush = timed(lambda: None)
    rows: dict = {}
    for name, a, k, slot_rows in calls:
        w = a[0] if a and hasattr(a[0], "raw") else None
        label = name + (":" + ".".join(p for p in w.name.split(".") if not p.isdigit() and p not in ("blk", "weight"))
                        if w is not None else "")
        if slot_rows is not None:
            be._slot_rows = slot_rows
        us = timed(lambda: orig[name](*a, **k)) - flush
        r = rows.setdefault(label, [0, 0.0])
        r[0] += 1
        r[1] += us
    total = sum(r[1] for r in rows.values())
    print(f"GPU time per decode step by backend call ({len(calls)} calls; each timed {reps}x in a graph after an L2 "
          f"flush, the flush's {flush:.1f} us subtracted): sum {total / 1e3:.2f} ms")
    for label, (n, us) in sorted(rows.items(), key=lambda kv: -kv[1][1]):
        print(f"  {label:34s} {n:4d} calls  {us / n:8.1f} us each  {us / 1e3:6.2f} ms  {us / total:6.1%}")


def pdl_compare(m, rng, ids, steps: int, rounds: int = 3) -> None:
    """Graph decode and a 512-token prefill with and without programmatic dependent launch, rounds interleaved
    (graphs re-captured at each switch); the backend's default (on) is left set."""
    be, res, pre = m.backend, {True: [], False: []}, {True: [], False: []}
    prompt = rng.integers(1000, m.config.vocab_size, 512)
    for _ in range(rounds):
        for on in (True, False):
            be.pdl = on
            cache = m.new_cache()
            t0 = time.perf_counter()
            m.prefill(prompt, cache)
            cuda_sync(be)
            pre[on].append(len(prompt) / (time.perf_counter() - t0))
            cache = m.new_cache()
            m.prefill(np.array(ids), cache)
            for _ in range(4):
                m.net.forward(np.array([int(rng.integers(1000, m.config.vocab_size))]), cache, last_only=True)
            cuda_sync(be)
            t0 = time.perf_counter()
            for t in rng.integers(1000, m.config.vocab_size, steps):
                m.net.forward(np.array([int(t)]), cache, last_only=True)
            cuda_sync(be)
            res[on].append(steps / (time.perf_counter() - t0))
    be.pdl = True
    fmt = lambda v: " ".join(f"{x:.1f}" for x in v)
    print(f"programmatic dependent launch, graph decode tok/s over {rounds} interleaved rounds of {steps} tokens: "
          f"on {fmt(res[True])}, off {fmt(res[False])}; best on / best off = {max(res[True]) / max(res[False]):.3f}; "
          f"prefill of {len(prompt)} tokens, tok/s: on {fmt(pre[True])}, off {fmt(pre[False])}; best on / best off = "
          f"{max(pre[True]) / max(pre[False]):.3f}", flush=True)


def cuda_sync(be):
    be.stream.synchronize()


def graph_nodes(be) -> str:
    """Kernel nodes of the newest captured decode graph (through cuda-python, which numba-cuda brings)."""
    try:
        from cuda.bindings import runtime as rt
        total = 0
        for graph, *_ in next(reversed(be._graphs.values()))[0]:     # segments (one unless experts stream)
            err, _, n = rt.cudaGraphGetNodes(graph.graph, 0)
            if int(err) != 0:
                return f"? ({err})"
            total += n
        return str(total)
    except Exception as e:
        return f"? ({e!r})"


if __name__ == "__main__":
    main()
