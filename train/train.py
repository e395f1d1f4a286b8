"""Train the bundled demo model: a tiny Mistral Small 4 (Mistral3ForConditionalGeneration with a mistral4
text model and a pixtral encoder), from scratch, on our synthetic tasks (train/data.py).

    python -m train.train --out .scratch/demo-ckpt          # one H100: ~12.5 minutes (4500 steps)
    python -m train.train --out /tmp/ck --steps 20 --batch 8   # a smoke run on the CPU

The model is Transformers' own classes; the only thing replaced is how the routed experts are computed
on the GPU (sorted by expert, one grouped matmul in bf16 per projection) — the same arithmetic as
Transformers' eager loop, at training speed. A switch-style load-balancing loss keeps every expert in
use. Seeded: the data stream, the initialisation and the order of batches are fixed by --seed (the GPU's
atomics leave the last bits of the weights free; the accuracies reproduce, docs/DEMO.md).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import IMAGE_SIZE, PICTURE_LABELS, TRAIN_SEED_BASE, draw, heldout_keys, picture_labels
from .encode import MERGE, PATCH, TEKKEN, VOCAB_SIZE, Encoder

# Small 4's configuration scaled down; RoPE is left at Small 4's default (YaRN, llama-4 query scaling).
TEXT = dict(vocab_size=VOCAB_SIZE, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
            num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
            n_routed_experts=32, num_experts_per_tok=4, n_group=1, topk_group=1, norm_topk_prob=True,
            routed_scaling_factor=1.0, kv_lora_rank=64, q_lora_rank=128, qk_rope_head_dim=16,
            qk_nope_head_dim=32, v_head_dim=32, first_k_dense_replace=0,
            tie_word_embeddings=False,
            rms_norm_eps=1e-6, pad_token_id=11, bos_token_id=1, eos_token_id=2)
VISION = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
              image_size=IMAGE_SIZE, patch_size=PATCH, hidden_act="silu",
              rope_parameters={"rope_type": "axial", "rope_theta": 10000.0})


def build_model():
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, Mistral4Config, PixtralVisionConfig
    cfg = Mistral3Config(text_config=Mistral4Config(**TEXT), vision_config=PixtralVisionConfig(**VISION),
                         image_token_index=10, spatial_merge_size=MERGE, projector_hidden_act="gelu",
                         multimodal_projector_bias=False, vision_feature_layer=-1, tie_word_embeddings=False)
    return Mistral3ForConditionalGeneration(cfg)


# -- data --------------------------------------------------------------------------------------------
class Batches(torch.utils.data.IterableDataset):
    """An endless stream of padded batches; worker w draws from an rng seeded by (seed, w), and the
    DataLoader interleaves workers in a fixed order, so the stream depends on (seed, workers) only."""

    def __init__(self, seed: int, batch: int, images_per_batch: int):
        self.seed, self.batch, self.images_per_batch = seed, batch, images_per_batch

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid = info.id if info else 0
        rng = random.Random(TRAIN_SEED_BASE + self.seed * 1000 + wid)
        enc, skip = Encoder(), heldout_keys()
        pad = enc.tok.special_id("<pad>")
        while True:
            rows, labels = [], []
            while len(rows) < self.batch:
                s = draw(rng)
                if s.meta.get("expr") in skip or (s.image is not None and len(labels) >= self.images_per_batch):
                    continue
                rows.append(enc.encode(s))
                if s.image is not None:
                    labels.append(picture_labels(s))
            out = collate(rows, pad)
            if labels:
                out["picture_labels"] = torch.tensor(labels)
            yield out


def collate(rows, pad: int) -> dict:
    """(ids, loss mask, pixels or None) rows -> the model's inputs, right-padded; labels[t] = ids[t+1]
    where the mask is set, else -100."""
    T = max(len(i) for i, _, _ in rows)
    ids = np.full((len(rows), T), pad, np.int64)
    labels = np.full((len(rows), T), -100, np.int64)
    attn = np.zeros((len(rows), T), np.int64)
    for r, (i, m, _) in enumerate(rows):
        ids[r, :len(i)] = i
        attn[r, :len(i)] = 1
        labels[r, :len(i) - 1] = np.where(np.asarray(m[1:]) == 1, i[1:], -100)
    out = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
           "attention_mask": torch.from_numpy(attn)}
    images = [p for _, _, p in rows if p is not None]
    if images:
        out["pixel_values"] = torch.from_numpy(np.stack(images))
        out["image_sizes"] = torch.tensor([[IMAGE_SIZE, IMAGE_SIZE]] * len(images))
    return out


# -- the experts on the GPU --------------------------------------------------------------------------------
GROUP_ALIGN = 16     # grouped_mm's backward needs every expert's row count to be a multiple of 16 (bf16)


def grouped_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """Mistral4Experts.forward, sorted by expert: one bf16 grouped matmul per projection. Each expert's
    rows are padded with zero rows up to a multiple of 16 (at least 16): misaligned or empty groups
    leave garbage in the weight gradients (torchtitan pads the same way)."""
    n, k = top_k_index.shape
    E, H, dev = self.num_experts, hidden_states.shape[-1], hidden_states.device
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    expert = flat[order]
    counts = F.one_hot(flat, E).sum(0)          # = bincount, which reads its max back to the host on a GPU
    padded = (counts // GROUP_ALIGN + 1) * GROUP_ALIGN
    pad_end = torch.cumsum(padded, 0)
    slot = (pad_end - padded)[expert] + torch.arange(n * k, device=dev) - (torch.cumsum(counts, 0) - counts)[expert]
    total = n * k + GROUP_ALIGN * E      # an upper bound of pad_end[-1]: no host read (rows past it stay zero, unread)
    # gathers and copies by a permutation only (no index_add: its float atomics made two runs of the same
    # seed differ); each token's k rows are summed in a fixed order below
    rows = hidden_states.to(torch.bfloat16).repeat_interleave(k, dim=0)[order]
    x = hidden_states.new_zeros(total, H, dtype=torch.bfloat16).index_copy(0, slot, rows)
    gm = getattr(F, "grouped_mm", None) or torch._grouped_mm
    offs = pad_end.to(torch.int32)
    gate, up = gm(x, self.gate_up_proj.to(torch.bfloat16).transpose(1, 2), offs=offs).chunk(2, dim=-1)
    y = gm(self.act_fn(gate) * up, self.down_proj.to(torch.bfloat16).transpose(1, 2), offs=offs)
    y = y[slot].float() * top_k_weights.reshape(-1)[order, None].float()
    out = torch.zeros(n * k, H, device=dev, dtype=torch.float32).index_copy(0, order, y).view(n, k, H).sum(1)
    return out.to(hidden_states.dtype)


class BalanceLoss:
    """Switch-transformer load balancing over every MoE layer: E * sum_e (token share_e x mean prob_e),
    1.0 when routing is uniform. Collected from the routers by forward hooks."""

    def __init__(self, model):
        self.terms = []
        for m in model.modules():
            if type(m).__name__ == "Mistral4TopkRouter":
                m.register_forward_hook(self.hook)

    def hook(self, module, args, output):
        logits, _, idx = output
        probs = logits.float().softmax(-1)
        share = F.one_hot(idx.reshape(-1), module.num_experts).sum(0).float() / idx.numel()   # bincount syncs
        self.terms.append(module.num_experts * (share * probs.mean(0)).sum())

    def pop(self):
        loss = torch.stack(self.terms).mean()
        self.terms.clear()
        return loss


class PictureProbe(torch.nn.Module):
    """Training-only auxiliary loss: linear classifiers read what each picture shows (count, shape,
    colour, cell, digit) straight from the projector's image tokens. It gives the vision tower a
    dense signal from the first step, where the answers' few tokens alone train it slowly; the probe
    is not saved."""

    def __init__(self, model, tokens: int):
        super().__init__()
        dim = model.config.text_config.hidden_size
        self.heads = torch.nn.ModuleList(torch.nn.Linear(tokens * dim, n) for n in PICTURE_LABELS.values())
        self.tokens, self.features = tokens, None
        model.model.multi_modal_projector.register_forward_hook(self.hook)

    def hook(self, module, args, output):
        self.features = output

    def loss(self, labels):
        x = self.features.float().reshape(len(labels), -1)
        self.features = None
        return sum(F.cross_entropy(h(x), labels[:, j], ignore_index=-1, reduction="sum") / (labels[:, j] >= 0).sum().clamp(min=1)
                   for j, h in enumerate(self.heads))


# -- the loop ----------------------------------------------------------------------------------------
def train(out: Path, steps: int, batch: int, lr: float, seed: int, workers: int, images_per_batch: int,
          balance: float, vision_lr: float, probe_weight: float, log_every: int = 100, max_minutes: float | None = None) -> dict:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    # Same seed, same bits: deterministic kernels (cuBLAS needs its workspace setting before first use);
    # an op without a deterministic implementation warns once and is named in the log.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    # ...but do not fill every new tensor with NaN first (deterministic mode's default): that is ~3,400 extra
    # kernels per step, 45% of all launches, and this CPU-bound step pays for each. Nothing reads memory it did
    # not write (a NaN would have shown in the loss), so the bits are the same.
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.benchmark = False
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        from transformers.models.mistral4 import modeling_mistral4
        modeling_mistral4.Mistral4Experts.forward = grouped_experts_forward
    model = build_model().to(dev)
    model.train()
    balancer = BalanceLoss(model)
    probe = PictureProbe(model, (IMAGE_SIZE // PATCH // MERGE) ** 2).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    groups = {}                      # (decays, vision) -> params; the vision side learns at vision_lr x lr
    for n, p in model.named_parameters():
        key = (p.ndim >= 2 and "embed" not in n, "vision_tower" in n or "multi_modal_projector" in n)
        groups.setdefault(key, []).append(p)
    groups[(True, True)] += list(probe.parameters())
    opt = torch.optim.AdamW([{"params": ps, "weight_decay": 0.05 if d else 0.0, "lr": lr * (vision_lr if v else 1)}
                             for (d, v), ps in groups.items()], lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=True)
    warmup = max(1, steps // 25)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    loader = torch.utils.data.DataLoader(Batches(seed, batch, images_per_batch), batch_size=None,
                                         num_workers=workers, pin_memory=cuda, prefetch_factor=8 if workers else None,
                                         persistent_workers=bool(workers))
    print(f"model: {n_params / 1e6:.2f} M parameters; {steps} steps of {batch} sequences on {dev}", flush=True)
    t0, tokens, history, skipped_t = time.time(), 0, [], torch.zeros((), device=dev)
    it = iter(loader)
    for step in range(steps):
        if max_minutes and time.time() - t0 > 60 * max_minutes:
            print(f"stopping early at step {step}: --max-minutes {max_minutes}", flush=True)
            break
        batch_cpu = next(it)
        tokens += int(batch_cpu["attention_mask"].sum())          # counted on the host: no device read
        b = {k: v.to(dev, non_blocking=True) for k, v in batch_cpu.items()}
        labels = b.pop("labels")
        pictures = b.pop("picture_labels", None)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            logits = model(**b).logits
        lm = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        bal = balancer.pop()
        aux = probe.loss(pictures) if pictures is not None else torch.zeros((), device=dev)
        loss = lm + balance * bal + probe_weight * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        # a bad batch must not poison the weights: the fused optimizer skips the update on the device
        # when found_inf is 1 (as under GradScaler), so the host never waits for the GPU here
        opt.found_inf = (~torch.isfinite(grad_norm)).float()
        skipped_t += opt.found_inf
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            skipped = int(skipped_t)
            if skipped > 20:
                raise SystemExit(f"training diverged: {skipped} non-finite steps (by step {step})")
            el = time.time() - t0
            rec = {"step": step, "loss": round(lm.item(), 4), "balance": round(bal.item(), 4), "probe": round(aux.item(), 4),
                   "lr": sched.get_last_lr()[0], "seconds": round(el, 1), "tokens_per_s": round(tokens / max(el, 1e-9)),
                   "grad_norm": round(float(grad_norm), 3), "skipped": skipped}
            history.append(rec)
            print(json.dumps(rec), flush=True)
    seconds = time.time() - t0
    save(model, out)
    report = {"seconds": round(seconds, 1), "steps": steps, "steps_done": step + 1, "batch": batch, "lr": lr, "seed": seed,
              "workers": workers, "parameters": n_params, "device": torch.cuda.get_device_name() if cuda else "cpu",
              "torch": torch.__version__, "history": history}
    (out / "train_report.json").write_text(json.dumps(report, indent=1))
    return report


def save(model, out: Path) -> None:
    """A Transformers checkpoint directory our converter reads: weights, config, tekken.json."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    shutil.copy(TEKKEN, tmp / "tekken.json")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    ap.add_argument("--steps", type=int, default=4500)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1))
    ap.add_argument("--images-per-batch", type=int, default=160)
    ap.add_argument("--balance", type=float, default=0.01, help="load-balancing loss weight")
    ap.add_argument("--probe", type=float, default=0.3, help="weight of the auxiliary picture classifier loss")
    ap.add_argument("--vision-lr", type=float, default=1.0, help="learning-rate multiplier of the vision tower")
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--max-minutes", type=float, default=None, help="stop early (exploration only: not reproducible)")
    a = ap.parse_args(argv)
    train(a.out, a.steps, a.batch, a.lr, a.seed, a.workers, a.images_per_batch, a.balance, a.vision_lr, a.probe, a.log_every, a.max_minutes)


if __name__ == "__main__":
    main()
