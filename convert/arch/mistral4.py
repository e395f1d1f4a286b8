"""Mistral 4 (Mistral Small 4): MLA attention + routed/shared experts, llama.cpp arch `mistral4`.

Converts `Mistral4ForCausalLM` and the text model of `Mistral3ForConditionalGeneration`.
Tensor names and metadata follow llama.cpp's converter (its DeepSeek-2 path); see docs/LLAMACPP.md.
"""
from __future__ import annotations

import math

from localmoe.errors import ConvertError
from localmoe.gguf.format import KEY_ATTN_SCALE, KEY_ROPE_INTERLEAVED

from ..writer import Planned, copied, whole
from . import base_metadata, kv

ARCH = "mistral4"
HF_ARCHITECTURES = ("Mistral4ForCausalLM", "Mistral3ForConditionalGeneration")

DEFAULTS = dict(  # Mistral4Config's defaults (Transformers 5.23) for keys a config.json may omit
    intermediate_size=12288, moe_intermediate_size=2048, n_shared_experts=1, n_routed_experts=128,
    routed_scaling_factor=1.0, kv_lora_rank=256, q_lora_rank=1024, qk_rope_head_dim=64, v_head_dim=128,
    qk_nope_head_dim=64, n_group=1, topk_group=1, num_experts_per_tok=4, first_k_dense_replace=0,
    norm_topk_prob=True, max_position_embeddings=1048576, rms_norm_eps=1e-6, tie_word_embeddings=False,
    rope_interleave=True, attention_bias=False, hidden_act="silu",
)


def accepts(config: dict) -> bool:
    return config.get("model_type") == "mistral4" or (config.get("text_config") or {}).get("model_type") == "mistral4"


def text_config(config: dict) -> dict:
    text = config.get("text_config", config)
    cfg = {**DEFAULTS, **text}
    if "tie_word_embeddings" in config and "text_config" in config:
        cfg["tie_word_embeddings"] = config["tie_word_embeddings"]
    if cfg.get("attention_bias"):
        raise ConvertError("mistral4 with attention_bias is not supported")
    if cfg["hidden_act"] != "silu":
        raise ConvertError(f"mistral4 with hidden_act {cfg['hidden_act']!r} is not supported")
    cfg["source_architecture"] = (config.get("architectures") or ["?"])[0]
    return cfg


def rope_parameters(cfg: dict) -> dict:
    """The rope dict as Transformers 5.23 standardises it (rope_parameters, or legacy rope_scaling)."""
    rp = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    if not rp:  # Mistral4Config.__post_init__'s default
        rp = {"type": "yarn", "rope_theta": 10000.0, "factor": 128.0, "original_max_position_embeddings": 8192,
              "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0, "llama_4_scaling_beta": 0.1}
    rp.setdefault("rope_type", rp.get("type", "default"))
    rp.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    if rp["rope_type"] == "yarn":
        rp.setdefault("original_max_position_embeddings", cfg["max_position_embeddings"])
    return rp


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def attention_numbers(cfg: dict) -> dict:
    """Softmax scale, rope dim and YaRN attention factor exactly as Transformers 5.23 computes them."""
    rp = rope_parameters(cfg)
    head_dim = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    scale = head_dim ** -0.5
    if rp["rope_type"] != "default" and rp.get("mscale_all_dim"):
        m = yarn_get_mscale(rp["factor"], rp["mscale_all_dim"])
        scale *= m * m
    partial = rp.get("partial_rotary_factor", cfg["qk_rope_head_dim"] / head_dim)
    attn_factor = 1.0
    if rp["rope_type"] == "yarn":
        attn_factor = rp.get("attention_factor")
        if attn_factor is None:
            if rp.get("mscale") and rp.get("mscale_all_dim"):
                attn_factor = yarn_get_mscale(rp["factor"], rp["mscale"]) / yarn_get_mscale(rp["factor"], rp["mscale_all_dim"])
            else:
                attn_factor = yarn_get_mscale(rp["factor"])
    return {"scale": scale, "rope_dim": int(head_dim * partial), "attn_factor": float(attn_factor), "rope": rp}


def add_metadata(w, cfg: dict) -> None:
    a = f"{ARCH}."
    nums = attention_numbers(cfg)
    rp = nums["rope"]
    if nums["rope_dim"] != cfg["qk_rope_head_dim"]:
        raise ConvertError(f"rope dimension {nums['rope_dim']} != qk_rope_head_dim {cfg['qk_rope_head_dim']}")
    if rp["rope_type"] not in ("yarn", "default"):
        raise ConvertError(f"mistral4 rope type {rp['rope_type']!r} is not supported")
    base_metadata(w, ARCH, cfg)
    for key, value in [
        ("attention.head_count_kv", 1),                      # MLA as MQA over the latent (llama.cpp)
        ("attention.kv_lora_rank", cfg["kv_lora_rank"]),
        ("attention.key_length", cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]),
        ("attention.value_length", cfg["kv_lora_rank"]),
        ("attention.key_length_mla", cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]),
        ("attention.value_length_mla", cfg["v_head_dim"]),
        ("leading_dense_block_count", cfg["first_k_dense_replace"]),
        ("expert_feed_forward_length", cfg["moe_intermediate_size"]),
        ("expert_count", cfg["n_routed_experts"]),
        ("expert_used_count", cfg["num_experts_per_tok"]),
        ("expert_shared_count", cfg["n_shared_experts"]),
        ("expert_weights_scale", float(cfg["routed_scaling_factor"])),
        ("expert_weights_norm", bool(cfg["norm_topk_prob"])),
        ("expert_group_count", cfg["n_group"] or 1),
        ("expert_group_used_count", cfg["topk_group"] or 1),
        ("expert_gating_func", 1),                           # 1 = softmax (llama.cpp's enum)
        ("rope.dimension_count", cfg["qk_rope_head_dim"]),
        ("rope.freq_base", float(rp["rope_theta"])),
    ]:
        kv(w, a + key, value)
    if cfg["q_lora_rank"]:
        kv(w, a + "attention.q_lora_rank", cfg["q_lora_rank"])
    if rp["rope_type"] == "yarn":
        kv(w, a + "rope.scaling.type", "yarn")
        kv(w, a + "rope.scaling.factor", float(rp["factor"]))
        kv(w, a + "rope.scaling.original_context_length", int(rp["original_max_position_embeddings"]))
        kv(w, a + "rope.scaling.yarn_beta_fast", float(rp.get("beta_fast") or 32.0))
        kv(w, a + "rope.scaling.yarn_beta_slow", float(rp.get("beta_slow") or 1.0))
        kv(w, a + "rope.scaling.yarn_log_multiplier", 0.1 * float(rp.get("mscale_all_dim") or 0.0))
        if nums["attn_factor"] != 1.0:
            kv(w, a + "rope.scaling.yarn_attn_factor", nums["attn_factor"])
    if rp.get("llama_4_scaling_beta") is not None:
        kv(w, a + "attention.temperature_scale", float(rp["llama_4_scaling_beta"]))
        kv(w, a + "attention.temperature_length",
           int(rp.get("original_max_position_embeddings") or cfg["max_position_embeddings"]))
    kv(w, KEY_ATTN_SCALE, float(nums["scale"]))
    kv(w, KEY_ROPE_INTERLEAVED, bool(cfg["rope_interleave"]))


def plan(ck, cfg: dict) -> list[Planned]:
    H, E, I = cfg["hidden_size"], cfg["n_routed_experts"], cfg["moe_intermediate_size"]
    heads, nope, vd, kvr = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"]

    def copy(src, dst, keep_f32=False):
        return copied(ck, src, dst, keep_f32)

    def experts_half(src, lo, hi, dst):
        """rows lo:hi of every expert of a fused [E, R, C] tensor, streamed one expert at a time."""
        C = ck.shape(src)[2]
        return Planned(dst, (E, hi - lo, C), lambda: (ck.rows(src, e, e + 1)[0, lo:hi] for e in range(E)))

    def kv_b(src, which):
        """kv_b_proj split per head: k_b [heads, kv_lora, nope] (W_kb transposed, to absorb q_nope into
        the latent) and v_b [heads, v_head_dim, kv_lora], as llama.cpp writes them."""
        def load():
            kvb = ck.get(src).reshape(heads, nope + vd, kvr)
            return kvb[:, :nope, :].transpose(0, 2, 1) if which == "k" else kvb[:, nope:, :]
        return load

    out = [copy("embed_tokens.weight", "token_embd.weight")]
    for i in range(cfg["num_hidden_layers"]):
        p, b = f"layers.{i}.", f"blk.{i}."
        out += [copy(p + "input_layernorm.weight", b + "attn_norm.weight", True)]
        if cfg["q_lora_rank"]:
            out += [copy(p + "self_attn.q_a_proj.weight", b + "attn_q_a.weight"),
                    copy(p + "self_attn.q_a_layernorm.weight", b + "attn_q_a_norm.weight", True),
                    copy(p + "self_attn.q_b_proj.weight", b + "attn_q_b.weight")]
        else:
            out += [copy(p + "self_attn.q_proj.weight", b + "attn_q.weight")]
        out += [copy(p + "self_attn.kv_a_proj_with_mqa.weight", b + "attn_kv_a_mqa.weight"),
                copy(p + "self_attn.kv_a_layernorm.weight", b + "attn_kv_a_norm.weight", True),
                whole(b + "attn_k_b.weight", (heads, kvr, nope), kv_b(p + "self_attn.kv_b_proj.weight", "k")),
                whole(b + "attn_v_b.weight", (heads, vd, kvr), kv_b(p + "self_attn.kv_b_proj.weight", "v")),
                copy(p + "self_attn.o_proj.weight", b + "attn_output.weight"),
                copy(p + "post_attention_layernorm.weight", b + "ffn_norm.weight", True)]
        if i < cfg["first_k_dense_replace"]:
            out += [copy(p + f"mlp.{n}_proj.weight", b + f"ffn_{n}.weight") for n in ("gate", "up", "down")]
            continue
        gu = p + "mlp.experts.gate_up_proj"
        if not ck.has(gu):
            raise ConvertError(f"{ck.dir}: missing tensor {gu} (layer {i} routed experts)")
        out += [copy(p + "mlp.gate.weight", b + "ffn_gate_inp.weight", True),
                experts_half(gu, 0, I, b + "ffn_gate_exps.weight"),
                experts_half(gu, I, 2 * I, b + "ffn_up_exps.weight"),
                copy(p + "mlp.experts.down_proj", b + "ffn_down_exps.weight")]
        if cfg["n_shared_experts"]:
            out += [copy(p + f"mlp.shared_experts.{n}_proj.weight", b + f"ffn_{n}_shexp.weight")
                    for n in ("gate", "up", "down")]
    out += [copy("norm.weight", "output_norm.weight", True)]
    if not cfg["tie_word_embeddings"] and ck.has("lm_head.weight"):
        out += [copy("lm_head.weight", "output.weight")]
    return out
