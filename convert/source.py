"""Reading a Hugging Face checkpoint directory lazily: config.json plus safetensors shards.

Shards are parsed by hand (8-byte header length, JSON header, raw data) so BF16 needs no torch, and
any row range of a tensor is read with pread into a fresh buffer: no mapping keeps pages resident,
so conversion memory stays bounded by one block whatever the model's size.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from localmoe.errors import ConvertError

# Prefixes under which checkpoints store the text model, stripped to canonical names
# ("layers.0.self_attn.q_a_proj.weight", "embed_tokens.weight", "norm.weight", "lm_head.weight").
TEXT_PREFIXES = ("language_model.model.", "model.language_model.", "model.")
HEAD_PREFIXES = ("language_model.lm_head.", "lm_head.")
_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8"}


@dataclass(frozen=True)
class _Entry:
    shard: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


class Checkpoint:
    def __init__(self, src: str | Path):
        self.dir = Path(src)
        if not self.dir.is_dir():
            raise ConvertError(f"{self.dir}: not a checkpoint directory")
        cfg_path = self.dir / "config.json"
        if not cfg_path.is_file():
            raise ConvertError(f"{self.dir}: not a checkpoint (no config.json)")
        try:
            self.config = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConvertError(f"{cfg_path}: invalid JSON ({e})") from None
        shards = sorted(self.dir.glob("*.safetensors"))
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                names = set(json.loads(index.read_text())["weight_map"].values())
            except (json.JSONDecodeError, KeyError) as e:
                raise ConvertError(f"{index}: invalid index ({e})") from None
            shards = [self.dir / n for n in sorted(names)]
        if not shards:
            raise ConvertError(f"{self.dir}: no .safetensors files")
        self._fds: dict[Path, int] = {}
        self.entries: dict[str, _Entry] = {}
        for shard in shards:
            self._read_header(shard)
        self.canonical = self._canonical_names()

    def _read_header(self, shard: Path) -> None:
        if not shard.is_file():
            raise ConvertError(f"{shard}: shard named in the index is missing")
        size = shard.stat().st_size
        with open(shard, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConvertError(f"{shard}: not a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 1 << 30:
                raise ConvertError(f"{shard}: not a safetensors file (bad header length)")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ConvertError(f"{shard}: not a safetensors file (bad header)") from None
        self._fds[shard] = os.open(shard, os.O_RDONLY)
        base = 8 + n
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            b, e = meta["data_offsets"]
            if base + e > size:
                raise ConvertError(f"{shard}: truncated (tensor {name} ends past the end of the file)")
            self.entries[name] = _Entry(shard, meta["dtype"], tuple(meta["shape"]), base + b, base + e)

    def _canonical_names(self) -> dict[str, str]:
        out = {}
        for name in self.entries:
            for p in HEAD_PREFIXES:
                if name.startswith(p):
                    out["lm_head." + name[len(p):]] = name
                    break
            else:
                for p in TEXT_PREFIXES:
                    if name.startswith(p):
                        out[name[len(p):]] = name
                        break
                else:
                    out[name] = name
        return out

    # -- access by canonical name ------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self.canonical

    def _entry(self, name: str) -> _Entry:
        try:
            return self.entries[self.canonical[name]]
        except KeyError:
            raise ConvertError(f"{self.dir}: checkpoint has no tensor {name}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def rows(self, name: str, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """float32 copy of tensor[lo:hi] along its first axis (only those bytes are read)."""
        e = self._entry(name)
        if e.dtype not in _DTYPES:
            raise ConvertError(f"{self.dir}: tensor {name} has unsupported dtype {e.dtype}")
        dt = np.dtype(_DTYPES[e.dtype])
        shape = e.shape or (1,)
        hi = shape[0] if hi is None else hi
        inner = int(np.prod(shape[1:], dtype=np.int64))
        count = (hi - lo) * inner
        nbytes = count * dt.itemsize
        buf = os.pread(self._fds[e.shard], nbytes, e.begin + lo * inner * dt.itemsize)
        if len(buf) != nbytes:
            raise ConvertError(f"{e.shard}: truncated while reading {name}")
        a = np.frombuffer(buf, dtype=dt).reshape((hi - lo,) + tuple(shape[1:]))
        if e.dtype == "BF16":
            return (a.astype(np.uint32) << 16).view(np.float32)
        return a.astype(np.float32)

    def get(self, name: str) -> np.ndarray:
        return self.rows(name).reshape(self._entry(name).shape)
