"""models.toml: named presets resolved to GGUF files under $LOCALMOE_HOME (or, for a bundled preset,
inside the installed package)."""
from __future__ import annotations

import os
import tomllib
from pathlib import Path

from .errors import InputError

REGISTRY = Path(__file__).with_name("models.toml")
BUNDLED = Path(__file__).with_name("data")
DEFAULT = "demo"    # the preset `localmoe run`/`chat` and `localmoe.load()` use when no model is named: it ships
                    # inside the package, so the commands work right after installing


def home() -> Path:
    return Path(os.environ.get("LOCALMOE_HOME", Path.home() / ".cache" / "localmoe"))


def presets() -> dict[str, dict]:
    return tomllib.loads(REGISTRY.read_text())


def preset_file(p: dict, quant: str | None = None) -> Path:
    """Where a preset's GGUF lives (whether or not it is there)."""
    if p.get("bundled"):
        return BUNDLED / p["file"]
    return home() / p["file"].format(quant=quant or p["default_quant"])


def preset_path(name: str, quant: str | None = None) -> Path:
    table = presets()
    if name not in table:
        raise InputError(f"unknown model {name!r}: not a file and not a preset (presets: {', '.join(table)})")
    p = table[name]
    path = preset_file(p, quant)
    if path.is_file():
        return path
    if p.get("bundled"):
        raise InputError(f"the bundled model {name!r} is missing: {path} is absent (a broken installation? "
                         f"reinstall localmoe, or pass -m MODEL)")
    raise InputError(f"model {name!r} is not converted yet: download {p['hf_id']} and run "
                     f"`localmoe convert CHECKPOINT_DIR {path} --quant {quant or p['default_quant']}`")
