"""GGUF -> GGUF in another type: each tensor dequantized and encoded again, every metadata key copied,
so quantization quality can be compared without the original checkpoint.

Rounding twice costs a little: a Q4_0 made from a Q8_0 lands slightly further from the original weights
than a Q4_0 converted from the checkpoint. Streamed like a conversion: one row block in memory at a time.
"""
from __future__ import annotations

import struct
from collections import Counter
from pathlib import Path

import gguf
import numpy as np

from localmoe.errors import ConvertError
from localmoe.gguf.format import GGML_QUANT_SIZES, KEY_QUANT_FALLBACK, SUPPORTED_TYPES, GGMLType, GGUFValueType
from localmoe.gguf.reader import GGUFFile, TensorInfo, _Cursor
from localmoe.vision import companion_path

from . import Report
from .writer import BLOCK_ELEMENTS, Planned, write_gguf

# Keys the writer sets itself (the architecture, the F16 fallback list of the new file) and the
# file-type keys, which describe the old encoding and are rewritten where the source has them.
FILE_TYPE, QUANT_VERSION = "general.file_type", "general.quantization_version"
NOT_COPIED = {"general.architecture", KEY_QUANT_FALLBACK, FILE_TYPE, QUANT_VERSION}


def requantize(src: Path, out: Path, quant: GGMLType, progress=None, on_plan=None):
    """Requantize GGUF `src` (and `SRC.mmproj.gguf` beside it, into `OUT.mmproj.gguf`) to `quant`.
    Both sources are read and planned before anything is written, so a bad one leaves no output."""
    jobs = [(_Source(src), out)]
    if companion_path(src).is_file():
        jobs.append((_Source(companion_path(src)), companion_path(out)))
    plans = [[_plan(f.file, ti, quant) for ti in f.file.tensors.values()] for f, _ in jobs]
    if on_plan:
        on_plan(sum(4 * int(np.prod(p.shape)) for ps in plans for p in ps))
    for (f, dst), ps in zip(jobs, plans):
        write_gguf(dst, f.arch, lambda w, f=f: f.copy_metadata(w, quant), ps, quant, progress)
    text = jobs[0][0]
    return Report(out, text.arch, "copied", plans[0], out.stat().st_size,
                  jobs[1][1] if len(jobs) > 1 else None, requantized_from=text.main_type())


class _Source:
    """A source GGUF: tensors through localmoe's reader (checked against the file's size, so a truncated
    file is a one-line error), metadata with the GGUF value types it is stored in, to copy it exactly."""

    def __init__(self, path: Path):
        self.file = GGUFFile(path)
        self.arch = self.file.require("general.architecture")
        types = {ti.type for ti in self.file.tensors.values()}
        if types <= {GGMLType.F32}:
            raise ConvertError(f"{path}: every tensor is F32, so the ones that stay F32 (norms, routers) cannot be "
                               f"told from the weights; convert the checkpoint directory instead")
        if unknown := types - set(SUPPORTED_TYPES):
            raise ConvertError(f"{path}: cannot requantize {', '.join(sorted(t.name for t in unknown))} tensors "
                               f"(only {', '.join(t.name for t in SUPPORTED_TYPES)})")
        self.fields = _typed_metadata(self.file)

    def copy_metadata(self, w: gguf.GGUFWriter, quant: GGMLType) -> None:
        for key, value, vtype, sub_type in self.fields:
            if key == "general.alignment":
                w.add_custom_alignment(value)          # the writer must pad to it, not only record it
            elif key not in NOT_COPIED:
                w.add_key_value(key, value, vtype, sub_type)
        keys = {field[0] for field in self.fields}
        if FILE_TYPE in keys:
            w.add_file_type(gguf.LlamaFileType["ALL_F32" if quant == GGMLType.F32 else f"MOSTLY_{quant.name}"])
        if QUANT_VERSION in keys:
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    def main_type(self) -> str:
        """The type that holds most of the source's bytes (its quant, as `info` would call it)."""
        size = Counter()
        for ti in self.file.tensors.values():
            size[ti.type.name] += ti.nbytes
        return max(size, key=size.get)


def _typed_metadata(f: GGUFFile) -> list[tuple[str, object, GGUFValueType, GGUFValueType | None]]:
    """(key, value, type, array element type) of every key, read again with localmoe's header cursor:
    `GGUFFile.metadata` keeps values only, and gguf.GGUFReader takes ~25 s over a 131k-token vocabulary."""
    cur = _Cursor(memoryview(f.data), f.path)
    cur.pos = 16                                      # after magic, version and tensor count
    fields = []
    for _ in range(cur.scalar("<Q")):
        key, vtype = cur.string(), GGUFValueType(cur.scalar("<I"))
        sub_type = None
        if vtype == GGUFValueType.ARRAY:                # the element type, which cur.value reads past
            sub_type = GGUFValueType(struct.unpack_from("<I", cur.buf, cur.pos)[0])
        fields.append((key, _writable(cur.value(vtype)), vtype, sub_type))
    return fields


def _writable(value):
    """A value as GGUFWriter packs it back byte for byte: strings as their stored bytes, arrays as lists."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, list):
        return [_writable(v) for v in value]
    return value


def _plan(f: GGUFFile, ti: TensorInfo, quant: GGMLType) -> Planned:
    """F32 tensors (kept F32 by the converter: norms, routers, patch embedding) and rows that are not
    whole `quant` blocks are copied as they are; every other tensor is dequantized block by block, and
    the writer encodes it in `quant`."""
    rows = f.raw(ti.name).reshape(-1, ti.row_bytes)
    step = max(1, BLOCK_ELEMENTS // ti.shape[-1])
    blocks = lambda: (rows[lo:lo + step] for lo in range(0, len(rows), step))  # noqa: E731
    if ti.type == GGMLType.F32 or ti.shape[-1] % GGML_QUANT_SIZES[quant][0]:
        return Planned(ti.name, ti.shape, blocks, type=ti.type, encoded=True)
    return Planned(ti.name, ti.shape, lambda: (gguf.quants.dequantize(b, ti.type) for b in blocks()))
