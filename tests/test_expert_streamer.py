"""localmoe/backends/cuda/streaming.py: expert slots filled from the mapped weights.

On the CPU the device is simulated (SimStreamer): pools are numpy arrays, and the copy stream is a queue
that runs only when an event behind it is waited for, as late as a real GPU may run it. So a missing
copy -> kernel wait leaves stale bytes in a slot, a staging buffer refilled too early corrupts a copy,
and a copy into a slot before the copy stream waited for its previous readers fails an assertion; the
mutation test checks that each of these bugs is caught. The GPU test runs the real cupy path (skipped
without a GPU).
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from localmoe.backends import Weight
from localmoe.backends.cuda import available
from localmoe.backends.cuda import streaming
from localmoe.backends.cuda.streaming import ExpertStreamer
from localmoe.cache import CacheFullError
from localmoe.gguf.format import GGMLType

GPU, WHY = available()
needs_gpu = pytest.mark.skipif(not GPU, reason="no CUDA GPU")
Q8 = GGMLType.Q8_0
# the CUDA backend's kernels.fast_ok, without importing numba.cuda
FAKE_BE = SimpleNamespace(xp=np, K=SimpleNamespace(fast_ok=lambda qt, cols: qt in (2, 8) and cols % 64 == 0))


class SimStreamer(ExpertStreamer):
    """The device on the host. Copy-stream operations are queued; `run(upto)` executes them in order.
    Events: ("copy", queue position) or ("compute", number of fetches whose kernels had run). The
    test plays the kernels: `consume(slots)` right after each fetch reads the slots."""

    def _init_device(self):
        self.queue, self.ran = [], 0
        self.allowed = 0          # the copy stream has waited for the readers of fetches 1..allowed
        self.consumed = 0         # fetches whose kernels have run
        self.last_reader = {}     # slot -> number of the fetch that read it last
        self.copied = 0           # bytes the executed copies wrote

    def _alloc(self, nbytes, fast):
        junk = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)
        return junk.view(np.uint32) if fast else junk

    def _pinned(self, nbytes):
        return np.empty(nbytes, np.uint8)

    def _h2d(self, pool, offset, src):
        self.queue.append(("copy", pool, offset, src))   # src is read when the copy runs, not now

    def _record(self, on_copy):
        return ("copy", len(self.queue)) if on_copy else ("compute", self.consumed)

    def _wait(self, ev, on_copy):
        if on_copy:
            assert ev[0] == "compute"
            self.queue.append(("allow", ev[1]))
        else:
            assert ev[0] == "copy"
            self.run(ev[1])

    def _sync(self, ev):
        assert ev[0] == "copy"
        pending = self.ran < ev[1]
        self.run(ev[1])
        return pending

    def run(self, upto=None):
        upto = len(self.queue) if upto is None else upto
        for op in self.queue[self.ran:upto]:
            if op[0] == "allow":
                self.allowed = max(self.allowed, op[1])
                continue
            _, pool, off, src = op
            p = next(i for i, q in enumerate(self.pools) if q is pool)
            slot, r = divmod(off, self.mat_bytes[p])
            assert r == 0 and len(src) == self.mat_bytes[p]
            assert self.last_reader.get(slot, 0) <= self.allowed, \
                f"copy into slot {slot} before the kernels of fetch {self.last_reader[slot]} finished"
            pool.view(np.uint8)[off:off + len(src)] = src
            self.copied += len(src)
        self.ran = max(self.ran, upto)

    def consume(self, slots):
        self.consumed += 1
        for s in np.unique(slots).tolist():
            self.last_reader[s] = self.consumed


def random_layer(rng, E=8, H=128, I=64, D=96) -> tuple[Weight, Weight, Weight]:
    """Q8_0-shaped random bytes: gate and up as views of one fused [E, 2I, .] tensor (mistral4's
    layout: each expert's rows are contiguous, the tensor is not), down [E, D, .] with cols I + 32 (not
    a multiple of 64: a uint8 pool)."""
    gu = rng.integers(0, 256, (E, 2 * I, H // 32 * 34), dtype=np.uint8)
    down = rng.integers(0, 256, (E, D, (I + 32) // 32 * 34), dtype=np.uint8)
    return (Weight(gu[:, :I], Q8, H, "gate"), Weight(gu[:, I:], Q8, H, "up"),
            Weight(down, Q8, I + 32, "down"))


def check_slots(ws, pools, ids, slots):
    """Each requested expert's bytes sit in its slot of every pool."""
    assert slots.shape == np.shape(ids) and slots.dtype == np.int32
    for w, pool in zip(ws, pools):
        m = w.raw[0].nbytes
        flat = pool.view(np.uint8)
        for e, s in zip(np.ravel(ids).tolist(), slots.ravel().tolist()):
            assert np.array_equal(flat[s * m:(s + 1) * m], w.raw[e].reshape(-1)), (w.name, e, s)


def drive(st: SimStreamer, layers, rng, steps=150, k=3, max_tokens=3, prefetch=0.5):
    """Random fetches (1..max_tokens tokens of k experts), layer by layer, with prefetches of random
    guesses for the next layer; checks every fetch. Returns the number of distinct ids looked up."""
    L, E = len(layers), layers[0][0].n_experts
    lookups = 0
    for step in range(steps):
        layer = step % L
        ids = np.stack([rng.choice(E, k, replace=False) for _ in range(rng.integers(1, max_tokens + 1))])
        *pools, slots = st.fetch(layer, *layers[layer], ids)
        check_slots(layers[layer], pools, ids, slots)
        st.consume(slots)
        lookups += len(np.unique(ids))
        if rng.random() < prefetch:
            nxt = (layer + 1) % L
            st.prefetch(nxt, *layers[nxt], rng.choice(E, rng.integers(1, 4), replace=False))
        if layer == L - 1:
            st.end_token()
    return lookups


@pytest.mark.parametrize("policy", ["lru", "lfu", "hot"])
def test_random_fetches_put_the_right_bytes_in_the_slots(policy, monkeypatch):
    monkeypatch.setattr(streaming, "MIN_CHUNK", 1000)      # host copies in 3 pieces, over 3 threads
    rng = np.random.default_rng(["lru", "lfu", "hot"].index(policy))
    L, E = 3, 8
    layers = [random_layer(rng) for _ in range(L)]
    bpe = sum(w.raw[0].nbytes for w in layers[0])
    kw = {"hot_counts": rng.integers(0, 50, (L, E)), "hot_fraction": 0.2} if policy == "hot" else {}
    st = SimStreamer(FAKE_BE, 10 * bpe + bpe // 2, L, E, policy=policy, copy_threads=3, **kw)
    assert st.stats()["slots"] == 0 and st.stats()["bytes_h2d"] == 0       # nothing allocated yet
    if policy == "hot":                                     # fill the hot set first, as the backend would
        st.admit(0, *layers[0], [])
        for layer, e in st.cache.hot_keys:
            st.admit(layer, *layers[layer], [e])
        assert st.stats()["admits"] == 2
    lookups = drive(st, layers, rng)
    n = st.stats()
    assert n["slots"] == 10 < L * E and n["slot_bytes"] == bpe and n["pool_bytes"] == 10 * bpe
    assert [p.dtype for p in st.pools] == [np.uint32, np.uint32, np.uint8] and not st.fast
    assert n["hits"] + n["misses"] == n["lookups"] == lookups
    loads = n["misses"] + n["prefetch_loads"] + n["admits"]
    assert n["bytes_h2d"] == loads * bpe == n["bytes_moved"]
    assert n["evictions"] > 0 and n["prefetch_loads"] > 0 and n["hits"] > 0 and n["host_waits"] > 0
    assert n["tokens"] == 150 // L
    st.run()                                                # every queued copy done: the whole table holds
    assert st.copied == n["bytes_h2d"]
    table = st.cache.table()
    for layer, e in zip(*np.nonzero(table >= 0)):
        check_slots(layers[layer], st.pools, [e], np.array([table[layer, e]], np.int32))


def test_prefetch_does_not_wait_and_fetch_waits_for_it():
    rng = np.random.default_rng(7)
    layers = [random_layer(rng) for _ in range(2)]
    bpe = sum(w.raw[0].nbytes for w in layers[0])
    st = SimStreamer(FAKE_BE, 8 * bpe, 2, 8)
    *pools, slots = st.fetch(0, *layers[0], [[1, 2]])
    st.consume(slots)
    st.prefetch(1, *layers[1], [3, 5])
    assert st.ran < len(st.queue)                            # in flight
    *pools, slots = st.fetch(1, *layers[1], [[5, 3], [3, 6]])
    check_slots(layers[1], pools, [[5, 3], [3, 6]], slots)
    n = st.stats()
    assert (n["prefetch_hits"], n["misses"], n["bytes_h2d"]) == (2, 3, 5 * bpe)


@pytest.mark.parametrize("bug", ["no compute wait", "staging reused early", "no copy wait"])
def test_the_simulation_catches_ordering_bugs(bug):
    class Broken(SimStreamer):
        def _wait(self, ev, on_copy):
            if bug != ("no copy wait" if on_copy else "no compute wait"):
                super()._wait(ev, on_copy)

        def _sync(self, ev):
            return False if bug == "staging reused early" else super()._sync(ev)
    rng = np.random.default_rng(3)
    layers = [random_layer(rng) for _ in range(3)]
    bpe = sum(w.raw[0].nbytes for w in layers[0])
    st = Broken(FAKE_BE, 6 * bpe, 3, 8)
    with pytest.raises(AssertionError):
        drive(st, layers, rng, steps=60, k=2, max_tokens=3)
        st.run()
        for layer, e in zip(*np.nonzero(st.cache.table() >= 0)):
            check_slots(layers[layer], st.pools, [e], np.array([st.cache.table()[layer, e]], np.int32))


def test_errors():
    rng = np.random.default_rng(5)
    layers = [random_layer(rng) for _ in range(2)]
    bpe = sum(w.raw[0].nbytes for w in layers[0])
    st = SimStreamer(FAKE_BE, 3 * bpe, 2, 8)
    with pytest.raises(CacheFullError, match="4 distinct experts.*holds 3"):
        st.fetch(0, *layers[0], [[0, 1], [2, 3]])
    with pytest.raises(CacheFullError, match="hold no expert"):
        SimStreamer(FAKE_BE, bpe - 1, 2, 8).fetch(0, *layers[0], [[0]])
    odd = random_layer(rng, D=64)                            # down has other rows in layer 1
    st = SimStreamer(FAKE_BE, 4 * bpe, 2, 8)
    st.fetch(0, *layers[0], [[0, 1]])
    with pytest.raises(ValueError, match="same expert shapes"):
        st.fetch(1, *odd, [[0, 1]])
    with pytest.raises(ValueError, match="same expert shapes"):
        st.prefetch(1, layers[0][0], layers[0][1], Weight(layers[0][2].raw, GGMLType.Q4_0, 128, "down"), [0])
    with pytest.raises(ValueError, match=r"expected expert tensors \[6"):
        SimStreamer(FAKE_BE, 4 * bpe, 2, 6).fetch(0, *layers[0], [[0]])


# -- the real device ------------------------------------------------------------------------------------
def quantized(rng, shape, t) -> Weight:
    from gguf.quants import quantize
    return Weight(quantize(rng.standard_normal(shape).astype(np.float32), t), t, shape[-1], f"{t.name}{shape}")


def pool_gemv(be, w: Weight, dev, dev2, mats, xidx, x, P, fused):
    """CUDABackend.gemv with the pools as the weight's device arrays."""
    y = be.xp.empty((P, w.rows), np.float32)
    rb = w.raw.shape[-1]
    be.K.launch_gemv(int(w.type), w.cols, w.rows, dev, dev2, mats, xidx, x, y, P, rb, rb * w.rows, be.sms,
                     fused=fused)
    return y


@needs_gpu
@pytest.mark.parametrize("t", [GGMLType.Q4_0, GGMLType.Q8_0], ids=lambda t: t.name)
def test_gpu_pools_match_resident_experts(t):
    """Through the real cupy path: the pools' bytes are the experts', and the gemv kernels on the pools
    with slot ids give the same bits as on the resident tensors with expert ids. A large matmul before
    each step's gemvs keeps the compute stream busy, so copies that did not wait for the previous
    readers (rule 2), or gemvs that did not wait for the copies (rule 1), would read the wrong bytes."""
    import cupy as cp
    from localmoe.backends.cuda import CUDABackend
    be = CUDABackend()
    rng = np.random.default_rng(int(t))
    L, E, H, I, k = 3, 8, 256, 128, 2
    layers = [(quantized(rng, (E, I, H), t), quantized(rng, (E, I, H), t), quantized(rng, (E, H, I), t))
              for _ in range(L)]
    bpe = sum(w.expert_nbytes() for w in layers[0])
    st = ExpertStreamer(be, 4 * bpe, L, E, policy="lru")
    busy = cp.asarray(rng.standard_normal((4096, 4096)).astype(np.float32))
    results = []
    for step in range(60):
        layer = step % L
        g, u, d = layers[layer]
        n = int(rng.integers(1, 3))
        ids = np.stack([rng.choice(E, k, replace=False) for _ in range(n)])
        pg, pu, pd, slots = st.fetch(layer, g, u, d, ids)
        for pool, w in zip((pg, pu, pd), (g, u, d)):
            host, m = cp.asnumpy(pool).view(np.uint8), w.expert_nbytes()
            for e, s in zip(ids.ravel().tolist(), slots.ravel().tolist()):
                assert np.array_equal(host[s * m:(s + 1) * m], w.raw[e].reshape(-1)), (step, e, s)
        _ = busy @ busy                                               # delays the kernels below
        P = n * k
        x = cp.asarray(rng.standard_normal((n, H)).astype(np.float32))
        tok = cp.asarray(np.repeat(np.arange(n), k).astype(np.int32))
        me, ms = cp.asarray(ids.reshape(P).astype(np.int32)), cp.asarray(slots.reshape(P).astype(np.int32))
        h_ref = be.gemv(g, me, tok, x, P, w2=u)
        h = pool_gemv(be, g, pg, pu, ms, tok, x, P, fused=True)
        y_ref = be.gemv(d, me, cp.arange(P, dtype=cp.int32), h_ref, P)
        y = pool_gemv(be, d, pd, pd, ms, cp.arange(P, dtype=cp.int32), h_ref, P, fused=False)
        results.append((h, h_ref, y, y_ref))                          # compared after the loop: no sync here
        if step % 2:
            nxt = (layer + 1) % L
            st.prefetch(nxt, *layers[nxt], rng.choice(E, 2, replace=False))
        if layer == L - 1:
            st.end_token()
    for i, (h, h_ref, y, y_ref) in enumerate(results):
        assert np.array_equal(cp.asnumpy(h), cp.asnumpy(h_ref)), i
        assert np.array_equal(cp.asnumpy(y), cp.asnumpy(y_ref)), i
    n = st.stats()
    assert n["evictions"] > 0 and n["bytes_h2d"] == (n["misses"] + n["prefetch_loads"]) * bpe
    assert st.fast == all(be.K.fast_ok(int(w.type), w.cols) for w in layers[0])


def test_stats_report_the_expert_cache():
    """m.stats.as_dict() and the --verbose line carry the streamer's hit rate and host->GPU bytes per token."""
    from localmoe.models.decoder import Stats

    class Counters:
        def stats(self):
            return {"hits": 30, "misses": 10, "slots": 12, "bytes_h2d": 5 * 2 ** 20}

    st = Stats(2, 8)
    assert "cache_hit_rate" not in st.as_dict() and st.cache_line() == ""
    st.expert_cache, st.tokens = Counters(), 4
    d = st.as_dict()
    assert d["cache_hit_rate"] == 0.75 and d["bytes_h2d"] == 5 * 2 ** 20 and d["bytes_h2d_per_token"] == 5 * 2 ** 18
    assert "hit rate 75.0%" in st.cache_line() and "1.2 MiB/token" in st.cache_line()
