"""Streaming GGUF writer: plan every tensor first (names, shapes, types) so the header can be
written, then quantize and write one row block at a time. Peak memory is one block, whatever
the model's size. Output goes to a temporary file renamed at the end; a failure leaves nothing.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import gguf
import numpy as np
from gguf import GGUFWriter

from localmoe.gguf.format import GGMLType, KEY_QUANT_FALLBACK, row_bytes

from localmoe.errors import ConvertError

BLOCK_ELEMENTS = 1 << 22   # float32 elements per streamed row block (16 MiB)


@dataclass
class Planned:
    """One output tensor: its GGUF name, numpy-order shape, and a generator of float32 row blocks
    (each [r, shape[-1]]) whose concatenation is the tensor flattened to 2-D."""
    name: str
    shape: tuple[int, ...]
    chunks: Callable[[], Iterable[np.ndarray]]
    keep_f32: bool = False                 # norms and routers stay F32
    type: GGMLType = field(default=GGMLType.F32)
    encoded: bool = False                  # chunks are already `type`'s bytes (uint8), written as they are


def whole(name: str, shape, fn: Callable[[], np.ndarray], keep_f32: bool = False) -> Planned:
    """A tensor computed in one piece (small ones, or ones that need a transform)."""
    shape = tuple(int(s) for s in shape)
    return Planned(name, shape, lambda: [np.asarray(fn(), np.float32).reshape(-1, shape[-1])], keep_f32)


def row_blocks(read: Callable[[int, int], np.ndarray], shape: tuple[int, ...]) -> Iterator[np.ndarray]:
    """Read a tensor of `shape` as slices [lo:hi] of its first axis, at most BLOCK_ELEMENTS values each
    (at least one slice: one expert of a 3-D tensor)."""
    inner = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    step = max(1, BLOCK_ELEMENTS // max(1, inner))
    for lo in range(0, shape[0], step):
        yield read(lo, min(shape[0], lo + step)).reshape(-1, shape[-1])


def choose_type(p: Planned, quant: GGMLType) -> GGMLType:
    if p.keep_f32 or len(p.shape) == 1 or quant == GGMLType.F32:
        return GGMLType.F32
    block = gguf.GGML_QUANT_SIZES[quant][0]
    if p.shape[-1] % block:
        return GGMLType.F16          # the quant fallback for rows that are not whole blocks
    return quant


def encode(block: np.ndarray, t: GGMLType) -> np.ndarray:
    if t == GGMLType.F32:
        return np.ascontiguousarray(block, dtype="<f4")
    if t == GGMLType.F16:
        return np.ascontiguousarray(block, dtype="<f2")
    return gguf.quants.quantize(np.ascontiguousarray(block, np.float32), t)


def write_gguf(out: Path, arch: str, add_metadata: Callable[[GGUFWriter], None], plans: list[Planned],
               quant: GGMLType, progress=None) -> list[Planned]:
    """Write `plans` to `out` (atomically). `add_metadata(writer)` adds every key-value pair.
    Returns the plans with their chosen types. `progress(nbytes)` is called after each block."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    for p in plans:
        if not p.encoded:
            p.type = choose_type(p, quant)
    fallback = [p.name for p in plans if p.type == GGMLType.F16 and quant not in (GGMLType.F16, GGMLType.F32)]
    try:
        w = GGUFWriter(tmp, arch)
        add_metadata(w)
        if fallback:
            w.add_array(KEY_QUANT_FALLBACK, fallback)
        for p in plans:
            n_rows = int(np.prod(p.shape[:-1], dtype=np.int64))
            nbytes = n_rows * row_bytes(p.type, p.shape[-1])
            if p.type in (GGMLType.F32, GGMLType.F16):
                w.add_tensor_info(p.name, p.shape, np.dtype(np.float32 if p.type == GGMLType.F32 else np.float16),
                                  nbytes)
            else:
                byte_shape = p.shape[:-1] + (row_bytes(p.type, p.shape[-1]),)
                w.add_tensor_info(p.name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=p.type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        fout = w.fout[0]
        w.write_padding(fout, fout.tell())
        for p in plans:
            written, expected = 0, int(np.prod(p.shape[:-1], dtype=np.int64)) * row_bytes(p.type, p.shape[-1])
            for block in p.chunks():
                if not p.encoded and not np.isfinite(block).all():
                    raise ConvertError(f"tensor {p.name} has NaN or infinite values (a diverged training run?); "
                                       f"nothing written")
                data = np.ascontiguousarray(block).view(np.uint8) if p.encoded else encode(block, p.type)
                fout.write(data if p.encoded else data.tobytes())
                written += data.nbytes
                if progress:
                    progress(data.nbytes)
            if written != expected:
                raise AssertionError(f"{p.name}: wrote {written} bytes, planned {expected}")
            w.write_padding(fout, written)
        fout.flush()
        os.fsync(fout.fileno())
        w.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return plans


def copied(ck, src: str, dst: str, keep_f32: bool = False) -> Planned:
    """A checkpoint tensor written as it is (streamed in row blocks)."""
    shape = ck.shape(src)
    return Planned(dst, shape, lambda: row_blocks(lambda lo, hi: ck.rows(src, lo, hi), shape), keep_f32)
