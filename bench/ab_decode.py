"""Decode-step A/B in one process: graph decode tok/s of configurations of the CUDA backend, in interleaved
rounds (argv[3], default 4) of 48 tokens, the graphs re-captured at each switch. On the GPU machine:
    python3 bench/ab_decode.py /mnt/lm/small4-q4_0.gguf pdl 6        (the file: bench_cuda.py --full-scale writes it)
    python3 bench/ab_decode.py /mnt/lm/small4-q4_0.gguf pipeline 6
pdl: A = no PDL (session 8's launches), B = PDL, weights loaded after the wait, C = PDL + preload (the default).
pipeline: fast2's plain launches without / with the next task's weights loaded before the current task's
arithmetic (kernels._make_fast2)."""
import sys, time
import numpy as np
import localmoe
from localmoe.backends.cuda import kernels as K
path, what = sys.argv[1], sys.argv[2]
m = localmoe.load(path, backend="cuda", n_ctx=4096)
ids = [1] + list(range(1000, 1015))
list(m.generate(ids, max_tokens=2, stop=()))
be = m.backend
V = min(100000, m.net.embed_tokens.rows)
orig = K.launch_gemv
pipelines = {qt: K.FAST2[qt]["pipeline"] for qt in K.FAST2}


def setting(pdl=True, preload=True, pipeline=True):
    def apply():
        be.pdl = pdl
        K.launch_gemv = orig if preload else lambda *a, **kw: orig(*a, **dict(kw, preload=False))
        for qt, p in pipelines.items():
            K.FAST2[qt]["pipeline"] = p if pipeline else (False, False)
    return apply


cfgs = {"pdl": {"A no PDL": setting(pdl=False, preload=False), "B PDL": setting(preload=False),
                "C PDL + preload": setting()},
        "pipeline": {"A not pipelined": setting(pipeline=False), "B pipelined": setting()}}[what]
rng = np.random.default_rng(0)
res = {k: [] for k in cfgs}
for rnd in range(int(sys.argv[3]) if len(sys.argv) > 3 else 4):
    for name, apply in cfgs.items():
        apply()
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
a = max(next(iter(res.values())))
for name, v in res.items():
    print(f"{name}: decode graph {' '.join(f'{x:.1f}' for x in v)} tok/s (best {max(v):.1f}, {1e3 / max(v):.2f} ms); "
          f"best / A best {max(v) / a:.3f}")
