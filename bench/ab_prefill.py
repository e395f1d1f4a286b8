"""Prefill tok/s of whichever localmoe is first on PYTHONPATH: a 2048-token prompt in batches of 128, twice in one
process (the first also compiles), so two trees can be compared in alternating processes, as bench/ab_trees.py
does for decode:
    for r in 1 2; do PYTHONPATH=/tmp/old python3 bench/ab_prefill.py /mnt/lm/small4-q4_0.gguf
                     PYTHONPATH=$PWD python3 bench/ab_prefill.py /mnt/lm/small4-q4_0.gguf; done
(the file: bench_cuda.py --full-scale writes it)."""
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ab_trees import load  # noqa: E402

import localmoe  # noqa: E402

if __name__ == "__main__":
    m = load(sys.argv[1])
    ids = np.concatenate([[1], np.random.default_rng(0).integers(1000, 100000, 2047)])
    res = []
    for _ in range(2):
        cache = m.new_cache()
        m.backend.stream.synchronize()
        t0 = time.perf_counter()
        m.prefill(ids, cache)
        m.backend.stream.synchronize()
        res.append(len(ids) / (time.perf_counter() - t0))
    print(f"{localmoe.__file__}: prefill 2048: {' '.join(f'{r:.1f}' for r in res)} tok/s")
