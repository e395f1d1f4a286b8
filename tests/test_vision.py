"""Vision (issue 4): mmproj conversion, preprocessing, Pixtral encoder + projector, image prompts.

References: Transformers 5.23's `Mistral3ForConditionalGeneration` for the numbers (fed exactly the
normalised pixels our preprocessing produced), mistral-common 1.13.1's `ImageEncoder` for the token
layout and the preprocessing (which resizes with OpenCV; ours with pillow, so pixels agree within a
measured tolerance, shapes exactly).
"""
from __future__ import annotations

import io
import shutil
import struct
import zlib

import numpy as np
import pytest
from gguf.quants import dequantize
from mistral_common.protocol.instruct.chunk import ImageChunk
from mistral_common.tokens.tokenizers.image import ImageConfig, ImageEncoder, SpecialImageIDs, _convert_to_rgb
from PIL import Image

import localmoe
from convert import convert
from convert.vision import rope_pairs
from localmoe.cli import main as cli_main
from localmoe.errors import InputError
from localmoe.gguf.reader import GGUFFile
from localmoe.vision import ImageSpec, companion_path, load_image, to_rgb

from checkpoints import hf_image_logits, make_mistral3_vision

LIMIT = 112                       # the tiny model's longest image side (vision_config.image_size)
SPEC = ImageSpec(14, 2, LIMIT)
# pillow (bicubic a=-0.5) vs OpenCV (a=-0.75) on photo-like images, max / mean |diff| in normalised
# units (1/255 of the range is ~0.015), measured (docs/ARCHITECTURE.md): at Small 4's limit, images of
# 200 px and more: 0.020 / 0.0027; the worst seen, a 27x29 picture upscaled 2x: 0.169 / 0.033.
TOLERANCE = {"small4": (0.03, 0.004), "any": (0.2, 0.04)}


def photo(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    """A smooth random picture (sums of low-frequency waves per channel): what photos and charts
    look like to a resampler, unlike white noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    img = np.zeros((h, w, 3))
    for c in range(3):
        for _ in range(4):
            fx, fy, ph = rng.uniform(0.5, 6, 3)
            img[..., c] += np.sin(2 * np.pi * (fx * x + fy * y) + ph)
    img = (img - img.min()) / (img.max() - img.min()) * 255
    return Image.fromarray(img.astype(np.uint8)).convert(mode)


def mistral_common(img: Image.Image, limit: int = LIMIT):
    return ImageEncoder(ImageConfig(14, limit, 2), SpecialImageIDs(img=10, img_break=12, img_end=13))(
        ImageChunk(image=img))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("mistral3-vision")
    src, model = make_mistral3_vision(d / "hf", image_size=LIMIT)
    report = convert(src, d / "model-f32.gguf", "f32")
    return dict(dir=d, src=src, model=model, report=report, m=localmoe.load(report.out))


def rel_diff(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def prompt(m, images, seed: int) -> list[int]:
    """BOS, random text, each image's tokens between random text: images anywhere in the prompt."""
    rng = np.random.default_rng(seed)
    text = lambda n: rng.integers(1000, m.config.vocab_size, n).tolist()
    ids = [1] + text(3)
    for im in images:
        ids += m.image_tokens(im) + text(4)
    return ids


# -- conversion ------------------------------------------------------------------------------------

def test_companion_written_with_llamacpp_names(tiny):
    mm = tiny["report"].mmproj
    assert mm == companion_path(tiny["report"].out) == tiny["dir"] / "model-f32.mmproj.gguf"
    f = GGUFFile(mm)
    assert f.get("general.architecture") == "clip" and f.get("general.type") == "mmproj"
    assert f.get("clip.projector_type") == "pixtral" and f.get("clip.has_vision_encoder") is True
    assert f.get("clip.use_silu") is True and f.get("clip.vision.spatial_merge_size") == 2
    assert f.get("clip.vision.projection_dim") == 64 and f.get("clip.vision.image_size") == LIMIT
    per_layer = ["ln1", "attn_q", "attn_k", "attn_v", "attn_out", "ln2", "ffn_gate", "ffn_up", "ffn_down"]
    expected = {"v.patch_embd.weight", "v.pre_ln.weight", "mm.input_norm.weight", "mm.patch_merger.weight",
                "mm.1.weight", "mm.2.weight", "v.token_embd.img_break"}
    expected |= {f"v.blk.{i}.{n}.weight" for i in range(2) for n in per_layer}
    assert set(f.tensors) == expected
    sd = tiny["model"].state_dict()
    q = sd["model.vision_tower.transformer.layers.1.attention.q_proj.weight"].numpy()
    np.testing.assert_array_equal(f.array("v.blk.1.attn_q.weight"), rope_pairs(q, 4))
    np.testing.assert_array_equal(f.array("v.token_embd.img_break"),
                                  sd["model.language_model.embed_tokens.weight"][12].numpy())
    assert f.info("v.patch_embd.weight").shape == (64, 3, 14, 14)


def test_q8_0_companion_quantized_where_rows_allow(tiny):
    report = convert(tiny["src"], tiny["dir"] / "model-q8_0.gguf", "q8_0")
    f = GGUFFile(report.mmproj)
    types = {name: t.type.name for name, t in f.tensors.items()}
    assert types["v.blk.0.attn_q.weight"] == types["mm.1.weight"] == types["v.blk.0.ffn_down.weight"] == "Q8_0"
    assert types["v.patch_embd.weight"] == types["mm.patch_merger.weight"] == types["v.blk.0.ln1.weight"] == "F32"
    ref = GGUFFile(tiny["report"].mmproj)
    w = f.info("mm.2.weight")
    deq = dequantize(f.raw(w.name), w.type).reshape(w.shape)
    assert np.abs(deq - ref.array("mm.2.weight")).max() < 0.01 * np.abs(ref.array("mm.2.weight")).max()
    m = localmoe.load(report.out)
    images = [load_image(photo(90, 60, 3), SPEC)]
    ids = prompt(m, images, 3)
    ref_logits = hf_image_logits(tiny["model"], ids, images)
    assert rel_diff(m.logits(ids, images=images), ref_logits) < 0.1


def test_info_shows_both_files(tiny, capsys):
    cli_main(["info", str(tiny["report"].out), "--no-tensors"])
    out = capsys.readouterr().out
    assert "architecture: mistral4" in out and "vision: " in out and "mmproj.gguf" in out
    cli_main(["info", str(tiny["report"].mmproj)])
    out = capsys.readouterr().out
    assert "(pixtral)" in out and "v.blk.1.ffn_down.weight" in out


# -- numbers against Transformers -------------------------------------------------------------------

@pytest.mark.parametrize("sizes", [[(90, 60)], [(70, 150), (300, 200)]], ids=["one-image", "two-images"])
def test_logits_equal_transformers(tiny, sizes):
    """Non-square images and one larger than the limit (300x200 -> 112x84), the same normalised
    pixels fed to both sides; the images must also matter (other pixels, other logits)."""
    m, model = tiny["m"], tiny["model"]
    pics = [photo(w, h, seed=w + h) for w, h in sizes]
    images = [load_image(p, m.vision.spec) for p in pics]
    ids = prompt(m, pics, seed=len(sizes))
    ref = hf_image_logits(model, ids, images)
    ours = m.logits(ids, images=images)
    assert ours.shape == ref.shape
    assert rel_diff(ours, ref) < 1e-3
    others = [load_image(photo(w, h, seed=w * h), m.vision.spec) for w, h in sizes]
    assert rel_diff(m.logits(ids, images=others), ref) > 1e-2


def test_images_split_across_prefill_batches(tiny):
    """An image whose tokens straddle a 128-token prefill batch boundary."""
    m = tiny["m"]
    images = [load_image(photo(112, 112, 5), SPEC), load_image(photo(112, 56, 6), SPEC)]
    ids = [1] + [1500] * 115 + m.image_tokens(images[0]) + [1600] * 3 + m.image_tokens(images[1])
    assert ids.index(10) < 128 < len(ids) - ids[::-1].index(13) - 20
    assert rel_diff(m.logits(ids, images=images), hf_image_logits(tiny["model"], ids, images)) < 1e-3


# -- preprocessing and layout against mistral-common ------------------------------------------------

@pytest.mark.parametrize("size", [(90, 60), (300, 200), (28, 28), (27, 29), (500, 37), (13, 1000), (1, 1)])
def test_layout_and_pixels_match_mistral_common(tiny, size):
    pic = photo(*size, seed=size[0])
    ref = mistral_common(pic)
    ours = load_image(pic, tiny["m"].vision.spec)
    assert ours.shape == ref.image.shape
    assert tiny["m"].image_tokens(pic) == ref.tokens
    d = np.abs(ours - ref.image)
    assert d.max() < TOLERANCE["any"][0] and d.mean() < TOLERANCE["any"][1]


@pytest.mark.parametrize("size", [(200, 150), (1024, 768), (2000, 1500), (3000, 400)])
def test_small4_size_rule(size):
    """Small 4's limit (1540) and unit (28): shapes equal mistral-common's, pixels within tolerance."""
    pic = photo(*size, seed=1)
    ref = mistral_common(pic, 1540)
    ours = load_image(pic)
    assert ours.shape == ref.image.shape
    d = np.abs(ours - ref.image)
    assert d.max() < TOLERANCE["small4"][0] and d.mean() < TOLERANCE["small4"][1]


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "1", "CMYK"])
def test_modes_convert_as_mistral_common(mode):
    pic = photo(60, 40, 2)
    if mode in ("RGBA", "LA"):
        pic = pic.convert(mode)
        alpha = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60), dtype=np.uint8))
        pic.putalpha(alpha)
    else:
        pic = pic.convert(mode)
    np.testing.assert_array_equal(np.asarray(to_rgb(pic)), np.asarray(_convert_to_rgb(pic)))


def test_exif_orientation_applied(tmp_path):
    pic = photo(90, 60, 4)
    exif = Image.Exif()
    exif[0x0112] = 6                                       # "rotate 90 CW to view"
    path = tmp_path / "rotated.jpg"
    pic.save(path, exif=exif.tobytes())
    assert load_image(path, SPEC).shape == (3, 112, 84)    # portrait after rotation, landscape before
    assert load_image(pic, SPEC).shape == (3, 84, 112)


# -- bad input -------------------------------------------------------------------------------------

def bomb_png(path, w: int = 30000, h: int = 30000) -> None:
    """A tiny file whose header claims w x h pixels (a decompression bomb) without the pixels."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def truncated_jpeg(path) -> None:
    buf = io.BytesIO()
    photo(200, 150, 8).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


@pytest.mark.parametrize("kind,expect", [
    ("missing", "no such image file"), ("text", "not an image"), ("truncated", "truncated or corrupt"),
    ("empty", "empty file"), ("bomb", "image too large"), ("directory", "is a directory"),
])
def test_bad_image_files(tmp_path, kind, expect):
    path = tmp_path / f"{kind}.png"
    if kind == "text":
        path.write_text("hello, not an image\n")
    elif kind == "truncated":
        path = tmp_path / "cut.jpg"
        truncated_jpeg(path)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "bomb":
        bomb_png(path)
    elif kind == "directory":
        path.mkdir()
    with pytest.raises(InputError) as e:
        load_image(path)
    msg = str(e.value)
    assert expect in msg and "\n" not in msg and str(path) in msg


@pytest.mark.parametrize("bad", [
    Image.new("RGB", (0, 0)), np.zeros((3, 30, 28), np.float32), np.ones((28, 28, 3), np.float32),
    np.full((3, 28, 28), np.nan, np.float32), np.ones((3, 28, 28), np.uint8), np.ones((3, 1568, 28), np.float32),
    "/nonexistent/x.png", 3.5,
], ids=["zero-size", "not-multiple", "channels-last", "nan", "integers", "too-large", "missing", "not-an-image"])
def test_bad_image_values(bad):
    with pytest.raises(InputError) as e:
        load_image(bad)
    assert "\n" not in str(e.value)


def test_model_errors(tiny, tmp_path):
    m = tiny["m"]
    img = load_image(photo(56, 56, 9), SPEC)
    with pytest.raises(InputError, match=r"has 0 \[IMG\] tokens but its 1 image\(s\) need 4"):
        m.logits([1, 2000, 3000], images=[img])
    with pytest.raises(InputError, match="truncated or corrupt"):
        path = tmp_path / "cut.jpg"
        truncated_jpeg(path)
        m.logits(prompt(m, [img], 1), images=[path])
    text_only = tmp_path / "text-only.gguf"
    shutil.copy(tiny["report"].out, text_only)
    plain = localmoe.load(text_only)
    with pytest.raises(InputError, match="has no vision companion"):
        plain.logits([1, 10, 13], images=[img])
    with pytest.raises(InputError, match="has no vision companion"):
        plain.image_tokens(img)

