"""Graph decode tok/s of whichever localmoe is first on PYTHONPATH, so two trees can be compared in alternating
processes on one machine: rounds of 48 tokens after a 16-token prompt, graphs re-captured each round (the loop
bench/ab_pdl.py runs per configuration). On the GPU machine, e.g. main before a change (a `git archive` of it in
/tmp/old) against this tree:
    for r in 1 2; do PYTHONPATH=/tmp/old python3 bench/ab_trees.py /mnt/lm/small4-q4_0.gguf 3
                     PYTHONPATH=$PWD python3 bench/ab_trees.py /mnt/lm/small4-q4_0.gguf 3; done
(the file: bench_cuda.py --full-scale writes it)."""
import sys
import time

import numpy as np

import localmoe

PROMPT = [1] + list(range(1000, 1015))


def load(path):
    """The model on the GPU, its kernels compiled by a first generation."""
    m = localmoe.load(path, backend="cuda", n_ctx=4096)
    list(m.generate(PROMPT, max_tokens=2, stop=()))
    return m


def decode_round(m, rng, tokens: int = 48) -> float:
    """Graph decode tok/s over `tokens` random tokens after the prompt, the graph captured afresh."""
    be = m.backend
    V = min(100000, m.net.embed_tokens.rows)
    be._graphs.clear()
    cache = m.new_cache()
    m.prefill(np.array(PROMPT), cache)
    for _ in range(4):
        m.net.forward(np.array([int(rng.integers(1000, V))]), cache, last_only=True)
    be.stream.synchronize()
    t0 = time.perf_counter()
    for t in rng.integers(1000, V, tokens):
        m.net.forward(np.array([int(t)]), cache, last_only=True)
    be.stream.synchronize()
    return tokens / (time.perf_counter() - t0)


if __name__ == "__main__":
    m = load(sys.argv[1])
    rng = np.random.default_rng(0)
    res = [decode_round(m, rng) for _ in range(int(sys.argv[2]) if len(sys.argv) > 2 else 3)]
    print(f"{localmoe.__file__}: graph decode {' '.join(f'{x:.1f}' for x in res)} tok/s (best {max(res):.1f}, "
          f"mean {np.mean(res):.1f}); {m.backend.graph_kernels} kernels in the graph")
