"""Hugging Face checkpoint (safetensors shards) -> GGUF, streamed tensor by tensor; or a GGUF file
requantized to another type (convert.requantize)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from localmoe.errors import ConvertError
from localmoe.gguf.format import QUANT_CHOICES

from . import arch
from .source import Checkpoint
from .writer import Planned, write_gguf


@dataclass
class Report:
    out: Path
    arch: str
    tokenizer: str
    tensors: list[Planned]
    nbytes: int
    mmproj: Path | None = None      # the vision companion (localmoe.vision.companion_path), if written
    requantized_from: str | None = None   # the source's type when `src` was a GGUF file (twice rounded)


def convert(src: str | Path, out: str | Path, quant: str = "q8_0", progress=None, on_plan=None) -> Report:
    """Convert checkpoint directory `src` into GGUF file `out` with large matrices in `quant`; a GGUF
    file as `src` is requantized instead. `on_plan(total_bytes)` is called once the plan is known;
    `progress(nbytes)` per written block."""
    from .tokenizer import write_tokenizer

    if quant not in QUANT_CHOICES:
        raise ConvertError(f"unknown quant type {quant!r}; choose one of {', '.join(QUANT_CHOICES)}")
    out = Path(out)
    if out.is_dir():
        raise ConvertError(f"{out}: is a directory; give the output file's name")
    if not out.parent.is_dir():
        raise ConvertError(f"{out.parent}: no such directory")
    if Path(src).is_file() or Path(src).suffix == ".gguf":
        from .requantize import requantize
        return requantize(Path(src), out, QUANT_CHOICES[quant], progress, on_plan)
    ck = Checkpoint(src)
    mod = arch.for_config(ck.config)
    cfg = mod.text_config(ck.config)
    plans = mod.plan(ck, cfg)
    kinds = []

    def metadata(w):
        mod.add_metadata(w, cfg)
        kinds.append(write_tokenizer(w, ck.dir, cfg["vocab_size"]))

    vision_plans, write_vision = _vision(ck, cfg, out, QUANT_CHOICES[quant], progress)
    if on_plan:
        on_plan(sum(4 * _elements(p.shape) for p in plans + vision_plans))
    write_gguf(out, mod.ARCH, metadata, plans, QUANT_CHOICES[quant], progress)
    return Report(out, mod.ARCH, kinds[0], plans, out.stat().st_size, write_vision())


def _vision(ck, cfg: dict, out: Path, quant, progress):
    """Plan the mmproj companion of a checkpoint with a vision tower (planned first, so a bad
    vision config fails before anything is written). Returns (plans, write() -> path or None)."""
    from localmoe.vision import companion_path

    from . import vision

    if not vision.has_vision(ck):
        return [], lambda: None
    vc = vision.vision_config(ck.config, cfg)
    mean, std = vision.image_stats(ck)
    plans = vision.plan(ck, vc, vision.img_break_id(ck))
    path = companion_path(out)

    def write():
        write_gguf(path, vision.ARCH, lambda w: vision.add_metadata(w, vc, mean, std), plans, quant, progress)
        return path
    return plans, write


def _elements(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
