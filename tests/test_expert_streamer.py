"""localmoe/backends/cuda/streaming.py: expert slots filled from the mapped weights.

On the CPU the device is simulated (SimStreamer): pools are numpy arrays, and the copy stream is a queue
that runs only when an event behind it is waited for, as late as a real GPU may run it. So a missing
copy -> kernel wait leaves stale bytes in a slot, a staging buffer refilled too early corrupts a copy,
and a copy into a slot before the copy stream waited for its previous readers fails an assertion; the
mutation test checks that each of these bugs is caught. The "mapped file" of the direct path is one
uint8 array the layers' tensors are carved from (`Blob`); registering it is recorded, every copy must
come from pinned memory (a staging buffer or the registered range), and unregistering with copies still
queued fails. The GPU test runs the real cupy path (skipped without a GPU).
"""
from __future__ import annotations

import re
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

    fail_register = None      # an exception for _register to raise (a CUDA refusal)

    def _init_device(self):
        self.queue, self.ran = [], 0
        self.registered = []      # (start, nbytes) ranges registered now
        self.unregistered = []
        self.allowed = 0          # the copy stream has waited for the readers of fetches 1..allowed
        self.consumed = 0         # fetches whose kernels have run
        self.last_reader = {}     # slot -> number of the fetch that read it last
        self.copied = 0           # bytes the executed copies wrote
        self.pinned_buffers = []  # _pinned's allocations (staging buffers, or a caller's)

    def _alloc(self, nbytes, fast):
        junk = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)
        return junk.view(np.uint32) if fast else junk

    def _pinned(self, nbytes):
        b = np.empty(nbytes, np.uint8)
        self.pinned_buffers.append(b)
        return b

    def _h2d(self, pool, offset, src):
        assert self.pinned(src), "a copy from pageable memory"
        self.queue.append(("copy", pool, offset, src))   # src is read when the copy runs, not now

    def pinned(self, src):
        p = src.__array_interface__["data"][0]
        return (any(np.shares_memory(src, b) for b in self._stage + self.pinned_buffers)
                or any(lo <= p and p + src.nbytes <= lo + n for lo, n in self.registered))

    def _set_flag(self, flag, value):
        self.queue.append(("flag", flag, value))

    def _wait_flag(self, flag, value):     # the compute stream goes on once the copy stream has set the flag
        self.run(1 + max(i for i, op in enumerate(self.queue) if op[0] == "flag" and op[1] is flag and op[2] == value))

    def _register(self, start, nbytes):
        if self.fail_register is not None:
            raise self.fail_register
        self.registered.append((start, nbytes))

    def _unregister(self, start):
        assert self.ran == len(self.queue), "unregistered while copies from it are queued"
        (r,) = [r for r in self.registered if r[0] == start]
        self.registered.remove(r)
        self.unregistered.append(r)

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
            if op[0] == "flag":
                op[1][0] = op[2]
                continue
            _, pool, off, src = op
            if not any(pool is q for q in self.pools):       # publish: a caller's device array
                pool.view(np.uint8)[off:off + src.nbytes] = src.view(np.uint8)
                continue
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


class Blob:
    """One uint8 array standing in for the mapped GGUF: random tensors carved from it back to back, each at
    an odd offset (tensors in a file share pages), rounded up to `align`; the file's `data`."""

    def __init__(self, nbytes: int, align: int = 1):
        self.data, self.used, self.align = np.zeros(nbytes, np.uint8), 0, align

    def __call__(self, rng, shape):
        n = int(np.prod(shape))
        self.used = -(-(self.used + 13) // self.align) * self.align
        a = self.data[self.used:self.used + n].reshape(shape)
        a[...] = rng.integers(0, 256, shape, dtype=np.uint8)
        self.used += n
        return a


def random_layer(rng, E=8, H=128, I=64, D=96, blob: Blob | None = None) -> tuple[Weight, Weight, Weight]:
    """Q8_0-shaped random bytes: gate and up as views of one fused [E, 2I, .] tensor (mistral4's
    layout: each expert's rows are contiguous, the tensor is not), down [E, D, .] with cols I + 32 (not
    a multiple of 64: a uint8 pool). In `blob` when given, else separate arrays."""
    alloc = blob or (lambda rng, shape: rng.integers(0, 256, shape, dtype=np.uint8))
    gu = alloc(rng, (E, 2 * I, H // 32 * 34))
    down = alloc(rng, (E, D, (I + 32) // 32 * 34))
    return (Weight(gu[:, :I], Q8, H, "gate"), Weight(gu[:, I:], Q8, H, "up"),
            Weight(down, Q8, I + 32, "down"))


def random_layers(rng, n: int, direct: bool = True):
    """n random layers, all in one host blob (as in a mapped file) when direct; returns them, the bytes per
    expert and the streamer's keywords for DMA straight from that blob."""
    blob = Blob(1 << 20) if direct else None
    layers = [random_layer(rng, blob=blob) for _ in range(n)]
    kw = {"host_buffer": blob.data, "host_register": True} if direct else {}
    return layers, sum(w.raw[0].nbytes for w in layers[0]), kw


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


@pytest.mark.parametrize("direct", [False, True], ids=["staged", "direct"])
@pytest.mark.parametrize("policy", ["lru", "lfu", "hot"])
def test_random_fetches_put_the_right_bytes_in_the_slots(policy, direct, monkeypatch):
    """Staged, or direct from the registered file: with the copies run as late as they may be, every slot
    holds its expert's bytes."""
    monkeypatch.setattr(streaming, "MIN_CHUNK", 1000)      # host copies in 3 pieces, over 3 threads
    rng = np.random.default_rng(["lru", "lfu", "hot"].index(policy))
    L, E = 3, 8
    layers, bpe, kw = random_layers(rng, L, direct)
    if policy == "hot":
        kw.update(hot_counts=rng.integers(0, 50, (L, E)), hot_fraction=0.2)
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
    assert n["evictions"] > 0 and n["prefetch_loads"] > 0 and n["hits"] > 0
    assert n["tokens"] == 150 // L
    if direct:                                              # no staging buffer, no host wait
        assert n["host_registered"] and n["register_why_not"] == "" and n["register_s"] >= 0
        assert st.registered == [(kw["host_buffer"].ctypes.data, kw["host_buffer"].nbytes)]
        assert n["bytes_direct"] == n["bytes_h2d"] and n["staging_bytes"] == 0 and n["host_waits"] == 0
    else:
        assert not n["host_registered"] and n["register_why_not"] == "no mapped file given"
        assert n["bytes_direct"] == 0 and n["staging_bytes"] == 3 * bpe and n["host_waits"] > 0
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


@pytest.mark.parametrize("direct", [False, True], ids=["staged", "direct"])
def test_pipelined_fetches_publish_their_slots_behind_their_copies(direct):
    """The pipelined replay's order: fetch with the event behind the previous fetch's readers (recorded ahead),
    no compute-stream wait; publish the slots to a device array and a flag; the compute stream waits for the
    flag. Kernels that read the slots before that wait would find missing bytes; after it, all are there."""
    rng = np.random.default_rng(11)
    L, E, k = 3, 8, 3
    layers, bpe, kw = random_layers(rng, L, direct)
    st = SimStreamer(FAKE_BE, 7 * bpe, L, E, policy="lfu", copy_threads=2, **kw)
    mats, flag = np.zeros(k, np.int32), np.zeros(1, np.uint32)
    early = 0
    for step in range(60):
        layer = step % L
        ids = rng.choice(E, (1, k), replace=False)
        *pools, slots = st.fetch(layer, *layers[layer], ids, readers_done=("compute", getattr(st, "consumed", 0)))
        host = st._pinned(4 * k).view(np.int32)
        host[:] = slots.reshape(-1)
        st.publish(mats, host, flag, step + 1)
        assert st.ran < len(st.queue) and flag[0] == step      # the publication is queued, not done
        try:                                                  # a kernel that did not wait for the flag
            check_slots(layers[layer], pools, ids, slots)
        except AssertionError:
            early += 1
        st.await_published(flag, step + 1)
        assert flag[0] == step + 1 and np.array_equal(mats, slots.reshape(-1))
        check_slots(layers[layer], pools, ids, mats.reshape(ids.shape))
        st.consume(slots)
    n = st.stats()
    assert n["misses"] >= early > 0 and n["hits"] > 0 and n["evictions"] > 0


@pytest.mark.parametrize("direct", [False, True], ids=["staged", "direct"])
@pytest.mark.parametrize("bug", ["no compute wait", "no host wait", "no copy wait"])
def test_the_simulation_catches_ordering_bugs(bug, direct):
    """Each missing wait is caught: "no host wait" reuses a staging buffer early (staged) or unregisters the
    file with copies from it in flight (direct, at close)."""
    class Broken(SimStreamer):
        def _wait(self, ev, on_copy):
            if bug != ("no copy wait" if on_copy else "no compute wait"):
                super()._wait(ev, on_copy)

        def _sync(self, ev):
            return False if bug == "no host wait" else super()._sync(ev)
    rng = np.random.default_rng(3)
    layers, bpe, kw = random_layers(rng, 3, direct)
    st = Broken(FAKE_BE, 6 * bpe, 3, 8, **kw)
    with pytest.raises(AssertionError):
        drive(st, layers, rng, steps=60, k=2, max_tokens=3)
        *_, slots = st.fetch(1, *layers[1], [[0]])          # one slot pinned: a prefetch of layer 0 loads
        st.consume(slots)
        for e in range(8):                                   # (at most 5 of its 8 experts are resident)
            st.prefetch(0, *layers[0], [e])
        st.close()                                           # with those copies in flight
        st.run()
        for layer, e in zip(*np.nonzero(st.cache.table() >= 0)):
            check_slots(layers[layer], st.pools, [e], np.array([st.cache.table()[layer, e]], np.int32))
    assert st.stats()["bytes_direct"] == (st.stats()["bytes_h2d"] if direct else 0)


def test_close_unregisters_after_the_copies():
    """close() waits for the copies in flight, then unregisters the one range; later copies are staged."""
    rng = np.random.default_rng(4)
    layers, bpe, kw = random_layers(rng, 2)
    st = SimStreamer(FAKE_BE, 4 * bpe, 2, 8, **kw)
    st.fetch(0, *layers[0], [[1, 2]])
    st.prefetch(1, *layers[1], [3, 4])
    assert st.ran < len(st.queue)                            # in flight when close() is called
    st.close()
    assert st.registered == [] and st.unregistered == [(kw["host_buffer"].ctypes.data, kw["host_buffer"].nbytes)]
    n = st.stats()
    assert not n["host_registered"] and n["register_why_not"] == "closed" and n["bytes_direct"] == 4 * bpe
    *pools, slots = st.fetch(1, *layers[1], [[5, 3]])       # after close: staged (3 is still resident)
    check_slots(layers[1], pools, [[5, 3]], slots)
    assert st.stats()["bytes_direct"] == 4 * bpe and st.stats()["staging_bytes"] == 3 * bpe
    st.close()                                               # twice: nothing more
    assert len(st.unregistered) == 1


def test_a_refused_registration_falls_back_to_staging():
    rng = np.random.default_rng(6)
    layers, bpe, kw = random_layers(rng, 3)
    st = SimStreamer(FAKE_BE, 6 * bpe, 3, 8, **kw)
    st.fail_register = RuntimeError("cudaErrorNotSupported: operation not supported")
    drive(st, layers, rng, steps=60, k=2)
    n = st.stats()
    assert not n["host_registered"] and st.registered == []
    assert n["register_why_not"] == "cudaHostRegister failed: cudaErrorNotSupported: operation not supported"
    assert n["bytes_direct"] == 0 and n["bytes_h2d"] > 0 and n["staging_bytes"] == 3 * bpe
    st.close()
    assert st.unregistered == []


def test_weights_outside_the_registered_file_are_staged():
    """Layer 0 lies in the registered buffer, layer 1 does not: only layer 0's experts are DMA'd directly
    (the simulation fails a copy from unregistered, unstaged memory)."""
    rng = np.random.default_rng(8)
    blob = Blob(1 << 19)
    layers = [random_layer(rng, blob=blob), random_layer(rng)]
    bpe = sum(w.raw[0].nbytes for w in layers[0])
    st = SimStreamer(FAKE_BE, 4 * bpe, 2, 8, host_buffer=blob.data, host_register=True)
    *pools, slots = st.fetch(0, *layers[0], [[1, 2]])
    check_slots(layers[0], pools, [[1, 2]], slots)
    assert st.stats()["staging_bytes"] == 0                  # not made until a staged copy needs one
    st.consume(slots)
    drive(st, layers, rng, steps=40, k=2, max_tokens=1)
    n = st.stats()
    assert 0 < n["bytes_direct"] < n["bytes_h2d"] and n["staging_bytes"] == 3 * bpe and n["host_registered"]
    direct_loads = sum(1 for op in st.queue if op[0] == "copy" and not any(np.shares_memory(op[3], b)
                                                                            for b in st._stage)) // 3
    assert direct_loads * bpe == n["bytes_direct"]
    assert all(np.shares_memory(op[3], blob.data) for op in st.queue if op[0] == "copy"
               and not any(np.shares_memory(op[3], b) for b in st._stage))


class MappedSim(SimStreamer):
    """SimStreamer whose registered file the GPU could read (a mapped registration): only the device mode's
    preconditions are left to refuse it."""

    def _device_pointer(self, start):
        return start


@pytest.mark.parametrize("case", ["no kernels", "off", "hot", "small pool", "unmapped", "strided", "unaligned"])
def test_the_device_mode_says_why_not_and_the_host_decides(case):
    """Where the kernels cannot decide (no kernels, turned off, policy "hot", a pool smaller than a layer's
    experts, a file not mapped for kernels, experts not contiguous or not 16-byte aligned in it), the streamer
    says why in its stats and the host's path serves the fetches."""
    rng = np.random.default_rng(9)
    be = FAKE_BE if case == "no kernels" else SimpleNamespace(
        xp=np, K=SimpleNamespace(fast_ok=FAKE_BE.K.fast_ok, cache_lookup_kernel=None, CANDIDATES=8, LOOKUP_THREADS=1024,
                                 MAX_EXPERTS=512))
    E, blob = 8, Blob(1 << 20, align=1 if case == "unaligned" else 32)
    if case == "strided":                      # gate and up: views of one fused tensor (random_layer's layout)
        layers = [random_layer(rng, E=E, blob=blob) for _ in range(2)]
    else:
        layers = [(Weight(blob(rng, (E, 64, 136)), Q8, 128, "gate"), Weight(blob(rng, (E, 64, 136)), Q8, 128, "up"),
                   Weight(blob(rng, (E, 128, 68)), Q8, 64, "down")) for _ in range(2)]
    bpe = sum(w.raw[0].nbytes for w in layers[0])
    kw = dict(host_buffer=blob.data, host_register=True, on_device=False if case == "off" else None)
    if case == "hot":
        kw.update(policy="hot", hot_counts=rng.integers(0, 50, (2, E)))
    cls = SimStreamer if case == "unmapped" else MappedSim
    st = cls(be, (E // 2 if case == "small pool" else 2 * E) * bpe, 2, E, **kw)
    ids = np.array([[1, 5, 6]])
    *pools, slots = st.fetch(0, *layers[0], ids)
    check_slots(layers[0], pools, ids, slots)
    n = st.stats()
    why = {"no kernels": "no device kernels", "off": "turned off", "hot": "policy 'hot' decides on the host",
           "small pool": "fewer than a layer's 8 experts", "unmapped": "not mapped for kernels",
           "strided": "not contiguous", "unaligned": "16-byte boundaries"}[case]
    assert not n["on_device"] and why in n["device_why_not"], n["device_why_not"]
    assert n["host_registered"]


def test_pinnable_bytes_leaves_a_quarter_or_8_gib():
    GiB = 2 ** 30
    info = "MemFree:        1000 kB\nMemTotal:       {} kB\nBuffers: 0 kB\n"
    assert streaming.pinnable_bytes(info.format(128 * 2 ** 20)) == 96 * GiB          # 128 GiB: a quarter left
    assert streaming.pinnable_bytes(info.format(24 * 2 ** 20)) == 16 * GiB           # 24 GiB: 8 GiB left
    assert streaming.pinnable_bytes(info.format(6 * 2 ** 20)) == 0
    assert streaming.pinnable_bytes("MemFree: 5 kB\n") is None


@pytest.mark.parametrize("total_gib, setting, registered, why", [
    (64, None, True, ""),
    (8, None, False, r"the file \(0\.5 GiB\) is more than the RAM it may pin \(0\.0 GiB"),
    (None, None, False, r"RAM unknown"),
    (8, True, True, ""),                                    # on: the RAM check is skipped
    (64, False, False, r"turned off")])
def test_auto_registers_when_the_file_fits_in_ram(monkeypatch, total_gib, setting, registered, why):
    info = "" if total_gib is None else f"MemTotal: {total_gib * 2 ** 20} kB\n"
    monkeypatch.setattr(streaming, "_meminfo", lambda: info)
    rng = np.random.default_rng(9)
    big = np.zeros(2 ** 29, np.uint8)                        # 0.5 GiB, never touched but by the layers
    blob = Blob(1)
    blob.data = big
    layers = [random_layer(rng, blob=blob)]
    bpe = sum(w.raw[0].nbytes for w in layers[0])
    st = SimStreamer(FAKE_BE, 4 * bpe, 1, 8, host_buffer=big, host_register=setting)
    assert st.stats()["register_why_not"] == "not set up yet"
    *pools, slots = st.fetch(0, *layers[0], [[1, 2]])
    check_slots(layers[0], pools, [[1, 2]], slots)
    n = st.stats()
    assert n["host_registered"] == registered and re.match(why, n["register_why_not"])
    assert n["bytes_direct"] == (2 * bpe if registered else 0)


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


def mapped_read_only(path, layers, align: int = 1):
    """The layers' tensors written to one file at odd offsets (rounded up to `align`) and mapped back read-only
    (as GGUFFile maps a model): (the mapping, its uint8 array, the layers as Weights over it)."""
    import mmap
    offs, pos = [], 0
    with open(path, "wb") as f:
        for ws in layers:
            for w in ws:
                pos = -(-(pos + 13) // align) * align
                f.seek(pos)
                f.write(np.ascontiguousarray(w.raw).tobytes())
                offs.append(pos)
                pos += w.raw.nbytes
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    data = np.frombuffer(mm, np.uint8)
    it = iter(offs)
    out = [tuple(Weight(data[o:o + w.raw.nbytes].reshape(w.raw.shape), w.type, w.cols, w.name)
                 for w, o in zip(ws, it)) for ws in layers]
    return mm, data, out


@needs_gpu
@pytest.mark.parametrize("direct", [False, True], ids=["staged", "direct"])
@pytest.mark.parametrize("t", [GGMLType.Q4_0, GGMLType.Q8_0], ids=lambda t: t.name)
def test_gpu_pools_match_resident_experts(t, direct, tmp_path):
    """Through the real cupy path: the pools' bytes are the experts', and the gemv kernels on the pools
    with slot ids give the same bits as on the resident tensors with expert ids. A large matmul before
    each step's gemvs keeps the compute stream busy, so copies that did not wait for the previous
    readers (rule 2), or gemvs that did not wait for the copies (rule 1), would read the wrong bytes.
    direct: the experts lie in a read-only file mapping registered with CUDA (skipped at the end, after
    the staged fallback was checked, where CUDA refuses to register it)."""
    import cupy as cp
    from localmoe.backends.cuda import CUDABackend
    be = CUDABackend()
    rng = np.random.default_rng(int(t))
    L, E, H, I, k = 3, 8, 256, 128, 2
    layers = [(quantized(rng, (E, I, H), t), quantized(rng, (E, I, H), t), quantized(rng, (E, H, I), t))
              for _ in range(L)]
    bpe = sum(w.expert_nbytes() for w in layers[0])
    kw = {}
    if direct:
        mm, data, layers = mapped_read_only(tmp_path / "experts.bin", layers)
        kw = {"host_buffer": data, "host_register": True}
    st = ExpertStreamer(be, 4 * bpe, L, E, policy="lru", on_device=False, **kw)
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
    assert n["bytes_direct"] == (n["bytes_h2d"] if n["host_registered"] else 0)
    assert n["staging_bytes"] == (0 if n["host_registered"] else 3 * bpe)
    st.close()
    if direct and not n["host_registered"]:
        pytest.skip(f"CUDA refused to register the read-only mapping: {n['register_why_not']}")


@needs_gpu
@pytest.mark.parametrize("t", [GGMLType.Q4_0, GGMLType.Q8_0], ids=lambda t: t.name)
def test_device_mode_expert_ffn_matches_resident(t, tmp_path):
    """Decided on the device, with fast2's shapes (the hits run while the copy stream copies the misses, then
    the misses): expert_ffn gives the resident run's bits, eager and replayed from captured graphs, with a
    large matmul delaying the kernels of some steps (a miss read before its copy, or a copy into a slot still
    being read, would change the bits); layers 0 and 2 have a shared expert (in a slot of its own: folded
    into the same launches, as resident)."""
    import cupy as cp
    from localmoe.backends import DenseFFN
    from localmoe.backends.cuda import CUDABackend
    rng = np.random.default_rng()
    L, E, H, I, k = 4, 16, 256, 512, 4
    layers = [tuple(Weight(w.raw, w.type, w.cols, f"blk.{i}.ffn_{name}_exps") for w, name in
                    zip((quantized(rng, (E, I, H), t), quantized(rng, (E, I, H), t), quantized(rng, (E, H, I), t)),
                        ("gate", "up", "down"))) for i in range(L)]
    shared = [DenseFFN(quantized(rng, (I, H), t), quantized(rng, (I, H), t), quantized(rng, (H, I), t))
              if i % 2 == 0 else None for i in range(L)]
    mm, data, layers = mapped_read_only(tmp_path / "experts.bin", layers, align=32)
    bpe = sum(w.expert_nbytes() for w in layers[0])
    streamed, resident = CUDABackend(), CUDABackend()
    streamed.stream_experts(int(1.5 * E * bpe), L, E, "lfu", host_buffer=data, host_register=True)
    busy = cp.asarray(rng.standard_normal((4096, 4096)).astype(np.float32))
    weights = [cp.asarray(rng.random((3, k)).astype(np.float32)) for _ in range(L)]
    got, want = [], []
    for step in range(48):
        layer, graph = step % L, step >= 16
        n = 1 if graph else int(rng.integers(1, 4))
        x = cp.asarray(rng.standard_normal((n, H)).astype(np.float32))
        ids = cp.asarray(np.stack([rng.choice(E, k, replace=False) for _ in range(n)]).astype(np.int32))
        g, u, d = layers[layer]
        w, sh = weights[layer][:n], shared[layer]
        want.append(resident.expert_ffn(g, u, d, x, ids, w, shared=sh))
        if step % 3 == 0:
            _ = busy @ busy                                           # delays what follows
        if graph:                                                     # one key per layer: captured, then replayed
            y, = streamed.replay(("ffn", layer), lambda x, ids, g=g, u=u, d=d, w=w, sh=sh:
                                 (streamed.expert_ffn(g, u, d, x, ids, w, shared=sh),), cp.asnumpy(x), cp.asnumpy(ids))
            got.append(y)
        else:
            got.append(streamed.expert_ffn(g, u, d, x, ids, w, shared=sh))
    for i, (a, b) in enumerate(zip(got, want)):
        assert np.array_equal(cp.asnumpy(a), cp.asnumpy(b)), i
    n = streamed.streamer.stats()
    assert n["on_device"], n["device_why_not"]
    assert n["misses"] > 0 and n["hits"] > 0 and n["evictions"] > 0 and n["bytes_h2d"] == n["misses"] * bpe
    streamed.close()


@needs_gpu
def test_device_mode_guesses_from_the_layer_output_so_far(tmp_path):
    """With the next layers' routers set (next_experts), a decode token's guesses come after its hits: the
    routers read this layer's input plus its hits and its shared expert (the misses left out: they are still
    copying), bitwise what the resident backend gives with the misses' weights zeroed; the prefetch they start
    leaves every output the resident run's bits, and its targets go in (prefetch counters). Every fourth guess
    the host synchronizes first: the copy kernel, which waits for the targets, must give up on them, not hang."""
    import cupy as cp
    from localmoe.backends import DenseFFN
    from localmoe.backends.cuda import CUDABackend
    from localmoe.models.moe import Experts
    rng = np.random.default_rng()
    t, L, E, H, I, k = GGMLType.Q4_0, 4, 16, 256, 512, 4
    layers = [tuple(Weight(w.raw, w.type, w.cols, f"blk.{i}.ffn_{name}_exps") for w, name in
                    zip((quantized(rng, (E, I, H), t), quantized(rng, (E, I, H), t), quantized(rng, (E, H, I), t)),
                        ("gate", "up", "down"))) for i in range(L)]
    shared = [DenseFFN(quantized(rng, (I, H), t), quantized(rng, (I, H), t), quantized(rng, (H, I), t))
              for _ in range(L)]
    mm, data, layers = mapped_read_only(tmp_path / "experts.bin", layers, align=32)
    bpe = sum(w.expert_nbytes() for w in layers[0])
    streamed, resident = CUDABackend(), CUDABackend()
    streamed.stream_experts(int(1.5 * E * bpe), L, E, "lfu", host_buffer=data, host_register=True)
    routers = [Weight(rng.standard_normal((E, H)).astype(np.float32), GGMLType.F32, H, f"blk.{i}.ffn_gate_inp")
               for i in range(L)]
    streamed.next_experts = {i: (i + 1, Experts(routers[i + 1], *layers[i + 1])) for i in range(L - 1)}
    seen, guess0 = [], streamed._guess

    def guess(ahead, x, k):
        if len(seen) % 4 == 3:                        # a host that waits for the GPU before it enqueues the targets
            cp.cuda.Device().synchronize()            # (an eager first upload): the copy kernel stops waiting for them
        seen.append(cp.array(x))                      # (a plain x here: this test's inputs are not Normed)
        return guess0(ahead, x, k)
    streamed._guess = guess
    for step in range(24):
        layer = step % L
        g, u, d = layers[layer]
        x = cp.asarray(rng.standard_normal((1, H)).astype(np.float32))
        ids = cp.asarray(rng.choice(E, k, replace=False).astype(np.int32)[None])
        w = cp.asarray(rng.random((1, k)).astype(np.float32))
        n0 = len(seen)
        y = streamed.expert_ffn(g, u, d, x, ids, w, shared=shared[layer])
        assert np.array_equal(cp.asnumpy(y), cp.asnumpy(resident.expert_ffn(g, u, d, x, ids, w, shared=shared[layer])))
        if layer == L - 1:
            assert len(seen) == n0                    # no layer after it: no guess
            continue
        assert len(seen) == n0 + 1
        split = streamed.streamer._bufs[(layer, k + 1)][1]           # [2, k + 1]: the hits' slots, the misses'
        hit = cp.asnumpy(split[0, :k]) >= 0
        want = resident.expert_ffn(g, u, d, x, ids, w * cp.asarray(hit[None].astype(np.float32)),
                                   shared=shared[layer], residual=x)
        assert np.array_equal(cp.asnumpy(seen[-1]), cp.asnumpy(want)), step
    n = streamed.streamer.stats()
    assert n["misses"] > 0 and n["hits"] > 0 and n["prefetch_loads"] > 0, n
    streamed.close()


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
    assert "DMA" not in st.cache_line() and "staged" not in st.cache_line()
    st.expert_cache = SimStreamer(FAKE_BE, 1 << 20, 2, 8)     # not set up yet: says why it stages
    assert st.as_dict()["cache_direct_dma"] is False
    assert st.cache_line().endswith("; staged (not set up yet)")


def test_the_model_hands_its_mapped_file_to_the_streamer(request):
    """Model._place gives the streamer the file's whole mapping (the expert tensors lie in it: DMA'd
    directly) and Model.close() unregisters it before unmapping. A CPU backend stands in for the GPU."""
    try:
        scripted_gguf = request.getfixturevalue("scripted_gguf")
    except pytest.FixtureLookupError:            # the GPU machine runs this file with --noconftest
        pytest.skip("needs tests/conftest.py's scripted_gguf (run without --noconftest)")
    from localmoe.backends.cpu import CPUBackend
    from localmoe.model import Model

    class FakeGPU(CPUBackend):
        streamer = None

        def free_memory(self):
            return 64 * 2 ** 30

        def stream_experts(self, budget, n_layers, n_experts, policy="lfu", **kw):
            self.streamer = SimStreamer(FAKE_BE, budget, n_layers, n_experts, policy, **kw)

    be = FakeGPU()
    probe = Model(scripted_gguf)
    ex = next(L.experts for L in probe.net.layers if L.experts is not None)
    m = Model(scripted_gguf, backend=be, gpu_mem=2 * probe.config.n_experts * ex.bytes_per_expert, host_register=True)
    st = be.streamer
    assert m.placement.streams() and m.stats.expert_cache is st and st._host is m.file.data
    i, ex = next((i, L.experts) for i, L in enumerate(m.net.layers) if L.experts is not None)
    *pools, slots = st.fetch(i, ex.gate, ex.up, ex.down, [[0, 1]])
    check_slots((ex.gate, ex.up, ex.down), pools, [[0, 1]], slots)
    n = st.stats()
    assert n["host_registered"] and n["bytes_direct"] == n["bytes_h2d"] == 2 * ex.bytes_per_expert
    assert st.registered == [(m.file.data.ctypes.data, m.file.size)]
    assert "direct DMA from the mapped file" in m.stats.cache_line()
    m.close()
    assert st.registered == [] and len(st.unregistered) == 1 and m.file.data is None and st._host is None
