"""Programmatic dependent launch and weight preloading, A/B in one process: graph decode tok/s under
 A = no PDL (session 8's launches), B = PDL, weights loaded after the wait, C = PDL + preload (the default).
Interleaved rounds (argv[2], default 4) of 48 tokens, graphs re-captured at each switch. On the GPU machine:
    python3 bench/ab_pdl.py /mnt/lm/small4-q4_0.gguf 6      (the file: bench_cuda.py --full-scale writes it)"""
import sys, time
import numpy as np
import localmoe
from localmoe.backends.cuda import kernels as K
path = sys.argv[1]
m = localmoe.load(path, backend="cuda", n_ctx=4096)
ids = [1] + list(range(1000, 1015))
list(m.generate(ids, max_tokens=2, stop=()))
be = m.backend
V = min(100000, m.net.embed_tokens.rows)
orig = K.launch_gemv
def no_preload(*a, **kw):
    kw["preload"] = False
    return orig(*a, **kw)
cfgs = {"A no PDL": (False, False), "B PDL": (True, False), "C PDL + preload": (True, True)}
rng = np.random.default_rng(0)
res = {k: [] for k in cfgs}
for rnd in range(int(sys.argv[2]) if len(sys.argv) > 2 else 4):
    for name, (pdl, pre) in cfgs.items():
        be.pdl = pdl
        K.launch_gemv = orig if pre else no_preload
        be._graphs.clear()
        cache = m.new_cache()
        m.prefill(np.array(ids), cache)
        for _ in range(4):
            m.net.forward(np.array([int(rng.integers(1000, V))]), cache, last_only=True)
        be.stream.synchronize()
        t0 = time.perf_counter()
        for t in rng.integers(1000, V, 48):
            m.net.forward(np.array([int(t)]), cache, last_only=True)
        be.stream.synchronize()
        res[name].append(48 / (time.perf_counter() - t0))
    print("round", rnd, {k: round(v[-1], 1) for k, v in res.items()}, flush=True)
a = max(res["A no PDL"])
for name, v in res.items():
    print(f"{name}: decode graph {' '.join(f'{x:.1f}' for x in v)} tok/s (best {max(v):.1f}, {1e3 / max(v):.2f} ms); best / A best {max(v) / a:.3f}")
