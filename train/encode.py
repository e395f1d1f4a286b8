"""Samples -> training sequences, through the runtime's own tokenizer and prompt format.

The demo's tokenizer is `train/tekken_demo.json`: the first ranks of the real tekken vocabulary
(mistral-common's tekken_240718.json) with Small 4's v15 special tokens and settings builder. The
encoder reads it the way a user's model will be read: the converter writes it into a vocabulary-only
GGUF and the runtime loads that, so training and inference tokenize identically by construction.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import gguf
import numpy as np

from convert.tokenizer import write_tokenizer
from localmoe.chat import ChatFormat
from localmoe.gguf.reader import GGUFFile
from localmoe.tokenizer import load_tokenizer
from localmoe.vision import ImageSpec, image_token_ids, preprocess

from .data import IMAGE_SIZE, Sample

TEKKEN = Path(__file__).with_name("tekken_demo.json")
VOCAB_SIZE = 4096                     # 1000 special + 3096 regular ranks
PATCH, MERGE = 8, 2
SPEC = ImageSpec(patch_size=PATCH, spatial_merge_size=MERGE, max_size=IMAGE_SIZE)


def write_demo_tekken(out: Path = TEKKEN, vocab_size: int = VOCAB_SIZE) -> Path:
    """Cut the v15 tekken file (tests/tokenizer_files.write_tekken_v15) down to `vocab_size` ids."""
    import sys
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from tests.tokenizer_files import write_tekken_v15

    with tempfile.TemporaryDirectory() as d:
        data = json.loads(write_tekken_v15(Path(d)).read_text(encoding="utf-8"))
    n_special = data["config"]["default_num_special_tokens"]
    data["vocab"] = data["vocab"][:vocab_size - n_special]
    data["config"]["default_vocab_size"] = vocab_size
    out.write_text(json.dumps(data, separators=(",", ":")), encoding="utf-8")
    return out


class Encoder:
    """`encode(sample)` -> (ids, loss mask, image array or None)."""

    def __init__(self, tekken: Path = TEKKEN, vocab_size: int = VOCAB_SIZE):
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "tekken.json").write_bytes(Path(tekken).read_bytes())
            w = gguf.GGUFWriter(Path(d) / "vocab.gguf", "mistral4")
            write_tokenizer(w, Path(d), vocab_size)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.close()
            f = GGUFFile(Path(d) / "vocab.gguf")
            self.metadata = dict(f.metadata)
            f.close()
        self.tok = load_tokenizer(self.metadata)
        self.fmt = ChatFormat.from_metadata(self.metadata, self.tok)
        self.think = self.tok.special_id("[THINK]")
        self.end_think = self.tok.special_id("[/THINK]")

    def image(self, img) -> np.ndarray:
        return preprocess(img, SPEC)

    def prompt(self, s: Sample, pixels: np.ndarray | None = None) -> list[int]:
        """The prompt ids the runtime builds for this sample (what evaluation feeds the model)."""
        return self.fmt.encode(s.messages, s.effort, lambda _img: image_token_ids(self.tok, pixels, SPEC.unit))

    def reply(self, s: Sample) -> list[int]:
        ids = []
        if s.thinking is not None:
            ids += [self.think, *self.tok.encode(s.thinking, bos=False), self.end_think]
        return ids + self.tok.encode(s.answer, bos=False) + [self.tok.eos_id]

    def encode(self, s: Sample) -> tuple[list[int], list[int], np.ndarray | None]:
        if not s.messages:                       # plain text: learn every token after <s>
            ids = self.tok.encode(s.answer, bos=True)
            return ids, [0] + [1] * (len(ids) - 1), None
        pixels = self.image(s.image) if s.image is not None else None
        prompt, reply = self.prompt(s, pixels), self.reply(s)
        return prompt + reply, [0] * len(prompt) + [1] * len(reply), pixels
