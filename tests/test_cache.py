"""localmoe/cache.py: the expert cache's slot bookkeeping, checked on hand-made traces and against a
brute-force LRU on random ones. Pure Python; no model, no device."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from localmoe.cache import POLICIES, CacheFullError, ExpertCache

BPE = 1000


def hot_profile(n_layers, n_experts, seed=0):
    return np.random.default_rng(seed).integers(0, 50, (n_layers, n_experts))


def make(policy, cap, L, E, **kw):
    if policy == "hot":
        kw.setdefault("hot_counts", hot_profile(L, E))
    return ExpertCache(cap, L, E, policy, BPE, **kw)


class RefLRU:
    """Brute force: a key -> time-of-last-use dict; a group's hits are used first, then each miss evicts
    the key with the oldest use outside the group."""

    def __init__(self, cap):
        self.cap, self.last, self.t = cap, {}, 0

    def access(self, group):
        hits = [k in self.last for k in group]
        for k, h in zip(group, hits):
            if h:
                self.t += 1
                self.last[k] = self.t
        for k, h in zip(group, hits):
            if not h:
                if len(self.last) == self.cap:
                    victim = min((t, v) for v, t in self.last.items() if v not in group)[1]
                    del self.last[victim]
                self.t += 1
                self.last[k] = self.t
        return hits


def check_consistent(c: ExpertCache):
    t = c.table()
    slots = t[t >= 0]
    assert len(slots) == len(set(slots.tolist())) <= c.capacity
    assert slots.size == 0 or (slots.min() >= 0 and slots.max() < c.capacity)
    assert c.stats()["resident"] == len(slots)


# -- hand-made traces ------------------------------------------------------------------------------------
def test_lru_hand_trace_counts_and_evicts_least_recent():
    c = ExpertCache(3, 1, 8, "lru", BPE)
    seq = [0, 1, 2, 0, 3, 1, 0, 4]
    #      m  m  m  h  m(-1) m(-2) h m(-3)
    miss = [bool(c.lookup(0, [e])[1][0]) for e in seq]
    assert miss == [True, True, True, False, True, True, False, True]
    s = c.stats()
    assert (s["hits"], s["misses"], s["evictions"], s["lookups"]) == (2, 6, 3, 8)
    assert sorted(e for e in range(8) if c.slot(0, e) >= 0) == [0, 1, 4]
    assert s["bytes_demand"] == s["bytes_moved"] == 6 * BPE


def test_evicted_slot_is_reused_and_slots_are_stable():
    c = ExpertCache(2, 2, 4, "lru", BPE)
    (a,), _ = c.lookup(0, [1])
    (b,), _ = c.lookup(1, [1])
    assert {a, b} == {0, 1}
    assert c.lookup(0, [1])[0][0] == a                   # a hit keeps its slot
    (d,), miss = c.lookup(1, [3])                        # evicts (1, 1), the least recent
    assert miss[0] and d == b and c.slot(1, 1) == -1 and c.slot(0, 1) == a


def test_group_lookup_counts_exactly():
    c = ExpertCache(4, 2, 8, "lru", BPE)
    slots, miss = c.lookup(0, np.array([3, 5], np.int16))
    assert miss.tolist() == [True, True] and len(set(slots.tolist())) == 2
    slots2, miss2 = c.lookup(0, [5, 6])
    assert miss2.tolist() == [False, True] and slots2[0] == slots[1]
    c.end_token()
    c.lookup(1, [0, 1])                                   # cache full: 3, 5, 6, 0 -> evicts 3 for 1
    c.end_token()
    s = c.stats()
    assert (s["lookups"], s["hits"], s["misses"], s["tokens"]) == (6, 1, 5, 2)
    assert s["misses_per_token"] == 2.5 and s["bytes_moved_per_token"] == 2.5 * BPE
    assert c.slot(0, 3) == -1 and c.slot(0, 5) >= 0


def test_a_lookup_never_evicts_its_own_experts():
    c = ExpertCache(4, 1, 8, "lru", BPE)
    c.lookup(0, [0, 1, 2, 3])
    slots, miss = c.lookup(0, [4, 0, 5, 1])               # 0, 1 hit; 4, 5 must evict 2, 3 (not 0, 1)
    assert miss.tolist() == [True, False, True, False]
    assert sorted(e for e in range(8) if c.slot(0, e) >= 0) == [0, 1, 4, 5]


def test_lookup_larger_than_the_pool_raises_before_changing_anything():
    c = ExpertCache(3, 1, 8, "lru", BPE)
    c.lookup(0, [0])
    with pytest.raises(CacheFullError):
        c.lookup(0, [1, 2, 3, 4])
    assert c.stats()["lookups"] == 1 and c.slot(0, 0) >= 0
    c.pin(0, [0])
    c.lookup(0, [1, 2])
    with pytest.raises(CacheFullError):                   # 0 is held: only 2 slots to spare
        c.lookup(0, [3, 4, 5])


def test_bad_ids_are_refused():
    c = ExpertCache(3, 2, 4)
    for layer, ids in ((2, [0]), (-1, [0]), (0, [4]), (0, [-1])):
        with pytest.raises(IndexError):
            c.lookup(layer, ids)
    with pytest.raises(ValueError):
        c.lookup(0, [1, 1])
    with pytest.raises(ValueError):
        ExpertCache(3, 2, 4, "fifo")
    with pytest.raises(ValueError):
        ExpertCache(3, 2, 4, "hot")                       # needs a profile


# -- prefetch and pinning ------------------------------------------------------------------------------
def test_prefetch_counts_loads_and_prefetch_hits_not_demand():
    c = ExpertCache(8, 2, 8, "lru", BPE)
    c.lookup(0, [0, 1])
    slots, load = c.prefetch(1, [2, 3])
    assert load.all()
    s = c.stats()
    assert (s["lookups"], s["misses"], s["prefetch_loads"], s["bytes_prefetch"]) == (2, 2, 2, 2 * BPE)
    slots2, miss = c.lookup(1, [3, 4])                    # 3 prefetched: a hit and a prefetch hit
    assert miss.tolist() == [False, True] and slots2[0] == slots[1]
    _, load = c.prefetch(1, [3])                          # resident: nothing to load
    assert not load.any()
    c.lookup(1, [3])                                      # a second hit is not a prefetch hit again
    s = c.stats()
    assert (s["hits"], s["misses"], s["prefetch_hits"], s["prefetch_loads"]) == (2, 3, 1, 2)
    assert s["bytes_moved"] == (s["misses"] + s["prefetch_loads"]) * BPE
    assert s["prefetch_accuracy"] == 0.5


def test_prefetch_never_evicts_the_running_layer():
    c = ExpertCache(4, 2, 8, "lru", BPE)
    slots, _ = c.lookup(0, [0, 1, 2, 3])                  # full, all pinned by the lookup
    _, load = c.prefetch(1, [0, 1, 2])
    assert not load.any() and c.stats()["prefetch_dropped"] == 3
    assert [c.slot(0, e) for e in range(4)] == slots.tolist()
    c.lookup(0, [0, 1])                                   # now 2 and 3 are unpinned
    _, load = c.prefetch(1, [5, 6, 7])                    # two slots to take; never 0, 1; no prefetch evicts a prefetch
    assert load.tolist() == [True, True, False]
    assert c.slot(0, 0) >= 0 and c.slot(0, 1) >= 0 and c.slot(0, 2) == c.slot(0, 3) == -1


def test_prefetch_ahead_is_protected_until_its_layer_runs():
    c = ExpertCache(4, 3, 8, "lru", BPE)
    c.lookup(0, [0])
    c.prefetch(1, [1, 2])                                 # for layer 1 (2 is a wrong guess)
    _, load = c.prefetch(2, [3, 4])                       # two layers ahead: only one free slot, no eviction
    assert load.tolist() == [True, False] and c.slot(1, 1) >= 0 and c.slot(1, 2) >= 0
    c.lookup(1, [1])                                      # layer 1 ran: its unused guess 2 may go now
    _, load = c.prefetch(2, [4, 5])                       # evicts (0, 0), then (1, 2); (2, 3) is still ahead
    assert load.all() and c.slot(0, 0) == c.slot(1, 2) == -1 and c.slot(2, 3) >= 0
    s = c.stats()
    assert (s["prefetch_hits"], s["prefetch_wasted"], s["prefetch_dropped"]) == (1, 1, 1)


def test_prefetched_entry_evicted_unused_is_wasted():
    c = ExpertCache(2, 1, 8, "lru", BPE)
    c.prefetch(0, [5])
    c.lookup(0, [0])
    c.lookup(0, [1])                                      # evicts 5 (least recent), never used
    assert c.stats()["prefetch_wasted"] == 1 and c.slot(0, 5) == -1


@pytest.mark.parametrize("policy", POLICIES)
@given(seed=st.integers(0, 2**32 - 1))
@settings(max_examples=15, deadline=None)
def test_pinned_layer_survives_any_prefetch(policy, seed):
    rng = np.random.default_rng(seed)
    L, E, k = 3, 8, 3
    c = make(policy, int(rng.integers(k + 1, 12)), L, E, hot_fraction=0.3)
    for _ in range(30):
        layer = int(rng.integers(L))
        slots, _ = c.lookup(layer, rng.choice(E, k, replace=False))
        ids = [e for e in range(E) if c.slot(layer, e) in slots.tolist()]
        before = {e: c.slot(layer, e) for e in ids}
        for _ in range(2):
            c.prefetch(int(rng.integers(L)), rng.choice(E, int(rng.integers(1, E)), replace=False))
            assert {e: c.slot(layer, e) for e in ids} == before
        check_consistent(c)


def test_pin_holds_until_unpin():
    c = ExpertCache(2, 1, 8, "lru", BPE)
    c.lookup(0, [0])
    c.pin(0, [0])
    c.lookup(0, [1])
    c.lookup(0, [2])                                      # evicts 1, not the held 0
    assert c.slot(0, 0) >= 0 and c.slot(0, 1) == -1
    c.unpin()
    c.lookup(0, [3])                                      # now 0 is the least recent
    assert c.slot(0, 0) == -1


# -- policies ------------------------------------------------------------------------------------------
def test_lfu_keeps_the_frequent_expert_through_a_scan():
    lru, lfu = ExpertCache(3, 1, 16, "lru"), ExpertCache(3, 1, 16, "lfu", decay=1.0)
    for c in (lru, lfu):
        for _ in range(5):
            c.lookup(0, [0])
            c.end_token()
        for e in range(1, 8):                             # a scan of one-off experts
            c.lookup(0, [e])
            c.end_token()
    assert lru.slot(0, 0) == -1 and lfu.slot(0, 0) >= 0


def test_lfu_decay_forgets_old_counts():
    c = ExpertCache(2, 1, 8, "lfu", decay=0.5)
    for _ in range(4):
        c.lookup(0, [0])
        c.end_token()
    for _ in range(10):                                   # 1 is used later, a few times: outweighs 0
        c.lookup(0, [1])
        c.end_token()
    c.lookup(0, [2])
    assert c.slot(0, 0) == -1 and c.slot(0, 1) >= 0
    slow = ExpertCache(2, 1, 8, "lfu", decay=1.0)         # no decay: 0's four uses still beat 1's two
    for e in [0, 0, 0, 0, 1, 1, 2]:
        slow.lookup(0, [e])
        slow.end_token()
    assert slow.slot(0, 0) >= 0 and slow.slot(0, 1) == -1


def test_hot_set_is_reserved_and_never_evicted():
    counts = np.zeros((2, 8))
    counts[0, 3], counts[1, 5] = 10, 9                    # the hottest two
    c = ExpertCache(4, 2, 8, "hot", BPE, hot_counts=counts, hot_fraction=0.5)
    assert c.hot_keys == [(0, 3), (1, 5)]
    slots, load = c.admit(0, [3])
    assert load[0] and slots[0] == 0 and c.stats()["bytes_admit"] == BPE
    for e in (0, 1, 2, 4, 6, 7):
        c.lookup(0, [e])
    assert c.slot(0, 3) == 0 and c.slot(1, 5) == -1       # reserved slot 1 waits for (1, 5)
    assert c.lookup(1, [5])[0][0] == 1
    assert sum(c.slot(0, e) >= 0 for e in range(8)) == 3  # 3 + two LRU slots
    c.evict(0, [3])
    assert c.slot(0, 3) == 0                              # evict() leaves the hot set too


@pytest.mark.parametrize("policy", POLICIES)
@given(seed=st.integers(0, 2**32 - 1))
@settings(max_examples=15, deadline=None)
def test_capacity_never_exceeded_and_bytes_add_up(policy, seed):
    rng = np.random.default_rng(seed)
    L, E = int(rng.integers(1, 4)), int(rng.integers(4, 12))
    k = int(rng.integers(1, min(E, 4) + 1))
    cap = int(rng.integers(2 * k, max(2 * k, L * E) + 3))
    c = make(policy, cap, L, E, hot_fraction=float(rng.uniform(0, 0.5)))
    for t in range(40):
        for layer in range(L):
            c.lookup(layer, rng.choice(E, k, replace=False))
            if rng.random() < 0.5:
                c.prefetch((layer + 1) % L, rng.choice(E, k, replace=False))
            check_consistent(c)
        c.end_token()
    s = c.stats()
    assert s["hits"] + s["misses"] == s["lookups"] == 40 * L * k
    assert s["bytes_demand"] == s["misses"] * BPE and s["bytes_prefetch"] == s["prefetch_loads"] * BPE
    assert s["prefetch_hits"] <= s["prefetch_loads"] and s["tokens"] == 40
    assert s["resident"] <= cap
    c.reset()
    assert c.stats()["lookups"] == 0 and c.stats()["resident"] == s["resident"]


# -- against the brute-force reference -------------------------------------------------------------------
@given(seed=st.integers(0, 2**32 - 1), L=st.integers(1, 4), E=st.integers(2, 10), k=st.integers(1, 4),
       extra=st.integers(0, 20))
@settings(max_examples=60, deadline=None)
def test_lru_matches_brute_force(seed, L, E, k, extra):
    k = min(k, E)
    rng = np.random.default_rng(seed)
    cap = min(k + extra, L * E)
    c, ref = ExpertCache(cap, L, E, "lru", BPE), RefLRU(cap)
    skew = rng.dirichlet(np.full(E, 0.3))                  # skewed, so there are hits as well
    for _ in range(60):
        layer = int(rng.integers(L))
        ids = rng.choice(E, k, replace=False, p=skew)
        _, miss = c.lookup(layer, ids)
        hits = ref.access([(layer, int(e)) for e in ids])
        assert (~miss).tolist() == hits
        assert {(l, e) for l in range(L) for e in range(E) if c.slot(l, e) >= 0} == set(ref.last)
    s = c.stats()
    assert s["bytes_moved"] == s["misses"] * BPE


def test_for_budget_and_table():
    c = ExpertCache.for_budget(10_500, 2, 4, 1000)
    assert c.capacity == 8                                # at most every expert
    c = ExpertCache.for_budget(3_500, 2, 4, 1000)
    assert c.capacity == 3
    slots, _ = c.lookup(1, [2, 0])
    t = c.table()
    assert t.shape == (2, 4) and t[1, 2] == slots[0] and t[1, 0] == slots[1] and (t >= 0).sum() == 2


def test_stats_of_counters_kept_elsewhere():
    """stats(kept): the GPU's counters (the device mode) replace the cache's own, and the rates follow from them."""
    c = ExpertCache(4, 2, 8, "lfu", bytes_per_expert=10)
    c.lookup(0, [1, 2])
    c.end_token()
    c.end_token()
    n = c.stats(dict(lookups=20, hits=15, misses=5, evictions=1, bytes_demand=50, resident=4))
    assert (n["lookups"], n["hits"], n["misses"], n["evictions"], n["resident"]) == (20, 15, 5, 1, 4)
    assert n["hit_rate"] == 0.75 and n["bytes_moved"] == 50 and n["bytes_moved_per_token"] == 25
    assert n["misses_per_token"] == 2.5 and n["tokens"] == 2 and n["capacity"] == 4
    own = c.stats()
    assert (own["lookups"], own["misses"], own["resident"]) == (2, 2, 2)
