"""What every decoder-only MoE shares: weights from the GGUF, the KV cache, the layer loop, counters.

step() reads like the paper: per layer x += attention(norm(x)), x += ffn(norm(x)); norm; head. A norm is handed
on as a `Normed` (the kernels that read it apply it) and each residual add as `residual=` (the kernel that
produces the sum adds it), so neither costs a launch of its own on a GPU. forward()
does the host part around it (embedding rows, positions, cache growth, counters).
An architecture file supplies `attention` and `ffn` for one layer.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import numpy as np

from ..backends import Normed, Weight
from ..gguf.reader import GGUFFile
from .moe import moe


def weight(f: GGUFFile, name: str) -> Weight:
    ti = f.info(name)
    return Weight(f.raw(name), ti.type, ti.shape[-1], name)


def expert_weight(f: GGUFFile, name: str) -> Weight:
    """A routed-experts tensor: read one expert at a time, so the file gets no readahead for it."""
    f.advise_random(name)
    return weight(f, name)


@dataclass(frozen=True)
class Projections:
    """Projections of one input with their weights stacked by rows where they are stored alike (as vLLM's
    fused qkv): one gemv instead of one per projection, the launches of a decode step being its fixed cost.
    Called with (backend, x [n, cols]), returns each projection's output, as views of one [n, sum] array."""
    weights: tuple[Weight, ...]
    sizes: tuple[int, ...]

    @classmethod
    def stack(cls, *ws: Weight) -> "Projections":
        groups: list[list[Weight]] = []
        for w in ws:
            if groups and (groups[-1][0].type, groups[-1][0].cols) == (w.type, w.cols):
                groups[-1].append(w)
            else:
                groups.append([w])
        return cls(tuple(g[0] if len(g) == 1 else Weight(np.concatenate([w.raw for w in g]), g[0].type, g[0].cols,
                                                         "+".join(w.name for w in g)) for g in groups),
                   tuple(w.rows for w in ws))

    def __call__(self, be, x) -> list:
        ys = [be.linear(w, x) for w in self.weights]
        y = ys[0] if len(ys) == 1 else be.xp.concatenate(ys, axis=-1)
        ends = np.cumsum(self.sizes)
        return [y[..., e - s:e] for s, e in zip(self.sizes, ends)]


_GENERATIONS = itertools.count()


class KVCache:
    """Per layer, named arrays of rows (one row per position), grown by doubling up to n_ctx.

    `reserve(end)` grows on the host before a forward pass; `write` and the attention then index the
    buffers with position arrays only, so a decode step reads no host value (a CUDA graph replays it)."""

    def __init__(self, n_layers: int, rows: dict[str, tuple[int, ...]], n_ctx: int, xp=np):
        """xp: the array namespace the rows live in (the backend's: numpy, or cupy on the GPU)."""
        self.n_ctx, self.length, self.rows, self.xp = n_ctx, 0, rows, xp
        self.capacity = min(n_ctx, 256)
        self.generation = next(_GENERATIONS)     # changes whenever the buffers do (keys captured steps)
        self.layers = [{k: xp.zeros((self.capacity,) + s, np.float32) for k, s in rows.items()}
                       for _ in range(n_layers)]

    def reserve(self, end: int) -> None:
        """Room for positions 0..end-1 (buffers reallocated, doubling, when they are shorter)."""
        if end <= self.capacity:
            return
        self.capacity = min(self.n_ctx, max(end, 2 * self.capacity))
        self.generation = next(_GENERATIONS)
        for store in self.layers:
            for k, old in store.items():
                store[k] = self.xp.zeros((self.capacity,) + self.rows[k], np.float32)
                store[k][:len(old)] = old

    def write(self, layer: int, positions, **values) -> None:
        """Rows `values[name][j]` at positions[j] (an xp int array)."""
        store = self.layers[layer]
        for k, v in values.items():
            store[k][positions] = v

    def buffer(self, layer: int, name: str):
        """The whole buffer [capacity, ...]; rows past the written positions are never read."""
        return self.layers[layer][name]

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)


class Stats:
    """Counters: tokens processed, which experts ran per layer, expert bytes read."""

    def __init__(self, n_layers: int, n_experts: int):
        self.n_layers, self.n_experts = n_layers, n_experts
        self.keep_routing = False      # keep every call's expert ids in `routing` (for analysis; grows per token)
        self.expert_cache = None       # the backend's ExpertStreamer when experts stream into a VRAM cache
        self.reset()

    def reset(self) -> None:
        self.tokens = 0
        self.forward_calls = 0
        self.expert_counts = np.zeros((self.n_layers, max(1, self.n_experts)), np.int64)
        self.expert_reads = 0          # (layer, expert) matrices read: once per forward call per unique expert
        self.expert_bytes = 0
        self.routing: list[tuple[int, int, np.ndarray]] = []   # (forward call, layer, ids [n, k]) if keep_routing

    def record_routes(self, call: int, layers: np.ndarray, ids: np.ndarray, bytes_per_expert: np.ndarray) -> None:
        """Forward call `call`'s routing: ids [M, n, k], the experts MoE layer layers[m] ran for each of its n
        rows (bytes_per_expert [M]: what one expert of that layer reads), in whole arrays."""
        E = self.expert_counts.shape[1]
        keys = (layers[:, None] * E + ids.reshape(len(layers), -1)).ravel()
        self.expert_counts.reshape(-1)[:] += np.bincount(keys, minlength=self.expert_counts.size)
        keys.sort()
        distinct = keys[np.concatenate(([True], keys[1:] != keys[:-1]))]      # (layer, expert) pairs read
        self.expert_reads += len(distinct)
        self.expert_bytes += int(bytes_per_expert[np.searchsorted(layers, distinct // E)].sum())
        if self.keep_routing:
            self.routing += [(call, int(layer), a.copy()) for layer, a in zip(layers, ids)]

    def as_dict(self) -> dict:
        d = {"tokens": self.tokens, "forward_calls": self.forward_calls, "expert_reads": self.expert_reads,
             "expert_bytes": self.expert_bytes}
        if self.expert_cache is not None:
            c = self.expert_cache.stats()
            hits, misses = c.get("hits", 0), c.get("misses", 0)          # none before the first fetch
            d.update(cache_hit_rate=hits / max(1, hits + misses), cache_slots=c["slots"],
                     bytes_h2d=c["bytes_h2d"], bytes_h2d_per_token=c["bytes_h2d"] / max(1, self.tokens))
            if "host_registered" in c:
                d.update(cache_direct_dma=c["host_registered"], cache_register_why_not=c["register_why_not"],
                         cache_on_device=c.get("on_device", False))
        return d

    def cache_line(self) -> str:
        """The expert cache's figures for --verbose ('' when every expert is resident)."""
        if self.expert_cache is None:
            return ""
        d = self.as_dict()
        how = ""
        if "cache_direct_dma" in d:
            how = ("; decided and copied by GPU kernels from the mapped file" if d["cache_on_device"] else
                   "; direct DMA from the mapped file" if d["cache_direct_dma"] else
                   f"; staged ({d['cache_register_why_not']})")
        return (f"expert cache: {d['cache_slots']} slots, hit rate {d['cache_hit_rate']:.1%}, host->GPU "
                f"{d['bytes_h2d_per_token'] / 2 ** 20:.1f} MiB/token ({d['bytes_h2d'] / 2 ** 30:.2f} GiB in all){how}")


class Decoder:
    """The layer loop. Subclasses load their layers and define attention(i, h, pos, cache, residual) and
    ffn(i, h, routes, residual): the layer's output + residual, h a `Normed`."""

    def __init__(self, f: GGUFFile, cfg, be):
        self.cfg, self.be = cfg, be
        self.embed_tokens = weight(f, "token_embd.weight")
        self.lm_head = weight(f, "output.weight") if "output.weight" in f.tensors else self.embed_tokens
        self.norm = f.array("output_norm.weight")
        L = cfg.num_hidden_layers
        self.attn_norm = [f.array(f"blk.{i}.attn_norm.weight") for i in range(L)]
        self.ffn_norm = [f.array(f"blk.{i}.ffn_norm.weight") for i in range(L)]
        self._stats = Stats(L, cfg.n_experts)
        self._unrecorded = None          # (forward call, routes [layers, n, k]) not counted yet

    def forward(self, ids: np.ndarray, cache: KVCache, last_only: bool = False, embeds=None) -> np.ndarray:
        """Logits [n or 1, vocab] as a host numpy array; activations and the cache stay in `be.xp`.
        `embeds` = (rows, vectors): inputs that replace the token embeddings at those rows of `ids`
        (image features at [IMG] positions, as Transformers' masked_scatter).

        The host work (embedding rows, positions, cache growth, counters) happens here; `step` is
        the device-only part, which the backend may capture once and replay (`be.replay`): decode
        steps of one token are keyed by the cache buffers they write, so each replay is one launch
        (the embedded token and its position copied in, the logits and routes copied out, in the graph)."""
        be, n = self.be, len(ids)
        cache.reserve(cache.length + n)
        positions = np.arange(cache.length, cache.length + n, dtype=np.int32)
        x = self.embed_tokens.dequantize_rows(ids)       # the embedding stays on the host: one row a token
        if embeds is not None:
            x[embeds[0]] = be.to_host(embeds[1])
        key = ("decode", cache.generation) if n == 1 and embeds is None else None
        logits, routes = be.replay(key, lambda x, pos: self.step(x, pos, cache, last_only), x, positions,
                                   meanwhile=self._record_routes)
        cache.length += n
        self._stats.tokens += n
        self._stats.forward_calls += 1
        self._unrecorded = (self._stats.forward_calls, routes)
        return logits

    @property
    def stats(self) -> Stats:
        """The counters. forward() leaves its routing to be counted while the next call's step runs on the
        device (`be.replay`'s meanwhile: the host's ~0.1 ms a token off the GPU's critical path); reading
        the counters counts it first."""
        self._record_routes()
        return self._stats

    def _record_routes(self) -> None:
        if self._unrecorded is None:
            return
        (call, routes), self._unrecorded = self._unrecorded, None
        moe, per_expert = self._moe_layers
        if len(moe):
            self._stats.record_routes(call, moe, routes[moe], per_expert)

    @functools.cached_property
    def _moe_layers(self) -> tuple[np.ndarray, np.ndarray]:
        """The layers with routed experts, and the bytes one expert of each reads (for Stats.record_routes)."""
        moe = [(i, L.experts.bytes_per_expert) for i, L in enumerate(self.layers) if L.experts is not None]
        return np.array([i for i, _ in moe], np.intp), np.array([b for _, b in moe], np.int64)

    def step(self, x, positions, cache: KVCache, last_only: bool):
        """layers -> norm -> head on device arrays (x: the embedded tokens); reads nothing back from the device.
        Returns (logits, the expert ids chosen per layer [layers, n, k]; rows of dense layers unused)."""
        be, eps, c = self.be, self.cfg.rms_norm_eps, self.cfg
        routes = be.xp.zeros((c.num_hidden_layers, len(x), c.num_experts_per_tok), np.int32)
        for i in range(c.num_hidden_layers):
            x = self.attention(i, Normed(x, self.attn_norm[i], eps), positions, cache, residual=x)
            x = self.ffn(i, Normed(x, self.ffn_norm[i], eps), routes, residual=x)
        return be.linear(self.lm_head, Normed(x[-1:] if last_only else x, self.norm, eps)), routes

    def routed(self, i: int, experts, h, routes, **kw):
        """Layer i's routed experts on h (moe.moe), writing the chosen ids to routes[i] for the counters."""
        return moe(self.be, experts, h, self.cfg.num_experts_per_tok, ids_out=routes[i], **kw)
