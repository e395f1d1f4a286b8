"""The CUDA backend: the kernel interface of CPUBackend on numba.cuda kernels (kernels.py).

Weights are uploaded once, on first use, as the GGUF's own bytes (a `Weight` -> device array cache
keyed by the stored array's address, shape, strides and type) and never dequantised. Activations
stay on the GPU as cupy arrays (`xp` = cupy; the model glue in localmoe/models uses `be.xp`): methods
accept host or device arrays and return device arrays; only `to_host` (the router's logits, the final
logits) copies back. The numba kernels take the cupy arrays through __cuda_array_interface__; both
libraries work on the legacy default stream of the primary context, so launches stay ordered. Capturing
the decode step in a CUDA graph is the next step (docs/PERFORMANCE.md).

Importing this package needs neither numba-cuda nor a GPU; `available()` says whether one is usable.
"""
from __future__ import annotations

import numpy as np

from .. import Weight


def available() -> tuple[bool, str]:
    """(True, device name) when numba.cuda imports and sees a GPU, else (False, why not)."""
    try:
        from ._numba import cuda
    except Exception as e:  # numba-cuda missing or broken
        return False, f"numba.cuda does not import: {e}"
    try:
        if not cuda.is_available():
            return False, "no CUDA GPU"
        name = getattr(cuda.get_current_device(), "name", b"CUDA simulator")
        return True, name.decode() if isinstance(name, bytes) else str(name)
    except Exception as e:
        return False, f"no CUDA GPU: {e}"


def _key(a: np.ndarray, t: int = -1):
    return (a.__array_interface__["data"][0], a.shape, a.strides, a.dtype.str, t)


class CUDABackend:
    name = "cuda"

    def __init__(self):
        ok, why = available()
        if not ok:
            raise RuntimeError(why)
        from . import kernels as K
        from ._numba import cuda
        import cupy as cp
        self.K, self.cuda, self.xp = K, cuda, cp
        self.rope_tables: dict = {}      # rope tables cached per backend (models/rope.py)
        self.device_name = why
        self.sms = getattr(cuda.get_current_device(), "MULTIPROCESSOR_COUNT", 1)
        self._weights: dict = {}          # key -> (host array kept alive, device array, fast)
        self._vectors: dict = {}          # norm weights and other float vectors
        self._ints: dict = {}             # cached index arrays
        self.bytes_uploaded = 0           # weight bytes host -> device so far
        self.launches = 0                 # kernel launches so far (for launches per token)

    # -- weights ----------------------------------------------------------------------------------
    def upload(self, w: Weight):
        """The device copy of a weight's stored blocks: (device array, fast); uploaded on first use."""
        k = _key(w.raw, int(w.type))
        hit = self._weights.get(k)
        if hit is None:
            raw = np.ascontiguousarray(w.raw).reshape(-1)
            if raw.dtype != np.uint8:
                raw = raw.view(np.uint8)
            fast = self.K.fast_ok(int(w.type), w.cols)
            dev = self.cuda.to_device(raw.view(np.uint32) if fast else raw)
            self.bytes_uploaded += raw.nbytes
            hit = self._weights[k] = (w.raw, dev, fast)
        return hit[1], hit[2]

    def _vector(self, v: np.ndarray):
        k = _key(v)
        hit = self._vectors.get(k)
        if hit is None:
            hit = self._vectors[k] = (v, self.xp.asarray(np.ascontiguousarray(v, dtype=np.float32)))
        return hit[1]

    def _arange(self, n: int):
        k = ("arange", n)
        if k not in self._ints:
            self._ints[k] = self.xp.arange(n, dtype=np.int32)
        return self._ints[k]

    def _zeros(self, n: int):
        k = ("zeros", n)
        if k not in self._ints:
            self._ints[k] = self.xp.zeros(n, dtype=np.int32)
        return self._ints[k]

    # -- the batched gemv -------------------------------------------------------------------------
    def gemv(self, w: Weight, mats, xidx, x_dev, P: int, w2: Weight | None = None, out=None):
        """Device y [P, rows]: y[p] = W[mats[p]] @ x[xidx[p]] (or silu(gate) * up with w2)."""
        qt, cols, rows = int(w.type), w.cols, w.rows
        dev, fast = self.upload(w)
        dev2 = self.upload(w2)[0] if w2 is not None else dev
        y = out if out is not None else self.xp.empty((P, rows), np.float32)
        row_bytes = w.raw.shape[-1]
        self.K.launch_gemv(qt, cols, rows, dev, dev2, mats, xidx, x_dev, y, P, row_bytes, row_bytes * rows, self.sms,
                           fused=w2 is not None)
        self.launches += 1
        return y

    # -- activations ------------------------------------------------------------------------------
    def to_host(self, a) -> np.ndarray:
        """A host numpy copy of a device (or host) array: the one way activations leave the GPU."""
        return self.xp.asnumpy(a) if isinstance(a, self.xp.ndarray) else np.asarray(a)

    def _dev(self, x, shape=None):
        """x as a C-contiguous float32 device array (uploaded if on the host), optionally reshaped."""
        x = self.xp.asarray(x, dtype=np.float32)
        if shape is not None:
            x = x.reshape(shape)
        return self.xp.ascontiguousarray(x)

    # -- the kernel interface ---------------------------------------------------------------------
    def linear(self, w: Weight, x):
        """y [n, rows] = x [n, cols] @ W.T, on the stored blocks."""
        squeeze = x.ndim == 1
        x2 = self._dev(x, (-1, w.cols))
        n = len(x2)
        y = self.gemv(w, self._zeros(n), self._arange(n), x2, n)
        return y[0] if squeeze else y

    def linear_heads(self, w: Weight, x):
        """Per-head matrices w [heads, rows, cols] applied to x [n, heads, cols] -> [n, heads, rows]."""
        n, heads, cols = x.shape
        P = n * heads
        k = ("heads", n, heads)
        if k not in self._ints:
            self._ints[k] = self.xp.asarray(np.tile(np.arange(heads, dtype=np.int32), n))
        y = self.gemv(w, self._ints[k], self._arange(P), self._dev(x, (P, cols)), P)
        return y.reshape(n, heads, w.rows)

    def embed(self, w: Weight, ids: np.ndarray):
        """Rows of the embedding table for token ids, dequantised on the host from the mapped file
        (only those rows are read), then uploaded (one row per decoded token)."""
        from ..cpu import CPUBackend
        return self.xp.asarray(CPUBackend.embed(None, w, ids))

    def rmsnorm(self, x, weight: np.ndarray, eps: float):
        x2 = self._dev(x, (-1, x.shape[-1]))
        out = self.xp.empty_like(x2)
        self.K.rmsnorm_kernel[len(x2), self.K.THREADS](x2, self._vector(weight), out, np.float32(eps))
        self.launches += 1
        return out.reshape(x.shape)

    def expert_ffn(self, gate: Weight, up: Weight, down: Weight, x, ids: np.ndarray, weights: np.ndarray):
        """sum_k weights[:, k] * down_e(silu(gate_e x) * up_e x) over each token's selected experts e.
        ids and weights (the router's choice) are small host arrays: one upload each."""
        xp = self.xp
        squeeze = x.ndim == 1
        x2 = self._dev(x, (-1, gate.cols))
        n = len(x2)
        ids2 = np.asarray(ids).reshape(n, -1)
        k = ids2.shape[1]
        P = n * k
        if ids2.min() < 0 or ids2.max() >= gate.n_experts:
            raise ValueError("expert id out of range")
        mats = xp.asarray(ids2.astype(np.int32).reshape(P))
        kt = ("tok", n, k)
        if kt not in self._ints:
            self._ints[kt] = xp.asarray(np.repeat(np.arange(n, dtype=np.int32), k))
        tok = self._ints[kt]
        if int(gate.type) == int(up.type):
            h = self.gemv(gate, mats, tok, x2, P, w2=up)                 # silu(gate x) * up x, fused
        else:
            g = self.gemv(gate, mats, tok, x2, P)
            u = self.gemv(up, mats, tok, x2, P)
            h = xp.ascontiguousarray(g / (1.0 + xp.exp(-g)) * u, dtype=np.float32)
        yp = self.gemv(down, mats, self._arange(P), h, P)
        wd = self._dev(np.asarray(weights, dtype=np.float32), (n, k))
        y = xp.empty((n, down.rows), np.float32)
        gx = max(1, min(64, (down.rows + self.K.THREADS - 1) // self.K.THREADS))
        self.K.combine_kernel[(gx, n), self.K.THREADS](yp, wd, y)
        self.launches += 1
        return y[0] if squeeze else y

    def attention(self, q, k, v, pos0: int, scale: float):
        """Causal attention of queries q [n, Hq, dk] at positions pos0.. over keys k [T, Hkv, dk] and
        values v [T, Hkv, dv] at positions 0..T-1 (Hq a multiple of Hkv) -> [n, Hq, dv]."""
        n, hq, dk = q.shape
        T, hkv, dv = v.shape
        xp = self.xp
        out = xp.empty((n, hq, dv), np.float32)
        s = xp.empty((n, hq, max(T, 1)), np.float32)
        self.K.attention_kernel[(n, hq), self.K.THREADS](self._dev(q), self._dev(k), self._dev(v), out, s, int(pos0),
                                                         np.float32(scale), T, hq // hkv)
        self.launches += 1
        return out
