"""localmoe/placement.py: which device holds each layer, resident or streamed experts (simulated devices)."""
from __future__ import annotations

import numpy as np
import pytest

from localmoe.placement import RESERVE, GiB, LayerBytes, PlacementError, layer_bytes, plan, plan_experts, split_layers

SMALL4 = LayerBytes(dense=(40 * 2 ** 20,) * 36, experts=(1_820 * 2 ** 20,) * 36, other=302 * 2 ** 20)  # ~Q4_0 shapes
ONE_LAYER = 128 * 14 * 2 ** 20


def test_resident_when_it_fits():
    p = plan(SMALL4, [80 * GiB], kv_bytes=GiB // 2, min_cache=ONE_LAYER)
    assert p.layer_device == (0,) * 36 and p.expert_cache == (None,) and not p.streams()
    assert p.need[0] == sum(SMALL4.dense) + sum(SMALL4.experts) + SMALL4.other + GiB // 2 + GiB // 2


def test_streams_what_does_not_fit():
    """24 GiB free: dense + KV + head + working room resident, the rest of the GPU is the expert cache."""
    rng = np.random.default_rng(3)
    for free in rng.integers(8, 60, 5) * GiB:
        p = plan(SMALL4, [int(free)], kv_bytes=GiB // 4, min_cache=ONE_LAYER)
        fixed = sum(SMALL4.dense) + SMALL4.other + GiB // 4 + GiB // 2
        assert p.streams() and p.expert_cache[0] == free - fixed and p.need[0] == free


def test_user_cache_size_and_errors():
    p = plan(SMALL4, [80 * GiB], kv_bytes=0, min_cache=ONE_LAYER, cache=24 * GiB)
    assert p.expert_cache == (24 * GiB,)                                # --gpu-mem streams even when it fits
    with pytest.raises(PlacementError, match=r"GPU 0: it needs .* GiB .* 2\.0 GiB is free"):
        plan(SMALL4, [2 * GiB], kv_bytes=0, min_cache=ONE_LAYER)       # not even dense + one layer's experts
    with pytest.raises(PlacementError, match="lower --gpu-mem"):
        plan(SMALL4, [30 * GiB], kv_bytes=0, min_cache=ONE_LAYER, cache=29 * GiB)
    with pytest.raises(PlacementError, match="expert cache of >= 1.8 GiB"):
        plan(SMALL4, [80 * GiB], kv_bytes=0, min_cache=ONE_LAYER, cache=GiB)


def test_layer_split_over_simulated_devices():
    """Contiguous blocks in proportion to free memory; every device's need is its own layers' bytes."""
    rng = np.random.default_rng(11)
    for _ in range(20):
        L, n = int(rng.integers(4, 40)), int(rng.integers(1, 5))
        sizes = rng.integers(1, 100, L).tolist()
        free = rng.integers(50, 200, n).tolist()
        where = split_layers(sizes, free)
        assert where == sorted(where) and where[0] == 0 and max(where) < n
        for d in range(n):                        # each device's share is within one layer of its target
            got = sum(s for s, w in zip(sizes, where) if w == d)
            assert abs(got - sum(sizes) * free[d] / sum(free)) <= max(sizes) + 1e-9 or got == 0
    lb = LayerBytes((GiB,) * 8, (4 * GiB,) * 8, GiB)
    p = plan(lb, [30 * GiB, 30 * GiB], kv_bytes=0, min_cache=GiB)
    assert p.layer_device == (0,) * 4 + (1,) * 4 and p.expert_cache == (None, None)
    assert p.need == (20 * GiB + GiB // 2, 21 * GiB + GiB // 2)        # the head sits with the last layers


def test_expert_parallel_over_simulated_devices():
    """The lead (device 0) holds the dense weights, the head and the KV cache; expert e of every layer lives
    on device e % N, so each holds its share of the routed experts (a 67 GB Q4_0 Small 4 fits two 80 GB
    GPUs resident, and one only by streaming)."""
    lead = sum(SMALL4.dense) + SMALL4.other + GiB
    for n in (2, 3, 4):
        p = plan_experts(SMALL4, [80 * GiB] * n, kv_bytes=GiB, min_cache=ONE_LAYER, n_experts=128)
        counts = [p.expert_owner.count(d) for d in range(n)]
        assert p.layer_device == (-1,) * 36 and sum(counts) == 128 and max(counts) - min(counts) <= 1
        assert p.expert_owner[:n] == tuple(range(n))                  # neighbouring ids on different GPUs
        assert p.expert_cache == (None,) * n
        for d in range(n):
            assert abs(p.need[d] - RESERVE - (lead if d == 0 else 0) - sum(SMALL4.experts) * counts[d] / 128) <= 1
    assert plan(SMALL4, [60 * GiB], kv_bytes=GiB, min_cache=ONE_LAYER).streams()
    p = plan_experts(SMALL4, [20 * GiB] * 2, kv_bytes=GiB, min_cache=ONE_LAYER, n_experts=128)
    assert p.expert_cache == (20 * GiB - lead - RESERVE, 20 * GiB - RESERVE) and p.need == (20 * GiB,) * 2


def test_no_streaming_error_names_the_memory_per_gpu():
    """When streaming is not allowed, a model that does not fit is an error naming the GiB each GPU needs."""
    need = (sum(SMALL4.dense) + SMALL4.other + RESERVE + sum(SMALL4.experts) / 2) / GiB
    with pytest.raises(PlacementError, match=rf"GPU 0: it needs {need:.1f} GiB there .* 20\.0 GiB is free; allow "
                                             r"streaming the experts or add GPUs"):
        plan_experts(SMALL4, [20 * GiB] * 2, kv_bytes=0, min_cache=ONE_LAYER, n_experts=128, stream=False)
    with pytest.raises(PlacementError, match=r"GPU \d: it needs .* allow streaming"):        # layer split, 60 of 66 GiB
        plan(SMALL4, [40 * GiB, 20 * GiB], kv_bytes=0, min_cache=ONE_LAYER, stream=False)
    p = plan_experts(SMALL4, [40 * GiB] * 2, kv_bytes=0, min_cache=ONE_LAYER, n_experts=128, stream=False)
    assert p.expert_cache == (None, None)


def test_layer_bytes_of_a_file(tmp_path):
    """Counted from a real GGUF's tensor table: every tensor once, the untied embedding left on the host."""
    import localmoe
    from convert.synthetic import write_random_gguf
    path = tmp_path / "s.gguf"
    write_random_gguf(path, "q8_0", seed=0, num_hidden_layers=2, vocab_size=4096, hidden_size=256,
                      num_attention_heads=4, q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32,
                      qk_rope_head_dim=32, v_head_dim=32, n_routed_experts=8, moe_intermediate_size=64,
                      intermediate_size=128)
    f = localmoe.load(path).file
    lb = layer_bytes(f.tensors, 2)
    total = sum(ti.nbytes for ti in f.tensors.values())
    assert sum(lb.dense) + sum(lb.experts) + lb.other == total - f.tensors["token_embd.weight"].nbytes
    assert all(e > d > 0 for d, e in zip(lb.dense, lb.experts))
    assert sum(lb.experts) == sum(ti.nbytes for n, ti in f.tensors.items() if "_exps" in n)
