"""models.toml: named presets resolved to GGUF files under $LOCALMOE_HOME."""
from __future__ import annotations

import os
import tomllib
from pathlib import Path

from .errors import InputError

REGISTRY = Path(__file__).with_name("models.toml")


def home() -> Path:
    return Path(os.environ.get("LOCALMOE_HOME", Path.home() / ".cache" / "localmoe"))


def presets() -> dict[str, dict]:
    return tomllib.loads(REGISTRY.read_text())


def preset_path(name: str, quant: str | None = None) -> Path:
    table = presets()
    if name not in table:
        raise InputError(f"unknown model {name!r}: not a file and not a preset ({', '.join(table)})")
    p = table[name]
    quant = quant or p["default_quant"]
    path = home() / p["file"].format(quant=quant)
    if not path.is_file():
        raise InputError(f"model {name!r} is not converted yet: download {p['hf_id']} and run "
                         f"`localmoe convert CHECKPOINT_DIR {path} --quant {quant}`")
    return path
