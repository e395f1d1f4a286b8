"""Mistral 4 (Mistral Small 4): MLA attention, routed top-k + shared experts. GGUF arch `mistral4`.

Attention runs in the compressed latent (DeepSeek's "absorbed" MLA): the cache holds per token the
normalised KV latent c (kv_lora_rank) and the rotated shared key (qk_rope_head_dim) — 320 values per
layer for Small 4. W_kb is folded into the query and W_vb applied after attending, so keys and values
are never expanded per head; it is the same arithmetic as Transformers' expanded form.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..backends import DenseFFN, Normed, swiglu
from ..gguf.format import KEY_ATTN_SCALE
from ..gguf.reader import GGUFFile
from .decoder import Decoder, KVCache, Projections, expert_weight, weight
from .moe import Experts
from .rope import Rope, rope_table

ARCH = "mistral4"


@dataclass(frozen=True)
class Config:
    """Fields named as in Transformers' Mistral4Config; values read from GGUF metadata."""
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int
    moe_intermediate_size: int
    intermediate_size: int
    first_k_dense_replace: int
    rms_norm_eps: float
    vocab_size: int
    max_position_embeddings: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    n_group: int
    topk_group: int
    rope: Rope
    attention_scale: float
    llama_4_scaling_beta: float
    llama_4_scaling_length: int

    @property
    def n_experts(self) -> int:
        return self.n_routed_experts

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> "Config":
        a = lambda k, d=None: f.get(f"{ARCH}.{k}", d) if d is not None else f.require(f"{ARCH}.{k}")
        kv_lora, rope_dim = a("attention.kv_lora_rank"), a("rope.dimension_count")
        nope = a("attention.key_length_mla") - rope_dim
        factor = a("rope.scaling.factor", 1.0) if a("rope.scaling.type", "none") == "yarn" else 1.0
        # The softmax scale: stored exactly by our converter; for other files derived as llama.cpp does
        # (1/sqrt(head dim) times the YaRN mscale squared, mscale = 1 + log_multiplier * ln(factor)).
        mscale = 1.0 + a("rope.scaling.yarn_log_multiplier", 0.0) * math.log(factor) if factor > 1 else 1.0
        scale = f.get(KEY_ATTN_SCALE, (nope + rope_dim) ** -0.5 * mscale * mscale)
        return cls(
            hidden_size=a("embedding_length"), num_hidden_layers=a("block_count"),
            num_attention_heads=a("attention.head_count"), q_lora_rank=a("attention.q_lora_rank", 0),
            kv_lora_rank=kv_lora, qk_nope_head_dim=nope, qk_rope_head_dim=rope_dim,
            v_head_dim=a("attention.value_length_mla"), n_routed_experts=a("expert_count"),
            num_experts_per_tok=a("expert_used_count"), n_shared_experts=a("expert_shared_count", 0),
            moe_intermediate_size=a("expert_feed_forward_length"), intermediate_size=a("feed_forward_length", 0),
            first_k_dense_replace=a("leading_dense_block_count", 0),
            rms_norm_eps=float(a("attention.layer_norm_rms_epsilon")),
            vocab_size=f.info("token_embd.weight").shape[0], max_position_embeddings=a("context_length"),
            routed_scaling_factor=float(a("expert_weights_scale", 1.0)),
            norm_topk_prob=bool(a("expert_weights_norm", False)), n_group=a("expert_group_count", 1),
            topk_group=a("expert_group_used_count", 1),
            rope=Rope(rope_dim, float(a("rope.freq_base")), factor, a("rope.scaling.original_context_length", 0),
                      float(a("rope.scaling.yarn_beta_fast", 32.0)), float(a("rope.scaling.yarn_beta_slow", 1.0)),
                      float(a("rope.scaling.yarn_attn_factor", 1.0))),
            attention_scale=float(scale),
            llama_4_scaling_beta=float(a("attention.temperature_scale", 0.0)),
            llama_4_scaling_length=int(a("attention.temperature_length", 1) or 1),
        )


@dataclass
class Layer:
    q_kv: Projections      # [attn_q_a (or attn_q when q_lora_rank is 0), attn_kv_a_mqa]: both read h
    q_a_norm: np.ndarray | None
    q_b: object | None
    kv_a_norm: np.ndarray
    k_b: object            # [heads, kv_lora, nope]
    v_b: object            # [heads, v_head_dim, kv_lora]
    o: object
    experts: Experts | None
    shared: DenseFFN | None
    dense: DenseFFN | None


class Model(Decoder):
    def __init__(self, f: GGUFFile, cfg: Config, be):
        super().__init__(f, cfg, be)
        self.layers = [self._layer(f, i) for i in range(cfg.num_hidden_layers)]

    def _layer(self, f: GGUFFile, i: int) -> Layer:
        b = f"blk.{i}."
        w = lambda n: weight(f, b + n + ".weight")
        has = lambda n: b + n + ".weight" in f.tensors
        lora = self.cfg.q_lora_rank > 0
        ffn = lambda s: DenseFFN(w(f"ffn_gate{s}"), w(f"ffn_up{s}"), w(f"ffn_down{s}"))
        experts = None
        if has("ffn_gate_inp"):
            if has("ffn_gate_up_exps"):            # llama.cpp's fused layout: gate rows, then up rows
                gu = expert_weight(f, b + "ffn_gate_up_exps.weight")
                I = gu.rows // 2
                gate, up = (type(gu)(gu.raw[:, s], gu.type, gu.cols, gu.name) for s in (slice(0, I), slice(I, None)))
            else:
                gate, up = expert_weight(f, b + "ffn_gate_exps.weight"), expert_weight(f, b + "ffn_up_exps.weight")
            experts = Experts(w("ffn_gate_inp"), gate, up, expert_weight(f, b + "ffn_down_exps.weight"))
        return Layer(
            q_kv=Projections.stack(w("attn_q_a") if lora else w("attn_q"), w("attn_kv_a_mqa")),
            q_a_norm=f.array(b + "attn_q_a_norm.weight") if lora else None, q_b=w("attn_q_b") if lora else None,
            kv_a_norm=f.array(b + "attn_kv_a_norm.weight"), k_b=w("attn_k_b"), v_b=w("attn_v_b"),
            o=w("attn_output"), experts=experts,
            shared=ffn("_shexp") if experts is not None and has("ffn_gate_shexp") else None,
            dense=ffn("") if experts is None else None)

    def new_cache(self, n_ctx: int) -> KVCache:
        c = self.cfg
        return KVCache(c.num_hidden_layers, {"latent": (c.kv_lora_rank + c.qk_rope_head_dim,)}, n_ctx, self.be.xp)

    def attention(self, i: int, h: Normed, positions: np.ndarray, cache: KVCache, residual) -> np.ndarray:
        c, be, L = self.cfg, self.be, self.layers[i]
        n, heads, nope, kvr = len(h), c.num_attention_heads, c.qk_nope_head_dim, c.kv_lora_rank
        q, kv = L.q_kv(be, h)
        if L.q_b is not None:                                                          # q LoRA
            q = be.linear(L.q_b, Normed(q, L.q_a_norm, c.rms_norm_eps))
        q = q.reshape(n, heads, nope + c.qk_rope_head_dim)
        # cache row = [rmsnorm(c), rope(k_rope)]; query = [W_kb q_nope, rope(q_rope)] (both llama-4 scaled)
        query = be.mla_rope(q, kv, positions, *rope_table(be, c.rope, cache.n_ctx), L.kv_a_norm, c.rms_norm_eps,
                            cache.buffer(i, "latent"), L.k_b, c.llama_4_scaling_beta, c.llama_4_scaling_length)
        kvc = cache.buffer(i, "latent")[:, None, :]
        o_latent = be.attention(query, kvc, kvc[..., :kvr], positions, c.attention_scale)
        o = be.linear_heads(L.v_b, o_latent)                                           # W_vb after attending
        return be.linear(L.o, o.reshape(n, heads * c.v_head_dim), residual=residual)

    def ffn(self, i: int, h: Normed, routes, residual) -> np.ndarray:
        c, L = self.cfg, self.layers[i]
        if L.dense is not None:
            return swiglu(self.be, L.dense, h, residual=residual)
        return self.routed(i, L.experts, h, routes, norm=c.norm_topk_prob, scale=c.routed_scaling_factor,
                           n_group=c.n_group, topk_group=c.topk_group, shared=L.shared, residual=residual)
