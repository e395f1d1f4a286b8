"""Mixtral: GQA attention + top-2 routed experts, written as llama.cpp writes it (arch `llama`).

Both on-disk expert layouts are read: per expert (`block_sparse_moe.experts.N.w1/w2/w3`) and fused
(`mlp.experts.gate_up_proj` [E, 2I, H], gate rows first; `mlp.experts.down_proj` [E, H, I]).
Q and K rows are permuted per head from rotate-half to interleaved pairs, as llama.cpp does, so
the same interleaved RoPE serves every architecture.
"""
from __future__ import annotations

import numpy as np

from localmoe.errors import ConvertError
from localmoe.gguf.format import KEY_ROPE_INTERLEAVED

from ..writer import Planned, copied, whole
from . import base_metadata, kv

ARCH = "llama"
HF_ARCHITECTURES = ("MixtralForCausalLM",)


def accepts(config: dict) -> bool:
    return True


def text_config(config: dict) -> dict:
    cfg = dict(config)
    cfg.setdefault("head_dim", None)
    cfg["head_dim"] = cfg["head_dim"] or cfg["hidden_size"] // cfg["num_attention_heads"]
    cfg.setdefault("rms_norm_eps", 1e-5)
    cfg.setdefault("tie_word_embeddings", False)
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rp.get("rope_type", rp.get("type", "default")) not in ("default", None):
        raise ConvertError(f"mixtral rope type {rp.get('rope_type')!r} is not supported")
    cfg["rope_theta"] = float(rp.get("rope_theta") or cfg.get("rope_theta") or 1e6)
    if cfg.get("sliding_window"):
        raise ConvertError("mixtral with a sliding window is not supported")
    cfg["source_architecture"] = (config.get("architectures") or ["?"])[0]
    return cfg


def add_metadata(w, cfg: dict) -> None:
    a = f"{ARCH}."
    base_metadata(w, ARCH, cfg)
    for key, value in [
        ("attention.head_count_kv", cfg["num_key_value_heads"]),
        ("attention.key_length", cfg["head_dim"]),
        ("attention.value_length", cfg["head_dim"]),
        ("expert_count", cfg["num_local_experts"]),
        ("expert_used_count", cfg["num_experts_per_tok"]),
        ("rope.dimension_count", cfg["head_dim"]),
        ("rope.freq_base", cfg["rope_theta"]),
    ]:
        kv(w, a + key, value)
    kv(w, KEY_ROPE_INTERLEAVED, True)


def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of each head from rotate-half order (i, i + d/2) to interleaved pairs (2i, 2i+1)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def plan(ck, cfg: dict) -> list[Planned]:
    E, H = cfg["num_local_experts"], cfg["hidden_size"]
    out = [copied(ck, "embed_tokens.weight", "token_embd.weight")]
    for i in range(cfg["num_hidden_layers"]):
        p, b = f"layers.{i}.", f"blk.{i}."
        q, k = p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight"
        out += [
            copied(ck, p + "input_layernorm.weight", b + "attn_norm.weight", True),
            whole(b + "attn_q.weight", ck.shape(q), lambda q=q: permute_rope(ck.get(q), cfg["num_attention_heads"])),
            whole(b + "attn_k.weight", ck.shape(k), lambda k=k: permute_rope(ck.get(k), cfg["num_key_value_heads"])),
            copied(ck, p + "self_attn.v_proj.weight", b + "attn_v.weight"),
            copied(ck, p + "self_attn.o_proj.weight", b + "attn_output.weight"),
            copied(ck, p + "post_attention_layernorm.weight", b + "ffn_norm.weight", True),
        ]
        if ck.has(p + "mlp.experts.gate_up_proj"):            # fused layout
            gu = p + "mlp.experts.gate_up_proj"
            n2, cols = ck.shape(gu)[1:]
            I = n2 // 2
            out += [copied(ck, p + "mlp.gate.weight", b + "ffn_gate_inp.weight", True),
                    Planned(b + "ffn_gate_exps.weight", (E, I, cols), lambda gu=gu, I=I: (ck.rows(gu, e, e + 1)[0, :I] for e in range(E))),
                    Planned(b + "ffn_up_exps.weight", (E, I, cols), lambda gu=gu, I=I: (ck.rows(gu, e, e + 1)[0, I:] for e in range(E))),
                    copied(ck, p + "mlp.experts.down_proj", b + "ffn_down_exps.weight")]
        elif ck.has(p + "block_sparse_moe.gate.weight"):         # per-expert layout
            m = p + "block_sparse_moe."
            out += [copied(ck, m + "gate.weight", b + "ffn_gate_inp.weight", True)]
            for w, name in (("w1", "ffn_gate_exps"), ("w3", "ffn_up_exps"), ("w2", "ffn_down_exps")):
                src = [f"{m}experts.{e}.{w}.weight" for e in range(E)]
                out += [Planned(f"{b}{name}.weight", (E,) + ck.shape(src[0]), lambda src=src: (ck.get(s) for s in src))]
        else:
            raise ConvertError(f"{ck.dir}: layer {i} has no experts (neither block_sparse_moe nor mlp.experts)")
    out += [copied(ck, "norm.weight", "output_norm.weight", True)]
    if not cfg["tie_word_embeddings"] and ck.has("lm_head.weight"):
        out += [copied(ck, "lm_head.weight", "output.weight")]
    return out
