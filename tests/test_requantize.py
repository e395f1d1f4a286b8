"""`localmoe convert SRC.gguf OUT.gguf --quant q4_0`: a GGUF file requantized. Every tensor must be exactly
quantize(dequantize(source)), the metadata copied, the vision companion requantized beside it, and the
model's logits must stay close to the source's."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize, quantize

import localmoe
from convert import convert
from localmoe.gguf.format import GGMLType
from localmoe.gguf.reader import GGUFFile
from localmoe.vision import companion_path

from checkpoints import make_mistral3_vision
from test_bad_input import assert_clean_error, localmoe as localmoe_cli, write_gguf
from test_reference import KL_LIMIT, mean_kl
from tokenizer_files import write_tekken_v15

TYPE_KEYS = {"general.file_type", "general.quantization_version"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny Small 4 (mistral4 text + pixtral vision) converted to Q8_0, then requantized to Q4_0."""
    d = tmp_path_factory.mktemp("requant")
    src, _ = make_mistral3_vision(d / "hf", image_size=56)
    write_tekken_v15(src)
    q8 = convert(src, d / "m-q8_0.gguf", "q8_0").out
    q4 = d / "m-q4_0.gguf"
    r = localmoe_cli("convert", q8, q4, "--quant", "q4_0")
    assert r.returncode == 0, r.stderr
    assert "requantized from Q8_0" in r.stderr
    return q8, q4


@pytest.mark.parametrize("part", ["text", "vision"])
def test_tensors_and_metadata(files, part):
    q8, q4 = files if part == "text" else map(companion_path, files)
    a, b = GGUFFile(q8), GGUFFile(q4)
    keys = a.metadata.keys() - TYPE_KEYS
    assert keys == b.metadata.keys() - TYPE_KEYS
    for k in keys:
        v = a.metadata[k]
        assert np.array_equal(v, b.metadata[k]) if isinstance(v, np.ndarray) else v == b.metadata[k], k
    assert list(a.tensors) == list(b.tensors)
    kept = requantized = 0
    for name, ti in a.tensors.items():
        got = np.asarray(b.raw(name))
        if ti.type in (GGMLType.F32, GGMLType.F16):       # norms/routers/patch embedding, rows not whole blocks
            assert b.tensors[name].type == ti.type and np.array_equal(got, a.raw(name)), name
            kept += 1
        else:
            assert ti.type == GGMLType.Q8_0 and b.tensors[name].type == GGMLType.Q4_0, name
            want = quantize(dequantize(np.asarray(a.raw(name)), GGMLType.Q8_0), GGMLType.Q4_0)
            assert np.array_equal(got, want), name
            requantized += 1
    assert kept and requantized


def test_logits_stay_close(files, tmp_path):
    from PIL import Image
    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 56, 3), dtype=np.uint8)).save(image)
    q8, q4 = (localmoe.load(p) for p in files)
    ids = q8.chat_tokens([{"role": "user", "content": "What is in this picture?"}], images=[image])
    ids += np.random.default_rng(1).integers(1000, 131072, 64).tolist()
    kl = mean_kl(q8.logits(ids, images=[image]), q4.logits(ids, images=[image]))
    assert kl < KL_LIMIT["q4_0"], kl


def test_file_type_keys_are_rewritten(tmp_path):
    """A file as llama.cpp writes it (with general.file_type): the type keys describe the new encoding."""
    src, out = tmp_path / "src.gguf", tmp_path / "out.gguf"
    w = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    write_gguf(src, "llama", {"blk.0.ffn_up.weight": (quantize(w, GGMLType.Q8_0), GGMLType.Q8_0),
                              "blk.0.attn_norm.weight": (np.ones(64, np.float32), None)},
               {"general.file_type": gguf.LlamaFileType.MOSTLY_Q8_0, "general.quantization_version": 2})
    convert(src, out, "q4_0")
    f = GGUFFile(out)
    assert f.metadata["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_0
    assert f.metadata["general.quantization_version"] == gguf.GGML_QUANT_VERSION
    assert f.tensors["blk.0.ffn_up.weight"].type == GGMLType.Q4_0
    assert f.tensors["blk.0.attn_norm.weight"].type == GGMLType.F32


def test_bad_source_leaves_nothing(files, tmp_path):
    q8, _ = files
    data, vision = q8.read_bytes(), companion_path(q8).read_bytes()
    for cut in (40, len(data) // 3, len(data) - 100):
        src = tmp_path / f"cut{cut}.gguf"
        src.write_bytes(data[:cut])
        assert_clean_error(localmoe_cli("convert", src, tmp_path / "out.gguf", "--quant", "q4_0"), "truncated")
    src = tmp_path / "good.gguf"                         # a good text file with a truncated companion
    src.write_bytes(data)
    companion_path(src).write_bytes(vision[:len(vision) // 2])
    assert_clean_error(localmoe_cli("convert", src, tmp_path / "out.gguf", "--quant", "q4_0"), "truncated")
    f32 = tmp_path / "f32.gguf"
    write_gguf(f32, "llama", {"token_embd.weight": (np.ones((8, 32), np.float32), None)})
    assert_clean_error(localmoe_cli("convert", f32, tmp_path / "out.gguf", "--quant", "q4_0"), "every tensor is F32")
    assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob(".out*"))
