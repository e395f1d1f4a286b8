"""Held-out accuracy of the demo model through localmoe's own runtime (not torch), with the routing
statistics an expert cache cares about.

    python -m train.eval localmoe/data/demo.gguf                         # default sets, 500 problems each
    python -m train.eval MODEL.gguf --n 50 --jobs 8 --sets arithmetic:high,vision:none --json out.json
    python -m train.eval MODEL.gguf --all --write-routing routes.npz      # + vision@high; routing to replay

Every problem is prompted as `localmoe run` prompts (m.chat_tokens; images through m.image_embeds) and
decoded greedily; the reply is split at [THINK]/[/THINK] and only the answer is scored. Routing comes
from the runtime's counters (m.stats.routing), per problem, over prompt and generated tokens. In the
table, "tokens" counts generated tokens (EOS included), "s/prob" is one worker's seconds per problem and
"wall s" the set's elapsed time with all workers.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import re
import sys
import time

import numba
import numpy as np

from localmoe.chat import message_images
from localmoe.errors import InputError, LocalMoeError
from localmoe.model import load

from .data import HELDOUT, HELDOUT_POOL, Sample, heldout

DEFAULT_SETS = ("arithmetic:high", "arithmetic:none", "multistep:high", "multistep:none", "word:high", "vision:none")
MAX_TOKENS = 128                 # twice the longest reference reply (word@high: 68 tokens)
THREAD_VARS = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
_INT = re.compile(r"(?<![0-9])-?[0-9]+")


# -- scoring -------------------------------------------------------------------------------------------
def answer_number(text: str) -> int | None:
    """The last integer of the text; a '-' right after a digit is an operator ("5-3" ends in 3), not a sign."""
    found = _INT.findall(text)
    return int(found[-1]) if found else None


def score(sample: Sample, thinking: str | None, answer: str) -> bool:
    """Only the answer counts (the thinking may be right while the answer is not). Sums: its last integer
    is the result. Pictures: it ends with the label as a whole phrase after the template's last word
    ("It is at the top left" is right for "top left", wrong for "left")."""
    if sample.kind != "vision":
        return answer_number(answer) == int(sample.expected)
    text = " ".join(answer.lower().split()).rstrip(".").rstrip()
    label = re.escape(sample.expected.lower())
    return re.search(rf"(?:^|\b(?:is|are|a|an|the) ){label}$", text) is not None


def split_reply(tokenizer, ids: list[int]) -> tuple[str | None, str]:
    """(thinking, or None when no [THINK] was generated; answer), split as chat.ThinkingSplitter splits
    text: an unterminated [THINK] leaves the rest as thinking."""
    think, end = tokenizer.special_id("[THINK]"), tokenizer.special_id("[/THINK]")
    parts, kind = {"thinking": [], "answer": []}, "answer"
    for t in ids:
        if t in (think, end):
            kind = "thinking" if t == think else "answer"
        elif t != tokenizer.eos_id:
            parts[kind].append(t)
    return (tokenizer.decode(parts["thinking"]) if think in ids else None), tokenizer.decode(parts["answer"])


# -- routing -------------------------------------------------------------------------------------------
def routes_of(stats) -> dict[int, np.ndarray]:
    """One sequence's routing per MoE layer, ids [tokens, k] in position order (calls are recorded in order)."""
    layers = sorted({layer for _, layer, _ in stats.routing})
    return {layer: np.concatenate([ids for _, at, ids in stats.routing if at == layer]) for layer in layers}


@contextlib.contextmanager
def next_router_guesses(model):
    """While active, each MoE layer's input also goes through the next MoE layer's router (its top-k: the
    guess the streamed GPU backend prefetches on, CUDABackend._fetcher); yields the list that gathers
    (layer guessed, ids [n, k]) per call, in order. Reads the guesses back at once: a host backend only."""
    net, be, k = model.net, model.backend, model.config.num_experts_per_tok
    moe = [i for i, layer in enumerate(net.layers) if layer.experts is not None]
    nxt, out, routed = dict(zip(moe, moe[1:])), [], net.routed

    def guessing(i, experts, h, routes, **kw):
        if i in nxt:
            ids, _ = be.route(be.linear(net.layers[nxt[i]].experts.router, h), k)
            out.append((nxt[i], be.to_host(ids)))
        return routed(i, experts, h, routes, **kw)
    net.routed = guessing
    try:
        yield out
    finally:
        del net.routed                               # the class's method again


def layer_reuse(ids: np.ndarray) -> np.ndarray:
    """For one layer's [tokens, k] routing of one sequence: (consecutive pairs, pairs where the later token
    selects an expert the earlier one did, sum over pairs of the fraction of its k experts so reused)."""
    shared = (ids[1:, :, None] == ids[:-1, None, :]).any(-1).sum(-1)
    return np.array([len(shared), (shared > 0).sum(), shared.sum() / ids.shape[1]], np.float64)


def add_routes(counts: np.ndarray, reuse: np.ndarray, routes: dict[int, np.ndarray]) -> None:
    """Accumulate one sequence into counts [layers, experts] and reuse [layers, 3] (sums, so they merge by +)."""
    for layer, ids in routes.items():
        counts[layer] += np.bincount(ids.ravel(), minlength=counts.shape[1])
        reuse[layer] += layer_reuse(ids)


def routing_summary(counts: np.ndarray, reuse: np.ndarray, k: int) -> dict:
    """Per MoE layer (rows with no selections are dense layers, left out): usage entropy / log(E), min and
    max share, experts never used, reuse; `random` is what uniform routing of k of E would give."""
    E = counts.shape[1]
    layers = []
    for layer in np.flatnonzero(counts.sum(1)):
        p = counts[layer] / counts[layer].sum()
        nz = p[p > 0]
        pairs, hits, shared = reuse[layer]
        layers.append({"layer": int(layer), "entropy": float(-(nz * np.log(nz)).sum() / math.log(E)),
                       "min_share": float(p.min()), "max_share": float(p.max()), "unused": int((p == 0).sum()),
                       "reuse_any": hits / pairs if pairs else math.nan,
                       "reuse_mean": shared / pairs if pairs else math.nan})
    return {"layers": layers, "every_expert_used": all(d["unused"] == 0 for d in layers),
            "random": {"reuse_any": 1 - math.comb(E - k, k) / math.comb(E, k), "reuse_mean": k / E}}


# -- running problems ----------------------------------------------------------------------------------
def solve(m, sample: Sample, max_tokens: int) -> tuple[int, list[int]]:
    """(prompt length, greedy reply ids) for one sample, in a fresh cache."""
    ids = m.chat_tokens(sample.messages, sample.effort)
    embeds = m.image_embeds(ids, message_images(sample.messages))
    return len(ids), list(m.generate_from(m.new_cache(), ids, max_tokens=max_tokens, embeds=embeds))


def evaluate(model, samples: list[Sample], max_tokens: int = MAX_TOKENS, on_routes=None) -> list[dict]:
    """One record per sample, in order; `on_routes(i, routes, guesses)` receives problem i's routing (routes_of)
    and the next-router guesses of every MoE layer but the first (the same layout). The model's stats are reset
    around every problem, so Stats.routing never grows past one sequence."""
    tok = model.tokenizer
    think, end = tok.special_id("[THINK]"), tok.special_id("[/THINK]")
    out = []
    model.stats.keep_routing = True
    with next_router_guesses(model) if on_routes is not None else contextlib.nullcontext([]) as guesses:
        for i, s in enumerate(samples):
            guesses.clear()
            out.append(_solve_one(model, s, max_tokens, think, end))
            if on_routes is not None:
                on_routes(i, routes_of(model.stats), {layer: np.concatenate([ids for at, ids in guesses if at == layer])
                                                      for layer in sorted({at for at, _ in guesses})})
    model.stats.reset()
    return out


def _solve_one(model, s: Sample, max_tokens: int, think: int, end: int) -> dict:
    """One sample solved in a fresh cache (the model's stats reset first) and scored: its record."""
    model.stats.reset()
    t0 = time.perf_counter()
    n_prompt, gen = solve(model, s, max_tokens)
    seconds = time.perf_counter() - t0
    thinking, answer = split_reply(model.tokenizer, gen)
    return {"expected": s.expected, "correct": score(s, thinking, answer),
            "think": think in gen and end in gen[gen.index(think):], "prompt_tokens": n_prompt,
            "tokens": len(gen), "seconds": seconds, "thinking": thinking, "answer": answer}


_model = None


def _init(path: str) -> None:
    """Worker start: load the model once (memory-mapped, so workers share the file's pages)."""
    global _model
    _model = load(path)


def _work(task: tuple[list[Sample], int, int]):
    """A chunk: its records, routing counts and reuse sums, and the routing [tokens, layers, k] of its
    first `keep` problems."""
    samples, max_tokens, keep = task
    counts = np.zeros((_model.stats.n_layers, _model.stats.n_experts), np.int64)
    reuse = np.zeros((_model.stats.n_layers, 3))
    kept = []

    def take(i, routes, guesses):
        add_routes(counts, reuse, routes)
        if i < keep:
            none = np.full_like(routes[min(routes)], -1)          # the first MoE layer has no guess
            kept.append(tuple(np.stack([a[layer] for layer in sorted(routes)], 1).astype(np.int16)
                              for a in (routes, {layer: guesses.get(layer, none) for layer in routes})))
    return evaluate(_model, samples, max_tokens, take), counts, reuse, kept


def run_set(imap, jobs: int, samples: list[Sample], max_tokens: int, keep: int):
    """Chunks across workers (about four per worker, for balance); imap keeps them in order."""
    size = max(1, math.ceil(len(samples) / (4 * jobs)))
    starts = range(0, len(samples), size)
    tasks = [(samples[s:s + size], max_tokens, max(0, min(size, keep - s))) for s in starts]
    records, counts, reuse, kept = [], 0, 0, []
    for r, c, u, k in imap(_work, tasks):
        records += r
        counts, reuse, kept = counts + c, reuse + u, kept + k
    return records, counts, reuse, kept


# -- command line --------------------------------------------------------------------------------------
def parse_sets(text: str) -> list[tuple[str, str]]:
    sets = [tuple(s.strip().split(":")) for s in text.split(",") if s.strip()]
    for s in sets:
        if len(s) != 2 or s[0] not in HELDOUT or s[1] not in ("none", "high"):
            raise InputError(f"bad set {':'.join(s)!r}: expected KIND:EFFORT, KIND one of "
                             f"{', '.join(HELDOUT)}, EFFORT none or high")
    return sets


def summarise(kind: str, effort: str, records: list[dict], wall: float) -> dict:
    n = len(records)
    return {"set": kind, "effort": effort, "n": n, "accuracy": 100 * sum(r["correct"] for r in records) / n,
            "think_rate": sum(r["think"] for r in records) / n if effort == "high" else None,
            "mean_tokens": sum(r["tokens"] for r in records) / n,
            "s_per_problem": sum(r["seconds"] for r in records) / n, "wall_s": wall}


def report(sets: list[dict], routing: dict) -> None:
    print(f"{'set':<11}{'effort':<7}{'n':>5}{'acc %':>8}{'think':>7}{'tokens':>8}{'s/prob':>8}{'wall s':>8}")
    for s in sets:
        think = f"{s['think_rate']:.2f}" if s["think_rate"] is not None else "-"
        print(f"{s['set']:<11}{s['effort']:<7}{s['n']:>5}{s['accuracy']:>8.1f}{think:>7}{s['mean_tokens']:>8.1f}"
              f"{s['s_per_problem']:>8.3f}{s['wall_s']:>8.1f}")
    acc = {(s["set"], s["effort"]): s["accuracy"] for s in sets}
    if ("multistep", "high") in acc and ("multistep", "none") in acc:
        print(f"multistep high - none: {acc['multistep', 'high'] - acc['multistep', 'none']:+.1f} points")
    print(f"\n{'layer':<7}{'entropy':>8}{'min %':>7}{'max %':>7}{'unused':>7}{'reuse any':>10}{'reuse k':>9}")
    for d in routing["layers"]:
        print(f"{d['layer']:<7}{d['entropy']:>8.3f}{100 * d['min_share']:>7.2f}{100 * d['max_share']:>7.2f}"
              f"{d['unused']:>7}{d['reuse_any']:>10.3f}{d['reuse_mean']:>9.3f}")
    rnd = routing["random"]
    print(f"(uniform random routing: reuse any {rnd['reuse_any']:.3f}, reuse k {rnd['reuse_mean']:.3f})")
    print(f"every expert used: {'yes' if routing['every_expert_used'] else 'no'}")


@contextlib.contextmanager
def worker_pool(jobs: int, model_path: str):
    """Spawned workers with one thread each: the demo's matrices are too small for threads (2 numba
    threads ran 4-20x slower than 1 on 2 cores). The variables must be in the environment before a
    worker imports numba; this process's own environment is put back afterwards."""
    saved = {v: os.environ.get(v) for v in THREAD_VARS}
    os.environ.update(dict.fromkeys(THREAD_VARS, "1"))
    try:
        with multiprocessing.get_context("spawn").Pool(jobs, _init, (model_path,)) as pool:
            yield pool
    finally:
        for v, old in saved.items():
            if old is None:
                os.environ.pop(v, None)
            else:
                os.environ[v] = old


def evaluate_sets(model, args, sets: list[tuple[str, str]]) -> dict:
    """Every set through one pool (or in this process with --jobs 1); routing summed over all of them."""
    keep = args.routing_problems if args.write_routing else 0
    global _model
    _model = model                                   # --jobs 1: _work runs here
    summaries, records, counts, reuse = [], {}, 0, 0
    with (worker_pool(args.jobs, args.model) if args.jobs > 1 else contextlib.nullcontext()) as pool:
        if pool is None:
            numba.set_num_threads(1)
        for i, (kind, effort) in enumerate(sets):
            t0 = time.perf_counter()
            r, c, u, kept = run_set(pool.imap if pool else map, args.jobs, heldout(kind, args.n, effort),
                                    args.max_tokens, keep if i == 0 else 0)
            summaries.append(summarise(kind, effort, r, time.perf_counter() - t0))
            records[f"{kind}:{effort}"], counts, reuse = r, counts + c, reuse + u
            if i == 0 and keep:
                write_routing(args.write_routing, kept, [x["prompt_tokens"] for x in r[:keep]], c)
    routing = routing_summary(counts, reuse, model.config.num_experts_per_tok)
    return {"model": str(model.path), "max_tokens": args.max_tokens, "sets": summaries, "routing": routing,
            "records": records}


def write_routing(path: str, kept: list[tuple[np.ndarray, np.ndarray]], prompt_tokens: list[int],
                  counts: np.ndarray) -> None:
    """routes int16 [tokens, layers, k] (problems concatenated; problem i is rows offsets[i]:offsets[i+1],
    its first prompt_tokens[i] rows the prompt), guesses alike (the next MoE layer's router on each MoE layer's
    input: row t, layer j is layer j's guess from layer j - 1; -1 for the first), and the MoE layers' ids."""
    offsets = np.concatenate([[0], np.cumsum([len(r) for r, _ in kept])])
    np.savez_compressed(path, routes=np.concatenate([r for r, _ in kept]),
                        guesses=np.concatenate([g for _, g in kept]), offsets=offsets,
                        prompt_tokens=np.array(prompt_tokens), layers=np.flatnonzero(counts.sum(1)))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m train.eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="GGUF file (its .mmproj.gguf companion is needed for vision sets)")
    ap.add_argument("--n", type=int, default=500, help="problems per set")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    ap.add_argument("--sets", help="KIND:EFFORT,... (default: " + ",".join(DEFAULT_SETS) + ")")
    ap.add_argument("--all", action="store_true", help="the default sets plus vision:high")
    ap.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help="most generated tokens per problem")
    ap.add_argument("--json", help="write every result to this file")
    ap.add_argument("--write-routing", help="save the first set's per-token routing to this .npz")
    ap.add_argument("--routing-problems", type=int, default=200, help="problems --write-routing saves")
    args = ap.parse_args(argv)
    try:
        if args.sets and args.all:
            raise InputError("--sets and --all exclude each other")
        if not 1 <= args.n <= HELDOUT_POOL or min(args.jobs, args.max_tokens) < 1:
            raise InputError(f"--n must be 1..{HELDOUT_POOL} (training avoids only those problems); "
                             f"--jobs and --max-tokens at least 1")
        sets = parse_sets(args.sets or ",".join(DEFAULT_SETS + (("vision:high",) if args.all else ())))
        model = load(args.model)                      # bad paths fail here, as one line
        if any(kind == "vision" for kind, _ in sets):
            model.vision                              # a missing companion fails here, not in a worker
        out = evaluate_sets(model, args, sets)
    except LocalMoeError as e:
        print(f"train.eval: error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    report(out["sets"], out["routing"])
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
