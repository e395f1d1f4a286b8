"""The CPU backend: the kernel interface on Numba kernels (kernels.py) and numpy."""
from __future__ import annotations

import os
from pathlib import Path

# Numba caches compiled kernels next to the module; where the install is read-only, in the user's cache.
if "NUMBA_CACHE_DIR" not in os.environ and not os.access(Path(__file__).parent, os.W_OK):
    os.environ["NUMBA_CACHE_DIR"] = str(Path.home() / ".cache" / "localmoe" / "numba")

import numpy as np  # noqa: E402
from gguf.quants import dequantize  # noqa: E402

from .. import Weight  # noqa: E402
from ...gguf.format import GGMLType  # noqa: E402
from ...models.moe import route_topk  # noqa: E402
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

    def linear(self, w: Weight, x: np.ndarray) -> np.ndarray:
        """y [n, rows] = x [n, cols] @ W.T, on the stored blocks."""
        return kernels.matmul(w.raw, int(w.type), np.ascontiguousarray(x, dtype=np.float32))

    def linear_heads(self, w: Weight, x: np.ndarray) -> np.ndarray:
        """Per-head matrices w [heads, rows, cols] applied to x [n, heads, cols] -> [n, heads, rows]."""
        return kernels.matmul_heads(w.raw, int(w.type), x)

    def embed(self, w: Weight, ids: np.ndarray) -> np.ndarray:
        """Rows of the embedding table for token ids (only those rows are read)."""
        rows = w.raw[np.asarray(ids, dtype=np.int64)]
        if w.type == GGMLType.F32:
            return rows.view(np.float32).reshape(len(ids), w.cols).copy()
        return dequantize(rows, w.type).reshape(len(ids), w.cols).astype(np.float32)

    def rmsnorm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        x = x.astype(np.float32, copy=False)
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight

    @staticmethod
    def route(logits: np.ndarray, k: int, norm: bool = True, scale: float = 1.0, n_group: int = 1,
              topk_group: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """The router's choice for logits [n, E]: (ids [n, k], weights [n, k]) as moe.route_topk."""
        return route_topk(logits, k, norm, scale, n_group, topk_group)

    @staticmethod
    def replay(key, step, *inputs):
        """Run step(*inputs). (The CUDA backend captures keyed steps into graphs; here nothing to gain.)"""
        return step(*inputs)

    def expert_ffn(self, gate: Weight, up: Weight, down: Weight, x: np.ndarray, ids: np.ndarray,
                   weights: np.ndarray) -> np.ndarray:
        """sum_k weights[:, k] * down_e(silu(gate_e x) * up_e x) over each token's selected experts e."""
        return kernels.expert_ffn(np.ascontiguousarray(x, dtype=np.float32), ids, weights, gate.raw, int(gate.type),
                                  down.raw, int(down.type), up.raw, int(up.type))

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
