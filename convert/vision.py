"""The vision half of `Mistral3ForConditionalGeneration`: Pixtral encoder + projector -> an mmproj GGUF.

llama.cpp keeps the vision tower out of the text GGUF, in a companion "mmproj" file of architecture
`clip` (`clip.projector_type = "pixtral"`); the names, layout and metadata keys here are those of its
converter (`conversion/llava.py`, `LlavaVisionModel`, HF path). In particular q/k rows are permuted
per head from Transformers' rotate-half order into interleaved pairs (`LlamaModel.permute`), so the
runtime rotates pairs as it does for the text model. See docs/ARCHITECTURE.md, "Vision".
"""
from __future__ import annotations

import json

from localmoe.errors import ConvertError
from localmoe.gguf.format import KEY_PROJECTOR_NORM_EPS, KEY_SOURCE_ARCH

from .arch import kv
from .writer import Planned, copied, whole

ARCH = "clip"
# Transformers' PixtralRMSNorm eps inside the tower is hard-coded, not a config key.
TOWER_NORM_EPS = 1e-5
# mistral-common's CLIP statistics (DATASET_MEAN / DATASET_STD), used when no preprocessor config says otherwise.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMG_BREAK_DEFAULT = 12     # tekken's [IMG_BREAK] slot


def has_vision(ck) -> bool:
    """A Mistral3 checkpoint that actually carries a vision tower (text-only re-packs do not)."""
    return bool(ck.config.get("vision_config")) and ck.has("vision_tower.patch_conv.weight")


def vision_config(config: dict, text_cfg: dict) -> dict:
    """The values the mmproj needs, checked against what the runtime implements."""
    v = dict(config["vision_config"])
    head_dim = v.get("head_dim") or v["hidden_size"] // v["num_attention_heads"]
    rope = v.get("rope_parameters") or {}
    checks = [
        (v.get("hidden_act", "gelu") == "silu", f"vision hidden_act {v.get('hidden_act', 'gelu')!r} (only silu)"),
        (config.get("projector_hidden_act", "gelu") == "gelu",
         f"projector_hidden_act {config.get('projector_hidden_act')!r} (only gelu)"),
        (not config.get("multimodal_projector_bias", False), "multimodal_projector_bias"),
        (config.get("vision_feature_layer", -1) == -1, f"vision_feature_layer {config.get('vision_feature_layer')!r} (only -1)"),
        (head_dim * v["num_attention_heads"] == v["hidden_size"], "vision head_dim * heads != hidden_size"),
        (rope.get("rope_type", "axial") == "axial", f"vision rope type {rope.get('rope_type')!r} (only axial)"),
    ]
    for ok, what in checks:
        if not ok:
            raise ConvertError(f"vision tower with {what} is not supported")
    return dict(
        hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
        num_hidden_layers=v["num_hidden_layers"], num_attention_heads=v["num_attention_heads"],
        patch_size=v["patch_size"], image_size=v["image_size"], rope_theta=float(rope.get("rope_theta", v.get("rope_theta", 10000.0))),
        spatial_merge_size=config.get("spatial_merge_size", 2), projection_dim=text_cfg["hidden_size"],
        projector_norm_eps=float(text_cfg["rms_norm_eps"]),
        source_architecture=(config.get("architectures") or ["?"])[0],
    )


def image_stats(ck) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation mean/std: the checkpoint's preprocessor config if any, else mistral-common's."""
    for name in ("preprocessor_config.json", "processor_config.json"):
        p = ck.dir / name
        if p.is_file():
            cfg = json.loads(p.read_text())
            cfg = {**cfg, **cfg.get("image_processor", {})}
            if "image_mean" in cfg and "image_std" in cfg:
                return tuple(cfg["image_mean"]), tuple(cfg["image_std"])
    return CLIP_MEAN, CLIP_STD


def img_break_id(ck) -> int:
    """[IMG_BREAK]'s id from the tekken file's special-token list, else its fixed tekken slot."""
    tekken = ck.dir / "tekken.json"
    if tekken.is_file():
        for t in json.loads(tekken.read_text()).get("special_tokens", []):
            if t.get("token_str") == "[IMG_BREAK]":
                return int(t["rank"])
    return IMG_BREAK_DEFAULT


def add_metadata(w, vc: dict, mean, std) -> None:
    w.add_type("mmproj")
    w.add_name("pixtral")
    for key, value in [
        ("clip.projector_type", "pixtral"),
        ("clip.has_vision_encoder", True),
        ("clip.use_silu", True),
        ("clip.vision.projection_dim", vc["projection_dim"]),
        ("clip.vision.image_size", vc["image_size"]),
        ("clip.vision.patch_size", vc["patch_size"]),
        ("clip.vision.embedding_length", vc["hidden_size"]),
        ("clip.vision.feed_forward_length", vc["intermediate_size"]),
        ("clip.vision.block_count", vc["num_hidden_layers"]),
        ("clip.vision.attention.head_count", vc["num_attention_heads"]),
        ("clip.vision.attention.layer_norm_epsilon", TOWER_NORM_EPS),
        ("clip.vision.spatial_merge_size", vc["spatial_merge_size"]),
        ("clip.vision.image_mean", [float(x) for x in mean]),
        ("clip.vision.image_std", [float(x) for x in std]),
        ("clip.rope.freq_base", vc["rope_theta"]),
        (KEY_PROJECTOR_NORM_EPS, vc["projector_norm_eps"]),
        (KEY_SOURCE_ARCH, vc["source_architecture"]),
    ]:
        kv(w, key, value)


def rope_pairs(w, heads: int):
    """Rows of q/k [heads*hd, C] from rotate-half order (i, i+hd/2) to interleaved pairs (2i, 2i+1)."""
    hd = w.shape[0] // heads
    return w.reshape(heads, 2, hd // 2, -1).swapaxes(1, 2).reshape(w.shape)


def plan(ck, vc: dict, break_id: int) -> list[Planned]:
    heads = vc["num_attention_heads"]
    t, mm = "vision_tower.", "multi_modal_projector."

    def copy(src, dst, keep_f32=False):
        return copied(ck, src, dst, keep_f32)

    def permuted(src, dst):
        return whole(dst, ck.shape(src), lambda: rope_pairs(ck.get(src), heads))

    # patch_embd and patch_merger stay F32 as llama.cpp writes them (tensor_force_quant); the conv
    # weight keeps its 4-D shape [hidden, 3, p, p].
    out = [copy(t + "patch_conv.weight", "v.patch_embd.weight", True),
           copy(t + "ln_pre.weight", "v.pre_ln.weight", True)]
    for i in range(vc["num_hidden_layers"]):
        p, b = f"{t}transformer.layers.{i}.", f"v.blk.{i}."
        out += [copy(p + "attention_norm.weight", b + "ln1.weight", True),
                permuted(p + "attention.q_proj.weight", b + "attn_q.weight"),
                permuted(p + "attention.k_proj.weight", b + "attn_k.weight"),
                copy(p + "attention.v_proj.weight", b + "attn_v.weight"),
                copy(p + "attention.o_proj.weight", b + "attn_out.weight"),
                copy(p + "ffn_norm.weight", b + "ln2.weight", True),
                copy(p + "feed_forward.gate_proj.weight", b + "ffn_gate.weight"),
                copy(p + "feed_forward.up_proj.weight", b + "ffn_up.weight"),
                copy(p + "feed_forward.down_proj.weight", b + "ffn_down.weight")]
    hidden = ck.shape("embed_tokens.weight")[1]
    out += [copy(mm + "norm.weight", "mm.input_norm.weight", True),
            copy(mm + "patch_merger.merging_layer.weight", "mm.patch_merger.weight", True),
            copy(mm + "linear_1.weight", "mm.1.weight"),
            copy(mm + "linear_2.weight", "mm.2.weight"),
            whole("v.token_embd.img_break", (hidden,),
                  lambda: ck.rows("embed_tokens.weight", break_id, break_id + 1)[0], True)]
    return out
