"""Mixtral: grouped-query attention, top-2 routed experts. GGUF arch `llama` (as llama.cpp writes it)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backends import Normed
from ..errors import ModelFileError
from ..gguf.reader import GGUFFile
from .decoder import Decoder, KVCache, Projections, expert_weight, weight
from .moe import Experts
from .rope import Rope, apply_rope, rope_tables

ARCH = "llama"


@dataclass(frozen=True)
class Config:
    """Fields named as in Transformers' MixtralConfig; values read from GGUF metadata."""
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    num_experts_per_tok: int
    rms_norm_eps: float
    vocab_size: int
    max_position_embeddings: int
    rope: Rope

    @property
    def n_experts(self) -> int:
        return self.num_local_experts

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> "Config":
        a = lambda k, d=None: f.get(f"{ARCH}.{k}", d) if d is not None else f.require(f"{ARCH}.{k}")
        hidden, heads = a("embedding_length"), a("attention.head_count")
        if not a("expert_count", 0):
            raise ModelFileError(f"{f.path}: a dense llama model (no experts); localmoe runs MoE models only")
        head_dim = a("attention.key_length", hidden // heads)
        return cls(
            hidden_size=hidden, num_hidden_layers=a("block_count"), num_attention_heads=heads,
            num_key_value_heads=a("attention.head_count_kv", heads), head_dim=head_dim,
            num_local_experts=a("expert_count"), num_experts_per_tok=a("expert_used_count"),
            rms_norm_eps=float(a("attention.layer_norm_rms_epsilon")),
            vocab_size=f.info("token_embd.weight").shape[0], max_position_embeddings=a("context_length"),
            rope=Rope(a("rope.dimension_count", head_dim), float(a("rope.freq_base", 10000.0))))


@dataclass
class Layer:
    qkv: Projections       # [attn_q, attn_k, attn_v]: all read h
    o: object
    experts: Experts


class Model(Decoder):
    def __init__(self, f: GGUFFile, cfg: Config, be):
        super().__init__(f, cfg, be)
        w = lambda i, n: weight(f, f"blk.{i}.{n}.weight")
        x = lambda i, n: expert_weight(f, f"blk.{i}.{n}.weight")
        self.layers = [Layer(Projections.stack(w(i, "attn_q"), w(i, "attn_k"), w(i, "attn_v")), w(i, "attn_output"),
                             Experts(w(i, "ffn_gate_inp"), x(i, "ffn_gate_exps"), x(i, "ffn_up_exps"),
                                     x(i, "ffn_down_exps")))
                       for i in range(cfg.num_hidden_layers)]

    def new_cache(self, n_ctx: int) -> KVCache:
        c = self.cfg
        row = (c.num_key_value_heads, c.head_dim)
        return KVCache(c.num_hidden_layers, {"k": row, "v": row}, n_ctx, self.be.xp)

    def attention(self, i: int, h: Normed, positions: np.ndarray, cache: KVCache, residual) -> np.ndarray:
        c, be, L = self.cfg, self.be, self.layers[i]
        n, hd = len(h), c.head_dim
        cos, sin = rope_tables(be, c.rope, cache.n_ctx, positions)
        q, k, v = L.qkv(be, h)
        q = apply_rope(q.reshape(n, c.num_attention_heads, hd), cos, sin, be.xp)
        k = apply_rope(k.reshape(n, c.num_key_value_heads, hd), cos, sin, be.xp)
        cache.write(i, positions, k=k, v=v.reshape(n, c.num_key_value_heads, hd))
        o = be.attention(q, cache.buffer(i, "k"), cache.buffer(i, "v"), positions, hd ** -0.5)
        return be.linear(L.o, o.reshape(n, c.num_attention_heads * hd), residual=residual)

    def ffn(self, i: int, h: Normed, routes, residual) -> np.ndarray:
        return self.routed(i, self.layers[i].experts, h, routes, residual=residual)
