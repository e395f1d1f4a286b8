"""How much of a resident decode step is the host's: the GPU waits while the host finishes one step and starts
the next (copy the routes and logits back, count the experts, embed the next token, copy it in, launch).

    python3 bench/host_gap.py /mnt/lm/small4-q4_0.gguf [tokens] [rounds]

Prints, per token: the decode loop (`m.net.forward`, as bench_cuda and ab_trees time it), the same captured
graph replayed back to back with no host work between launches (the GPU's own time: what the loop would take
with a free host), and the loop's pieces, each timed around its call. (The file: bench_cuda.py --full-scale writes it.)"""
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ab_trees import decode_round, load  # noqa: E402


def graph_only(m, tokens: int) -> float:
    """Seconds per token of the last captured decode graph launched `tokens` times back to back."""
    be = m.backend
    (segments, *_), = [g for k, g in be._graphs.items() if k is not None and k[0] == "decode"]
    graph = segments[0][0]
    graph.launch(be.stream)
    be.stream.synchronize()
    t0 = time.perf_counter()
    for _ in range(tokens):
        graph.launch(be.stream)
    be.stream.synchronize()
    return (time.perf_counter() - t0) / tokens


def pieces(m, tokens: int) -> dict[str, float]:
    """Seconds per token of each host piece of the decode loop. `replay` holds the rest: the copies in and out,
    the launch, the wait for the GPU, and the counting of the last call's experts (done while the GPU runs)."""
    be, stats = m.backend, m.net.stats
    spent = defaultdict(float)

    def timed(name, fn):
        def call(*a, **kw):
            t0 = time.perf_counter()
            r = fn(*a, **kw)
            spent[name] += time.perf_counter() - t0
            return r
        return call

    w = m.net.embed_tokens
    be.replay = timed("replay", be.replay)
    stats.record_routes = timed("count the experts", stats.record_routes)
    object.__setattr__(w, "dequantize_rows", timed("embed the token", w.dequantize_rows))
    try:
        cache = m.new_cache()
        m.prefill(np.array([1] + list(range(1000, 1015))), cache)
        rng = np.random.default_rng(1)
        for _ in range(4):
            m.net.forward(np.array([int(rng.integers(1000, 100000))]), cache, last_only=True)
        spent.clear()
        be.stream.synchronize()
        t0 = time.perf_counter()
        for t in rng.integers(1000, 100000, tokens):
            m.net.forward(np.array([int(t)]), cache, last_only=True)
        total = time.perf_counter() - t0
    finally:
        del be.replay, stats.record_routes
        object.__delattr__(w, "dequantize_rows")
    out = {k: v / tokens for k, v in spent.items()}
    out["the rest of forward()"] = total / tokens - out["embed the token"] - out["replay"]
    return out


def main(path: str, tokens: int, rounds: int) -> None:
    m = load(path)
    rng = np.random.default_rng(0)
    loop, graph = [], []
    for _ in range(rounds):                  # alternated, so both see the same machine
        loop.append(1 / decode_round(m, rng, tokens))
        graph.append(graph_only(m, tokens))
    lo, gr = min(loop), min(graph)
    print(f"decode loop {lo * 1e3:.3f} ms/token ({1 / lo:.1f} tok/s); the graph alone {gr * 1e3:.3f} ms/token "
          f"({1 / gr:.1f} tok/s); host gap {(lo - gr) * 1e3:.3f} ms = {(lo - gr) / lo:.1%} of the loop "
          f"(best of {rounds} rounds of {tokens} tokens)")
    print("the loop's pieces, us per token (an instrumented run):")
    for k, v in pieces(m, tokens).items():
        print(f"  {k:30s} {v * 1e6:8.1f}")
    print("(replay: copy in, launch, count the last call's experts while the graph runs, wait, copy out)")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 48, int(sys.argv[3]) if len(sys.argv) > 3 else 3)
