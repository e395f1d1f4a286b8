"""The CPU backend: the kernel interface on Numba kernels (kernels.py) and numpy."""
from __future__ import annotations

import os
from pathlib import Path

# Numba caches compiled kernels next to the module; where the install is read-only, in the user's cache.
if "NUMBA_CACHE_DIR" not in os.environ and not os.access(Path(__file__).parent, os.W_OK):
    os.environ["NUMBA_CACHE_DIR"] = str(Path.home() / ".cache" / "localmoe" / "numba")

import numpy as np  # noqa: E402

from .. import DenseFFN, Weight, plain, swiglu  # noqa: E402
from ...models.moe import route_topk  # noqa: E402
from ...models.rope import apply_rope  # noqa: E402
from . import kernels  # noqa: E402


def kernels_cached() -> bool:
    """Whether Numba's on-disk cache already holds compiled kernels (so no JIT wait is coming)."""
    root = Path(os.environ["NUMBA_CACHE_DIR"]) if os.environ.get("NUMBA_CACHE_DIR") else Path(__file__).parent / "__pycache__"
    return root.exists() and any(root.rglob("kernels.*.nbi"))


class CPUBackend:
    name = "cpu"
    xp = np                              # the array namespace of activations (models/*.py use be.xp)

    def __init__(self):
        self.rope_tables: dict = {}      # rope tables cached per backend (models/rope.py)

    @staticmethod
    def to_host(a) -> np.ndarray:
        """Activations as a host numpy array (they already are)."""
        return a

    def linear(self, w: Weight, x, residual: np.ndarray | None = None) -> np.ndarray:
        """y [n, rows] = x [n, cols] @ W.T (x an array or a `Normed`), on the stored blocks; + residual [n, rows]
        when given (the residual stream's add: on a GPU, norm, product and add are one launch)."""
        y = kernels.matmul(w.raw, int(w.type), np.ascontiguousarray(plain(self, x), dtype=np.float32))
        return y if residual is None else y + residual

    def linear_heads(self, w: Weight, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Per-head matrices w [heads, rows, cols] applied to x [n, heads, cols] -> [n, heads, rows]
        (written into `out`, which may be a strided view, when given)."""
        y = kernels.matmul_heads(w.raw, int(w.type), x)
        if out is None:
            return y
        out[...] = y
        return out

    def glu(self, gate: Weight, up: Weight, x: np.ndarray) -> np.ndarray:
        """silu(x @ gate.T) * (x @ up.T) [n, rows]: the SwiGLU hidden layer (one fused kernel on a GPU)."""
        x = plain(self, x)
        g = self.linear(gate, x)
        return g / (1.0 + np.exp(-g)) * self.linear(up, x)

    def rmsnorm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        x = x.astype(np.float32, copy=False)
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight

    def mla_rope(self, q: np.ndarray, kv: np.ndarray, positions: np.ndarray, cos: np.ndarray, sin: np.ndarray,
                 kv_norm: np.ndarray, eps: float, cache: np.ndarray, k_b: Weight, beta: float = 0.0,
                 length: int = 1) -> np.ndarray:
        """MLA's work between its projections and the attention (one kernel on a GPU).
        q [n, heads, nope + r], kv [n, kvr + r], cos/sin [n_ctx, r/2] whole tables, cache [capacity, kvr + r],
        k_b [heads, kvr, nope]. Writes cache[positions[j]] = [rmsnorm(kv[j, :kvr]) * kv_norm, rope(kv[j, kvr:])];
        returns the query [n, heads, kvr + r] = [W_kb (q_nope * s), rope(q_rope) * s] (W_kb folded into the
        query), s = 1 + beta * log1p(position // length) (llama-4 scaling)."""
        r = 2 * cos.shape[1]
        nope, kvr = q.shape[2] - r, kv.shape[1] - r
        c, s = cos[positions], sin[positions]
        scale = (1 + beta * np.log1p(positions // length)).astype(np.float32)[:, None, None] if beta else np.float32(1)
        query = np.empty(q.shape[:2] + (kvr + r,), np.float32)
        query[..., kvr:] = apply_rope(q[..., nope:], c, s) * scale
        cache[positions] = np.concatenate([self.rmsnorm(kv[:, :kvr], kv_norm, eps),
                                           apply_rope(kv[:, None, kvr:], c, s)[:, 0]], axis=-1)
        self.linear_heads(k_b, np.ascontiguousarray(q[..., :nope] * scale, dtype=np.float32), out=query[..., :kvr])
        return query

    @staticmethod
    def route(logits: np.ndarray, k: int, norm: bool = True, scale: float = 1.0, n_group: int = 1,
              topk_group: int = 1, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The router's choice for logits [n, E]: (ids [n, k], weights [n, k]) as moe.route_topk;
        ids written into `out` when given."""
        ids, w = route_topk(logits, k, norm, scale, n_group, topk_group)
        if out is None:
            return ids, w
        out[...] = ids
        return out, w

    @staticmethod
    def replay(key, step, *inputs, meanwhile=lambda: None):
        """meanwhile(), then step(*inputs). (The CUDA backend captures keyed steps into graphs and does the
        host's meanwhile() while one runs; here nothing to gain.)"""
        meanwhile()
        return step(*inputs)

    def expert_ffn(self, gate: Weight, up: Weight, down: Weight, x, ids: np.ndarray, weights: np.ndarray,
                   shared: DenseFFN | None = None, residual: np.ndarray | None = None) -> np.ndarray:
        """sum_k weights[:, k] * down_e(silu(gate_e x) * up_e x) over each token's selected experts e
        (+ the shared expert's swiglu(x), when given; + residual, when given). x: an array or a `Normed`."""
        x = np.ascontiguousarray(plain(self, x), dtype=np.float32)
        y = kernels.expert_ffn(x, ids, weights, gate.raw, int(gate.type), down.raw, int(down.type), up.raw,
                               int(up.type))
        if shared is not None:
            y = swiglu(self, shared, x, residual=y)
        return y if residual is None else y + residual

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, positions: np.ndarray,
                  scale: float) -> np.ndarray:
        """Causal attention: query j of q [n, Hq, dk] sees the keys k [:, Hkv, dk] and values
        v [:, Hkv, dv] at positions 0..positions[j] (Hq a multiple of Hkv; rows past the largest
        position are not read) -> [n, Hq, dv]."""
        n, hq, dk = q.shape
        T = int(positions.max()) + 1
        k, v = k[:T], v[:T]
        hkv, dv = v.shape[1:]
        g = hq // hkv
        qg = q.reshape(n, hkv, g, dk).transpose(1, 0, 2, 3).reshape(hkv, n * g, dk)   # rows: (query, head)
        s = np.matmul(qg, k.transpose(1, 2, 0)) * np.float32(scale)                   # [hkv, n*g, T]
        query_pos = np.repeat(positions, g)
        s[:, np.arange(T)[None, :] > query_pos[:, None]] = -np.inf
        s -= s.max(axis=-1, keepdims=True)
        p = np.exp(s)
        p /= p.sum(axis=-1, keepdims=True)
        o = np.matmul(p, v.transpose(1, 0, 2))                                         # [hkv, n*g, dv]
        return o.reshape(hkv, n, g, dv).transpose(1, 0, 2, 3).reshape(n, hq, dv).astype(np.float32)
