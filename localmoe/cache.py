"""Expert cache bookkeeping: which (layer, expert) weights occupy which slot of a fixed device pool.

When a model's routed experts do not fit in VRAM, the GPU backend keeps its dense weights resident and
a pool of `capacity_slots` equal-sized expert slots (`--gpu-mem` // bytes per expert); a routed expert
that is not in the pool is copied in from the memory-mapped GGUF (over PCIe, through pinned staging
buffers). This module decides *which* slot holds what, and counts what that costs. It never touches
memory: the backend owns the pool and the copy engine, and calls

    slots, miss = cache.lookup(layer, ids)      # before running layer `layer`'s experts `ids`
    for e, s in zip(ids[miss], slots[miss]):    # copy these in (stall: they are needed now)
        copy(layer, e, s)
    slots_p, load = cache.prefetch(layer + 1, predicted)   # optional, while `layer` computes
    ...
    cache.end_token()                           # after the token's last layer

so the same policy code runs (and is tested) on the CPU, and the bench (bench/bench_cache.py) replays
routing traces through it. Pure Python (dicts, an OrderedDict, a heap): a lookup of 4 experts took
16-36 us on the loaded 2-core dev machine (0.6-1.3 ms for a 36-layer token: hidden behind PCIe time
while misses are frequent, but not negligible next to the ~1.2 ms HBM time of a fully cached token).

Policies (the bench measures them; docs/PERFORMANCE.md "Expert cache policy (simulated)"):
- "lru": evict the least recently used expert. Decode reuses a token's experts at the next tokens
  (routing has temporal locality), and LRU needs no tuning.
- "lfu": evict the expert with the smallest decayed use count (ties: least recently used). The count
  survives eviction (history over every (layer, expert)) and decays by `decay` per token, so it tracks
  the skew of routing (some experts are chosen far more often) without freezing an old prompt's set.
- "hot": a static hot set plus LRU. `hot_fraction` of the slots are reserved for the most used
  (layer, expert) pairs of a measured profile (`hot_counts` [layers, experts], e.g. from
  `python -m train.eval --write-routing` or a previous run's stats), chosen globally so skewed layers
  get more; once loaded they are never evicted. The rest of the pool is LRU. Rationale: routing
  frequencies are skewed and stable across prompts, so the frequent experts should never be pushed
  out by a burst of rare ones (LRU's weakness), while the hot set costs no bookkeeping per use and
  its slots can be filled once at start (`admit(layer, hot_experts)`); LRU keeps the recency benefit
  for the rest. `hot_fraction` 0.75 was the best of 0.25..0.9 on the bench's skewed traces.
Measured (bench/bench_cache.py, docs/PERFORMANCE.md): on the demo model's replayed routing "lfu" wins at
every cache size (LRU thrashes when the pool holds less than a token's experts); on a synthetic Zipf
trace with temporal locality "hot" wins; on uniform routing no policy beats the cache share. Pass
policy="lfu" until real Small 4 routing has been replayed ("lru", the default, is the baseline).

Pinning: `lookup` pins the slots it returns until the next `lookup` (or `release()`), so a `prefetch`
issued while that layer runs can never evict what it reads; `pin`/`unpin` hold slots longer.
A prefetch never evicts what another prefetch loaded for a layer not looked up since (prefetching
several layers ahead is safe); once that layer's lookup has passed, an unused prefetch is fair game.
The pins are bookkeeping only: on an asynchronous device the backend must still order a copy into a
slot after the kernels that read the slot's previous expert (an event per slot), and a kernel after the
prefetch copy that filled its slot.
"""
from __future__ import annotations

import heapq
from collections import OrderedDict

import numpy as np

POLICIES = ("lru", "lfu", "hot")
COUNTERS = ("tokens", "lookups", "hits", "misses", "prefetch_loads", "prefetch_hits", "prefetch_wasted",
            "prefetch_dropped", "admits", "evictions", "bytes_demand", "bytes_prefetch", "bytes_admit")


class CacheFullError(RuntimeError):
    """A lookup needs more slots than the pool has unpinned: the pool is too small for one layer."""


# -- policies: they only order the evictable slots; ExpertCache owns the mapping ----------------------
class _LRU:
    """Recency order of the evictable slots (oldest first)."""

    def __init__(self, cache: ExpertCache):
        self.order: OrderedDict[int, None] = OrderedDict()

    def reserved(self, key: int) -> int | None:        # a slot set aside for this key (hot policy)
        return None

    def admitted(self, slot: int, key: int, demand: bool) -> None:
        self.order[slot] = None

    def used(self, slot: int, key: int) -> None:       # a demand hit
        self.order.move_to_end(slot)

    def touched(self, slot: int, key: int) -> None:    # a prefetch of a resident entry: soon needed
        self.order.move_to_end(slot)

    def removed(self, slot: int) -> None:
        del self.order[slot]

    def evictable(self, blocked: set[int]) -> int:
        return len(self.order) - sum(1 for s in blocked if s in self.order)

    def victim(self, blocked: set[int]) -> int | None:
        for s in self.order:
            if s not in blocked:
                return s
        return None

    def tick(self, n: int) -> None:
        pass


class _LFU:
    """Decayed use counts per (layer, expert), kept across evictions. Instead of multiplying every count
    by `decay` each token, each use adds decay**-t (t = tokens so far): the same order, and a token costs
    nothing; counts are rescaled before they overflow. The victim (lowest count, then least recent) comes
    from a heap with lazy deletion: each use pushes a new entry, stale ones are skipped."""

    def __init__(self, cache: ExpertCache):
        if not 0 < cache.decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {cache.decay}")
        self.score = [0.0] * (cache.n_layers * cache.n_experts)
        self.key = [-1] * cache.capacity                  # slot -> key
        self.last = [0] * cache.capacity                  # slot -> clock of its last use or touch
        self.heap: list[tuple[float, int, int]] = []      # (score, last, slot)
        self.clock, self.weight, self.growth, self.n = 0, 1.0, 1 / cache.decay, 0

    def reserved(self, key: int) -> int | None:
        return None

    def admitted(self, slot: int, key: int, demand: bool) -> None:
        self.key[slot] = key
        self.n += 1
        self._use(slot, key, demand)

    def used(self, slot: int, key: int) -> None:
        self._use(slot, key, True)

    def touched(self, slot: int, key: int) -> None:     # recency only: a prediction is not a use
        self._use(slot, key, False)

    def _use(self, slot: int, key: int, count: bool) -> None:
        if count:
            self.score[key] += self.weight
        self.clock += 1
        self.last[slot] = self.clock
        heapq.heappush(self.heap, (self.score[key], self.clock, slot))
        if len(self.heap) > 4 * len(self.key) + 64:
            self._rebuild()

    def _rebuild(self) -> None:
        self.heap = [(self.score[k], self.last[s], s) for s, k in enumerate(self.key) if k >= 0]
        heapq.heapify(self.heap)

    def removed(self, slot: int) -> None:
        self.key[slot] = -1
        self.n -= 1

    def evictable(self, blocked: set[int]) -> int:
        return self.n - len(blocked)                    # blocked slots are always resident

    def victim(self, blocked: set[int]) -> int | None:
        aside, found = [], None
        while self.heap:
            entry = heapq.heappop(self.heap)
            score, last, s = entry
            if self.key[s] < 0 or self.last[s] != last:
                continue                                # stale: evicted, or used since
            if s in blocked:
                aside.append(entry)
                continue
            found = s
            break
        for entry in aside:
            heapq.heappush(self.heap, entry)
        return found

    def tick(self, n: int) -> None:
        self.weight *= self.growth ** n
        if self.weight > 1e200:
            self.score = [x / self.weight for x in self.score]
            self.weight = 1.0
            self._rebuild()


class _Hot(_LRU):
    """Slots 0..H-1 reserved for the H hottest keys of the profile; the other slots are LRU."""

    def __init__(self, cache: ExpertCache):
        super().__init__(cache)
        counts = cache.hot_counts
        if counts is None:
            raise ValueError('policy "hot" needs hot_counts [n_layers, n_experts] (a measured profile)')
        counts = np.asarray(counts, np.float64)
        if counts.shape != (cache.n_layers, cache.n_experts):
            raise ValueError(f"hot_counts has shape {counts.shape}, expected {(cache.n_layers, cache.n_experts)}")
        if not 0 <= cache.hot_fraction < 1:
            raise ValueError(f"hot_fraction must be in [0, 1), got {cache.hot_fraction}")
        flat = counts.ravel()
        h = min(int(cache.hot_fraction * cache.capacity), int((flat > 0).sum()))
        order = np.argsort(-flat, kind="stable")[:h]     # hottest first; ties: lower key
        self.hot = {int(k): i for i, k in enumerate(order)}

    def reserved(self, key: int) -> int | None:
        return self.hot.get(key)

    def admitted(self, slot: int, key: int, demand: bool) -> None:
        if slot >= len(self.hot):
            self.order[slot] = None

    def used(self, slot: int, key: int) -> None:
        if slot >= len(self.hot):
            self.order.move_to_end(slot)

    touched = used

    def removed(self, slot: int) -> None:
        if slot >= len(self.hot):
            del self.order[slot]


_POLICY = {"lru": _LRU, "lfu": _LFU, "hot": _Hot}


class ExpertCache:
    """Maps (layer, expert) -> slot in a pool of `capacity_slots` slots, and counts hits, misses,
    prefetches and the bytes they move host -> device (`bytes_per_expert` each).

    `decay` (lfu): per-token decay of the use counts (0.99: half-life ~69 tokens).
    `hot_counts`, `hot_fraction` (hot): the profile the hot set is chosen from, and the share of slots
    it may take."""

    def __init__(self, capacity_slots: int, n_layers: int, n_experts: int, policy: str = "lru",
                 bytes_per_expert: int = 0, *, decay: float = 0.99, hot_counts=None, hot_fraction: float = 0.75):
        if policy not in _POLICY:
            raise ValueError(f"unknown policy {policy!r}: one of {', '.join(POLICIES)}")
        if capacity_slots < 1 or n_layers < 1 or n_experts < 1 or bytes_per_expert < 0:
            raise ValueError("capacity_slots, n_layers and n_experts must be >= 1, bytes_per_expert >= 0")
        self.capacity, self.n_layers, self.n_experts = int(capacity_slots), int(n_layers), int(n_experts)
        self.policy, self.bytes_per_expert = policy, int(bytes_per_expert)
        self.decay, self.hot_counts, self.hot_fraction = decay, hot_counts, hot_fraction
        self.clear()

    @classmethod
    def for_budget(cls, budget_bytes: int, n_layers: int, n_experts: int, bytes_per_expert: int, **kw) -> ExpertCache:
        """As many slots as `budget_bytes` (VRAM left for experts) holds, at most every expert."""
        slots = min(int(budget_bytes) // int(bytes_per_expert), n_layers * n_experts)
        return cls(slots, n_layers, n_experts, bytes_per_expert=bytes_per_expert, **kw)

    # -- state -------------------------------------------------------------------------------------
    def clear(self) -> None:
        """Empty the pool and zero the counters."""
        self._p = _POLICY[self.policy](self)
        n_hot = len(getattr(self._p, "hot", ()))
        self._slot: dict[int, int] = {}                   # key -> slot
        self._key = [-1] * self.capacity                   # slot -> key (-1: free)
        self._fresh: set[int] = set()                      # loaded by prefetch, not demanded yet
        self._ahead: dict[int, set[int]] = {}              # layer -> its fresh slots, until its lookup
        self._free = list(range(self.capacity - 1, n_hot - 1, -1))   # pop() gives the lowest slot
        self._pinned: set[int] = set()                     # the last lookup's slots
        self._held: set[int] = set()                       # pin()
        self.reset()

    def reset(self) -> None:
        """Zero the counters; the pool keeps its contents."""
        self._n = dict.fromkeys(COUNTERS, 0)

    def stats(self, kept: dict | None = None) -> dict:
        """The counters, and derived rates: hit_rate (of demand lookups; prefetched entries found
        resident count as hits, and as prefetch_hits), per-token figures over `tokens` (end_token calls).
        kept: counters (and `resident`) kept elsewhere, in place of this cache's (the GPU's, when kernels
        make these decisions: backends/cuda/streaming.py)."""
        n = dict(self._n, resident=len(self._slot))
        n.update(kept or {})
        n["bytes_moved"] = n["bytes_demand"] + n["bytes_prefetch"] + n["bytes_admit"]
        n["hit_rate"] = n["hits"] / n["lookups"] if n["lookups"] else float("nan")
        n["prefetch_accuracy"] = n["prefetch_hits"] / n["prefetch_loads"] if n["prefetch_loads"] else float("nan")
        t = n["tokens"]
        for k in ("misses", "prefetch_loads", "bytes_demand", "bytes_prefetch", "bytes_moved"):
            n[f"{k}_per_token"] = n[k] / t if t else float("nan")
        n["capacity"] = self.capacity
        return n

    def _k(self, layer: int, e: int) -> int:
        if not (0 <= layer < self.n_layers and 0 <= e < self.n_experts):
            raise IndexError(f"(layer {layer}, expert {e}) outside {self.n_layers} x {self.n_experts}")
        return layer * self.n_experts + e

    def slot(self, layer: int, expert: int) -> int:
        """The expert's slot, or -1; marks nothing."""
        return self._slot.get(self._k(layer, int(expert)), -1)

    def table(self) -> np.ndarray:
        """int32 [n_layers, n_experts]: each expert's slot or -1 (for a kernel that gathers by id)."""
        t = np.full(self.n_layers * self.n_experts, -1, np.int32)
        if self._slot:
            t[list(self._slot)] = list(self._slot.values())
        return t.reshape(self.n_layers, self.n_experts)

    @property
    def hot_keys(self) -> list[tuple[int, int]]:
        """(layer, expert) of the hot set in slot order (policy "hot"; else empty): what to admit at start."""
        return [divmod(k, self.n_experts) for k in getattr(self._p, "hot", {})]

    # -- the calls a backend makes -------------------------------------------------------------------
    def lookup(self, layer: int, experts) -> tuple[np.ndarray, np.ndarray]:
        """Demand access before running `layer` with `experts` (distinct ids): (slots int32, miss bool),
        both aligned with `experts`. The missing ones are given slots (evicting per policy) and must be
        copied in now. Releases the previous lookup's pins and pins these slots."""
        ids = self._ids(experts)
        base = self._layer(layer) * self.n_experts
        found = [self._slot.get(base + e) for e in ids]
        need = [i for i, s in enumerate(found) if s is None]
        pinned = {s for s in found if s is not None}       # hits are pinned before any eviction
        if need:
            blocked = pinned | self._held
            short = sum(1 for i in need if self._p.reserved(base + ids[i]) is None)
            free = len(self._free) + self._p.evictable(blocked)
            if short > free:
                raise CacheFullError(f"layer {layer} needs {short} slots more; {free} of {self.capacity} are "
                                     f"free or evictable")
        n = self._n
        self._ahead.pop(layer, None)                       # its prefetches have had their chance
        for i, s in enumerate(found):
            if s is not None:
                self._p.used(s, base + ids[i])
                if s in self._fresh:
                    self._fresh.discard(s)
                    n["prefetch_hits"] += 1
        for i in need:
            s = found[i] = self._place(base + ids[i], blocked, demand=True)
            blocked.add(s)
            pinned.add(s)
        self._pinned = pinned
        n["lookups"] += len(ids)
        n["hits"] += len(ids) - len(need)
        n["misses"] += len(need)
        n["bytes_demand"] += len(need) * self.bytes_per_expert
        miss = np.zeros(len(ids), bool)
        miss[need] = True
        return np.array(found, np.int32), miss

    def prefetch(self, layer: int, experts) -> tuple[np.ndarray, np.ndarray]:
        """Load `layer`'s predicted experts ahead of need (the copy overlaps compute): (slots int32, load
        bool) aligned with `experts`; copy those with load. Resident ones are only refreshed. Never evicts
        a pinned slot or a prefetch whose layer has not been looked up since; where no slot can be had it is dropped
        (slot -1, counted in prefetch_dropped). Counts no demand hit or miss."""
        blocked = self._pinned | self._held
        for pending in self._ahead.values():
            blocked |= pending
        slots, load = self._load_soft(layer, experts, blocked, touch=True)
        new = set(slots[load].tolist())
        self._fresh |= new
        self._ahead.setdefault(layer, set()).update(new)
        k = len(new)
        self._n["prefetch_dropped"] += int(np.count_nonzero(slots < 0))
        self._n["prefetch_loads"] += k
        self._n["bytes_prefetch"] += k * self.bytes_per_expert
        return slots, load

    def admit(self, layer: int, experts) -> tuple[np.ndarray, np.ndarray]:
        """Load experts outside the demand path (at start: the hot set, or a profile's favourites): like
        prefetch, but counted as admits, and dropped silently rather than evicting pinned slots."""
        slots, load = self._load_soft(layer, experts, self._pinned | self._held, touch=False)
        k = int(np.count_nonzero(load))
        self._n["admits"] += k
        self._n["bytes_admit"] += k * self.bytes_per_expert
        return slots, load

    def _load_soft(self, layer: int, experts, blocked: set, touch: bool) -> tuple[np.ndarray, np.ndarray]:
        """Place absent experts without evicting `blocked` slots (slot -1 where none can be had); resident
        ones keep their slot (refreshed in the policy if `touch`). Returns (slots int32, newly loaded)."""
        ids = self._ids(experts)
        base = self._layer(layer) * self.n_experts
        slots = np.full(len(ids), -1, np.int32)
        load = np.zeros(len(ids), bool)
        blocked = set(blocked)
        for i, e in enumerate(ids):
            key = base + e
            s = self._slot.get(key)
            if s is None:
                s = self._place(key, blocked, demand=False, soft=True)
                if s < 0:
                    continue
                load[i] = True
            elif touch:
                self._p.touched(s, key)
            slots[i] = s
            blocked.add(s)
        return slots, load

    def end_token(self, n: int = 1) -> None:
        """A token (or a prefill batch of n) has passed every layer: per-token counters, LFU aging."""
        self._n["tokens"] += n
        self._p.tick(n)

    def release(self) -> None:
        """Drop the last lookup's pins (lookup does this itself)."""
        self._pinned = set()

    def pin(self, layer: int, experts) -> None:
        """Hold these resident experts until unpin (absent ones are ignored)."""
        for e in self._ids(experts):
            s = self._slot.get(self._layer(layer) * self.n_experts + e)
            if s is not None:
                self._held.add(s)

    def unpin(self, layer: int | None = None, experts=None) -> None:
        """Release pin()'s hold on these experts, or on all with no arguments."""
        if layer is None:
            self._held = set()
            return
        for e in self._ids(experts):
            self._held.discard(self._slot.get(self._layer(layer) * self.n_experts + e, -1))

    def evict(self, layer: int, experts) -> None:
        """Drop these experts if resident and not pinned (the backend needs the VRAM back)."""
        for e in self._ids(experts):
            s = self._slot.get(self._layer(layer) * self.n_experts + e)
            if (s is not None and s not in self._pinned and s not in self._held
                    and self._p.reserved(self._key[s]) is None):
                self._drop(s)
                self._free.append(s)

    # -- internals -------------------------------------------------------------------------------------
    def _layer(self, layer: int) -> int:
        if not 0 <= layer < self.n_layers:
            raise IndexError(f"layer {layer} outside 0..{self.n_layers - 1}")
        return layer

    def _ids(self, experts) -> list[int]:
        ids = list(experts) if isinstance(experts, (list, tuple)) else np.asarray(experts).ravel().tolist()
        if ids and (min(ids) < 0 or max(ids) >= self.n_experts):
            raise IndexError(f"expert ids {ids} outside 0..{self.n_experts - 1}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"experts must be distinct, got {ids}")
        return ids

    def _place(self, key: int, blocked: set[int], demand: bool, soft: bool = False) -> int:
        """A slot for key: its reserved slot, a free one, or the policy's victim (evicted)."""
        s = self._p.reserved(key)
        if s is None:
            if self._free:
                s = self._free.pop()
            else:
                s = self._p.victim(blocked)
                if s is None:
                    if soft:
                        return -1
                    raise CacheFullError("no evictable slot")
                self._drop(s)
                self._n["evictions"] += 1
        self._slot[key] = s
        self._key[s] = key
        self._p.admitted(s, key, demand)
        return s

    def _drop(self, s: int) -> None:
        if s in self._fresh:
            self._fresh.discard(s)
            self._n["prefetch_wasted"] += 1
            for pending in self._ahead.values():
                pending.discard(s)
        del self._slot[self._key[s]]
        self._key[s] = -1
        self._p.removed(s)
