"""The pieces every MoE architecture shares: the router and the expert FFNs.

gpt-fast's MoE in numpy: gate logits -> softmax -> top-k -> renormalise -> run only the chosen experts.
`route_topk` is the reference the backends' `route` implement (the CPU backend calls it).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backends import DenseFFN, Weight


def route_topk(logits: np.ndarray, k: int, norm: bool = True, scale: float = 1.0,
               n_group: int = 1, topk_group: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Router: softmax over all experts, keep the k largest (within the best `topk_group` of `n_group`
    groups, DeepSeek-style, when n_group > 1), renormalise them to sum 1, times `scale`.
    Returns (expert ids [n, k] int64, weights [n, k] float32)."""
    z = logits.astype(np.float32)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    choice = p
    if n_group > 1:
        n, E = p.shape
        g = p.reshape(n, n_group, E // n_group)
        group_score = np.sort(g, axis=-1)[..., -2:].sum(-1)
        keep = np.argsort(-group_score, axis=-1, kind="stable")[:, :topk_group]
        mask = np.zeros((n, n_group), bool)
        np.put_along_axis(mask, keep, True, axis=1)
        choice = np.where(np.repeat(mask, E // n_group, axis=1), p, 0.0)
    ids = np.argsort(-choice, axis=-1, kind="stable")[:, :k]
    w = np.take_along_axis(p, ids, axis=-1)
    if norm:
        w = w / (w.sum(axis=-1, keepdims=True) + 1e-20)
    return ids.astype(np.int64), (w * scale).astype(np.float32)


@dataclass
class Experts:
    """One layer's routed experts as stored: gate/up [E, I, H], down [E, H, I], router [E, H]."""
    router: Weight
    gate: Weight
    up: Weight
    down: Weight

    @property
    def bytes_per_expert(self) -> int:
        return self.gate.expert_nbytes() + self.up.expert_nbytes() + self.down.expert_nbytes()


def moe(be, ex: Experts, x, k: int, norm: bool = True, scale: float = 1.0, n_group: int = 1,
        topk_group: int = 1, shared: DenseFFN | None = None, ids_out=None, residual=None):
    """Routed experts for a batch x [n, H] (an array or a `Normed`): route (route_topk, on the backend), then
    run only the selected experts, plus the `shared` expert (weight 1) when there is one, plus `residual`.
    The chosen ids [n, k] go to `ids_out` (the decoder's counters). Returns y [n, H], on the backend's device."""
    ids, w = be.route(be.linear(ex.router, x), k, norm, scale, n_group, topk_group, out=ids_out)
    return be.expert_ffn(ex.gate, ex.up, ex.down, x, ids, w, shared=shared, residual=residual)
