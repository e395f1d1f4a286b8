"""Synthetic mistral4 checkpoints of any size (random weights, Small 4's layout on disk).

Written layer by layer into shards with an index, so memory stays at one layer whatever the size.
Used by the streaming tests and the benchmarks; no Transformers needed.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

SMALL4_SCALED = dict(  # Small 4's shapes scaled down: the CPU benchmark model (~560 M parameters)
    vocab_size=131072, hidden_size=1024, num_hidden_layers=8, num_attention_heads=8, q_lora_rank=256,
    kv_lora_rank=128, qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=128, n_routed_experts=64,
    num_experts_per_tok=4, n_shared_experts=1, moe_intermediate_size=256, intermediate_size=2048,
)


def write_checkpoint(d: Path, tokenizer: Path, seed: int = 0, std: float = 0.05, **dims) -> Path:
    cfg = dict(architectures=["Mistral4ForCausalLM"], model_type="mistral4", first_k_dense_replace=0,
               max_position_embeddings=32768, tie_word_embeddings=False, rms_norm_eps=1e-6)
    cfg.update(SMALL4_SCALED)
    cfg.update(dims)
    cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    shutil.copy(tokenizer, d / ("tekken.json" if tokenizer.suffix == ".json" else "tokenizer.model"))
    rng = np.random.default_rng(seed)
    r = lambda *s: rng.standard_normal(s, dtype=np.float32) * np.float32(std)
    one = lambda n: 1 + np.float32(0.1) * rng.standard_normal(n, dtype=np.float32)
    H, E, I, heads = cfg["hidden_size"], cfg["n_routed_experts"], cfg["moe_intermediate_size"], cfg["num_attention_heads"]
    qk = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    weight_map = {}

    from safetensors.numpy import save_file

    def shard(name, tensors):
        save_file(tensors, d / name)
        weight_map.update({k: name for k in tensors})

    shard("embed.safetensors", {"model.embed_tokens.weight": r(cfg["vocab_size"], H),
                                "lm_head.weight": r(cfg["vocab_size"], H), "model.norm.weight": one(H)})
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shard(f"layer{i:03d}.safetensors", {
            p + "input_layernorm.weight": one(H), p + "post_attention_layernorm.weight": one(H),
            p + "self_attn.q_a_proj.weight": r(cfg["q_lora_rank"], H),
            p + "self_attn.q_a_layernorm.weight": one(cfg["q_lora_rank"]),
            p + "self_attn.q_b_proj.weight": r(heads * qk, cfg["q_lora_rank"]),
            p + "self_attn.kv_a_proj_with_mqa.weight": r(cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"], H),
            p + "self_attn.kv_a_layernorm.weight": one(cfg["kv_lora_rank"]),
            p + "self_attn.kv_b_proj.weight": r(heads * (cfg["qk_nope_head_dim"] + cfg["v_head_dim"]), cfg["kv_lora_rank"]),
            p + "self_attn.o_proj.weight": r(H, heads * cfg["v_head_dim"]),
            p + "mlp.gate.weight": r(E, H),
            p + "mlp.experts.gate_up_proj": r(E, 2 * I, H),
            p + "mlp.experts.down_proj": r(E, H, I),
            p + "mlp.shared_experts.gate_proj.weight": r(I * cfg["n_shared_experts"], H),
            p + "mlp.shared_experts.up_proj.weight": r(I * cfg["n_shared_experts"], H),
            p + "mlp.shared_experts.down_proj.weight": r(H, I * cfg["n_shared_experts"])})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


def random_demo(out: Path) -> Path:
    """A small random-weight mistral4 GGUF (Small 4's layout, tekken vocabulary) for smoke runs.
    Its text is gibberish: it shows the pipeline working, not a model's quality."""
    import tempfile

    import mistral_common

    from . import convert

    tekken = Path(mistral_common.__file__).parent / "data" / "tekken_240718.json"
    with tempfile.TemporaryDirectory() as tmp:
        src = write_checkpoint(Path(tmp) / "hf", tekken, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                               q_lora_rank=128, kv_lora_rank=64, qk_rope_head_dim=32, qk_nope_head_dim=32,
                               v_head_dim=32, n_routed_experts=16, moe_intermediate_size=128)
        convert(src, out, "q8_0")
    return out


if __name__ == "__main__":
    import sys

    print(random_demo(Path(sys.argv[1])))
