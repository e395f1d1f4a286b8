"""Expert cache policy, simulated: routing traces replayed through localmoe/cache.py's ExpertCache, for
cache sizes of 10%..90% of all experts, and what each hit rate allows Mistral Small 4 (Q4_0) to decode
when the experts that miss stream over PCIe. No GPU: this decides the policy the CUDA backend's
`--gpu-mem` expert cache uses, before it is wired in.

    python bench/bench_cache.py [--routing FILE.npz] [--tokens 300] [--zipf 0.6] [--locality 0.25]
                                [--sizes 10,20,...,90] [--traces uniform,zipf,demo,demo->36]
                                [--write docs/PERFORMANCE.md]

Traces (decode only is scored; the first half of each trace only warms the cache and is the profile
the "hot" policy picks its hot set from, so no policy is scored on what it was tuned on):
  uniform   Small 4's shape (36 layers x 128 experts, top-4): k distinct experts uniformly at random.
  zipf      Small 4's shape; per layer a Zipf(--zipf) law over a random permutation of the experts
            (drawn without replacement), and with probability --locality each of a token's k choices
            repeats the previous token's choice in that slot (temporal locality).
  demo      REPLAYED routing of the bundled demo model (localmoe/data/demo.gguf: 6 layers x 32 experts,
            top-4), as written by `python -m train.eval ... --write-routing` (60 arithmetic@high
            problems, prompt + greedy reply); problems 0..29 warm up, 30..59 are scored. Each problem's
            prompt runs as a prefill (per layer, the union of the prompt's experts, in chunks that fit),
            then its reply one token at a time; the cache persists across problems, as in a server.
  demo->36  the same routing cycled onto Small 4's 36 layers (layer L replays demo layer L mod 6, its
            experts distinct keys), still 32 experts per layer.
Policies: lru, lfu (decay per token --decay), hot (a static hot set of --hot-fraction of the slots from
the warm-up half's decode counts + LRU), and opt (Belady's offline optimum for demand fetching: evicts the
expert used farthest in the future; a bound, not a policy). Prefetch (with --prefetch-policy; default:
the best demand policy at that size), per layer
after its lookup, of the next layer's experts (for the last layer: the next token's layer 0): "oracle"
prefetches the true ones (upper bound: a perfect next-layer router), "prev" the previous token's
experts of that layer (a lower bound that needs no model), and on the demo traces "router" the next
layer's router applied to this layer's input, as the demo model itself computed it (train.eval
--write-routing records these guesses; what the CUDA backend's streamed decode prefetches on).

Small 4 roofline per token (A = 36 layers x 4 routed = 144 expert uses, bpe = bytes per expert):
  demand bytes m_d = (1 - hit rate) x A x bpe, prefetch bytes m_p = prefetch loads per use x A x bpe,
  HBM bytes h = dense (incl. the head) + A x bpe (every used expert is read from VRAM once),
  PCIe-only bound  tok/s = B_pcie / (m_d + m_p)
  with HBM         tok/s = 1 / max(h / B_hbm + m_d / B_pcie, (m_d + m_p) / B_pcie)
(demand misses stall the layer; prefetch copies overlap compute but share the link).
"""
from __future__ import annotations

import argparse
import datetime
import heapq
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from localmoe.cache import ExpertCache  # noqa: E402

HEADING = "## Expert cache policy (simulated)"
DEFAULT_ROUTING = ROOT / ".scratch" / "bench" / "demo-routes.npz"
DEMO = "localmoe/data/demo.gguf"
EVAL_ARGS = [DEMO, "--sets", "arithmetic:high,word:high,vision:none", "--n", "60",
             "--jobs", "2", "--write-routing"]
L4, E4, K4 = 36, 128, 4                      # Small 4: layers, routed experts, top-k
POLICIES = ("lru", "lfu", "hot", "opt")
TIE = 0.005                                  # hit rates this close count as a tie (bold in the table)


# -- Small 4's bytes ---------------------------------------------------------------------------------------
def small4_bytes() -> dict:
    """Bytes per expert and dense bytes per decode token of Small 4 at Q4_0, from the converter's own plan
    of Small 4's shapes (convert.synthetic.SMALL4 = shared/reference/mistral-small-4.md): which tensors
    stay F32 (norms, routers) is the converter's choice, as in the files the runtime reads."""
    from convert.synthetic import small4_config, random_plans
    from localmoe.gguf.format import GGML_QUANT_SIZES

    dense = experts = head = 0
    for p in random_plans(small4_config(), "q4_0"):
        block, size = GGML_QUANT_SIZES[p.type]
        n = int(np.prod(p.shape, dtype=np.int64)) // block * size
        if p.name.endswith("_exps.weight"):
            experts += n
        elif p.name != "token_embd.weight":      # one embedding row per token: negligible
            dense += n
            head += n if p.name == "output.weight" else 0
    bpe = experts // (L4 * E4)
    assert bpe == 3 * 4096 * 2048 * 18 // 32, bpe   # gate, up, down: 3 x hidden x moe_intermediate, Q4_0
    return {"bpe": bpe, "dense": dense, "head": head, "experts": experts}


# -- traces ------------------------------------------------------------------------------------------------
class Trace:
    """Steps (layer, expert ids, scored, ends a token, prefetch targets {mode: (layer, ids) | None}) over
    `n_layers` x `n_experts`, and the warm-up part's counts [n_layers, n_experts] (the hot profile)."""

    def __init__(self, name: str, n_layers: int, n_experts: int, k: int):
        self.name, self.n_layers, self.n_experts, self.k = name, n_layers, n_experts, k
        self.steps: list[tuple] = []
        self.profile = np.zeros((n_layers, n_experts), np.int64)
        self.scored_routes: list[np.ndarray] = []      # [tokens, layers, k] of each scored sequence
        self.scored_guesses: list[np.ndarray] = []     # ... and the next-router guesses (-1: none), if recorded

    def add(self, routes: np.ndarray, n_prompt: int, scored_from: int, layer_map: list[int],
            guesses: np.ndarray | None = None) -> None:
        """One sequence: routes [tokens, source layers, k], its first n_prompt tokens a prompt (a prefill);
        decode tokens from scored_from on are scored, the others warm up (the decode ones among them are the
        hot profile). Layer L of the trace replays source layer layer_map[L]. guesses (like routes): the source
        model's next-router guess of each layer from the layer before (-1 where none); a trace layer has one only
        where it follows its source layer's predecessor."""
        r = routes[:, layer_map]                       # [tokens, n_layers, k]
        g = None
        if guesses is not None:
            g = guesses[:, layer_map].copy()
            for layer in range(self.n_layers):
                if layer == 0 or layer_map[layer] != layer_map[layer - 1] + 1:
                    g[:, layer] = -1
        L, T = self.n_layers, len(r)
        first = max(n_prompt, scored_from)
        for layer in range(L):                         # decode tokens only: the policy is for decode
            self.profile[layer] += np.bincount(r[n_prompt:first, layer].ravel(), minlength=self.n_experts)
        if first < T:
            self.scored_routes.append(r[first:])
            if g is not None:
                self.scored_guesses.append(g[first:])
        if n_prompt:
            for layer in range(L):                     # prefill: the prompt's experts, once per layer
                ids = tuple(np.unique(r[:n_prompt, layer]).tolist())
                self.steps.append((layer, ids, False, layer == L - 1, None))
        for t in range(n_prompt, T):
            for layer in range(L):
                if layer < L - 1:
                    oracle, prev = (layer + 1, r[t, layer + 1]), ((layer + 1, r[t - 1, layer + 1]) if t else None)
                else:
                    oracle, prev = ((0, r[t + 1, 0]), (0, r[t, 0])) if t + 1 < T else (None, None)
                router = (layer + 1, g[t, layer + 1]) if g is not None and layer < L - 1 and g[t, layer + 1, 0] >= 0 \
                    else None
                pf = {"oracle": oracle and (oracle[0], tuple(oracle[1].tolist())),
                      "prev": prev and (prev[0], tuple(prev[1].tolist())),
                      "router": router and (router[0], tuple(router[1].tolist()))}
                self.steps.append((layer, tuple(r[t, layer].tolist()), t >= scored_from, layer == L - 1, pf))

    def describe(self) -> str:
        """Normalised routing entropy and reuse (share of a token's k experts the previous token used at
        the same layer) of the scored decode tokens: how skewed and how local the trace is."""
        counts = np.zeros((self.n_layers, self.n_experts))
        pairs = reused = 0
        for r in self.scored_routes:
            for layer in range(self.n_layers):
                counts[layer] += np.bincount(r[:, layer].ravel(), minlength=self.n_experts)
            same = (r[1:, :, :, None] == r[:-1, :, None, :]).any(-1)   # [t-1, layers, k]
            pairs, reused = pairs + same.shape[0] * same.shape[1], reused + same.mean(-1).sum()
        p = counts / counts.sum(1, keepdims=True)
        ent = np.mean([-(q[q > 0] * np.log(q[q > 0])).sum() / math.log(self.n_experts) for q in p])
        top = (p.max(1) * self.n_experts).mean()
        tokens = sum(len(r) for r in self.scored_routes)
        text = (f"{tokens} scored decode tokens; routing entropy / log E {ent:.3f}, top expert {top:.1f}x "
                f"the mean share, reuse of the previous token's experts {reused / max(pairs, 1):.3f} "
                f"(uniform: {self.k / self.n_experts:.3f})")
        if self.scored_guesses:
            hit = n = 0
            for r, g in zip(self.scored_routes, self.scored_guesses):
                has = g[:, :, 0] >= 0                                       # [tokens, layers]
                both = (g[:, :, :, None] == r[:, :, None, :]).any(-1).mean(-1)   # share of the k guessed right
                hit, n = hit + both[has].sum(), n + has.sum()
            text += (f"; the next layer's router on this layer's input finds {hit / max(n, 1):.3f} of the next "
                     f"layer's experts (over {n} layer steps)")
        return text


def synthetic_routes(T: int, L: int, E: int, k: int, s: float, rho: float, rng) -> np.ndarray:
    """[T, L, k]: per layer a Zipf(s) law over a random permutation of the experts, k drawn without
    replacement (Gumbel top-k), each slot repeating the previous token's expert with probability rho."""
    logp = -s * np.log(np.arange(1, E + 1))
    perm = np.stack([rng.permutation(E) for _ in range(L)])        # rank -> expert, per layer
    out = np.empty((T, L, k), np.int64)
    for t0 in range(0, T, 256):                                    # bounded memory: 256 tokens at a time
        g = logp + rng.gumbel(size=(min(256, T - t0), L, E))
        top = np.argpartition(-g, 2 * k, axis=2)[:, :, :2 * k]
        order = np.take_along_axis(g, top, 2).argsort(2)[:, :, ::-1]
        cand = np.take_along_axis(top, order, 2)                   # the 2k likeliest ranks, best first
        keep = rng.random(cand.shape[:2] + (k,)) < rho
        for i in range(len(cand)):
            t = t0 + i
            for layer in range(L):
                if t == 0 or rho == 0:
                    out[t, layer] = cand[i, layer, :k]
                    continue
                kept = [x for x, m in zip(out[t - 1, layer].tolist(), keep[i, layer].tolist()) if m]
                fill = [x for x in cand[i, layer].tolist() if x not in kept][:k - len(kept)]
                out[t, layer] = kept + fill
    return np.take_along_axis(perm[None], out, 2)


def synthetic_trace(name: str, tokens: int, s: float, rho: float, seed: int) -> Trace:
    rng = np.random.default_rng(seed)
    tr = Trace(name, L4, E4, K4)
    r = synthetic_routes(2 * tokens, L4, E4, K4, s, rho, rng)
    tr.add(r, 0, tokens, list(range(L4)))          # the first half warms up (and is the hot profile)
    return tr


def demo_traces(path: Path, model: Path = ROOT / DEMO) -> tuple[Trace, Trace, dict]:
    """The routing file's problems as the native trace and the one cycled onto 36 layers; the expert
    count comes from the model that wrote it (the routing file does not record it)."""
    from localmoe.gguf.reader import GGUFFile

    f = GGUFFile(model)
    E = int(f.require(f"{f.require('general.architecture')}.expert_count"))
    f.close()
    d = np.load(path)
    routes, offsets, prompts = d["routes"].astype(np.int64), d["offsets"], d["prompt_tokens"]
    guesses = d["guesses"].astype(np.int64) if "guesses" in d else None     # (files written before: none)
    n_src, k = routes.shape[1], routes.shape[2]
    if routes.max() >= E:
        raise SystemExit(f"{path}: expert ids up to {routes.max()}, but {model} has {E} experts")
    n = len(prompts)
    native, cycled = Trace("demo", n_src, E, k), Trace("demo->36", L4, E, k)
    for i in range(n):
        r = routes[offsets[i]:offsets[i + 1]]
        scored_from = 0 if i >= n // 2 else len(r)
        g = None if guesses is None else guesses[offsets[i]:offsets[i + 1]]
        native.add(r, int(prompts[i]), scored_from, list(range(n_src)), g)
        cycled.add(r, int(prompts[i]), scored_from, [layer % n_src for layer in range(L4)], g)
    return native, cycled, {"problems": n, "tokens": len(routes), "prompt": int(prompts.sum()), "layers": n_src,
                            "experts": E, "k": k}


# -- simulation --------------------------------------------------------------------------------------------
SCORED = ("lookups", "hits", "misses", "prefetch_loads", "prefetch_hits", "prefetch_wasted", "tokens")


def simulate(tr: Trace, policy: str, cap: int, prefetch: str | None = None, decay: float = 0.99,
             hot_fraction: float = 0.75) -> dict:
    """Replays the trace; returns the scored steps' counters (cache.stats() deltas)."""
    hot_fraction = max(0.0, min(hot_fraction, (cap - 2 * tr.k) / cap))   # leave LRU a layer + a prefetch
    c = ExpertCache(cap, tr.n_layers, tr.n_experts, policy, decay=decay, hot_counts=tr.profile,
                    hot_fraction=hot_fraction)
    chunk = max(tr.k, (cap - len(c.hot_keys)) // 2)
    acc = dict.fromkeys(SCORED, 0)
    snap, scoring = None, False
    for layer, ids, scored, end, pf in tr.steps:
        if scored != scoring:
            now = c.stats()
            if scoring:
                for key in SCORED:
                    acc[key] += now[key] - snap[key]
            snap, scoring = now, scored
        for i in range(0, len(ids), chunk):                        # a prefill union may exceed the pool
            c.lookup(layer, ids[i:i + chunk])
        if prefetch and pf and pf[prefetch]:
            c.prefetch(*pf[prefetch])
        if end:
            c.end_token()
    if scoring:
        now = c.stats()
        for key in SCORED:
            acc[key] += now[key] - snap[key]
    return acc


def simulate_opt(tr: Trace, cap: int) -> dict:
    """Belady's MIN for demand fetching with a step's experts resident together: on a miss, evict the
    resident expert (not of this step) whose next use is farthest away. Same prefill chunking."""
    chunk = max(tr.k, cap // 2)
    steps = []
    for layer, ids, scored, _, _ in tr.steps:
        base = layer * tr.n_experts
        for i in range(0, len(ids), chunk):
            steps.append(([base + e for e in ids[i:i + chunk]], scored))
    nxt: list[list[int]] = [None] * len(steps)
    last: dict[int, int] = {}
    for j in range(len(steps) - 1, -1, -1):                        # next use of each key after step j
        keys = steps[j][0]
        nxt[j] = [last.get(key, math.inf) for key in keys]
        for key in keys:
            last[key] = j
    resident: dict[int, float] = {}                                # key -> its next use
    heap: list = []
    hits = misses = 0
    for j, (keys, scored) in enumerate(steps):
        group = set(keys)
        for key, nu in zip(keys, nxt[j]):
            if key in resident:
                hits += scored
            else:
                misses += scored
                if len(resident) >= cap:
                    aside = []
                    while True:
                        neg, victim = heapq.heappop(heap)
                        if resident.get(victim) != -neg:
                            continue                               # stale entry
                        if victim in group:
                            aside.append((neg, victim))
                            continue
                        del resident[victim]
                        break
                    for a in aside:
                        heapq.heappush(heap, a)
            resident[key] = nu
            heapq.heappush(heap, (-nu, key))
    tokens = sum(1 for _, _, scored, end, _ in tr.steps if scored and end)
    return {"lookups": hits + misses, "hits": hits, "misses": misses, "prefetch_loads": 0, "prefetch_hits": 0,
            "prefetch_wasted": 0, "tokens": tokens}


# -- roofline ----------------------------------------------------------------------------------------------
def roofline(r: dict, sizes: dict, pcie: float, hbm: float) -> tuple[float, float]:
    """(PCIe-only tok/s, tok/s with HBM time) for Small 4 at this trace's hit rate and prefetch rate."""
    A, bpe = L4 * K4, sizes["bpe"]
    md = (1 - r["hits"] / r["lookups"]) * A * bpe
    mp = r["prefetch_loads"] / r["lookups"] * A * bpe
    h = sizes["dense"] + A * bpe
    only = pcie / (md + mp) if md + mp else math.inf
    return only, 1 / max(h / hbm + md / pcie, (md + mp) / pcie)


def fmt_tps(x: float) -> str:
    return "∞" if x == math.inf else f"{x:.0f}" if x >= 10 else f"{x:.1f}"


# -- the run -----------------------------------------------------------------------------------------------
def ensure_routing(path: Path) -> None:
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "train.eval", *EVAL_ARGS, str(path)]
    print(f"{path} is missing: generating it (about a minute on 2 cores):\n  {' '.join(cmd)}", file=sys.stderr)
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=sys.stderr)


def machine() -> str:
    from bench_cpu import machine as m
    return m()


def run_trace(tr: Trace, fracs: list[float], args, sizes: dict, log, summary: list) -> list[str]:
    n_all = tr.n_layers * tr.n_experts
    pf = args.prefetch_policy
    lines = [f"| cache: share of experts (slots = tokens' worth) | Small 4 expert VRAM | LRU | LFU | hot | OPT | best "
             f"demand policy: tok/s PCIe-only / with HBM | + prev-token prefetch ({pf}): hit, loads/use, tok/s | "
             f"+ next-router prefetch ({pf}): hit, loads/use, tok/s | + oracle prefetch ({pf}): hit, loads/use, tok/s |",
             "|---|---:|---:|---:|---:|---:|---|---|---|---|"]
    for f in fracs:
        cap = max(2 * tr.k, round(f * n_all))
        t0 = time.perf_counter()
        res = {p: (simulate_opt(tr, cap) if p == "opt" else
                   simulate(tr, p, cap, None, args.decay, args.hot_fraction)) for p in POLICIES}
        hit = {p: res[p]["hits"] / res[p]["lookups"] for p in POLICIES}
        best = max(("lru", "lfu", "hot"), key=hit.get)
        near = [p for p in ("lru", "lfu", "hot") if hit[best] - hit[p] < TIE]
        only, full = roofline(res[best], sizes, args.pcie, args.hbm)
        cells, with_pf = [], {}
        for mode in ("prev", "router", "oracle"):
            if mode == "router" and not tr.scored_guesses:
                cells.append("—")
                continue
            r = simulate(tr, best if pf == "best" else pf, cap, mode, args.decay, args.hot_fraction)
            o, w = roofline(r, sizes, args.pcie, args.hbm)
            with_pf[mode] = w
            cells.append(f"{r['hits'] / r['lookups']:.1%}, {r['prefetch_loads'] / r['lookups']:.2f}, "
                         f"{fmt_tps(o)} / {fmt_tps(w)}")
        vram = f * L4 * E4 * sizes["bpe"] / 1e9
        mark = {p: f"**{hit[p]:.1%}**" if p in near else f"{hit[p]:.1%}" for p in POLICIES}
        lines.append(f"| {f:.0%} ({cap} = {cap / (tr.n_layers * tr.k):.1f}) | {vram:.1f} GB | {mark['lru']} | "
                     f"{mark['lfu']} | {mark['hot']} | {mark['opt']} | {best}: {fmt_tps(only)} / {fmt_tps(full)} | "
                     f"{cells[0]} | {cells[1]} | {cells[2]} |")
        summary.append({"trace": tr.name, "f": f, "best": best, "near": near, "hit": hit, "tps": full, **with_pf})
        log(f"  {tr.name} {f:.0%}: " + " ".join(f"{p} {hit[p]:.3f}" for p in POLICIES)
            + f" ({time.perf_counter() - t0:.1f} s)")
    return lines


def summarise(name: str, rows: list[dict], sizes: dict) -> str:
    """One generated line per trace: who wins where, by how much, and what prefetch adds."""
    pct = lambda r: f"{100 * r['f']:.0f}%"
    wins = ", ".join(f"{pct(r)} {'='.join(r['near'])}" for r in rows)
    h = lambda r, p: 100 * r["hit"][p]
    gain = ", ".join(f"{pct(r)} {h(r, r['best']) - h(r, 'lru'):+.1f}/{h(r, 'opt') - h(r, r['best']):.1f}" for r in rows)
    fast = next((f"{pct(r)} of the experts ({r['f'] * sizes['experts'] / 1e9:.0f} GB)"
                 for r in rows if r["tps"] >= 100), "none of the sizes tried")
    ora = [pct(r) for r in rows if r["oracle"] > 1.1 * r["tps"]]
    prev = [pct(r) for r in rows if r["prev"] > 1.02 * r["tps"]]
    router = ([pct(r) for r in rows if r["router"] > 1.02 * r["tps"]] if all("router" in r for r in rows)
              else None)
    return (f"- {name}: best demand policy (= ties within {100 * TIE:.1f} points) {wins}. Points of hit rate over "
            f"LRU / left to OPT: {gain}. First size whose best demand policy reaches 100 tok/s with HBM: {fast}. "
            f"Oracle prefetch adds >10% to that bound at: {', '.join(ora) or 'no size'}; prev-token prefetch "
            f"adds >2% at: {', '.join(prev) or 'no size'}"
            + ("." if router is None else f"; next-router prefetch adds >2% at: {', '.join(router) or 'no size'}."))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--routing", type=Path, default=DEFAULT_ROUTING, help="train.eval --write-routing file")
    ap.add_argument("--tokens", type=int, default=300, help="synthetic traces: scored tokens (as many warm up)")
    ap.add_argument("--zipf", type=float, default=0.6,
                    help="Zipf exponent (0.6: normalised routing entropy ~0.93; the demo's layers: 0.92-0.97 over "
                    "prompts and replies of three sets, 0.83 over arithmetic replies)")
    ap.add_argument("--locality", type=float, default=0.25, help="probability a slot repeats the previous token")
    ap.add_argument("--sizes", default="10,20,30,40,50,60,70,80,90", help="cache sizes, %% of all experts")
    ap.add_argument("--traces", default="uniform,zipf,demo,demo->36")
    ap.add_argument("--decay", type=float, default=0.99, help="lfu: count decay per token")
    ap.add_argument("--hot-fraction", type=float, default=0.75, help="hot: share of slots for the hot set")
    ap.add_argument("--prefetch-policy", default="best", choices=("best", "lru", "lfu", "hot"),
                    help="policy of the prefetch runs (best: each size's best demand policy)")
    ap.add_argument("--pcie", type=float, default=50e9, help="host->device bytes/s (pinned, PCIe 5 x16)")
    ap.add_argument("--hbm", type=float, default=2970e9, help="HBM bytes/s (H100 device copy)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write", type=Path, help="replace/append the section in this Markdown file")
    args = ap.parse_args()
    fracs = [int(x) / 100 for x in args.sizes.split(",")]
    names = args.traces.split(",")
    log = lambda s: print(s, file=sys.stderr, flush=True)
    t_start = time.perf_counter()

    sizes = small4_bytes()
    A = L4 * K4
    every_miss = 1 / ((sizes["dense"] + A * sizes["bpe"]) / args.hbm + A * sizes["bpe"] / args.pcie)
    resident = args.hbm / (sizes["dense"] + A * sizes["bpe"])
    traces, summary = [], []
    if "uniform" in names:
        traces.append(synthetic_trace("uniform", args.tokens, 0.0, 0.0, args.seed))
    if "zipf" in names:
        traces.append(synthetic_trace("zipf", args.tokens, args.zipf, args.locality, args.seed + 1))
    demo_info = None
    if "demo" in names or "demo->36" in names:
        ensure_routing(args.routing)
        native, cycled, demo_info = demo_traces(args.routing)
        traces += [t for t in (native, cycled) if t.name in names]

    date = datetime.date.today().isoformat()
    cmd = "python bench/bench_cache.py " + " ".join(a if " " not in a else repr(a) for a in sys.argv[1:])
    out = [f"{HEADING} ({date})", "",
           f"Machine: {machine()} (a CPU simulation: no GPU involved). Command: `{cmd.strip()}`.",
           "localmoe/cache.py's `ExpertCache` replays routing traces (bench/bench_cache.py's docstring has "
           "the details); decode tokens only are scored, after a warm-up half that is also the \"hot\" "
           "policy's profile. Hit rate = demand lookups found resident.",
           "",
           f"Small 4 at Q4_0 (converter's plan of the reference shapes): an expert is 3 x 4096 x 2048 weights x "
           f"18/32 B = {sizes['bpe'] / 1e6:.2f} MB, {L4} x {E4} of them = {sizes['experts'] / 1e9:.1f} GB; dense "
           f"weights read per token {sizes['dense'] / 1e9:.3f} GB (incl. the {sizes['head'] / 1e9:.3f} GB head); "
           f"a token uses A = {A} experts = {A * sizes['bpe'] / 1e9:.3f} GB. B_pcie = {args.pcie / 1e9:.0f} GB/s "
           f"(pinned), B_hbm = {args.hbm / 1e9:.0f} GB/s (shared/reference/hardware-and-limits.md).",
           "",
           "Roofline per decode token: m_d = (1 - hit) x A x bpe demand bytes, m_p = loads/use x A x bpe "
           "prefetch bytes, h = dense + A x bpe HBM bytes; **PCIe-only tok/s = B_pcie / (m_d + m_p)**; "
           "**with HBM tok/s = 1 / max(h / B_hbm + m_d / B_pcie, (m_d + m_p) / B_pcie)** (a demand miss stalls "
           "its layer, a prefetch copy overlaps compute but shares the link). For reference: every expert a "
           f"miss {every_miss:.1f} tok/s; everything resident {resident:.0f} tok/s.",
           ""]
    for tr in traces:
        log(f"{tr.name}: {tr.n_layers} layers x {tr.n_experts} experts, {len(tr.steps)} steps")
        if tr.name == "uniform":
            what = f"**uniform** (synthetic, Small 4's 36 x 128, top-4): measured on the simulated trace."
        elif tr.name == "zipf":
            what = (f"**zipf** (synthetic, Small 4's 36 x 128, top-4; exponent {args.zipf}, per-layer random "
                    f"permutation, locality {args.locality}): measured on the simulated trace.")
        elif tr.name == "demo":
            i = demo_info
            what = (f"**demo, replayed** ({i['problems']} arithmetic@high problems, {i['tokens']} tokens of which "
                    f"{i['prompt']} prompt; the demo model's own {i['layers']} layers x {i['experts']} experts, "
                    f"top-{i['k']}, NOT Small 4's 36 x 128). Hit rates: measured, with the cache as a share of the "
                    f"demo's {tr.n_layers * tr.n_experts} experts. VRAM and tok/s: extrapolated, assuming Small 4 "
                    f"has the same hit rate at the same share of its experts.")
        else:
            what = (f"**demo->36** (the same replay cycled onto 36 layers: layer L = demo layer L mod "
                    f"{demo_info['layers']}, still {tr.n_experts} experts per layer, cache share of "
                    f"{tr.n_layers * tr.n_experts}). Hit rates measured on that construction (6 copies of each "
                    f"layer's stream); Small 4's 128-expert layers (a token uses 3% of a layer, here 12.5%) "
                    f"remain an extrapolation.")
        out += [what + " " + tr.describe() + ".", ""]
        out += run_trace(tr, fracs, args, sizes, log, summary)
        out.append("")
    out.append("Summary (generated):")
    for tr in traces:
        out.append(summarise(tr.name, [r for r in summary if r["trace"] == tr.name], sizes))
    out.append("")
    out.append(f"(Run time {time.perf_counter() - t_start:.0f} s. Cache column: slots, and how many tokens' expert "
               f"uses (layers x k) they hold. Bold: the best demand policy and any within {100 * TIE:.1f} points. "
               f"Prefetch columns: hit rate of demand lookups, expert loads issued by prefetch per expert use, and "
               f"the two tok/s bounds.)")
    text = "\n".join(out) + "\n"
    print(text)
    if args.write:
        from bench_cpu import write_section
        write_section(args.write, HEADING, text)


if __name__ == "__main__":
    main()
