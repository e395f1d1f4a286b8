"""convert.synthetic.write_random_gguf: random-weight GGUFs with Mistral Small 4's exact shapes,
written with no checkpoint on disk (the full-scale GPU benchmark's model), checked at a tiny size."""
from __future__ import annotations

import numpy as np
import pytest

import localmoe
from convert.synthetic import SMALL4, random_plans, small4_config, write_random_gguf
from localmoe.gguf.format import GGMLType, row_bytes
from localmoe.gguf.reader import GGUFFile

from checkpoints import TEKKEN

TINY = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, q_lora_rank=128, kv_lora_rank=64,
            qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=32, n_routed_experts=16, moe_intermediate_size=128)


def test_default_plan_is_small4():
    """Planned (nothing written): Small 4's parameter counts from the reference doc, ~67 GB at Q4_0."""
    plans = random_plans(small4_config(), "q4_0")
    params = {p.name: int(np.prod(p.shape)) for p in plans}
    assert sum(params.values()) == 118_972_826_624                       # 118.97 B
    active = sum(n * 4 // 128 if "_exps" in name else n for name, n in params.items())
    assert round(active / 1e9, 2) == 6.63                                  # with embedding and head
    assert round((active - params["token_embd.weight"] - params["output.weight"]) / 1e9, 2) == 5.56
    nbytes = sum(int(np.prod(p.shape[:-1])) * row_bytes(p.type, p.shape[-1]) for p in plans)
    assert 66.9e9 < nbytes < 67.1e9
    shapes = {p.name: p.shape for p in plans}
    assert shapes["blk.35.ffn_gate_exps.weight"] == (128, 2048, 4096)
    assert shapes["blk.0.attn_k_b.weight"] == (32, 256, 64)
    assert shapes["output.weight"] == (131072, 4096)
    assert {p.type for p in plans if p.encoded} == {GGMLType.Q4_0}
    assert all(p.type == GGMLType.F32 for p in plans if not p.encoded)  # norms and routers


@pytest.mark.parametrize("quant, vocab", [("q4_0", 131072), ("q8_0", 2048)])
def test_random_gguf_loads_and_runs(tmp_path, quant, vocab):
    """Small 4's whole tekken vocabulary once (its merges take seconds), a cut one for Q8_0."""
    path = write_random_gguf(tmp_path / f"r-{quant}.gguf", quant, seed=1, tokenizer=TEKKEN, **TINY, vocab_size=vocab)
    f = GGUFFile(path)
    assert f.get("mistral4.block_count") == 2 and f.get("mistral4.expert_count") == 16
    assert f.get("mistral4.rope.scaling.factor") == 128.0 and f.get("mistral4.rope.scaling.type") == "yarn"
    assert f.info("blk.1.ffn_down_exps.weight").type == GGMLType[quant.upper()]
    d = f.raw("blk.1.ffn_down_exps.weight")[..., :2].copy().view("<f2").astype(np.float32)
    assert np.isfinite(d).all() and (d > 0).all()                          # valid f16 scales
    m = localmoe.load(path)
    assert m.config.vocab_size == vocab and m.config.hidden_size == 256
    if vocab == 131072:
        assert m.tokenizer.encode("Hello, world!") == [1, 22177, 1044, 4304, 1033]
    tokens = list(m.generate([1, 1022, 1044], max_tokens=2, stop=()))
    assert len(tokens) == 2
    logits = m.logits([1, 1022, 1044])
    assert np.isfinite(logits).all() and 0.1 < logits.std() < 10        # unit-scale activations
    assert m.stats.expert_counts.sum() > 0 and m.stats.routing == []      # the routing log is opt-in


def test_random_gguf_is_deterministic(tmp_path):
    a = write_random_gguf(tmp_path / "a.gguf", "q4_0", seed=3, tokenizer=TEKKEN, **{**TINY, "vocab_size": 2048})
    b = write_random_gguf(tmp_path / "b.gguf", "q4_0", seed=3, tokenizer=TEKKEN, **{**TINY, "vocab_size": 2048})
    assert a.read_bytes() == b.read_bytes()
    assert set(SMALL4) >= set(TINY)
