"""Synthetic mistral4 models of any size (random weights, Small 4's layout).

`write_checkpoint`: a Hugging Face checkpoint on disk, written layer by layer into shards with an
index, so memory stays at one layer whatever the size. Used by the streaming tests and the
benchmarks; no Transformers needed.

`write_random_gguf`: a GGUF written directly, with no checkpoint on disk: by default Mistral Small 4's
exact shapes (`SMALL4`: 119 B parameters, ~67 GB at Q4_0), for full-scale speed runs. The tensors
are planned by the converter's own `convert/arch/mistral4.plan` (through a checkpoint stand-in that
only reports shapes) and the metadata and tokenizer are the converter's; Q4_0/Q8_0 tensors are
emitted as ready-made random blocks (f16 scales sized so a row's dot product with a unit-scale
vector is ~1, uniform random quants), sliced from a pool of random blocks at random offsets, so
writing runs at memory speed. Other types get random float rows through the writer's encoders.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

SMALL4_SCALED = dict(  # Small 4's shapes scaled down: the CPU benchmark model (~560 M parameters)
    vocab_size=131072, hidden_size=1024, num_hidden_layers=8, num_attention_heads=8, q_lora_rank=256,
    kv_lora_rank=128, qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=128, n_routed_experts=64,
    num_experts_per_tok=4, n_shared_experts=1, moe_intermediate_size=256, intermediate_size=2048,
)


def write_checkpoint(d: Path, tokenizer: Path, seed: int = 0, std: float = 0.05, **dims) -> Path:
    cfg = dict(architectures=["Mistral4ForCausalLM"], model_type="mistral4", first_k_dense_replace=0,
               max_position_embeddings=32768, tie_word_embeddings=False, rms_norm_eps=1e-6)
    cfg.update(SMALL4_SCALED)
    cfg.update(dims)
    cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    shutil.copy(tokenizer, d / ("tekken.json" if tokenizer.suffix == ".json" else "tokenizer.model"))
    rng = np.random.default_rng(seed)
    r = lambda *s: rng.standard_normal(s, dtype=np.float32) * np.float32(std)
    one = lambda n: 1 + np.float32(0.1) * rng.standard_normal(n, dtype=np.float32)
    H, E, I, heads = cfg["hidden_size"], cfg["n_routed_experts"], cfg["moe_intermediate_size"], cfg["num_attention_heads"]
    qk = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    weight_map = {}

    from safetensors.numpy import save_file

    def shard(name, tensors):
        save_file(tensors, d / name)
        weight_map.update({k: name for k in tensors})

    shard("embed.safetensors", {"model.embed_tokens.weight": r(cfg["vocab_size"], H),
                                "lm_head.weight": r(cfg["vocab_size"], H), "model.norm.weight": one(H)})
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shard(f"layer{i:03d}.safetensors", {
            p + "input_layernorm.weight": one(H), p + "post_attention_layernorm.weight": one(H),
            p + "self_attn.q_a_proj.weight": r(cfg["q_lora_rank"], H),
            p + "self_attn.q_a_layernorm.weight": one(cfg["q_lora_rank"]),
            p + "self_attn.q_b_proj.weight": r(heads * qk, cfg["q_lora_rank"]),
            p + "self_attn.kv_a_proj_with_mqa.weight": r(cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"], H),
            p + "self_attn.kv_a_layernorm.weight": one(cfg["kv_lora_rank"]),
            p + "self_attn.kv_b_proj.weight": r(heads * (cfg["qk_nope_head_dim"] + cfg["v_head_dim"]), cfg["kv_lora_rank"]),
            p + "self_attn.o_proj.weight": r(H, heads * cfg["v_head_dim"]),
            p + "mlp.gate.weight": r(E, H),
            p + "mlp.experts.gate_up_proj": r(E, 2 * I, H),
            p + "mlp.experts.down_proj": r(E, H, I),
            p + "mlp.shared_experts.gate_proj.weight": r(I * cfg["n_shared_experts"], H),
            p + "mlp.shared_experts.up_proj.weight": r(I * cfg["n_shared_experts"], H),
            p + "mlp.shared_experts.down_proj.weight": r(H, I * cfg["n_shared_experts"])})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


SMALL4 = dict(  # Mistral Small 4's text model (shared/reference/mistral-small-4.md); YaRN as Small 4
    vocab_size=131072, hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, q_lora_rank=1024,
    kv_lora_rank=256, qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=128, n_routed_experts=128,
    num_experts_per_tok=4, n_shared_experts=1, moe_intermediate_size=2048, intermediate_size=12288,
    max_position_embeddings=1048576, rms_norm_eps=1e-6, tie_word_embeddings=False,
    rope_parameters={"type": "yarn", "rope_theta": 10000.0, "factor": 128.0, "original_max_position_embeddings": 8192,
                     "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0,
                     "llama_4_scaling_beta": 0.1},
)
POOL_BYTES = 64 << 20        # random blocks per (type, row width), sliced at random offsets
CHUNK_BYTES = 16 << 20       # at most this much per written chunk


class _Shapes:
    """The part of `convert.source.Checkpoint` that `mistral4.plan` uses to plan: names and shapes.
    It holds no data: every planned tensor's chunks are replaced by random ones."""

    def __init__(self, cfg: dict):
        H, E, I, heads = cfg["hidden_size"], cfg["n_routed_experts"], cfg["moe_intermediate_size"], cfg["num_attention_heads"]
        qk, kvr, rope = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"], cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]
        S = I * cfg["n_shared_experts"]
        s = {"embed_tokens.weight": (cfg["vocab_size"], H), "norm.weight": (H,), "lm_head.weight": (cfg["vocab_size"], H)}
        for i in range(cfg["num_hidden_layers"]):
            p = f"layers.{i}."
            s.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                      p + "self_attn.q_a_proj.weight": (cfg["q_lora_rank"], H),
                      p + "self_attn.q_a_layernorm.weight": (cfg["q_lora_rank"],),
                      p + "self_attn.q_b_proj.weight": (heads * qk, cfg["q_lora_rank"]),
                      p + "self_attn.kv_a_proj_with_mqa.weight": (kvr + rope, H),
                      p + "self_attn.kv_a_layernorm.weight": (kvr,),
                      p + "self_attn.kv_b_proj.weight": (heads * (cfg["qk_nope_head_dim"] + cfg["v_head_dim"]), kvr),
                      p + "self_attn.o_proj.weight": (H, heads * cfg["v_head_dim"]),
                      p + "mlp.gate.weight": (E, H), p + "mlp.experts.gate_up_proj": (E, 2 * I, H),
                      p + "mlp.experts.down_proj": (E, H, I)})
            if S:
                s.update({p + "mlp.shared_experts.gate_proj.weight": (S, H), p + "mlp.shared_experts.up_proj.weight": (S, H),
                          p + "mlp.shared_experts.down_proj.weight": (H, S)})
        self.shapes, self.dir = s, Path("<random>")

    def has(self, name: str) -> bool:
        return name in self.shapes

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def rows(self, name: str, lo: int, hi: int):
        raise AssertionError(f"{name}: a random plan reads no checkpoint data")

    get = rows


def small4_config(**dims) -> dict:
    """The converter's text config (`mistral4.text_config`) for Small 4's shapes with `dims` overridden."""
    from .arch import mistral4

    return mistral4.text_config({"architectures": ["Mistral4ForCausalLM"], "model_type": "mistral4",
                                 "_name_or_path": "random-mistral4", **SMALL4, **dims})


def random_plans(cfg: dict, quant: str = "q4_0", seed: int = 0):
    """`mistral4.plan`'s tensors for `cfg` with random contents; Q4_0/Q8_0 ones as encoded blocks."""
    from localmoe.gguf.format import GGML_QUANT_SIZES, QUANT_CHOICES, GGMLType

    from .arch import mistral4
    from .writer import choose_type, row_blocks

    qtype = QUANT_CHOICES[quant]
    plans = mistral4.plan(_Shapes(cfg), cfg)
    pools: dict = {}

    def pool(t: GGMLType, cols: int, need: int) -> np.ndarray:
        """Random blocks [n, block bytes] of type t whose rows of `cols` values have unit-scale dot products."""
        key = (t, cols)
        block, bsize = GGML_QUANT_SIZES[t]
        n = min(POOL_BYTES, need) // bsize
        if key not in pools or len(pools[key]) < n:
            rng = np.random.default_rng([seed, int(t), cols])
            if t == GGMLType.Q4_0:
                b = rng.integers(0, 256, (n, bsize), dtype=np.uint8)
                rms = 4.64                        # of (nibble - 8) for uniform nibbles
            else:
                b = rng.integers(-127, 128, (n, bsize), dtype=np.int8).view(np.uint8)
                rms = 73.6                        # of a uniform int8 in -127..127
            d = rng.uniform(0.5, 1.5, n) / (rms * np.sqrt(cols))
            b[:, :2] = d.astype("<f2").view(np.uint8).reshape(n, 2)
            pools[key] = b
        return pools[key]

    def encoded_chunks(p, idx):
        block, bsize = GGML_QUANT_SIZES[p.type]
        cols = p.shape[-1]
        total = int(np.prod(p.shape, dtype=np.int64)) // block          # blocks in the tensor
        pl = pool(p.type, cols, total * bsize)
        step = min(len(pl), max(1, CHUNK_BYTES // bsize))
        rng = np.random.default_rng([seed, 1, idx])
        for lo in range(0, total, step):
            k = min(step, total - lo)
            off = int(rng.integers(0, len(pl) - k + 1))
            yield pl[off:off + k].reshape(-1)

    def float_chunks(p, idx):
        rng = np.random.default_rng([seed, 2, idx])
        cols = p.shape[-1]
        if len(p.shape) == 1:                   # norm weights
            yield (1 + 0.1 * rng.standard_normal(cols, dtype=np.float32)).reshape(1, cols)
            return
        rows = lambda lo, hi: rng.standard_normal((hi - lo,) + tuple(p.shape[1:]), dtype=np.float32) / np.float32(np.sqrt(cols))
        yield from row_blocks(rows, p.shape)

    for idx, p in enumerate(plans):
        p.type = choose_type(p, qtype)
        p.encoded = p.type in (GGMLType.Q4_0, GGMLType.Q8_0)
        p.chunks = (lambda p=p, idx=idx: encoded_chunks(p, idx)) if p.encoded else (lambda p=p, idx=idx: float_chunks(p, idx))
    return plans


def write_random_gguf(out: str | Path, quant: str = "q4_0", seed: int = 0, tokenizer: str | Path | None = None,
                      progress=None, **dims) -> Path:
    """Write a random-weight mistral4 GGUF with Small 4's exact shapes (or `dims` overriding any
    `SMALL4` key) straight to `out`; no checkpoint on disk. `tokenizer`: a tekken .json (default:
    mistral_common's tekken_240718.json) or a SentencePiece model. `progress(nbytes)` per chunk."""
    import tempfile

    from localmoe.gguf.format import QUANT_CHOICES

    from .arch import mistral4
    from .tokenizer import write_tokenizer
    from .writer import write_gguf

    if quant not in QUANT_CHOICES:
        raise ValueError(f"unknown quant {quant!r}")
    if tokenizer is None:
        import mistral_common
        tokenizer = Path(mistral_common.__file__).parent / "data" / "tekken_240718.json"
    tokenizer = Path(tokenizer).resolve()
    cfg = small4_config(**dims)
    plans = random_plans(cfg, quant, seed)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / ("tekken.json" if tokenizer.suffix == ".json" else "tokenizer.model")).symlink_to(tokenizer)

        def metadata(w):
            mistral4.add_metadata(w, cfg)
            write_tokenizer(w, Path(tmp), cfg["vocab_size"])

        write_gguf(Path(out), mistral4.ARCH, metadata, plans, QUANT_CHOICES[quant], progress)
    return Path(out)


def random_demo(out: Path) -> Path:
    """A small random-weight mistral4 GGUF (Small 4's layout, tekken vocabulary) for smoke runs.
    Its text is gibberish: it shows the pipeline working, not a model's quality."""
    import tempfile

    import mistral_common

    from . import convert

    tekken = Path(mistral_common.__file__).parent / "data" / "tekken_240718.json"
    with tempfile.TemporaryDirectory() as tmp:
        src = write_checkpoint(Path(tmp) / "hf", tekken, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                               q_lora_rank=128, kv_lora_rank=64, qk_rope_head_dim=32, qk_nope_head_dim=32,
                               v_head_dim=32, n_routed_experts=16, moe_intermediate_size=128)
        convert(src, out, "q8_0")
    return out


if __name__ == "__main__":
    import sys

    print(random_demo(Path(sys.argv[1])))
