"""One module per architecture. Each defines ARCH (llama.cpp's architecture string),
HF_ARCHITECTURES (the `architectures` entries of config.json it converts), and
`text_config(config) -> dict`, `add_metadata(writer, cfg)`, `plan(ckpt, cfg) -> list[Planned]`.
Adding an architecture means adding one module here and naming it in MODULES."""
from __future__ import annotations

import importlib

from localmoe.errors import ConvertError

MODULES = ("mistral4", "mixtral")


def for_config(config: dict):
    archs = config.get("architectures") or []
    for name in MODULES:
        mod = importlib.import_module(f"{__name__}.{name}")
        if any(a in mod.HF_ARCHITECTURES for a in archs) and mod.accepts(config):
            return mod
    raise ConvertError(f"unsupported architecture {archs or config.get('model_type')!r}; "
                       f"supported: mistral4, mistral3 (with a mistral4 text model), mixtral")


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
