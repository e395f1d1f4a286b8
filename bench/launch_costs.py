"""What each kernel of a decode step costs inside the CUDA graph: its marginal time, measured by leaving it out.

    python3 bench/launch_costs.py /mnt/lm/small4-q4_0.gguf [rounds] [kind,kind,...]   # (default: every kind)

Nsight Compute times kernels one at a time with cold caches, and PDL overlaps a launch with the one before it,
so neither a kernel's duration nor its launch count says what it adds to the graph. This script captures the
decode step again with one kind of launch replaced by nothing (its outputs are left stale: the tokens are
garbage, the timing is not) and reports the step's time without it, against the full step measured in
alternation. A kind is a gemv shape (rows x cols, f: fused gate/up, r: residual add, P products) or one of
the other kernels. Stale outputs can be NaN, which would route to no expert, so every step but the real one
routes to fixed valid experts (0..k-1, no route kernel): the first row is the route kernel's cost (real routing
against fixed), the others are measured against the fixed-route step. The last rows leave out groups of kinds:
the most any fusion of them could save.
(the file: bench_cuda.py --full-scale writes it.)"""
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ab_trees import decode_round, load  # noqa: E402

from localmoe.backends.cuda import kernels as K  # noqa: E402


class _Nothing:
    """Stands in for a kernel: any launch configuration, no work."""
    def __getitem__(self, cfg):
        return lambda *a: None


def gemv_kind(rows, cols, P, fused, residual) -> str:
    return f"gemv {rows}x{cols}{' f' if fused else ''}{' r' if residual is not None else ''} P={P}"


def main(path: str, rounds: int, only: list[str]) -> None:
    m = load(path)
    be = m.backend
    seen, skip = Counter(), set()
    launch_gemv = K.launch_gemv

    def gemv(qt, cols, rows, W, W2, mats, xidx, x, y, P, *a, **kw):
        kind = gemv_kind(rows, cols, P, kw.get("fused", False), kw.get("residual"))
        seen[kind] += 1
        if kind not in skip:
            launch_gemv(qt, cols, rows, W, W2, mats, xidx, x, y, P, *a, **kw)

    others = ("mla_rope", "combine", "route", "attention")
    real = {n: getattr(K, n) for n in ("mla_rope_kernel", "combine_kernel", "attention_kernel")}
    route, fixed = be.route, {}

    def fixed_route(logits, k, *a, out=None, **kw):
        n, E = logits.shape
        if (n, k) not in fixed:
            ids = np.tile(np.arange(k, dtype=np.int32), (n, 1))
            fixed[n, k] = (be.xp.asarray(ids), be.xp.full((n, k), 1.0 / k, np.float32),
                           be.xp.asarray(np.concatenate([ids, np.full((n, 1), E, np.int32)], 1)),
                           be.xp.full((n, k + 1), 1.0 / k, np.float32))
        be._slot_rows = fixed[n, k]
        return fixed[n, k][:2]

    def configure(kinds: set) -> None:
        skip.clear()
        skip.update(kinds)
        K.mla_rope_kernel = (lambda proj=None: _Nothing()) if "mla_rope" in kinds else real["mla_rope_kernel"]
        K.combine_kernel = (lambda k: _Nothing()) if "combine" in kinds else real["combine_kernel"]
        K.attention_kernel = (lambda *a: _Nothing()) if "attention" in kinds else real["attention_kernel"]
        be.route = fixed_route if "route" in kinds else route
        seen.clear()

    K.launch_gemv = gemv
    rng = np.random.default_rng(0)
    configure(set())
    cache = m.new_cache()                              # one eager decode step: the launches of each kind
    m.prefill(np.array([1, 1000, 1001]), cache)
    be.use_graphs = False
    seen.clear()
    m.net.forward(np.array([1002]), cache, last_only=True)
    be.use_graphs = True
    per_step = dict(seen)
    kinds = ["route"] + sorted(per_step, key=lambda k: -per_step[k]) + [k for k in others if k != "route"]
    kinds = [k for k in kinds if not only or any(o in k for o in only)]
    layers = m.config.num_hidden_layers
    E, V = m.config.n_experts, m.config.vocab_size
    chain = {"mla_rope", "attention"} | {k for k in per_step if k.endswith((" P=1", f" P={m.config.num_attention_heads}"))
                                         and not k.startswith((f"gemv {E}x", f"gemv {V}x"))}
    small = {"mla_rope", "attention", "route", "combine"} | {k for k in per_step if "256x64" in k or "128x256" in k}
    groups = {"the small kernels (mla_rope with k_b inside, attention, v_b, route, combine)": small,
              "the attention chain (q_a+kv_a .. attn_output)": chain}
    print(f"kinds per decode step (layers {layers}): " + "; ".join(f"{k}: {per_step.get(k, layers):.0f}" for k in kinds),
          flush=True)
    rows = []
    for what in [{k} for k in kinds] + ([] if only else list(groups.values())):
        base, without = [], []
        for _ in range(rounds):
            configure(set() if what == {"route"} else {"route"})
            base.append(decode_round(m, rng))
            configure(what | {"route"})
            without.append(decode_round(m, rng))
        b, w = 1e3 / max(base), 1e3 / max(without)       # ms per token, best of the rounds
        name = next((g for g, s in groups.items() if s == what), next(iter(what)))
        count = per_step.get(name, layers) if len(what) == 1 else None
        rows.append((name, b, w, count))
        per = f", {(b - w) * 1e3 / count:.2f} us per launch" if count else ""
        print(f"  without {name}: {w:.3f} ms/token vs {b:.3f} full: {(b - w) * 1e3:.0f} us per token{per}", flush=True)
    configure(set())
    K.launch_gemv = launch_gemv
    print(f"\n| left out | per step | full step ms | without ms | saved us/token | us per launch |\n|---|---:|---:|---:|---:|---:|")
    for name, b, w, count in rows:
        print(f"| {name} | {'' if count is None else f'{count:.0f}'} | {b:.3f} | {w:.3f} | {(b - w) * 1e3:.0f} | "
              f"{'' if count is None else f'{(b - w) * 1e3 / count:.2f}'} |")


if __name__ == "__main__":
    t0 = time.perf_counter()
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3, sys.argv[3].split(",") if len(sys.argv) > 3 else [])
    print(f"({time.perf_counter() - t0:.0f} s)")
