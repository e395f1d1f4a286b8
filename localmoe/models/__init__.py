"""One module per architecture, keyed by the GGUF's `general.architecture`."""
from __future__ import annotations

from ..errors import ModelFileError
from . import mistral4, mixtral

ARCHITECTURES = {mistral4.ARCH: mistral4, mixtral.ARCH: mixtral}


def module_for(arch: str):
    if arch not in ARCHITECTURES:
        raise ModelFileError(f"unknown architecture {arch!r}; localmoe runs: mistral4, llama (Mixtral MoE)")
    return ARCHITECTURES[arch]
