"""The Python API: load a GGUF, get logits, generate tokens."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import InputError, ModelFileError
from .gguf.format import KEY_QUANT_FALLBACK, SUPPORTED_TYPES, type_name
from .gguf.reader import GGUFFile
from .models import module_for

PREFILL_BATCH = 128          # prompt tokens per forward pass: weights are read once per batch
DEFAULT_CTX = 8192


def make_backend(name: str = "cpu"):
    if name in ("cpu", "auto"):
        from .backends.cpu import CPUBackend
        return CPUBackend()
    raise InputError(f"unknown backend {name!r}; available: cpu")


class Model:
    """A loaded model: `config`, `tokenizer`, `stats`, `logits(ids)`, `generate(ids, ...)`."""

    def __init__(self, path: str | Path, backend: str = "cpu", n_ctx: int | None = None):
        from .tokenizer import load_tokenizer

        self.path = Path(path)
        self.file = f = GGUFFile(path)
        self.arch = f.require("general.architecture")
        mod = module_for(self.arch)
        for ti in f.tensors.values():
            if ti.type not in SUPPORTED_TYPES:
                raise ModelFileError(f"{self.path}: tensor {ti.name} has unsupported type {type_name(ti.type)}; "
                                     f"supported: {', '.join(t.name for t in SUPPORTED_TYPES)}")
        self.config = mod.Config.from_gguf(f)
        self.backend = make_backend(backend)
        self.net = mod.Model(f, self.config, self.backend)
        self.tokenizer = load_tokenizer(f.metadata)
        self.n_ctx = min(n_ctx or DEFAULT_CTX, self.config.max_position_embeddings)
        self.quant_fallback = list(f.get(KEY_QUANT_FALLBACK, []))

    @property
    def stats(self):
        return self.net.stats

    def new_cache(self, n_ctx: int | None = None):
        return self.net.new_cache(n_ctx or self.n_ctx)

    def _check_ids(self, ids, n_ctx: int) -> np.ndarray:
        ids = np.asarray(list(ids), dtype=np.int64)
        if ids.ndim != 1 or len(ids) == 0:
            raise InputError("empty prompt: nothing to run")
        if len(ids) > n_ctx:
            raise InputError(f"prompt of {len(ids)} tokens is longer than the context ({n_ctx} tokens)")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise InputError(f"token id out of range 0..{self.config.vocab_size - 1}")
        return ids

    def prefill(self, ids, cache, last_only: bool = True) -> np.ndarray:
        """Run prompt ids through the model in batches, appending to `cache`."""
        out = []
        for s in range(0, len(ids), PREFILL_BATCH):
            chunk = ids[s:s + PREFILL_BATCH]
            out.append(self.net.forward(chunk, cache, last_only=last_only and s + PREFILL_BATCH >= len(ids)))
        return out[-1] if last_only else np.concatenate(out)

    def logits(self, ids) -> np.ndarray:
        """float32 [len(ids), vocab] logits for every position, in a fresh context."""
        ids = self._check_ids(ids, self.config.max_position_embeddings)
        cache = self.new_cache(len(ids))
        return self.prefill(ids, cache, last_only=False)

    def generate(self, ids, max_tokens: int = 64, temperature: float = 0.0, seed: int | None = None,
                 stop: tuple[int, ...] | None = None) -> Iterator[int]:
        """Yield up to max_tokens new token ids (greedy at temperature 0), stopping after EOS."""
        ids = self._check_ids(ids, self.n_ctx)
        stop = set(stop if stop is not None else (self.tokenizer.eos_id,))
        rng = np.random.default_rng(seed)
        cache = self.new_cache()
        logits = self.prefill(ids, cache)[-1]
        for _ in range(max_tokens):
            tok = sample(logits, temperature, rng)
            yield tok
            if tok in stop or cache.length >= self.n_ctx:
                return
            logits = self.net.forward(np.array([tok]), cache, last_only=True)[-1]


def sample(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    return int(rng.choice(len(p), p=p / p.sum()))


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A GGUF path, or a models.toml preset name resolved under $LOCALMOE_HOME."""
    p = Path(name_or_path)
    if p.suffix == ".gguf" or p.exists() or os.sep in str(name_or_path):
        return p
    from .registry import preset_path
    return preset_path(str(name_or_path))


def load(path_or_name: str | os.PathLike, backend: str = "cpu", n_ctx: int | None = None) -> Model:
    return Model(resolve(path_or_name), backend=backend, n_ctx=n_ctx)
