"""Pixtral vision encoder + Mistral 3 projector (the vision half of Small 4). GGUF arch `clip`, the
mmproj companion file (`clip.projector_type = "pixtral"`, llama.cpp's names).

encode() reads like Transformers' PixtralVisionModel + Mistral3MultiModalProjector: patches -> linear
(the conv, stride = kernel) -> RMSNorm -> per layer x += attention(norm(x)) with 2D RoPE,
x += SiLU-gated FFN(norm(x)) -> projector RMSNorm -> 2x2 patch merger -> linear -> GELU -> linear.
One image at a time, so attention never crosses images (Transformers' block-diagonal mask).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backends import DenseFFN, Weight, swiglu
from ..errors import ModelFileError
from ..gguf.format import KEY_PROJECTOR_NORM_EPS
from ..gguf.reader import GGUFFile
from .decoder import weight
from .rope import apply_rope

ARCH = "clip"
PROJECTOR = "pixtral"
QUERY_BLOCK = 256     # queries per attention call: scores stay [heads, 256, patches], not patches^2


@dataclass(frozen=True)
class Config:
    """Fields named as in Transformers' PixtralVisionConfig / Mistral3Config; read from `clip.*` keys."""
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    patch_size: int
    image_size: int                 # longest image side after resizing (mistral-common's max_image_size)
    spatial_merge_size: int
    rope_theta: float
    layer_norm_eps: float
    projector_norm_eps: float
    projection_dim: int             # the text model's hidden size
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def merge_unit(self) -> int:
        """Pixels per merged token side: image sides are multiples of this."""
        return self.patch_size * self.spatial_merge_size

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> "Config":
        if f.require("general.architecture") != ARCH or f.get("clip.projector_type") != PROJECTOR:
            raise ModelFileError(f"{f.path}: not a pixtral mmproj file (clip.projector_type "
                                 f"{f.get('clip.projector_type')!r})")
        v = lambda k, d=None: f.get(f"clip.vision.{k}", d) if d is not None else f.require(f"clip.vision.{k}")
        return cls(
            hidden_size=v("embedding_length"), intermediate_size=v("feed_forward_length"),
            num_hidden_layers=v("block_count"), num_attention_heads=v("attention.head_count"),
            patch_size=v("patch_size"), image_size=v("image_size"), spatial_merge_size=v("spatial_merge_size", 1),
            rope_theta=float(f.get("clip.rope.freq_base", 10000.0)),
            layer_norm_eps=float(v("attention.layer_norm_epsilon")),
            projector_norm_eps=float(f.get(KEY_PROJECTOR_NORM_EPS, 1e-5)),
            projection_dim=v("projection_dim"),
            image_mean=tuple(float(x) for x in v("image_mean")), image_std=tuple(float(x) for x in v("image_std")),
        )


@dataclass
class Layer:
    ln1: np.ndarray
    q: Weight              # rows in interleaved rope pairs (permuted by the converter)
    k: Weight
    v: Weight
    o: Weight
    ln2: np.ndarray
    ffn: DenseFFN


def rope_2d(cfg: Config, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [rows*cols, head_dim/2] of Pixtral's axial RoPE, patches in row-major order: the
    first half of each head's pairs turns with the patch's row (even frequencies), the second half
    with its column (odd frequencies), as Transformers' PixtralVisionRotaryEmbedding."""
    d = cfg.head_dim
    inv_freq = (1.0 / cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / d)).astype(np.float32)
    r, c = np.meshgrid(np.arange(rows, dtype=np.float32), np.arange(cols, dtype=np.float32), indexing="ij")
    angles = np.concatenate([r.reshape(-1, 1) * inv_freq[0::2], c.reshape(-1, 1) * inv_freq[1::2]], axis=1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def patches(image: np.ndarray, p: int) -> np.ndarray:
    """[3, H, W] -> [H/p * W/p, 3*p*p], row-major over the patch grid, each patch flattened in the conv
    weight's (channel, y, x) order: the stride-p convolution becomes one matrix product."""
    C, H, W = image.shape
    return np.ascontiguousarray(image.reshape(C, H // p, p, W // p, p).transpose(1, 3, 0, 2, 4)
                                .reshape((H // p) * (W // p), C * p * p), dtype=np.float32)


def merge_patches(x: np.ndarray, rows: int, cols: int, m: int, xp=np) -> np.ndarray:
    """[rows*cols, d] -> [(rows/m)*(cols/m), d*m*m]: each m x m block as one vector in torch's
    `unfold` order (channel-major, then y, then x), the order Mistral3PatchMerger's weight expects."""
    d = x.shape[-1]
    return xp.ascontiguousarray(x.reshape(rows // m, m, cols // m, m, d).transpose(0, 2, 4, 1, 3)
                                .reshape((rows // m) * (cols // m), d * m * m))


def gelu(x: np.ndarray, xp=np) -> np.ndarray:
    """Exact (erf) GELU, Transformers' "gelu". numpy has no erf: Abramowitz & Stegun 7.1.26 in
    float64 (|error| < 1.5e-7), far below float32 noise at these magnitudes. xp: numpy or cupy."""
    z = x.astype(np.float64) / np.sqrt(2.0)
    t = 1.0 / (1.0 + 0.3275911 * xp.abs(z))
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    erf = xp.sign(z) * (1.0 - poly * xp.exp(-z * z))
    return (0.5 * x * (1.0 + erf)).astype(np.float32)


class Model:
    """The encoder and projector; `encode(image)` -> one text-space vector per merged token."""

    def __init__(self, f: GGUFFile, cfg: Config, be):
        self.cfg, self.be = cfg, be
        pe = f.info("v.patch_embd.weight")
        self.patch_embd = Weight(f.raw(pe.name).reshape(pe.shape[0], -1), pe.type, int(np.prod(pe.shape[1:])), pe.name)
        self.pre_ln = f.array("v.pre_ln.weight")
        self.layers = [self._layer(f, i) for i in range(cfg.num_hidden_layers)]
        self.mm_norm = f.array("mm.input_norm.weight")
        self.merger = weight(f, "mm.patch_merger.weight")
        self.mm1, self.mm2 = weight(f, "mm.1.weight"), weight(f, "mm.2.weight")

    def _layer(self, f: GGUFFile, i: int) -> Layer:
        w = lambda n: weight(f, f"v.blk.{i}.{n}.weight")
        return Layer(ln1=f.array(f"v.blk.{i}.ln1.weight"), q=w("attn_q"), k=w("attn_k"), v=w("attn_v"),
                     o=w("attn_out"), ln2=f.array(f"v.blk.{i}.ln2.weight"),
                     ffn=DenseFFN(w("ffn_gate"), w("ffn_up"), w("ffn_down")))

    def encode(self, image: np.ndarray) -> np.ndarray:
        """image [3, H, W] (normalised; H, W multiples of merge_unit) -> [H*W/merge_unit^2, projection_dim]."""
        c, be = self.cfg, self.be
        rows, cols = image.shape[1] // c.patch_size, image.shape[2] // c.patch_size
        x = be.rmsnorm(be.linear(self.patch_embd, patches(image, c.patch_size)), self.pre_ln, c.layer_norm_eps)
        cos, sin = (be.xp.asarray(t) for t in rope_2d(c, rows, cols))
        for L in self.layers:
            x = x + self.attention(L, be.rmsnorm(x, L.ln1, c.layer_norm_eps), cos, sin)
            x = x + swiglu(be, L.ffn, be.rmsnorm(x, L.ln2, c.layer_norm_eps))
        return be.to_host(self.project(x, rows, cols))      # features on the host, like logits

    def attention(self, L: Layer, h: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """Bidirectional attention over one image's patches. The backend's attention is causal (query j
        sees keys 0..positions[j]); placing every query at position n - 1 (the last key) masks nothing."""
        c, be = self.cfg, self.be
        n, heads, hd = len(h), c.num_attention_heads, c.head_dim
        q = apply_rope(be.linear(L.q, h).reshape(n, heads, hd), cos, sin, be.xp)
        k = apply_rope(be.linear(L.k, h).reshape(n, heads, hd), cos, sin, be.xp)
        v = be.linear(L.v, h).reshape(n, heads, hd)
        last = be.xp.full(n, n - 1, np.int32)
        out = be.xp.concatenate([be.attention(q[s:s + QUERY_BLOCK], k, v, last[s:s + QUERY_BLOCK], hd ** -0.5)
                                 for s in range(0, n, QUERY_BLOCK)])
        return be.linear(L.o, out.reshape(n, heads * hd))

    def project(self, x: np.ndarray, rows: int, cols: int) -> np.ndarray:
        c, be = self.cfg, self.be
        x = be.rmsnorm(x, self.mm_norm, c.projector_norm_eps)
        x = be.linear(self.merger, merge_patches(x, rows, cols, c.spatial_merge_size, be.xp))
        return be.linear(self.mm2, gelu(be.linear(self.mm1, x), be.xp))
