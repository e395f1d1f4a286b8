"""Routed experts streamed through a fixed pool of VRAM slots, for models whose experts do not fit.

Dense weights stay resident (CUDABackend.upload); the routed experts live in three device pools (gate,
up, down), each laid out exactly like a stored expert tensor [E, rows, row_bytes] but with S matrices
instead of E. A slot s holds one (layer, expert)'s three matrices at matrix index s of each pool, so the
gemv kernels run unchanged with `mats` = slot ids instead of expert ids. All MoE layers share the pools
(their expert tensors must have the same shapes and types). S = budget // bytes per expert
(`ExpertCache.for_budget`); localmoe/cache.py decides which expert occupies which slot, this module
moves the bytes from the memory-mapped GGUF (`w.raw[e]`) into the slot with cudaMemcpyAsync on a dedicated
non-blocking copy stream, so the copies overlap the kernels of the compute stream. Two ways:
- direct (when the model hands over its file's bytes, `host_buffer`): at the first fetch the whole mapping
  is registered with CUDA once (cudaHostRegister, read-only flag: the map is PROT_READ; one range, since
  neighbouring tensors share pages), so its pages are pinned and each matrix is DMA'd straight from the
  file's bytes: no host copy, no host wait. Pinning keeps the whole file in RAM, so by default
  (`host_register=None`) it is done only when the file leaves max(8 GiB, 25%) of MemTotal free
  (`pinnable_bytes`); False never registers, True skips that check. If CUDA refuses (a driver or device
  without read-only registration, say) the reason is kept (`stats()["register_why_not"]`) and every copy
  is staged. `close()` unregisters (after the copies in flight), before the file may be unmapped.
- staged (no buffer, not registered, or a weight outside the registered range): the host first copies
  the expert into one of a small ring of pinned staging buffers (this is where the file is read; allocated
  at the first staged copy), split over `copy_threads` threads (numpy releases the GIL). Measured on an
  H100 machine (16 cores; 14.2 MB Q4_0 experts from RAM, all misses): 8.0 GB/s end to end with one
  thread, 16.7 GB/s with four, 14.2 with eight; a pinned host -> device copy alone does 54 GB/s, the host
  copy alone 9.8 GB/s on one thread and 29.5 on four (the two share the host's memory bandwidth). The
  direct path has not been measured yet (bench/bench_cuda.py --gpu-mem compares the two).

Ordering (all on the device, through events; the host only blocks to reuse a staging buffer):
1. copy -> kernel: an event is recorded on the copy stream after each slot's copy; `fetch` makes the
   compute stream wait for the newest such event among the slots it returns (the copy stream is FIFO,
   so that one event covers every older copy), whether the copy was a demand miss issued now or a
   prefetch still in flight.
2. kernel -> copy: a copy into a slot must not start before the kernels reading its previous occupant
   are done. The caller enqueues its kernels on a fetch's slots before its next `fetch`; so at the
   start of each `fetch` one event is recorded on the compute stream and becomes the "free after"
   event of the previous fetch's slots, and a copy into a slot makes the copy stream wait for that
   slot's event first. The current fetch's slots have no such event yet; the cache pins them until the
   next lookup, so a `prefetch` issued meanwhile never copies into them.
3. staging (staged copies only): a staging buffer is refilled by the host only after the event recorded
   behind its last copy has completed (`host_waits` counts the times the host had to block). Direct
   copies read the file's bytes, which nothing writes.
The compute stream is cupy's current stream at each call: the backend's kernels must run on it, and
the calls must come from one stream (the waits of rule 1 are not repeated for a slot once done).
Host decisions per layer (which experts, which copies) mean a step that streams is captured as graph
segments cut at each MoE layer's ids (CUDABackend._capture): at replay the host reads each layer's ids,
fetches, and hands the slots to the segment that reads them. Pipelined (CUDABackend._run_segments), that
segment is already enqueued behind a device-side wait: `publish` writes the slots and then a flag on the
copy stream, behind the layer's copies, and `await_published` is the compute stream's wait for the flag, so
rule 1 holds without a host wait; the event of rule 2 is then one the caller recorded ahead (`readers_done`).

The device mode (the default where it can run, `device_why_not` says why not): kernels decide and copy, so
the host is out of the loop and a streamed decode step is one captured graph like a resident one. The file
is registered mapped as well as read-only, so the SMs can read it. Per MoE layer, on the compute stream:
- kernels.cache_lookup_kernel makes ExpertCache's LRU/LFU choices from the router's ids in device arrays
  (`device_cache_state`), and writes each id's slot, the slots split into hits and misses, and the misses;
- kernels.expert_copy_kernel copies the misses' matrices from the mapped file into their slots. With the
  `overlap`, it runs on the copy stream on `copy_blocks()` SMs: the layer's hits (and the shared expert,
  which sits in a slot of its own after the cache's, `_shared_slot`, and runs in the same launches) run
  meanwhile on the other SMs, and the misses after the compute stream waits for it.
- for one token, the next MoE layer's router guesses its experts from this layer's output so far: its input
  plus the hits and the shared expert, which run while the misses copy (`ahead`, `place`: on the demo the
  first target is asked for 0.71 of the time, against 0.58 from the input alone, bench/bench_guess.py);
  kernels.cache_target_kernel gives those not resident slots (at most kernels.PREFETCH_TARGETS), and the copy
  kernel's blocks, past the misses and once it has (a flag, waited for at most kernels.TARGETS_WAIT_NS), copy
  them 32 KB item by item while the misses compute and the next layer's attention
  runs: the link is otherwise idle then (the join is then a flag the blocks raise past the misses,
  kernels.await_ready_kernel, not the kernel's end). The next lookup stops them (a flag checked before each
  item) and copies only what its layer needs of them: a target it asks for is a miss that keeps
  its slot and resumes where the prefetch stopped; one it does not ask for keeps its prefix (`have`) for
  a later lookup to finish. A wrong guess thus costs no link time a demand copy needed, only the slot it
  took. Where none of the next layer's guesses is missing (its window would idle), the guess for the layer
  after it (that layer's router on the same state: its first target is asked for 0.50 of the time) picks the targets
  instead; they stay pinned through the next lookup, and the lookup of their layer finishes them.
Stream order is the ordering needed: the victims are never this layer's hits, and every earlier
layer's kernels are done before the lookup starts (a prefetch writes only its targets' slots, which no
kernel reads before the next layer's copy kernel, behind it on the copy stream). The one kernel beside the
copy kernel that changes the cache, cache_target_kernel, takes no slot whose `have` the copy kernel writes. LFU ages by
cache_tick_kernel after each step. Kernel copies read random experts at ~95% of a DMA's rate
(bench/bench_zero_copy.py), and the host's ~130 us per layer of deciding is gone. Policy "hot", a pool
smaller than a layer's experts, or an unmapped file keep the host's decisions above.

The device operations are the few `_methods` at the end, so tests/test_expert_streamer.py can run all
of the above on the CPU with a simulated copy stream. Nothing here imports cupy at module level.
"""
from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ...cache import CacheFullError, ExpertCache
from .. import Weight

N_STAGING = 3        # pinned staging buffers of one expert each: a miss's host read overlaps the last one's DMA
MIN_CHUNK = 1 << 20  # a host copy is split over threads in pieces of at least this many bytes
REGISTER_READ_ONLY = 0x08   # cudaHostRegisterReadOnly: needed to pin a PROT_READ mapping
REGISTER_MAPPED = 0x02      # cudaHostRegisterMapped: kernels may read it (the device mode's copies)
GiB = 1 << 30


def _describe(w: Weight) -> str:
    return f"{w.name or '?'} type {int(w.type)} cols {w.cols} {w.n_experts} x {w.raw[0].nbytes} B"


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _driver():
    from cuda.bindings import driver        # numba-cuda's own dependency: the stream memory operations
    return driver


def _check(result) -> None:
    err = result[0]
    if int(err) != 0:
        raise RuntimeError(f"CUDA driver error {err!r}")


def _distinct(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.unique(ids, return_inverse=True) (inverse flat) without numpy's fixed cost: a decode step has a
    handful of ids, and the host's time per layer is on the critical path of a streamed step."""
    flat = ids.ravel().tolist()
    uniq = sorted(set(flat))
    at = {e: i for i, e in enumerate(uniq)}
    return np.array(uniq, dtype=ids.dtype), np.array([at[e] for e in flat], np.intp)


def _write_value(stream, flag, value: int) -> None:
    """On `stream`, after everything before it: flag (a 1-element uint32 device array) := value."""
    _check(_driver().cuStreamWriteValue32(stream.ptr, flag.data.ptr, value, 0))


def _wait_value(stream, flag, value: int) -> None:
    """`stream` holds until flag >= value (cyclic 32-bit comparison: CU_STREAM_WAIT_VALUE_GEQ)."""
    _check(_driver().cuStreamWaitValue32(stream.ptr, flag.data.ptr, value, 0))


def stream_memops_why_not(xp) -> str:
    """'' when this GPU and driver run CUDA's stream memory operations (a flag written by one stream, waited
    for by another: the pipelined streamed replay), else why not."""
    try:
        flag, st = xp.zeros(1, np.uint32), xp.cuda.Stream(non_blocking=True)
        _write_value(st, flag, 1)
        _wait_value(st, flag, 1)
        st.synchronize()
        return "" if int(flag.get()[0]) == 1 else "the flag written by cuStreamWriteValue32 did not read back"
    except Exception as e:
        return f"no stream memory operations: {type(e).__name__}: {e}"


def raise_flags(xp, flags, value: int) -> None:
    """Set every flag to value from a stream of its own (error paths: nothing else may be waited for)."""
    st = xp.cuda.Stream(non_blocking=True)
    for f in flags:
        _write_value(st, f, value)
    st.synchronize()


def device_cache_state(xp, K, n_layers: int, n_experts: int, slots: int) -> dict:
    """An empty expert cache's state for kernels.cache_lookup_kernel (the comments above it name the arrays),
    with no prefetch record."""
    n_keys = n_layers * n_experts
    return dict(slot_of=xp.full(n_keys, -1, np.int32), key_of=xp.full(slots, -1, np.int32),
                score=xp.zeros(n_keys, np.float64), last=xp.zeros(slots, np.int64), pin=xp.zeros(slots, np.int64),
                state=xp.zeros(K.CACHE_STATE, np.int64), wt=xp.ones(1, np.float64), have=xp.zeros(slots, np.int32),
                pf=xp.full(K.PF_HEAD + 2 * n_layers * K.PF_WORDS, -1, np.int64))


def pinnable_bytes(meminfo: str) -> int | None:
    """How much of the host's RAM the mapped file may pin (/proc/meminfo's text): MemTotal less
    max(8 GiB, a quarter of it), left for everything else since pinned pages cannot be paged out.
    None when MemTotal is not there."""
    m = re.search(r"^MemTotal:\s+(\d+)\s*kB", meminfo, re.M)
    if m is None:
        return None
    total = int(m.group(1)) * 1024
    return max(0, total - max(8 * GiB, total // 4))


def _meminfo() -> str:
    try:
        with open("/proc/meminfo") as f:
            return f.read()
    except OSError:
        return ""


class ExpertStreamer:
    """Fetches (layer, expert) matrices into the slot pools on demand or ahead of need; see the module
    docstring. `budget_bytes` is the VRAM for the pools; `policy` and `cache_kw` go to ExpertCache;
    `copy_threads` host threads copy from the mapped file into the staging buffers. `host_buffer`: the
    whole mapped file as one uint8 array (GGUFFile.data), registered with CUDA at the first fetch when
    `host_register` allows it (None: if it fits in RAM, `pinnable_bytes`) so weights inside it are copied
    without staging; held until `close()`, which must come before the file is unmapped. `on_device`: the
    device mode (None: wherever it can run, `device_why_not` says why not; False: never)."""

    def __init__(self, be, budget_bytes: int, n_layers: int, n_experts: int, policy: str = "lfu", *,
                 copy_threads: int = 4, host_buffer: np.ndarray | None = None, host_register: bool | None = None,
                 on_device: bool | None = None, copy_blocks: int | None = None, **cache_kw):
        self.be, self.xp = be, be.xp
        self._copy_blocks = copy_blocks          # the device mode's copy kernel beside the hits (None: COPY_BLOCKS)
        self._threads = ThreadPoolExecutor(copy_threads) if copy_threads > 1 else None
        self.copy_threads = max(1, copy_threads)
        self.budget, self.n_layers, self.n_experts = int(budget_bytes), int(n_layers), int(n_experts)
        self.policy, self.cache_kw = policy, cache_kw
        self.cache: ExpertCache | None = None   # made with the pools, once the first layer's shapes are known
        self.pools: tuple = ()
        self.fast = False                        # every pool a uint32 view (the fast kernels' layout)
        self.bytes_h2d = self.bytes_direct = self.host_waits = 0
        if host_buffer is not None and (host_buffer.dtype != np.uint8 or not host_buffer.flags.c_contiguous):
            raise ValueError("host_buffer must be one contiguous uint8 array (the mapped file)")
        self._host, self.host_register = host_buffer, host_register
        self._host_range = (0, 0)                # [start, end) registered with CUDA
        self.host_registered, self.register_s, self.register_why_not = False, 0.0, "not set up yet"
        self._stage: list = []
        self._newest_copy = None                 # the event behind the last copy enqueued
        self.want_device, self.on_device = on_device, False
        self.device_why_not = "not set up yet"
        self._mapped_at = None                   # the registered file's device address, when kernels may read it

    # -- the calls the backend makes ------------------------------------------------------------------
    def fetch(self, layer: int, gate: Weight, up: Weight, down: Weight, ids_host: np.ndarray, readers_done=None):
        """Make layer `layer`'s experts `ids_host` (any shape, repeats allowed) resident and order the
        compute stream after their copies. Returns (pool_gate, pool_up, pool_down, slots): the device
        arrays to pass to gemv as the weight, and int32 slots shaped like ids_host. Kernels on these
        slots must be enqueued before the next `fetch` (rule 2 of the module docstring).
        readers_done: for a caller that enqueues kernels ahead of its fetches (a pipelined replay), an event
        recorded on the compute stream behind the kernels that read the previous fetch's slots (else one is
        recorded now); the compute stream is then not made to wait here: the caller's `publish` and
        `await_published` order it after the copies (rule 1)."""
        ws = self._host_decides(layer, gate, up, down)
        ids = np.asarray(ids_host)
        uniq, inv = _distinct(ids)
        self._release_previous(readers_done)
        try:
            slots, miss = self.cache.lookup(layer, uniq)
        except CacheFullError as e:
            raise CacheFullError(
                f"layer {layer} routes {len(uniq)} distinct experts, but the expert pool holds "
                f"{self.cache.capacity} ({self.budget} bytes of VRAM at {self.slot_bytes} bytes per expert): "
                f"raise the GPU memory for experts or run fewer tokens per batch ({e})") from e
        for e, s in zip(uniq[miss].tolist(), slots[miss].tolist()):
            self._copy_in(ws, e, s, layer)
        self._mark_ready()
        newest = max((self._ready[s] for s in slots.tolist()), default=(0, None), key=lambda r: r[0])
        if readers_done is None and newest[0] > self._compute_waited:   # rule 1: one wait covers every older copy
            self._wait(newest[1], on_copy=False)
            self._compute_waited = newest[0]
        self._last = slots
        return (*self.pools, slots[inv.reshape(-1)].reshape(ids.shape))

    def publish(self, dst, host: np.ndarray, flag, value: int) -> None:
        """On the copy stream, behind every copy enqueued so far: the pinned host array `host` -> the device
        array `dst` (e.g. the slots a pipelined fetch returned), then the 32-bit device word `flag` := value.
        The compute stream waits for that with `await_published(flag, value)`: rule 1 for every copy before."""
        self._h2d(dst, 0, host)
        self._set_flag(flag, value)

    def await_published(self, flag, value: int) -> None:
        """The compute stream runs nothing more until `publish` has set `flag` to value or later (no host wait)."""
        self._wait_flag(flag, value)

    def lookup_on_device(self, layer: int, gate: Weight, up: Weight, down: Weight, ids, shared=None,
                         overlap: bool = False, ahead=()):
        """The device mode: enqueue on the compute stream the cache's lookup of `ids` [n, k] (the int32 device
        array a router kernel wrote: nothing waits for the host), then the copies of its misses, both by kernels
        (kernels.cache_lookup_kernel, expert_copy_kernel). shared: the layer's shared expert (a DenseFFN), run
        as each token's product k + 1 from a slot of its own when it is stored like the routed experts (the
        first call uploads it). overlap: the copies go to the copy stream (after the lookup), so the compute
        stream can run the hits meanwhile; it must `join` before it reads the misses.
        ahead: for one token with overlap, the MoE layers the caller will guess the experts of, each (layer, its
        gate, up and down): the next one, and the one after it. Then the copy kernel goes on from the misses to
        the guessed experts that are not resident, until the next lookup stops it (that lookup finishes what it
        needs of them), and the caller gets `place`: it must call it once, before `join`, with the guesses (int32
        device ids [1, k] per layer of ahead), which enqueues kernels.cache_target_kernel: it gives those experts
        slots, and the copy kernel waits for it. So the guesses may come from what the caller computes while
        the misses copy (the hits). Where none of the next layer's guesses is missing, the layer after it's is
        the one prefetched.
        Returns the device int32 arrays (fixed per layer and size: a captured step replays them) mats (each
        product's slot) and split [2, len(mats)] (only the hits' and the shared expert's slots; only the
        misses'), what `join` waits for (None without overlap), whether the shared expert is in them, and
        `place` (None: no guesses); None when the host decides (`fetch`)."""
        ws = self._check(layer, gate, up, down)
        if not self.on_device:
            return None
        K, xp = self.be.K, self.xp
        n, k = ids.shape
        sslot = self._shared_slot(layer, shared)
        Q = n * (k + 1) if sslot >= 0 else n * k
        bufs = self._bufs.get((layer, Q))
        if bufs is None:
            bufs = self._bufs[(layer, Q)] = (xp.empty(Q, np.int32), xp.empty((2, Q), np.int32),
                                             xp.empty(3 * n * k, np.int32), xp.zeros(1, np.int32))
        mats, split, miss, nmiss = bufs
        d = self._dstate
        K.cache_lookup_kernel[1, K.LOOKUP_THREADS, K.STREAM[0]](
            ids.reshape(-1), k, sslot, layer * self.n_experts, self.n_experts, self.policy == "lfu", d["slot_of"],
            d["key_of"], d["score"], d["last"], d["pin"], d["state"], d["wt"], mats, split.reshape(-1), miss, nmiss,
            d["have"], self._items, d["pf"], layer)
        guessed = [(-1, (0, 0, 0))] * 2        # (layer, its sources) of each guess; -1: none
        # (the copy kernel waits for the targets: with every SM its own, the kernel placing them could not run)
        if ahead and overlap and n == 1 and self.copy_blocks() < self.be.sms:
            for i, (j, *w) in enumerate(ahead):
                guessed[i] = j, self._mapped_sources(j, self._check(j, *w))
        done = place = None
        if overlap:
            self._wait(self._record(on_copy=False), on_copy=True)
        # beside the hits: copy_blocks SMs (bench_zero_copy.py: as fast as all of them); alone: every SM
        K.expert_copy_kernel[self.copy_blocks() if overlap else self.be.sms, K.COPY_THREADS,
                             self._copy_launch if overlap else K.STREAM[0]](
            miss, nmiss, *self._mapped_sources(layer, ws), *self._pool_words, self._words, self._uvs, d["state"],
            d["pf"], layer, d["key_of"], d["have"], *(a for j, src in guessed for a in (j, *src)))
        self.be.launches += 2
        if overlap:
            done = "ready" if guessed[0][0] >= 0 else self._record(on_copy=True)
        if guessed[0][0] >= 0:
            def place(guesses):
                gs = [(j, g.reshape(-1)) for (j, _), g in zip(guessed, guesses)] + [(-1, miss)] * 2  # (unread)
                K.cache_target_kernel[1, K.LOOKUP_THREADS, K.STREAM[0]](
                    self.policy == "lfu", d["slot_of"], d["key_of"], d["score"], d["last"], d["pin"], d["state"],
                    d["have"], d["pf"], layer,
                    *(a for j, g in gs[:2] for a in (g, g.size if j >= 0 else 0, max(j, 0) * self.n_experts, j)))
                self.be.launches += 1
        return mats, split, done, sslot >= 0, place

    def copy_blocks(self) -> int:
        """Blocks of the device mode's copy kernel beside the hits, at most one an SM: the SMs the hits' gemvs
        cannot count on until `join` (a fused gemv block needs a whole SM's registers)."""
        return min(self.be.sms, self.be.K.COPY_BLOCKS if self._copy_blocks is None else self._copy_blocks)

    def join(self, done) -> None:
        """The compute stream waits (on the device) for the misses `lookup_on_device(overlap=True)` copies: the
        event behind them, or, where a prefetch follows them in the same kernel, its flag."""
        if done == "ready":
            K = self.be.K
            K.await_ready_kernel[1, 1, K.STREAM[0]](self._dstate["pf"], self._dstate["state"])
            self.be.launches += 1
        else:
            self._wait(done, on_copy=False)

    def prefetch(self, layer: int, gate: Weight, up: Weight, down: Weight, ids_host: np.ndarray) -> None:
        """Start copying layer `layer`'s predicted experts on the copy stream; nothing waits for them
        here (the host only if all staging buffers are busy). The cache chooses which are loaded."""
        self._load(self._host_decides(layer, gate, up, down), layer, ids_host, self.cache.prefetch)

    def admit(self, layer: int, gate: Weight, up: Weight, down: Weight, ids_host: np.ndarray) -> None:
        """Load experts outside the demand path, e.g. the hot policy's `cache.hot_keys` at start."""
        self._load(self._host_decides(layer, gate, up, down), layer, ids_host, self.cache.admit)

    def end_token(self, n: int = 1, ticked: bool = False) -> None:
        """A token (or a prefill batch of n) passed every layer: per-token counters, LFU aging (`tick`, unless the
        step did it: a captured step ticks in its graph, so the host launches nothing between two steps)."""
        if self.cache is not None:
            self.cache.end_token(n)
        if not ticked:
            self.tick(n)

    def tick(self, n: int = 1) -> None:
        """The device mode's LFU aging for n tokens: a kernel on the compute stream (no-op otherwise)."""
        if self.on_device and self.policy == "lfu":
            K = self.be.K
            K.cache_tick_kernel[1, K.THREADS, K.STREAM[0]](self._dstate["score"], self._dstate["wt"],
                                                           (1 / self.cache.decay) ** n)

    def stats(self) -> dict:
        """ExpertCache.stats() and what actually moved: bytes_h2d (host -> device copies), bytes_direct (of
        those, DMA'd straight from the registered file), host_waits (staging buffer still in flight), slots,
        slot_bytes (one expert), pool_bytes, staging_bytes; host_registered, register_s (the registration's
        seconds), register_why_not ('' when registered). In the device mode an expert a prefetch had begun
        counts as a miss (not a hit, as the host's cache counts it) and as a prefetch_hit, and bytes_demand /
        bytes_prefetch are what the copy kernel moved for each."""
        sb = getattr(self, "slot_bytes", 0)
        h2d, direct, kept = self.bytes_h2d, self.bytes_direct, None
        if self.on_device:                        # the device's counters (the host's cache only counts tokens)
            c = dict(zip(("clock", "filled", "lookup_no", "lookups", "hits", "misses", "evictions", "prefetched",
                          "found", "demand_vecs", "prefetch_vecs"), self._dstate["state"].get().tolist()))
            h2d = direct = 16 * (c["demand_vecs"] + c["prefetch_vecs"])
            kept = dict(lookups=c["lookups"], hits=c["hits"], misses=c["misses"], evictions=c["evictions"],
                        bytes_demand=16 * c["demand_vecs"], bytes_prefetch=16 * c["prefetch_vecs"],
                        prefetch_loads=c["prefetched"], prefetch_hits=c["found"], resident=c["filled"])
        n = self.cache.stats(kept) if self.cache is not None else {}
        slots = self.cache.capacity if self.cache is not None else 0
        n.update(bytes_h2d=h2d, bytes_direct=direct, host_waits=self.host_waits, slots=slots,
                 slot_bytes=sb, pool_bytes=slots * sb, staging_bytes=len(self._stage) * sb,
                 host_registered=self.host_registered, register_s=self.register_s,
                 register_why_not=self.register_why_not, on_device=self.on_device,
                 device_why_not=self.device_why_not)
        return n

    def close(self) -> None:
        """Unregister the mapped file once the copies in flight are done, let go of it (the mapping may
        be unmapped after this, not before) and stop the copy threads. Later copies are staged."""
        if self.host_registered:
            if self._newest_copy is not None:
                self._sync(self._newest_copy)     # a DMA may still read the pinned pages
            if self.on_device:
                self.xp.cuda.Device().synchronize()   # ... or a copy kernel
                self.on_device, self.device_why_not = False, "closed"
            self.host_registered, self.register_why_not = False, "closed"
            self._unregister(self._host_range[0])
        self._host = None
        if self._threads is not None:
            self._threads.shutdown(wait=False)
            self._threads = None

    def __del__(self):
        try:                                      # dropped without close(): unpin all the same
            self.close()
        except Exception:                         # e.g. at interpreter exit, the CUDA context already gone
            pass

    # -- internals ------------------------------------------------------------------------------------
    def _check(self, layer: int, *ws: Weight) -> tuple[Weight, ...]:
        """The weights, after checking they match the pools' layout (which the first call sets up)."""
        spec = tuple((int(w.type), w.cols, w.raw.shape[1:], w.raw.dtype.str, w.n_experts) for w in ws)
        if self.cache is None:
            self._setup(ws, spec)
        elif spec != self._spec:
            raise ValueError(f"layer {layer}'s experts ({'; '.join(map(_describe, ws))}) differ from the "
                             f"expert pool's layout ({'; '.join(self._names)}): every MoE layer must have "
                             f"the same expert shapes and types to share the slots")
        return ws

    def _setup(self, ws: tuple[Weight, ...], spec) -> None:
        """Allocate the pools and register the mapped file for this layout (the first fetch/prefetch/admit)."""
        if any(w.raw.ndim != 3 or w.n_experts != self.n_experts for w in ws):
            raise ValueError(f"expected expert tensors [{self.n_experts}, rows, row_bytes], got "
                             f"{'; '.join(map(_describe, ws))}")
        self.mat_bytes = [w.raw[0].nbytes for w in ws]
        self.slot_bytes = sum(self.mat_bytes)
        if self.budget < self.slot_bytes:
            raise CacheFullError(f"{self.budget} bytes of VRAM for experts hold no expert ({self.slot_bytes} "
                                 f"bytes each)")
        cache = ExpertCache.for_budget(self.budget, self.n_layers, self.n_experts, self.slot_bytes,
                                       policy=self.policy, **self.cache_kw)
        S = cache.capacity
        fasts = [bool(self.be.K.fast_ok(int(w.type), w.cols)) for w in ws]
        self._init_device()
        self._pin_host()
        self.device_why_not = self._device_why_not(ws, S)
        # the device mode keeps each layer's shared expert in a slot after the cache's S (_shared_slot)
        extra = 0 if self.device_why_not else self.n_layers
        self.pools = tuple(self._alloc((S + extra) * m, f) for m, f in zip(self.mat_bytes, fasts))
        self.fast = all(fasts)
        self._stage_ev: list = [None] * N_STAGING
        self._next_stage = 0
        self._ready = [(0, None)] * S          # slot -> (copy number, event after its last copy)
        self._free_after = [(0, None)] * S     # slot -> (fetch number, compute event after its readers)
        self._copies = self._compute_waited = 0
        self._unmarked: list[int] = []         # slots copied into since the last ready event (_mark_ready)
        self._sources: dict = {}               # layer -> (its weights, expert -> direct byte views or None)
        self._fetches = self._copy_waited = 0
        self._last = None                      # the previous fetch's slots
        self._spec, self._names = spec, [_describe(w) for w in ws]
        self.cache = cache
        if not self.device_why_not:
            self._setup_device(ws)

    def _pin_host(self) -> None:
        """Register the mapped file with CUDA when allowed (timed); else keep the reason: copies are staged."""
        why = self._why_not_register()
        if not why:
            start, n = _address(self._host), self._host.nbytes
            t0 = time.perf_counter()
            try:
                self._register(start, n)
            except Exception as e:             # any CUDA error: the staged path works everywhere
                why = f"cudaHostRegister failed: {e}"
            else:
                self.host_registered, self._host_range = True, (start, start + n)
                self._mapped_at = self._device_pointer(start)
            self.register_s = time.perf_counter() - t0
        self.register_why_not = why

    def _why_not_register(self) -> str:
        if self._host is None:
            return "no mapped file given"
        if self.host_register is False:
            return "turned off (host_register=False)"
        if self.host_register is None:
            room = pinnable_bytes(_meminfo())
            if room is None:
                return "RAM unknown (no MemTotal in /proc/meminfo)"
            if self._host.nbytes > room:
                return (f"the file ({self._host.nbytes / GiB:.1f} GiB) is more than the RAM it may pin "
                        f"({room / GiB:.1f} GiB: MemTotal less max(8 GiB, 25%))")
        return ""

    def _host_decides(self, layer: int, *ws: Weight) -> tuple[Weight, ...]:
        """_check, for the host's decisions (fetch, prefetch, admit): an error in the device mode, whose cache
        lives on the device (the host's ExpertCache would go out of step with it)."""
        ws = self._check(layer, *ws)
        if self.on_device:
            raise RuntimeError("this streamer's cache is decided on the device (lookup_on_device)")
        return ws

    def _device_why_not(self, ws, S: int) -> str:
        """'' when the device mode can run with S cache slots (after the registration), else why not."""
        if self.want_device is False:
            return "turned off (on_device=False)"
        if not hasattr(self.be.K, "cache_lookup_kernel"):
            return "no device kernels"
        if self.policy not in ("lru", "lfu"):
            return f"policy {self.policy!r} decides on the host"
        if S < self.n_experts:
            return (f"the pool's {S} slots hold fewer than a layer's {self.n_experts} experts "
                    f"(a lookup could find every slot pinned)")
        if S > self.be.K.CANDIDATES * self.be.K.LOOKUP_THREADS:
            return f"{S} slots (the lookup kernel ranks <= {self.be.K.CANDIDATES * self.be.K.LOOKUP_THREADS})"
        if self.n_experts > self.be.K.MAX_EXPERTS:
            return f"{self.n_experts} experts per layer (the lookup kernel takes <= {self.be.K.MAX_EXPERTS})"
        if any(m % 16 for m in self.mat_bytes):
            return "an expert matrix's bytes are not a multiple of 16"
        if self._mapped_at is None:
            return f"the file is not mapped for kernels ({self.register_why_not or 'registered without the mapped flag'})"
        if not self._in_file(ws):
            return "the experts are not contiguous inside the registered file"
        if any(_address(w.raw) % 16 for w in ws):
            return "the experts do not start at 16-byte boundaries in the file"
        return ""

    def _setup_device(self, ws) -> None:
        """The device mode's state (kernels.cache_lookup_kernel's arrays), empty like ExpertCache.clear()."""
        K = self.be.K
        self._dstate = device_cache_state(self.xp, self.be.K, self.n_layers, self.n_experts, self.cache.capacity)
        self._pool_words = tuple(p if p.dtype == np.uint32 else p.view(np.uint32) for p in self.pools)
        self._words = tuple(m // 4 for m in self.mat_bytes)
        self._items = K.expert_items(self._words)
        self._shared_in: set[int] = set()      # layers whose shared expert is in its slot
        self._bufs: dict = {}                  # (layer, ids) -> the lookup's mats, split, misses and their count
        self._copy_launch = self.be.cuda.external_stream(self._copy_stream.ptr)   # numba's handle on the copy stream
        # the copy kernel interleaves as it copies (a DMA cannot): the device mode's slots are interleaved
        self._uvs = tuple(K.UNIT_VECTORS[int(w.type)] if self.be.interleaved(w) else 0 for w in ws)
        self.on_device = True

    @property
    def interleaved(self) -> bool:
        """The slots hold interleaved matrices where their shapes allow: the device mode's copy kernel writes
        them so (a DMA cannot permute: the host's slots keep the file's order)."""
        return self.on_device

    def _in_file(self, ws) -> bool:
        """Each matrix's experts lie back to back inside the registered file (what expert_copy_kernel reads)."""
        return all(self._registered(w.raw) and w.raw.strides[0] == m for w, m in zip(ws, self.mat_bytes))

    def _shared_slot(self, layer: int, shared) -> int:
        """The slot of the layer's shared expert (after the cache's S), uploaded at the first call; -1 when there
        is none or it is not stored like the routed experts (then it runs apart)."""
        if shared is None:
            return -1
        ws = (shared.gate, shared.up, shared.down)
        if tuple((int(w.type), w.cols, w.raw.shape, w.raw.dtype.str) for w in ws) != tuple(
                (t, c, shape, dt) for t, c, shape, dt, _ in self._spec):
            return -1
        s = self.cache.capacity + layer
        if layer not in self._shared_in:
            for pool, w, m in zip(self._pool_words, ws, self._words):
                raw = np.ascontiguousarray(w.raw).reshape(-1).view(np.uint8)
                pool[s * m:(s + 1) * m].set((self.be.K.interleave(raw, int(w.type)) if self.be.interleaved(w)
                                             else raw).view(np.uint32))
            self._shared_in.add(layer)
        return s

    def _mapped_sources(self, layer: int, ws) -> tuple[int, ...]:
        """The device addresses of the layer's expert 0 of each matrix, in the registered file."""
        if not self._in_file(ws):
            raise ValueError(f"layer {layer}'s experts are not contiguous inside the registered file")
        return tuple(self._mapped_at + _address(w.raw) - self._host_range[0] for w in ws)

    def _registered(self, a: np.ndarray) -> bool:
        """a's bytes lie, contiguous, inside the registered range (so they can be DMA'd as they are)."""
        if not self.host_registered or not a.flags.c_contiguous:
            return False
        lo, hi = self._host_range
        return lo <= _address(a) and _address(a) + a.nbytes <= hi

    def _release_previous(self, readers_done=None) -> None:
        """Rule 2: the previous fetch's kernels are enqueued by now (and done at readers_done, if given);
        mark its slots free after them."""
        if self._last is not None:
            self._fetches += 1
            ev = self._record(on_copy=False) if readers_done is None else readers_done
            for s in self._last.tolist():
                self._free_after[s] = (self._fetches, ev)
            self._last = None

    def _load(self, ws, layer: int, ids_host, place) -> None:
        uniq = _distinct(np.asarray(ids_host))[0]
        slots, load = place(layer, uniq)
        for e, s in zip(uniq[load].tolist(), slots[load].tolist()):
            self._copy_in(ws, e, s, layer)
        self._mark_ready()

    def _direct_sources(self, layer: int, ws, e: int):
        """Expert e's matrices as byte views inside the registered file, or None (they are staged); cached
        per layer (its weights' addresses are looked up once, not at every miss)."""
        cache = self._sources.get(layer)
        if cache is None or any(a is not b for a, b in zip(cache[0], ws)):
            cache = self._sources[layer] = (ws, {})
        if e not in cache[1]:
            srcs = [w.raw[e] for w in ws]
            cache[1][e] = ([a.reshape(-1).view(np.uint8) for a in srcs] if all(map(self._registered, srcs))
                           else None)
        return cache[1][e]

    def _copy_in(self, ws, e: int, s: int, layer: int) -> None:
        """Expert e's gate, up and down matrices -> slot s of the pools: straight from the registered
        file, else through a staging buffer."""
        srcs = self._direct_sources(layer, ws, e) if self.host_registered else None
        b = None
        if srcs is not None:
            self.bytes_direct += self.slot_bytes
        else:
            b = self._fill_stage(ws, e)
            ends = np.cumsum(self.mat_bytes).tolist()
            srcs = [self._stage[b][end - m:end] for end, m in zip(ends, self.mat_bytes)]
        n, ev = self._free_after[s]
        if n > self._copy_waited:                 # rule 2: one wait covers every older fetch's readers
            self._wait(ev, on_copy=True)
            self._copy_waited = n
        for pool, m, src in zip(self.pools, self.mat_bytes, srcs):
            self._h2d(pool, s * m, src)
        self._unmarked.append(s)
        if b is not None:                         # rule 3: the buffer is reusable after this event
            self._stage_ev[b] = self._mark_ready()
        self.bytes_h2d += self.slot_bytes

    def _mark_ready(self):
        """Rule 1: one event behind the copies enqueued since the last one marks all their slots ready (the
        copy stream is FIFO); returns it (None if there were none)."""
        if not self._unmarked:
            return None
        ev = self._record(on_copy=True)
        self._copies += 1
        for s in self._unmarked:
            self._ready[s] = (self._copies, ev)
        self._unmarked.clear()
        self._newest_copy = ev
        return ev

    def _fill_stage(self, ws, e: int) -> int:
        """The next staging buffer (made at the first staged copy), once its last copy is done (rule 3),
        filled with expert e's matrices; its index."""
        if not self._stage:
            self._stage = [self._pinned(self.slot_bytes) for _ in range(N_STAGING)]
        b = self._next_stage
        self._next_stage = (b + 1) % N_STAGING
        if self._stage_ev[b] is not None and self._sync(self._stage_ev[b]):   # rule 3
            self.host_waits += 1
        self._read(self._stage[b], ws, e)
        return b

    def _read(self, stage: np.ndarray, ws, e: int) -> None:
        """Expert e's matrices -> stage, back to back (this reads the mapped file), in pieces over threads."""
        parts, off = [], 0
        for w, m in zip(ws, self.mat_bytes):
            src = w.raw[e].reshape(-1).view(np.uint8)
            step = max(-(-m // self.copy_threads), MIN_CHUNK)
            parts += [(stage[off + i:off + min(i + step, m)], src[i:i + step]) for i in range(0, m, step)]
            off += m
        if self._threads is None or self.slot_bytes < 2 * MIN_CHUNK:      # small: threads cost more
            for dst, src in parts:
                np.copyto(dst, src)
        else:
            for f in [self._threads.submit(np.copyto, dst, src) for dst, src in parts]:
                f.result()

    # -- device operations (cupy; the CPU tests override these) -----------------------------------------
    def _init_device(self) -> None:
        self._copy_stream = self.xp.cuda.Stream(non_blocking=True)   # never syncs with the legacy stream

    def _alloc(self, nbytes: int, fast: bool):
        """A pool: nbytes of device memory, uint32 words for the fast kernels, else bytes."""
        return self.xp.empty(nbytes // 4, np.uint32) if fast else self.xp.empty(nbytes, np.uint8)

    def _pinned(self, nbytes: int) -> np.ndarray:
        import cupyx
        return cupyx.empty_pinned(nbytes, np.uint8)

    def _h2d(self, pool, offset: int, src: np.ndarray) -> None:
        """Copy the pinned host bytes src (a staging buffer or the registered file) to byte `offset` of pool,
        asynchronously on the copy stream."""
        rt = self.xp.cuda.runtime
        rt.memcpyAsync(pool.data.ptr + offset, src.ctypes.data, src.nbytes, rt.memcpyHostToDevice,
                       self._copy_stream.ptr)

    def _register(self, start: int, nbytes: int) -> None:
        """Page-lock the host range [start, start + nbytes) for DMA (read-only: the mapping is PROT_READ), mapped
        for kernels too where CUDA allows it; raises on any CUDA error, naming whether the device supports
        read-only registration."""
        rt = self.xp.cuda.runtime
        try:
            try:
                rt.hostRegister(start, nbytes, REGISTER_READ_ONLY | REGISTER_MAPPED)
            except Exception:
                rt.hostRegister(start, nbytes, REGISTER_READ_ONLY)
        except Exception as e:
            try:
                ok = rt.deviceGetAttribute(113, rt.getDevice())   # cudaDevAttrHostRegisterReadOnlySupported
            except Exception:
                ok = "?"
            raise RuntimeError(f"{e} (cudaDevAttrHostRegisterReadOnlySupported = {ok})") from e

    def _device_pointer(self, start: int) -> int | None:
        """The device address kernels read the registered range at (None: not mapped for them)."""
        try:
            err, ptr = _driver().cuMemHostGetDevicePointer(start, 0)
        except Exception:                         # no cuda.bindings (the CPU tests' simulated device)
            return None
        return int(ptr) if int(err) == 0 else None

    def _unregister(self, start: int) -> None:
        self.xp.cuda.runtime.hostUnregister(start)

    def _set_flag(self, flag, value: int) -> None:
        _write_value(self._copy_stream, flag, value)

    def _wait_flag(self, flag, value: int) -> None:
        _wait_value(self._stream(False), flag, value)

    def _stream(self, on_copy: bool):
        return self._copy_stream if on_copy else self.xp.cuda.get_current_stream()

    def _record(self, on_copy: bool):
        """An event behind everything enqueued so far on the copy (or compute) stream."""
        ev = self.xp.cuda.Event(disable_timing=True)
        ev.record(self._stream(on_copy))
        return ev

    def _wait(self, ev, on_copy: bool) -> None:
        """The copy (or compute) stream runs nothing more until ev has completed (no host wait)."""
        self._stream(on_copy).wait_event(ev)

    def _sync(self, ev) -> bool:
        """The host waits for ev; True if it was not already done."""
        if ev.done:
            return False
        ev.synchronize()
        return True
