"""How well the streamed decode's guesses find the next layers' experts, on the trained demo model (CPU).

The device mode prefetches, for each MoE layer, the experts the next MoE layer's router picks (and the one
after it's), from a state of this layer. Only the guesses that are not resident become targets, and the
prefetch copies them in order, so what counts is how often a target is asked for. This script runs held-out
arithmetic and word problems on the demo (greedy, effort high) with an LFU ExpertCache of `--slots` slots
beside it (demand lookups of the decode tokens: at the default 32 of 192 it hits ~62%, the full-scale bench's
Zipf hit rate), and scores four states for the guess, each through the next layers' routers:

  input       the layer's input (what the host mode guesses from)
  + shared    the input plus the shared expert's output
  + hits      the input plus the shared expert and the experts resident at the lookup (the device mode: they
              run while the misses copy)
  output      the layer's whole output (all its experts: a bound, not available before the misses are in)

For each: the share of the k guessed ids that the layer asks for (recall), the same over the targets (the
guessed ids not resident at the guess), and over the first target alone. bench/bench_cuda.py's `--guess`
replays guesses at a given recall; its targets are asked for at about that rate.

    PYTHONPATH=. python bench/bench_guess.py [--problems 30] [--slots 32]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from localmoe.backends import Normed, swiglu  # noqa: E402
from localmoe.cache import ExpertCache  # noqa: E402
from localmoe.model import load  # noqa: E402
from train.data import heldout  # noqa: E402
from train.eval import solve  # noqa: E402

STATES = ("input", "+ shared", "+ hits", "output")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "localmoe/data/demo.gguf"))
    ap.add_argument("--problems", type=int, default=30, help="held-out problems of each kind (arithmetic, word)")
    ap.add_argument("--slots", type=int, default=32, help="the LFU cache's slots (the demo has layers x experts)")
    args = ap.parse_args()

    m = load(args.model)
    net, be, k = m.net, m.backend, m.config.num_experts_per_tok
    moe = [i for i, layer in enumerate(net.layers) if layer.experts is not None]
    after = {i: moe[j + 1:j + 3] for j, i in enumerate(moe)}          # the next MoE layer, the one after it
    cache = ExpertCache(args.slots, max(moe) + 1, m.config.n_experts, policy="lfu")
    pending: dict[int, list] = {}          # layer -> [(distance, state, ids, resident then)]
    score: dict[tuple, np.ndarray] = {}    # (distance, state) -> [asked, guessed, asked targets, targets, first, firsts]
    hits = [0, 0]
    routed = net.routed

    def guess(router, x) -> list[int]:
        return be.to_host(be.route(be.linear(router, x), k)[0]).reshape(-1).tolist()

    def scoring(i, experts, h, routes, **kw):
        y = routed(i, experts, h, routes, **kw)
        if len(h.x) != 1:                                               # decode tokens only
            return y
        asked = set(np.asarray(routes[i]).reshape(-1).tolist())
        for d, state, ids, away in pending.pop(i, []):
            targets = [e for e, a in zip(ids, away) if a]
            s = score.setdefault((d, state), np.zeros(6))
            s += [len(asked & set(ids)), len(ids), len(asked & set(targets)), len(targets),
                  bool(targets) and targets[0] in asked, bool(targets)]
        ids, w = be.route(be.linear(experts.router, h), k, kw.get("norm", True), kw.get("scale", 1.0))
        ids, w = be.to_host(ids), be.to_host(w)
        _, miss = cache.lookup(i, ids[0])
        hits[0] += int((~miss).sum())
        hits[1] += len(miss)
        x = h.x
        sh = be.to_host(swiglu(be, kw["shared"], h)) if kw.get("shared") is not None else 0
        each = [be.to_host(be.expert_ffn(experts.gate, experts.up, experts.down, h, ids[:, j:j + 1], w[:, j:j + 1]))
                for j in range(k)]
        states = {"input": x, "+ shared": x + sh, "+ hits": x + sh + sum(e for e, m_ in zip(each, miss) if not m_),
                  "output": be.to_host(y)}
        for d, j in enumerate(after[i], 1):
            router = net.layers[j].experts.router
            for state, v in states.items():
                ids_g = guess(router, h if state == "input" else Normed(v, h.weight, h.eps))
                pending.setdefault(j, []).append((d, state, ids_g, [cache.slot(j, e) < 0 for e in ids_g]))
        return y

    net.routed = scoring
    for kind in ("arithmetic", "word"):
        for sample in heldout(kind, args.problems):
            pending.clear()
            solve(m, sample, 128)
    print(f"demo {Path(args.model).name}: {len(moe)} MoE layers x {m.config.n_experts} experts, top-{k}; "
          f"{args.problems} arithmetic + {args.problems} word problems; LFU cache of {args.slots} slots, "
          f"demand hit rate {hits[0] / hits[1]:.1%}")
    print("| guess from | layers ahead | recall (all guesses) | targets asked for | first target asked for |")
    print("|---|---:|---:|---:|---:|")
    for d in (1, 2):
        for state in STATES:
            s = score.get((d, state))
            if s is not None:
                print(f"| {state} | {d} | {s[0] / s[1]:.3f} | {s[2] / max(s[3], 1):.3f} ({s[3]:.0f}) | "
                      f"{s[4] / max(s[5], 1):.3f} |")


if __name__ == "__main__":
    main()
