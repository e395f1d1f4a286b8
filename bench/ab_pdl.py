"""Programmatic dependent launch and weight preloading, A/B in one process: graph decode tok/s under
 A = no PDL (session 8's launches), B = PDL, weights loaded after the wait, C = PDL + preload (the default).
Interleaved rounds (argv[2], default 4) of 48 tokens, graphs re-captured at each switch. On the GPU machine:
    python3 bench/ab_pdl.py /mnt/lm/small4-q4_0.gguf 6      (the file: bench_cuda.py --full-scale writes it)"""
import sys
import numpy as np
from ab_trees import decode_round, load
from localmoe.backends.cuda import kernels as K
m = load(sys.argv[1])
be = m.backend
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
        res[name].append(decode_round(m, rng))
    print("round", rnd, {k: round(v[-1], 1) for k, v in res.items()}, flush=True)
a = max(res["A no PDL"])
for name, v in res.items():
    print(f"{name}: decode graph {' '.join(f'{x:.1f}' for x in v)} tok/s (best {max(v):.1f}, {1e3 / max(v):.2f} ms); best / A best {max(v) / a:.3f}")
