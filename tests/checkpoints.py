"""Tiny random Hugging Face checkpoints built with Transformers (the reference implementation).

Each factory saves a real checkpoint directory (config.json, safetensors, tokenizer file) and
returns (path, model) so tests can compare our runtime with the same model's Transformers logits.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

import mistral_common

MC_DATA = Path(mistral_common.__file__).parent / "data"
TEKKEN = MC_DATA / "tekken_240718.json"
SPM_V1 = MC_DATA / "tokenizer.model.v1"


def _init(model, seed: int, std: float, router_std: float | None = None):
    """Fresh random weights (never zeros); norms near 1 so they matter but stay stable.
    `router_std` > std gives confident routing (clear top-k margins), as trained routers have."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("mlp.gate.weight") and router_std:
                p.copy_(router_std * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model.eval()


def make_mistral4(out: Path, *, hidden=64, layers=2, heads=4, q_lora=32, kv_lora=32, nope=16, rope=16,
                  v_dim=16, experts=8, top_k=4, moe_inter=32, shared=1, first_dense=0, inter=64,
                  vocab=131072, seed=0, std=0.02, router_std=None, max_shard_size=None, tie=False,
                  **extra):
    from transformers import Mistral4Config, Mistral4ForCausalLM
    torch.manual_seed(seed)
    cfg = Mistral4Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, moe_intermediate_size=moe_inter,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        n_shared_experts=shared, n_routed_experts=experts, num_experts_per_tok=top_k,
        kv_lora_rank=kv_lora, q_lora_rank=q_lora, qk_rope_head_dim=rope, qk_nope_head_dim=nope,
        v_head_dim=v_dim, first_k_dense_replace=first_dense, tie_word_embeddings=tie, **extra)
    model = _init(Mistral4ForCausalLM(cfg), seed, std, router_std)
    _save(model, out, max_shard_size)
    shutil.copy(TEKKEN, out / "tekken.json")
    return out, model


def make_mixtral(out: Path, *, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=None, experts=8,
                 top_k=2, inter=96, vocab=32000, seed=0, std=0.02, router_std=None, fused=False,
                 max_shard_size=None):
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(seed)
    cfg = MixtralConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, num_local_experts=experts,
        num_experts_per_tok=top_k, rope_theta=1e6, sliding_window=None, max_position_embeddings=4096,
        **({"head_dim": head_dim} if head_dim else {}))
    model = _init(MixtralForCausalLM(cfg), seed, std, router_std)
    _save(model, out, max_shard_size)
    if fused:
        _fuse_mixtral_experts(out, cfg)
    shutil.copy(SPM_V1, out / "tokenizer.model")
    return out, model


def _save(model, out: Path, max_shard_size):
    out.mkdir(parents=True, exist_ok=True)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kw)


def _fuse_mixtral_experts(out: Path, cfg) -> None:
    """Rewrite a per-expert Mixtral checkpoint into the fused on-disk layout
    (mlp.gate, mlp.experts.gate_up_proj [E, 2I, H] gate rows first, mlp.experts.down_proj [E, H, I])."""
    files = sorted(out.glob("*.safetensors"))
    tensors = {}
    for f in files:
        tensors.update(load_file(f))
        f.unlink()
    (out / "model.safetensors.index.json").unlink(missing_ok=True)
    fused = {}
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}.block_sparse_moe."
        E = cfg.num_local_experts
        w1 = [tensors.pop(f"{p}experts.{e}.w1.weight") for e in range(E)]
        w3 = [tensors.pop(f"{p}experts.{e}.w3.weight") for e in range(E)]
        w2 = [tensors.pop(f"{p}experts.{e}.w2.weight") for e in range(E)]
        q = f"model.layers.{layer}.mlp."
        fused[q + "experts.gate_up_proj"] = np.stack([np.concatenate([a, b]) for a, b in zip(w1, w3)])
        fused[q + "experts.down_proj"] = np.stack(w2)
        fused[q + "gate.weight"] = tensors.pop(p + "gate.weight")
    tensors.update(fused)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, out / "model.safetensors",
              metadata={"format": "pt"})


@torch.no_grad()
def hf_logits(model, ids) -> np.ndarray:
    """Reference logits (float32, [len(ids), vocab]) for one sequence."""
    return model(torch.tensor([list(ids)])).logits[0].float().numpy()


@torch.no_grad()
def hf_greedy(model, ids, n: int) -> list[int]:
    out = model.generate(torch.tensor([list(ids)]), max_new_tokens=n, do_sample=False,
                         attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


def read_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def make_mistral3_vision(out: Path, *, image_size=112, patch=14, v_hidden=64, v_layers=2, v_heads=4,
                         v_inter=128, seed=0, std=0.02, vision_std=0.05, **text_kw):
    """A tiny `Mistral3ForConditionalGeneration` as Small 4 is built: pixtral vision tower (SiLU-gated
    FFN, 2D RoPE) + 2x2 patch-merger projector + mistral4 text model, untied, saved with
    Transformers' own on-disk names. `vision_std` > std keeps the image features large enough to move
    the logits visibly (a test that images matter, not only that they are placed)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, Mistral4Config, PixtralVisionConfig
    torch.manual_seed(seed)
    text = dict(vocab_size=131072, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
                n_routed_experts=8, num_experts_per_tok=4, kv_lora_rank=32, q_lora_rank=32,
                qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, first_k_dense_replace=0,
                tie_word_embeddings=False)
    text.update(text_kw)
    vision = PixtralVisionConfig(hidden_size=v_hidden, intermediate_size=v_inter, num_hidden_layers=v_layers,
                                 num_attention_heads=v_heads, image_size=image_size, patch_size=patch,
                                 hidden_act="silu", rope_parameters={"rope_type": "axial", "rope_theta": 10000.0})
    cfg = Mistral3Config(text_config=Mistral4Config(**text), vision_config=vision, image_token_index=10,
                         spatial_merge_size=2, projector_hidden_act="gelu", multimodal_projector_bias=False,
                         vision_feature_layer=-1, tie_word_embeddings=False)
    model = _init(Mistral3ForConditionalGeneration(cfg), seed, std)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("vision_tower" in name or "multi_modal_projector" in name) and "norm" not in name:
                p.copy_(vision_std * torch.randn(p.shape, generator=g))
    _save(model, out, None)
    shutil.copy(TEKKEN, out / "tekken.json")
    return out, model


@torch.no_grad()
def hf_image_logits(model, ids, images) -> np.ndarray:
    """Reference logits for one sequence whose [IMG] positions take `images` (normalised float32
    arrays [3, H, W], each its own size), batched as Transformers' processor does: zero-padded to
    the largest height and width, with each image's true size in `image_sizes`."""
    H = max(im.shape[1] for im in images)
    W = max(im.shape[2] for im in images)
    pixels = torch.zeros(len(images), 3, H, W)
    for i, im in enumerate(images):
        pixels[i, :, :im.shape[1], :im.shape[2]] = torch.from_numpy(im)
    sizes = torch.tensor([im.shape[1:] for im in images])
    return model(torch.tensor([list(ids)]), pixel_values=pixels, image_sizes=sizes).logits[0].float().numpy()
