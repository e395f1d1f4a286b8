"""What every decoder-only MoE shares: weights from the GGUF, the KV cache, the layer loop, counters.

forward() reads like the paper: embed; per layer x += attention(norm(x)), x += ffn(norm(x)); norm; head.
An architecture file supplies `attention` and `ffn` for one layer.
"""
from __future__ import annotations

import numpy as np

from ..backends import Weight
from ..gguf.reader import GGUFFile


def weight(f: GGUFFile, name: str) -> Weight:
    ti = f.info(name)
    return Weight(f.raw(name), ti.type, ti.shape[-1], name)


def expert_weight(f: GGUFFile, name: str) -> Weight:
    """A routed-experts tensor: read one expert at a time, so the file gets no readahead for it."""
    f.advise_random(name)
    return weight(f, name)


class KVCache:
    """Per layer, named arrays of rows (one row per position), grown by doubling up to n_ctx."""

    def __init__(self, n_layers: int, rows: dict[str, tuple[int, ...]], n_ctx: int, xp=np):
        """xp: the array namespace the rows live in (the backend's: numpy, or cupy on the GPU)."""
        self.n_ctx, self.length, self.rows, self.xp = n_ctx, 0, rows, xp
        self.layers = [{k: xp.zeros((min(n_ctx, 256),) + s, np.float32) for k, s in rows.items()}
                       for _ in range(n_layers)]

    def write(self, layer: int, pos0: int, **values: np.ndarray) -> None:
        store = self.layers[layer]
        for k, v in values.items():
            end = pos0 + len(v)
            if end > len(store[k]):
                grown = self.xp.zeros((min(self.n_ctx, max(end, 2 * len(store[k]))),) + self.rows[k], np.float32)
                grown[:len(store[k])] = store[k]
                store[k] = grown
            store[k][pos0:end] = v

    def view(self, layer: int, name: str, end: int) -> np.ndarray:
        return self.layers[layer][name][:end]

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)


class Stats:
    """Counters: tokens processed, which experts ran per layer, expert bytes read."""

    def __init__(self, n_layers: int, n_experts: int):
        self.n_layers, self.n_experts = n_layers, n_experts
        self.keep_routing = False      # keep every call's expert ids in `routing` (for analysis; grows per token)
        self.reset()

    def reset(self) -> None:
        self.tokens = 0
        self.forward_calls = 0
        self.expert_counts = np.zeros((self.n_layers, max(1, self.n_experts)), np.int64)
        self.expert_reads = 0          # (layer, expert) matrices read: once per forward call per unique expert
        self.expert_bytes = 0
        self.routing: list[tuple[int, int, np.ndarray]] = []   # (forward call, layer, ids [n, k]) if keep_routing

    def record_experts(self, layer: int, ids: np.ndarray, bytes_per_expert: int) -> None:
        unique = np.unique(ids)
        np.add.at(self.expert_counts[layer], ids.ravel(), 1)
        self.expert_reads += len(unique)
        self.expert_bytes += len(unique) * bytes_per_expert
        if self.keep_routing:
            self.routing.append((self.forward_calls, layer, ids.copy()))

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "forward_calls": self.forward_calls, "expert_reads": self.expert_reads,
                "expert_bytes": self.expert_bytes}


class Decoder:
    """The layer loop. Subclasses load their layers and define attention(i, h, pos, cache) and ffn(i, h)."""

    def __init__(self, f: GGUFFile, cfg, be):
        self.cfg, self.be = cfg, be
        self.embed_tokens = weight(f, "token_embd.weight")
        self.lm_head = weight(f, "output.weight") if "output.weight" in f.tensors else self.embed_tokens
        self.norm = f.array("output_norm.weight")
        L = cfg.num_hidden_layers
        self.attn_norm = [f.array(f"blk.{i}.attn_norm.weight") for i in range(L)]
        self.ffn_norm = [f.array(f"blk.{i}.ffn_norm.weight") for i in range(L)]
        self.stats = Stats(L, cfg.n_experts)

    def forward(self, ids: np.ndarray, cache: KVCache, last_only: bool = False, embeds=None) -> np.ndarray:
        """Logits [n or 1, vocab] as a host numpy array; activations and the cache stay in `be.xp`.
        `embeds` = (rows, vectors): inputs that replace the token embeddings at those rows of `ids`
        (image features at [IMG] positions, as Transformers' masked_scatter)."""
        be, eps = self.be, self.cfg.rms_norm_eps
        positions = np.arange(cache.length, cache.length + len(ids))
        x = be.embed(self.embed_tokens, ids)
        if embeds is not None:
            x[be.xp.asarray(embeds[0])] = be.xp.asarray(embeds[1])
        for i in range(self.cfg.num_hidden_layers):
            x = x + self.attention(i, be.rmsnorm(x, self.attn_norm[i], eps), positions, cache)
            x = x + self.ffn(i, be.rmsnorm(x, self.ffn_norm[i], eps))
        cache.length += len(ids)
        self.stats.tokens += len(ids)
        self.stats.forward_calls += 1
        h = be.rmsnorm(x[-1:] if last_only else x, self.norm, eps)
        return be.to_host(be.linear(self.lm_head, h))       # logits on the host, for sampling
