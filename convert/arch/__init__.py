"""One module per architecture. Each defines ARCH (llama.cpp's architecture string),
HF_ARCHITECTURES (the `architectures` entries of config.json it converts), and
`text_config(config) -> dict`, `add_metadata(writer, cfg)`, `plan(ckpt, cfg) -> list[Planned]`.
Adding an architecture means adding one module here and naming it in MODULES."""
from __future__ import annotations

import importlib

from localmoe.errors import ConvertError
from localmoe.gguf.format import KEY_SOURCE_ARCH

MODULES = ("mistral4", "mixtral")


def for_config(config: dict):
    archs = config.get("architectures") or []
    for name in MODULES:
        mod = importlib.import_module(f"{__name__}.{name}")
        if any(a in mod.HF_ARCHITECTURES for a in archs) and mod.accepts(config):
            return mod
    raise ConvertError(f"unsupported architecture {archs or config.get('model_type')!r}; "
                       f"supported: mistral4, mistral3 (with a mistral4 text model), mixtral")


def base_metadata(w, arch: str, cfg: dict) -> None:
    """The keys every llama.cpp transformer file has, from the Hugging Face config's names."""
    w.add_name(cfg.get("_name_or_path") or arch)
    for key, value in [
        ("block_count", cfg["num_hidden_layers"]),
        ("context_length", cfg["max_position_embeddings"]),
        ("embedding_length", cfg["hidden_size"]),
        ("feed_forward_length", cfg["intermediate_size"]),
        ("vocab_size", cfg["vocab_size"]),
        ("attention.head_count", cfg["num_attention_heads"]),
        ("attention.layer_norm_rms_epsilon", float(cfg["rms_norm_eps"])),
    ]:
        kv(w, f"{arch}.{key}", value)
    kv(w, KEY_SOURCE_ARCH, cfg["source_architecture"])


def kv(w, key: str, value) -> None:
    """Add one metadata value with the GGUF type its Python type implies."""
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    else:
        w.add_array(key, list(value))
