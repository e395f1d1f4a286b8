"""The kernel interface.

Model code (localmoe/models/*) calls only the functions of a `Backend`; each backend (cpu, cuda)
implements them once. Weights are `Weight`s: the GGUF's own blocks, never dequantised whole.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..gguf.format import GGMLType


@dataclass(frozen=True)
class Weight:
    """A weight matrix as stored in the GGUF: raw blocks (rows, row_bytes), or (experts, rows, row_bytes).

    `cols` is the logical input width; `rows` the output width. Computing y = x @ W.T reads the
    blocks directly; `expert(e)` is a zero-copy view of one expert's matrix.
    """
    raw: np.ndarray
    type: GGMLType
    cols: int
    name: str = ""

    @property
    def rows(self) -> int:
        return self.raw.shape[-2]

    @property
    def n_experts(self) -> int:
        return self.raw.shape[0] if self.raw.ndim == 3 else 0

    def expert(self, e: int) -> "Weight":
        return Weight(self.raw[e], self.type, self.cols, f"{self.name}[{e}]")

    def expert_nbytes(self) -> int:
        return self.raw[0].nbytes

    def dequantize_rows(self, ids) -> np.ndarray:
        """float32 rows ids [n, cols], only those rows read (the token embedding, looked up on the host)."""
        from .cpu.kernels import dequantize_rows
        return dequantize_rows(self.raw, int(self.type), ids)


@dataclass
class DenseFFN:
    """A SwiGLU FFN: down(silu(gate x) * up x) — the shared expert and dense layers."""
    gate: Weight
    up: Weight
    down: Weight


@dataclass(frozen=True)
class Normed:
    """rmsnorm(x) * weight, not computed yet: the kernels that read it normalise x as they load it (a GPU's
    gemv prologue), so a norm costs no launch of its own. Backends take it wherever an activation goes in
    (`linear`, `glu`, `expert_ffn`); `plain` computes it for the rest."""
    x: object
    weight: np.ndarray
    eps: float

    def __len__(self) -> int:
        return len(self.x)


def plain(be, x):
    """x as an array: a `Normed` computed through be.rmsnorm, anything else as it is."""
    return be.rmsnorm(x.x, x.weight, x.eps) if isinstance(x, Normed) else x


def swiglu(be, ffn: DenseFFN, x, residual=None):
    """ffn(x) (+ residual) through a backend's kernel interface (the backends' expert_ffn adds the shared expert
    with it)."""
    return be.linear(ffn.down, be.glu(ffn.gate, ffn.up, x), residual=residual)
