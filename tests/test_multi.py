"""Expert parallel over simulated devices (localmoe/backends/multi.py): one model's routed experts spread
over N devices (expert e on device e % N) give the logits of one device, and each device computes only the
experts it owns."""
from __future__ import annotations

import numpy as np
import pytest

import localmoe
from convert import convert
from localmoe.backends.cpu import CPUBackend
from localmoe.backends.multi import ExpertParallel, LocalComm, local_route
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


class Recording(CPUBackend):
    """A simulated device that records which experts its expert_ffn was asked to compute."""

    def __init__(self):
        super().__init__()
        self.asked, self.slots = set(), set()

    def expert_ffn(self, gate, up, down, x, ids, weights, plus=None):
        self.slots.add(gate.n_experts)
        self.asked |= {int(e) for e, w in zip(np.ravel(ids), np.ravel(weights)) if w != 0}
        return super().expert_ffn(gate, up, down, x, ids, weights, plus)


@pytest.mark.parametrize("n", [2, 3])
def test_expert_parallel_matches_one_device(gguf, n):
    ids = [1] + np.random.default_rng(n).integers(3, 4000, 47).tolist()
    one = localmoe.load(gguf)
    ref = one.logits(ids)
    devices = [Recording() for _ in range(n)]
    m = Model(gguf, backend=ExpertParallel(devices, LocalComm()))
    ours = m.logits(ids)
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-4     # the partial sums re-associate the k terms
    assert np.array_equal(m.stats.expert_counts, one.stats.expert_counts)
    E = one.config.n_experts
    for d, dev in enumerate(devices):              # only its own experts, from a shard of E/N of them
        assert dev.slots == {len(range(d, E, n))}
        assert dev.asked and max(dev.asked) < len(range(d, E, n))
    used = {e for e in range(E) if one.stats.expert_counts[:, e].any()}
    assert used == {s * n + d for d, dev in enumerate(devices) for s in dev.asked}


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
