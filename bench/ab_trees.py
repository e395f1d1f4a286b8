"""Graph decode tok/s of whichever localmoe is first on PYTHONPATH, so two trees can be compared in alternating
processes on one machine (bench/ab_pdl.py's loop: rounds of 48 tokens after a 16-token prompt, graphs re-captured
each round). On the GPU machine, e.g. main before a change (a `git archive` of it in /tmp/old) against this tree:
    for r in 1 2; do PYTHONPATH=/tmp/old python3 bench/ab_trees.py /mnt/lm/small4-q4_0.gguf 3
                     PYTHONPATH=$PWD python3 bench/ab_trees.py /mnt/lm/small4-q4_0.gguf 3; done
(the file: bench_cuda.py --full-scale writes it)."""
import sys
import time

import numpy as np

import localmoe

path, rounds = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3
m = localmoe.load(path, backend="cuda", n_ctx=4096)
ids = [1] + list(range(1000, 1015))
list(m.generate(ids, max_tokens=2, stop=()))
be = m.backend
V = min(100000, m.net.embed_tokens.rows)
rng = np.random.default_rng(0)
res = []
for _ in range(rounds):
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
    res.append(48 / (time.perf_counter() - t0))
print(f"{localmoe.__file__}: graph decode {' '.join(f'{x:.1f}' for x in res)} tok/s (best {max(res):.1f}, "
      f"mean {np.mean(res):.1f}); {be.graph_kernels} kernels in the graph")
