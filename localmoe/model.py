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
from .sampling import Sampler, SamplingParams

PREFILL_BATCH = 128          # prompt tokens per forward pass: weights are read once per batch
DEFAULT_CTX = 8192


def make_backend(name="cpu"):
    """"cpu", "cuda", or "auto" (CUDA when numba.cuda sees a GPU, else CPU); a backend object is used as is
    (e.g. backends.multi.ExpertParallel over several devices)."""
    if not isinstance(name, str):
        return name
    if name in ("cuda", "auto"):
        from .backends.cuda import CUDABackend, available
        ok, why = available()
        if ok:
            return CUDABackend()
        if name == "cuda":
            raise InputError(f"backend 'cuda' is not usable here: {why}")
    if name in ("cpu", "auto"):
        from .backends.cpu import CPUBackend
        return CPUBackend()
    raise InputError(f"unknown backend {name!r}; available: cpu, cuda, auto")


class Model:
    """A loaded model: `config`, `tokenizer`, `stats`, `logits(ids)`, `generate(ids, ...)`."""

    def __init__(self, path: str | Path, backend: str = "cpu", n_ctx: int | None = None, gpu_mem: int | None = None,
                 host_register: bool | None = None):
        """gpu_mem: VRAM bytes for a cache of routed experts streamed from the file (CUDA backend);
        None: every weight resident when the model fits the GPU, else the experts stream through
        what is left (`placement`). host_register: when experts stream, pin the mapped file so they are
        DMA'd from it directly (None: if it fits in RAM; backends/cuda/streaming.py)."""
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
        self.placement = None
        self._streamer = None             # the backend's ExpertStreamer, when this model set one up
        if hasattr(self.backend, "free_memory"):
            self.placement = self._place(gpu_mem, host_register)
        elif gpu_mem is not None:
            raise InputError(f"--gpu-mem needs the cuda backend (this is {self.backend.name})")

    def _place(self, gpu_mem: int | None, host_register: bool | None = None):
        """Everything resident when it fits the GPU; else (or with gpu_mem) the routed experts stream
        through a VRAM cache (localmoe/placement.py decides, the backend's ExpertStreamer moves them)."""
        from .placement import PlacementError, layer_bytes, plan
        c, be = self.config, self.backend
        per_expert = next(L.experts for L in self.net.layers if L.experts is not None).bytes_per_expert
        rows = self.net.new_cache(1).rows
        kv = sum(int(np.prod(r)) for r in rows.values()) * 4 * c.num_hidden_layers * self.n_ctx
        try:
            p = plan(layer_bytes(self.file.tensors, c.num_hidden_layers), [be.free_memory()], kv,
                     c.n_experts * per_expert, gpu_mem)
        except PlacementError as e:
            raise InputError(str(e)) from None
        if p.streams(0):
            be.stream_experts(p.expert_cache[0], c.num_hidden_layers, c.n_experts, host_buffer=self.file.data,
                              host_register=host_register)
            moe = [(i, L.experts) for i, L in enumerate(self.net.layers) if L.experts is not None]
            be.next_experts = {i: nxt for (i, _), nxt in zip(moe, moe[1:])}
            self.net.stats.expert_cache = self._streamer = be.streamer
        return p

    def close(self) -> None:
        """Unmap the file, after the expert streamer this model set up has unregistered it from CUDA. The
        model is unusable afterwards; a backend passed in stays its owner's to close."""
        if self._streamer is not None:
            self._streamer.close()
        self.file.close()

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

    def prefill(self, ids, cache, last_only: bool = True, embeds=None) -> np.ndarray:
        """Run prompt ids through the model in batches, appending to `cache`. `embeds` = (positions,
        vectors [k, hidden]) replaces the embeddings at those prompt positions (image tokens)."""
        out = []
        for s in range(0, len(ids), PREFILL_BATCH):
            chunk = ids[s:s + PREFILL_BATCH]
            out.append(self.net.forward(chunk, cache, last_only=last_only and s + PREFILL_BATCH >= len(ids),
                                        embeds=_window(embeds, s, len(chunk))))
        return out[-1] if last_only else np.concatenate(out)

    def logits(self, ids, images=None) -> np.ndarray:
        """float32 [len(ids), vocab] logits for every position, in a fresh context. `images` (paths,
        PIL images or normalised float32 [3, H, W] arrays) fill the [IMG] positions of `ids` in order."""
        ids = self._check_ids(ids, self.config.max_position_embeddings)
        cache = self.new_cache(len(ids))
        return self.prefill(ids, cache, last_only=False, embeds=self.image_embeds(ids, images))

    @property
    def vision(self):
        """The vision companion (`<model>.mmproj.gguf`), loaded on first use."""
        from .vision import Vision, companion_path

        if getattr(self, "_vision", None) is None:
            path = companion_path(self.path)
            if not path.is_file():
                raise InputError(f"{self.path.name} has no vision companion ({path.name} not found): this model "
                                 f"cannot read images; convert a checkpoint with a vision tower to get one")
            vision = Vision(path, self.backend)
            if vision.config.projection_dim != self.config.hidden_size:
                raise ModelFileError(f"{path}: projection_dim {vision.config.projection_dim} does not match "
                                     f"the text model's hidden size {self.config.hidden_size}")
            self._vision = vision
        return self._vision

    def image_tokens(self, image) -> list[int]:
        """The prompt token ids for one image ([IMG] x w + [IMG_BREAK] per row, the last [IMG_END])."""
        return self.vision.token_ids(self.tokenizer, image)

    def image_embeds(self, ids: np.ndarray, images):
        """For prefill: (positions of [IMG] in ids, the images' projector outputs), None without images."""
        if not images:
            return None
        vectors = self.vision.embeddings(images)
        positions = np.flatnonzero(np.asarray(ids) == self.tokenizer.special_id("[IMG]"))
        if len(positions) != len(vectors):
            raise InputError(f"the prompt has {len(positions)} [IMG] tokens but its {len(images)} image(s) "
                             f"need {len(vectors)}; build them with image_tokens()")
        return positions, vectors

    def generate(self, ids, max_tokens: int = 64, temperature: float = 0.0, seed: int | None = None,
                 stop: tuple[int, ...] | None = None) -> Iterator[int]:
        """Yield up to max_tokens new token ids (greedy at temperature 0), stopping after EOS."""
        sampler = Sampler(SamplingParams(temperature=temperature, seed=seed))
        return self.generate_from(self.new_cache(), ids, sampler, max_tokens, stop)

    def generate_from(self, cache, ids, sampler: Sampler | None = None, max_tokens: int = 64,
                      stop: tuple[int, ...] | None = None, embeds=None) -> Iterator[int]:
        """Append ids to `cache` (which may already hold earlier turns: they are not recomputed), then
        yield up to max_tokens sampled ids, stopping after a stop id (EOS by default) or a full context.
        `embeds` (positions in ids, vectors) replace those positions' token embeddings (images)."""
        ids = self._check_ids(ids, cache.n_ctx - cache.length)
        sampler = sampler or Sampler()
        stop = set(stop if stop is not None else (self.tokenizer.eos_id,))
        return self._sample_loop(ids, cache, sampler, max_tokens, stop, embeds)

    def _sample_loop(self, ids, cache, sampler, max_tokens, stop, embeds=None) -> Iterator[int]:
        """The last token yielded is not run through the model (nothing would read its logits): the cache
        ends one short of the tokens yielded, as after a stop token (chat feeds it with the next turn)."""
        logits = self.prefill(ids, cache, embeds=embeds)[-1]
        for i in range(max_tokens):
            tok = sampler(logits)
            yield tok
            if tok in stop or cache.length >= cache.n_ctx or i == max_tokens - 1:
                return
            logits = self.net.forward(np.array([tok]), cache, last_only=True)[-1]

    @property
    def chat_format(self):
        """The prompt format recorded by the converter (`localmoe.chat`)."""
        if not hasattr(self, "_chat_format"):
            from .chat import ChatFormat
            self._chat_format = ChatFormat.from_metadata(self.file.metadata, self.tokenizer)
        return self._chat_format

    def chat_tokens(self, messages: list[dict], effort: str | None = None, images=None) -> list[int]:
        """Prompt ids of a conversation ({"role": "system"|"user"|"assistant", "content": str} dicts,
        ending with a user message) in the model's own format, ready for the assistant's reply.
        `images` attach to the last user message before its text; a user message's content may also be
        a list of {"type": "text", "text": ..} / {"type": "image", "image": ..} parts. Pass the same
        images, in prompt order (`chat.message_images`), to `logits` / `generate_from`."""
        from .chat import with_images
        return self.chat_format.encode(with_images(messages, images), effort, self.image_tokens)


def _window(embeds, start: int, n: int):
    """The part of (positions, vectors) that falls in prompt positions [start, start+n), made relative."""
    if embeds is None:
        return None
    positions, vectors = embeds
    keep = (positions >= start) & (positions < start + n)
    return (positions[keep] - start, vectors[keep]) if keep.any() else None


def resolve(name_or_path: str | os.PathLike | None = None) -> Path:
    """A GGUF path, or a models.toml preset name resolved under $LOCALMOE_HOME; None is the default
    preset (the bundled demo), looked up as a preset even where a file of that name is at hand."""
    from .registry import DEFAULT, preset_path

    if name_or_path is None:
        return preset_path(DEFAULT)
    p = Path(name_or_path)
    if p.suffix == ".gguf" or p.exists() or os.sep in str(name_or_path):
        return p
    return preset_path(str(name_or_path))


def load(path_or_name: str | os.PathLike | None = None, backend: str = "cpu", n_ctx: int | None = None,
         gpu_mem: int | None = None, host_register: bool | None = None) -> Model:
    """The model at a path or preset name; without one, the bundled demo model."""
    return Model(resolve(path_or_name), backend=backend, n_ctx=n_ctx, gpu_mem=gpu_mem, host_register=host_register)
