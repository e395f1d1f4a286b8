"""Memory-mapped GGUF reading: the header parsed by hand (fast for 131k-token vocabularies),
tensors as zero-copy uint8 views checked against the file's size.

`gguf.GGUFReader` builds a Python object per vocabulary string (~7 s for 131k tokens); here string
arrays are decoded in one tight loop and numeric arrays are `np.frombuffer` views.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ModelFileError
from .format import DEFAULT_ALIGNMENT, GGML_QUANT_SIZES, MAGIC, VERSIONS, GGMLType, GGUFValueType, type_name

_SCALAR = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_NUMPY = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2", GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]   # numpy order (outermost first): ggml ne reversed
    type: GGMLType
    offset: int              # absolute offset in the file
    nbytes: int

    @property
    def row_bytes(self) -> int:
        return self.nbytes // max(1, int(np.prod(self.shape[:-1], dtype=np.int64)))


class _Cursor:
    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def need(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            raise ModelFileError(f"{self.path}: truncated GGUF header (needs byte {self.pos + n}, file has {len(self.buf)})")

    def scalar(self, fmt: str):
        n = struct.calcsize(fmt)
        self.need(n)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self) -> str:
        n = self.scalar("<Q")
        self.need(n)
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="surrogateescape")
        self.pos += n
        return s

    def value(self, vtype: int):
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            etype, count = self.scalar("<I"), self.scalar("<Q")
            if etype == GGUFValueType.STRING:
                return self.string_array(count)
            if etype in _NUMPY:
                dt = np.dtype(_NUMPY[etype])
                self.need(count * dt.itemsize)
                arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos)
                self.pos += count * dt.itemsize
                return arr
            if etype == GGUFValueType.ARRAY:
                return [self.value(GGUFValueType.ARRAY) for _ in range(count)]
            raise ModelFileError(f"{self.path}: unknown GGUF array element type {etype}")
        if vtype in _SCALAR:
            return self.scalar(_SCALAR[vtype])
        raise ModelFileError(f"{self.path}: unknown GGUF value type {vtype}")

    def string_array(self, count: int) -> list[str]:
        buf, pos, end, out = self.buf, self.pos, len(self.buf), []
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(count):
            if pos + 8 > end:
                raise ModelFileError(f"{self.path}: truncated GGUF header in a string array")
            (n,) = unpack(buf, pos)
            pos += 8
            if pos + n > end:
                raise ModelFileError(f"{self.path}: truncated GGUF header in a string array")
            out.append(str(buf[pos:pos + n], "utf-8", "surrogateescape"))
            pos += n
        self.pos = pos
        return out


class GGUFFile:
    """One GGUF file: `metadata` (key -> value), `tensors` (name -> TensorInfo), zero-copy views."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            raise ModelFileError(f"{self.path}: no such file") from None
        except IsADirectoryError:
            raise ModelFileError(f"{self.path}: is a directory, not a GGUF file") from None
        with f:
            size = f.seek(0, 2)
            if size < 24:
                raise ModelFileError(f"{self.path}: not a GGUF file (only {size} bytes)")
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.size = size
        self.data = np.frombuffer(self._mmap, dtype=np.uint8)
        self._parse()

    def _parse(self) -> None:
        cur = _Cursor(memoryview(self._mmap), self.path)
        if bytes(cur.buf[:4]) != MAGIC:
            raise ModelFileError(f"{self.path}: not a GGUF file (bad magic {bytes(cur.buf[:4])!r})")
        cur.pos = 4
        version = cur.scalar("<I")
        if version not in VERSIONS:
            raise ModelFileError(f"{self.path}: unsupported GGUF version {version}")
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
        if n_tensors > 1 << 24 or n_kv > 1 << 24:
            raise ModelFileError(f"{self.path}: corrupt GGUF header (counts {n_tensors}, {n_kv})")
        self.metadata: dict[str, object] = {}
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.scalar("<I")
            if n_dims > 4:
                raise ModelFileError(f"{self.path}: tensor {name} has {n_dims} dimensions")
            ne = [cur.scalar("<Q") for _ in range(n_dims)]
            infos.append((name, ne, cur.scalar("<I"), cur.scalar("<Q")))
        align = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        start = (cur.pos + align - 1) // align * align
        self.data_offset = start
        self.tensors: dict[str, TensorInfo] = {}
        for name, ne, t, off in infos:
            try:
                gtype = GGMLType(t)
                block, bsize = GGML_QUANT_SIZES[gtype]
            except (ValueError, KeyError):
                raise ModelFileError(f"{self.path}: tensor {name} has unknown type code {t}") from None
            n = int(np.prod(ne, dtype=np.int64)) if ne else 1
            if ne and ne[0] % block:
                raise ModelFileError(f"{self.path}: tensor {name} row of {ne[0]} is not a multiple of {block} ({gtype.name})")
            nbytes = n // block * bsize
            begin = start + off
            if begin + nbytes > self.size:
                raise ModelFileError(
                    f"{self.path}: truncated: tensor {name} ends at byte {begin + nbytes}, file has {self.size}")
            self.tensors[name] = TensorInfo(name, tuple(int(x) for x in reversed(ne)), gtype, begin, nbytes)

    # -- access -------------------------------------------------------------------------------------
    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    def require(self, key: str):
        if key not in self.metadata:
            raise ModelFileError(f"{self.path}: missing metadata key {key}")
        return self.metadata[key]

    def info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise ModelFileError(f"{self.path}: missing tensor {name}")
        return self.tensors[name]

    def raw(self, name: str) -> np.ndarray:
        """uint8 view of a tensor's blocks shaped (*outer, rows, row_bytes) — no copy."""
        ti = self.info(name)
        block, bsize = GGML_QUANT_SIZES[ti.type]
        shape = ti.shape[:-1] + (ti.shape[-1] // block * bsize,)
        return self.data[ti.offset:ti.offset + ti.nbytes].reshape(shape)

    def array(self, name: str) -> np.ndarray:
        """A float tensor (F32/F16/BF16) as a float32 array; F32 is a zero-copy view."""
        ti = self.info(name)
        raw = self.data[ti.offset:ti.offset + ti.nbytes]
        if ti.type == GGMLType.F32:
            return raw.view("<f4").reshape(ti.shape)
        if ti.type == GGMLType.F16:
            return raw.view("<f2").astype(np.float32).reshape(ti.shape)
        if ti.type == GGMLType.BF16:
            return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(ti.shape)
        raise ModelFileError(f"{self.path}: tensor {name} is {type_name(ti.type)}, expected a float type")

    def advise_random(self, name: str) -> None:
        """Tell the kernel a tensor is read in scattered slices (routed experts): no readahead, so only
        the selected experts' pages are loaded."""
        ti, page = self.info(name), mmap.PAGESIZE
        start = (ti.offset + page - 1) // page * page
        end = (ti.offset + ti.nbytes) // page * page
        if end > start:
            self._mmap.madvise(mmap.MADV_RANDOM, start, end - start)

    def close(self) -> None:
        self.data = None
        try:
            self._mmap.close()
        except BufferError:  # views still alive: the mapping goes when they do
            pass
