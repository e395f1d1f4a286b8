"""Expert parallel (localmoe/backends/multi.py) with CPU worker processes as the other devices: one model's
routed experts spread over N devices (expert e on device e % N) give the logits and the greedy tokens of
one device."""
from __future__ import annotations

import numpy as np
import pytest

import localmoe
from convert import convert
from localmoe.backends.cpu import CPUBackend
from localmoe.backends.multi import ExpertParallel, local_route
from localmoe.model import Model

from checkpoints import make_mistral4, make_mixtral


@pytest.fixture(scope="module", params=["mistral4", "mixtral"])
def gguf(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    if request.param == "mistral4":
        src, _ = make_mistral4(d / "hf", experts=16, top_k=4, seed=5, router_std=1.0)
    else:
        src, _ = make_mixtral(d / "hf", experts=6, seed=5)
    out = d / "m.gguf"
    convert(src, out, "q8_0")
    return out


@pytest.mark.parametrize("n", [2, 3])
def test_expert_parallel_matches_one_device(gguf, n):
    ids = [1] + np.random.default_rng(n).integers(3, 4000, 47).tolist()
    one = localmoe.load(gguf)
    ref = one.logits(ids)
    ref_counts = one.stats.expert_counts.copy()
    ref_tokens = list(one.generate(ids[:6], max_tokens=8, stop=()))
    be = ExpertParallel.start(gguf, n, CPUBackend())
    try:
        m = Model(gguf, backend=be)
        ours = m.logits(ids)
        counts = m.stats.expert_counts.copy()
        tokens = list(m.generate(ids[:6], max_tokens=8, stop=()))
    finally:
        be.close()
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-4     # the partial sums re-associate the k terms
    assert np.array_equal(counts, ref_counts)
    assert tokens == ref_tokens


def test_a_failed_worker_is_an_error(gguf, tmp_path):
    be = ExpertParallel.start(tmp_path / "absent.gguf", 2, CPUBackend())
    try:
        with pytest.raises(RuntimeError, match="expert worker failed: .*absent.gguf"):
            Model(gguf, backend=be).logits([1, 5, 9])
    finally:
        be.close()


def test_local_route_partitions_the_choices():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n, E, k, t = int(rng.integers(1, 5)), int(rng.integers(4, 64)), int(rng.integers(1, 5)), int(rng.integers(1, 9))
        ids = np.stack([rng.choice(E, k, replace=False) for _ in range(t)])
        w = rng.random((t, k)).astype(np.float32) + 0.1
        parts = [local_route(ids, w, d, n) for d in range(n)]
        assert np.array_equal(sum(p[1] for p in parts), w)                  # each choice on exactly one device
        for d, (slots, wd) in enumerate(parts):
            own = ids % n == d
            assert np.array_equal(slots[own] * n + d, ids[own]) and not wd[~own].any()
