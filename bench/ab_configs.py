"""Resident graph decode under kernel configurations, A/B in one process (interleaved rounds, fresh graphs).

    python3 bench/ab_configs.py /mnt/lm/small4-q4_0.gguf SET [rounds]

Each configuration sets module values of localmoe.backends.cuda.kernels and gets its own memo of compiled
kernels (compiled at its first round), so the rounds compare code, not compile state; a process-to-process A/B
(ab_trees.py) moves ~5% between processes on the same tree, too much for a few percent. The first configuration
of a set is the shipped one; ratios are against it. Sets:
  coresident  fast2's Q4_0 block shape: A the default (16 warps, register cap 128: one block fills an SM);
              B 8 warps, cap 128 (two blocks fit an SM: the next kernel's can be resident and waiting, PDL),
              X_LOADS 16 so the norm prologue still holds a row (quantized in groups 2, 2, 4, 8; session 17
              measured it with one block at a time); C 8 warps, cap 256 (B's shape, one per SM)
  pipelined   fast2's loads one chunk ahead (PIPELINED): Q4_0's whole unit as shipped, against none (each chunk's
              words loaded at its start, as before session 20)
  quantize    fast2's x quantization: Q4_0's groups of blocks quantized together (QUANT_GROUPS) as shipped,
              other groupings, and one block at a time (session 16's order; the same bits in every case)
(the file: bench_cuda.py --full-scale writes it.)"""
import sys

import numpy as np

from ab_trees import decode_round, load
from localmoe.backends.cuda import kernels as K

jit = K._jit_source
CAP = [None]


def capped(src, name, max_registers=None, **names):
    """fast2's register cap, when the configuration sets one."""
    if name.startswith("fast2") and CAP[0] is not None:
        max_registers = CAP[0]
    return jit(src, name, max_registers, **names)


K._jit_source = capped
EIGHT_WARPS = dict(FAST2={**K.FAST2, K.Q4_0: {**K.FAST2[K.Q4_0], "warps": 8}}, X_LOADS=16,
                   QUANT_GROUPS={K.Q4_0: (2, 2, 4, 8), K.Q8_0: (2,) * 8})
SETS = {
    "coresident": {"A 16 warps cap 128": {},
                   "B 8 warps cap 128": dict(EIGHT_WARPS, cap=128),
                   "C 8 warps cap 256": dict(EIGHT_WARPS, cap=256)},
    "pipelined": {"Q4_0 unit ahead": {}, "none ahead": dict(PIPELINED={K.Q4_0: 0, K.Q8_0: 0})},
    "quantize": {f"groups {K.QUANT_GROUPS[K.Q4_0]}": {},
                 **{f"groups {g}": dict(QUANT_GROUPS={**K.QUANT_GROUPS, K.Q4_0: g}) for g in ((8,), (4, 4))},
                 "one block at a time": dict(QUANT_GROUPS={K.Q4_0: (1,) * 8, K.Q8_0: (1,) * 8})},
}
SHIPPED = {n: getattr(K, n) for n in ("FAST2", "X_LOADS", "QUANT_GROUPS", "PIPELINED")}
CACHES: dict = {}


def use(be, name, cfg):
    """Switch to configuration `name`: its values, its memo of compiled kernels, graphs captured afresh."""
    for n, v in SHIPPED.items():
        setattr(K, n, cfg.get(n, v))
    CAP[0] = cfg.get("cap")
    K._CACHE = CACHES.setdefault(name, {})
    be._graphs.clear()


if __name__ == "__main__":
    m = load(sys.argv[1])
    be = m.backend
    configs = SETS[sys.argv[2]]
    CACHES[next(iter(configs))] = K._CACHE
    rng = np.random.default_rng(0)
    res = {k: [] for k in configs}
    for rnd in range(int(sys.argv[3]) if len(sys.argv) > 3 else 3):
        for name, cfg in configs.items():
            use(be, name, cfg)
            res[name].append(decode_round(m, rng))
            regs = sorted({max(k.get_regs_per_thread().values()) for key, k in K._CACHE.items()
                           if key[0] is K._make_fast2 and k.get_regs_per_thread()})
            print(f"round {rnd} {name}: {res[name][-1]:.1f} tok/s; fast2 registers a thread {regs}", flush=True)
    a, am = max(res[next(iter(configs))]), np.mean(res[next(iter(configs))])
    for name, v in res.items():
        print(f"{name}: {' '.join(f'{x:.1f}' for x in v)} tok/s (best {max(v):.1f}, {1e3 / max(v):.2f} ms; mean "
              f"{np.mean(v):.1f}); best / first best {max(v) / a:.3f}, mean / first mean {np.mean(v) / am:.3f}")
