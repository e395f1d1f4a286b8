"""train/train.py's grouped-matmul experts compute what Transformers' Mistral4Experts computes (CPU, bf16)."""
from __future__ import annotations

import torch


def test_grouped_experts_match_transformers():
    from transformers.models.mistral4 import modeling_mistral4 as mm

    from train.train import build_model, grouped_experts_forward
    ex = next(m for m in build_model().modules() if isinstance(m, mm.Mistral4Experts))
    g = torch.Generator().manual_seed(7)
    n, k, E = 45, 4, ex.num_experts
    h = torch.randn(n, ex.gate_up_proj.shape[-1], generator=g, requires_grad=True)
    idx = torch.stack([torch.randperm(E - 3, generator=g)[:k] for _ in range(n)])   # 3 experts get no token
    w = torch.rand(n, k, generator=g)
    ref = mm.Mistral4Experts.forward(ex, h, idx, w)
    ours = grouped_experts_forward(ex, h, idx, w)
    assert ((ours - ref).abs().max() / ref.abs().max()).item() < 2e-2          # bf16 matmuls vs float32
    gr, = torch.autograd.grad(ref.pow(2).sum(), h)
    go, = torch.autograd.grad(ours.pow(2).sum(), h)
    assert ((go - gr).abs().max() / gr.abs().max()).item() < 5e-2
    again = grouped_experts_forward(ex, h, idx, w)
    assert torch.equal(ours, again)
