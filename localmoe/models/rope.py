"""Rotary position embeddings on interleaved pairs (x0, x1), (x2, x3)... — llama.cpp's "normal" RoPE.

Mixtral's rotate-half rows are permuted into pairs by the converter, so one rotation serves every
architecture. YaRN frequencies follow Transformers 5.23's `_compute_yarn_parameters`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Rope:
    dim: int
    theta: float
    yarn_factor: float = 1.0          # 1.0: plain RoPE
    original_context: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attn_factor: float = 1.0          # multiplies cos and sin (YaRN's mscale ratio)

    def inv_freq(self) -> np.ndarray:
        d = self.dim
        pos_freqs = self.theta ** (np.arange(0, d, 2, dtype=np.float32) / d)
        extrapolation = 1.0 / pos_freqs
        if self.yarn_factor <= 1.0:
            return extrapolation.astype(np.float32)
        interpolation = 1.0 / (self.yarn_factor * pos_freqs)

        def correction_dim(rotations):
            return d * math.log(self.original_context / (rotations * 2 * math.pi)) / (2 * math.log(self.theta))

        low = max(math.floor(correction_dim(self.beta_fast)), 0)
        high = min(math.ceil(correction_dim(self.beta_slow)), d - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(d // 2, dtype=np.float32) - low) / (high - low), 0, 1)
        extrapolation_factor = 1 - ramp
        return (interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor).astype(np.float32)

    def tables(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin [n, dim/2] for integer positions (float32 like the reference)."""
        f = positions.astype(np.float32)[:, None] * self.inv_freq()[None, :]
        return (np.cos(f) * self.attn_factor).astype(np.float32), (np.sin(f) * self.attn_factor).astype(np.float32)


def rope_table(be, rope: Rope, n_ctx: int):
    """cos, sin [n_ctx, dim/2] for positions 0..n_ctx-1 as `be.xp` arrays, computed once per backend:
    kernels read the rows at device positions, so a decode step uploads nothing and reads no host value."""
    hit = be.rope_tables.get(rope)
    if hit is None or n_ctx > len(hit[0]):
        hit = be.rope_tables[rope] = tuple(be.xp.asarray(t) for t in rope.tables(np.arange(n_ctx)))
    return hit


def rope_tables(be, rope: Rope, n_ctx: int, positions):
    """cos, sin [n, dim/2] at `positions` (an xp int array): rows of `rope_table`. The same float32
    elementwise arithmetic as Rope.tables, hence the same values."""
    cos, sin = rope_table(be, rope, n_ctx)
    return cos[positions], sin[positions]


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, xp=np) -> np.ndarray:
    """Rotate pairs of x [n, heads, dim] by the angles of each row's position (cos/sin [n, dim/2]);
    xp: the arrays' namespace (numpy or cupy)."""
    a, b = x[..., 0::2], x[..., 1::2]
    c, s = cos[:, None, :], sin[:, None, :]
    out = xp.empty_like(x)
    out[..., 0::2] = a * c - b * s
    out[..., 1::2] = b * c + a * s
    return out
