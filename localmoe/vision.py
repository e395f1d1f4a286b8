"""Images in: reading and preprocessing (pillow), the token layout, and the vision companion file.

Preprocessing follows mistral-common's `ImageEncoder` (the reference for Small 4's prompts):
transparent or non-RGB images are composited over white, the image is scaled down to fit the
model's longest side, then each side is rounded UP to a multiple of patch x merge (28 px), resized
with bicubic interpolation and normalised with the CLIP mean/std. mistral-common resizes with
OpenCV; pillow's bicubic differs slightly (pixel tolerance in docs/ARCHITECTURE.md), the output shape
never. Unlike mistral-common, an EXIF orientation tag is applied first (photos come out upright).

Token layout (per merged row: w x [IMG] then [IMG_BREAK]; the last one [IMG_END]) is derived from
the array's shape, so arrays passed in already normalised get the same layout as files.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError

# Decoded images above this many pixels are refused before decoding (pillow's own bomb threshold).
MAX_PIXELS = 89_478_485
COMPANION_SUFFIX = ".mmproj.gguf"


@dataclass(frozen=True)
class ImageSpec:
    """What preprocessing needs to know about a model; the defaults are Mistral Small 4's."""
    patch_size: int = 14
    spatial_merge_size: int = 2
    max_size: int = 1540
    mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)

    @property
    def unit(self) -> int:
        return self.patch_size * self.spatial_merge_size

    @classmethod
    def of(cls, cfg) -> "ImageSpec":
        """From a `models.pixtral.Config`."""
        return cls(cfg.patch_size, cfg.spatial_merge_size, cfg.image_size, cfg.image_mean, cfg.image_std)


def companion_path(text_path: str | os.PathLike) -> Path:
    """The mmproj file that belongs to a text GGUF: `model.gguf` -> `model.mmproj.gguf`."""
    p = Path(text_path)
    return p.with_name((p.name[:-5] if p.name.endswith(".gguf") else p.name) + COMPANION_SUFFIX)


# -- reading -------------------------------------------------------------------------------------

def open_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image file fully, turning every way it can be bad into one InputError line."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such image file")
    if p.is_dir():
        raise InputError(f"{p}: is a directory, not an image")
    if p.stat().st_size == 0:
        raise InputError(f"{p}: empty file, not an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(p)
            check_pixels(img.size, p)
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"{p}: image too large (more than {MAX_PIXELS} pixels)") from None
    except UnidentifiedImageError:
        raise InputError(f"{p}: not an image (or a format pillow cannot read)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{p}: truncated or corrupt image ({' '.join(str(e).split())})") from None
    return img


def check_pixels(size: tuple[int, int], name) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise InputError(f"{name}: zero-size image ({w}x{h})")
    if w * h > MAX_PIXELS:
        raise InputError(f"{name}: image too large ({w}x{h} = {w * h} pixels; limit {MAX_PIXELS})")


def to_rgb(img: Image.Image) -> Image.Image:
    """Upright RGB: EXIF orientation applied, then mistral-common's conversion (anything not RGB
    goes through RGBA and is pasted over white, so transparency becomes white)."""
    img = ImageOps.exif_transpose(img)
    if img.mode == "RGB":
        return img
    if img.mode != "RGBA":
        img = img.convert("RGBA")
    white = Image.new("RGBA", img.size, "WHITE")
    white.paste(img, (0, 0), img)
    return white.convert("RGB")


# -- preprocessing ---------------------------------------------------------------------------------

def target_size(width: int, height: int, spec: ImageSpec) -> tuple[int, int]:
    """mistral-common's size rule (`ImageEncoder._image_to_num_tokens`): scale down to fit
    spec.max_size (Python's round, at least 1 px), then each side up to a multiple of spec.unit."""
    ratio = max(width / spec.max_size, height / spec.max_size)
    if ratio > 1:
        width, height = max(round(width / ratio), 1), max(round(height / ratio), 1)
    u = spec.unit
    return ((width - 1) // u + 1) * u, ((height - 1) // u + 1) * u


def resize(rgb: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Bicubic resize of each channel in float (pillow mode "F"), as OpenCV resizes a float32 array:
    no rounding to 8 bits between resizing and normalising. Returns [3, H, W] in 0..255."""
    return np.stack([np.asarray(ch.convert("F").resize(size, Image.Resampling.BICUBIC), np.float32)
                     for ch in rgb.split()])


def normalise(pixels: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """[3, H, W] in 0..255 -> (x/255 - mean) / std per channel, float32."""
    mean = np.asarray(spec.mean, np.float32)[:, None, None]
    std = np.asarray(spec.std, np.float32)[:, None, None]
    return ((pixels / np.float32(255.0) - mean) / std).astype(np.float32)


def preprocess(img: Image.Image, spec: ImageSpec = ImageSpec()) -> np.ndarray:
    check_pixels(img.size, "image")
    rgb = to_rgb(img)
    return normalise(resize(rgb, target_size(*rgb.size, spec)), spec)


def check_array(a: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """An already-normalised image: float [3, H, W], finite, sides multiples of spec.unit."""
    a = np.asarray(a)
    if a.ndim != 3 or a.shape[0] != 3 or not np.issubdtype(a.dtype, np.floating):
        raise InputError(f"an image array must be float [3, H, W]; got {a.dtype} {list(a.shape)}")
    h, w = a.shape[1:]
    if h == 0 or w == 0 or h % spec.unit or w % spec.unit:
        raise InputError(f"image array of {h}x{w} pixels: both sides must be non-zero multiples of {spec.unit}")
    if max(h, w) > spec.max_size + spec.unit - 1:
        raise InputError(f"image array of {h}x{w} pixels is larger than the model's limit ({spec.max_size})")
    if not np.isfinite(a).all():
        raise InputError("image array contains NaN or infinite values")
    return np.ascontiguousarray(a, dtype=np.float32)


def load_image(src, spec: ImageSpec = ImageSpec()) -> np.ndarray:
    """A path, a PIL image, or an already-normalised float array [3, H, W] (used as it is) ->
    the model's input, float32 [3, H, W]. Bad input raises InputError with a one-line message."""
    if isinstance(src, np.ndarray):
        return check_array(src, spec)
    if isinstance(src, Image.Image):
        return preprocess(src, spec)
    if isinstance(src, (str, os.PathLike)):
        return preprocess(open_image(src), spec)
    raise InputError(f"an image must be a path, a PIL image or a float32 array; got {type(src).__name__}")


# -- tokens ----------------------------------------------------------------------------------------

def grid(image: np.ndarray, unit: int = 28) -> tuple[int, int]:
    """(rows, columns) of merged tokens of a preprocessed image [3, H, W]."""
    return image.shape[1] // unit, image.shape[2] // unit


def layout(rows: int, cols: int, img: int, img_break: int, img_end: int) -> list[int]:
    """Per row `cols` x [IMG] then [IMG_BREAK]; the very last token [IMG_END] (mistral-common's)."""
    ids = ([img] * cols + [img_break]) * rows
    ids[-1] = img_end
    return ids


def image_token_ids(tokenizer, image_array: np.ndarray, unit: int = 28) -> list[int]:
    """The prompt tokens that stand for one preprocessed image (`unit` = patch x merge pixels)."""
    rows, cols = grid(image_array, unit)
    s = tokenizer.special_id
    return layout(rows, cols, s("[IMG]"), s("[IMG_BREAK]"), s("[IMG_END]"))


# -- the companion file ----------------------------------------------------------------------------

class Vision:
    """A loaded vision companion: its spec, its encoder, and `embeddings(images)` for a prompt."""

    def __init__(self, path: Path, backend):
        from .gguf.reader import GGUFFile
        from .models import pixtral

        self.path = path
        self.file = GGUFFile(path)
        self.config = pixtral.Config.from_gguf(self.file)
        self.spec = ImageSpec.of(self.config)
        self.encoder = pixtral.Model(self.file, self.config, backend)

    def embeddings(self, images) -> np.ndarray:
        """All images' projector outputs, concatenated in order: [sum of tokens, projection_dim]."""
        return np.concatenate([self.encoder.encode(load_image(im, self.spec)) for im in images])

    def token_ids(self, tokenizer, image) -> list[int]:
        return image_token_ids(tokenizer, load_image(image, self.spec), self.spec.unit)


def describe(f) -> list[str]:
    """A few lines about an mmproj file (for `localmoe info`)."""
    from collections import Counter

    from .models import pixtral

    c = pixtral.Config.from_gguf(f)
    types = Counter(t.type.name for t in f.tensors.values())
    n = sum(int(np.prod(t.shape)) for t in f.tensors.values())
    return [f"vision: {f.path}  {f.size / 2**20:.1f} MiB, {len(f.tensors)} tensors, {n / 1e6:.1f} M parameters "
            f"({f.get('clip.projector_type')})",
            "vision config: " + ", ".join(f"{k}={v}" for k, v in vars(c).items() if k not in ("image_mean", "image_std")),
            "vision types: " + ", ".join(f"{k} x{v}" for k, v in sorted(types.items()))]
