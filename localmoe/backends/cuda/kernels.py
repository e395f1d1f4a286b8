"""CUDA kernels (numba.cuda) that compute directly on GGUF blocks, as stored.

Matrix-vector products ("gemv") are written once for a batch of P independent products: product p
multiplies matrix `mats[p]` of a (possibly 3-D: experts / heads) weight by activation row `xidx[p]`
and writes y[p]. `linear` (P = tokens, one matrix), `linear_heads` (P = tokens x heads) and the
routed experts (P = token x slot pairs, matrix = expert id) are all this one kernel.

Two kernel families:
  * fast Q4_0 / Q8_0 (cols % 64 == 0): the weight is read as uint32 words. A pair of blocks is
    9 words (Q4_0: 2 x 18 bytes) or 17 words (Q8_0: 2 x 34 bytes), so every pair starts 4-byte
    aligned. Each warp owns one row at a time; it loads a chunk of the row into shared memory with
    fully coalesced 4-byte loads (all of the chunk's loads issued before the first use), then each
    lane decodes its own pair(s) from shared memory (word stride 9 or 17: odd, so conflict-free)
    against the activation, which sits in shared memory padded by one float every 64 (also
    conflict-free). Persistent grid: blocks loop over rows.
  * generic (any supported type, any cols): one warp per row, byte loads. Used for F32/F16/BF16 and
    for odd shapes of tiny test models.
Everything accumulates in float32 (no activation quantization, unlike the CPU kernels).
"""
from __future__ import annotations

import math

import numpy as np
from numba import float32, int32, int64, uint32
from numba.cuda import libdevice

from ._numba import cuda

F32, F16, Q4_0, Q8_0, BF16 = 0, 1, 2, 8, 30
SUPPORTED = (F32, F16, BF16, Q8_0, Q4_0)
BLOCK_BYTES = {Q8_0: 34, Q4_0: 18}
ESIZE = {F32: 4, F16: 2, BF16: 2}

WARPS = 8
THREADS = 32 * WARPS
BLOCKS_PER_SM = 2          # gemv grid: this many blocks per SM, split over the P products (bench_cuda sweeps it)
_TWO112 = float32(5.192296858534828e+33)   # 2**112: rebias an fp16 exponent into fp32


@cuda.jit(device=True, inline=True)
def h2f(h):
    """float32 of the fp16 bit pattern in the low 16 bits of h (normals and subnormals)."""
    v = libdevice.int_as_float(int32((h & 0x7fff) << 13)) * _TWO112
    if h & 0x8000:
        v = -v
    return v


@cuda.jit(device=True, inline=True)
def bf2f(h):
    v = libdevice.int_as_float(int32((h & 0x7fff) << 16))
    if h & 0x8000:
        v = -v
    return v


@cuda.jit(device=True, inline=True)
def warp_sum(v):
    v += cuda.shfl_down_sync(0xffffffff, v, 16)
    v += cuda.shfl_down_sync(0xffffffff, v, 8)
    v += cuda.shfl_down_sync(0xffffffff, v, 4)
    v += cuda.shfl_down_sync(0xffffffff, v, 2)
    v += cuda.shfl_down_sync(0xffffffff, v, 1)
    return v


@cuda.jit(device=True, inline=True)
def silu(g):
    return g / (float32(1.0) + math.exp(-g))


# -- fast Q4_0 / Q8_0 ---------------------------------------------------------------------------------

@cuda.jit(device=True, inline=True)
def _q4_word(w, xs, xi):
    """4 Q4_0 quant bytes (elements j..j+3 low nibbles, j+16..j+19 high) against xs[xi:], xs[xi+16:]."""
    s = float32(0.0)
    for k in range(4):
        b = (w >> (8 * k)) & 0xff
        s += float32(int32(b & 15) - 8) * xs[xi + k] + float32(int32(b >> 4) - 8) * xs[xi + k + 16]
    return s


@cuda.jit(device=True, inline=True)
def _q4_half(w, xs, xi):
    s = float32(0.0)
    for k in range(2):
        b = (w >> (8 * k)) & 0xff
        s += float32(int32(b & 15) - 8) * xs[xi + k] + float32(int32(b >> 4) - 8) * xs[xi + k + 16]
    return s


@cuda.jit(device=True, inline=True)
def _q4_pair(st, o, xs, xi):
    """Two Q4_0 blocks (9 words at st[o:]) against 64 activations at xs[xi:]."""
    w0 = st[o]
    w4 = st[o + 4]
    a = (_q4_half(w0 >> 16, xs, xi) + _q4_word(st[o + 1], xs, xi + 2) + _q4_word(st[o + 2], xs, xi + 6)
         + _q4_word(st[o + 3], xs, xi + 10) + _q4_half(w4 & 0xffff, xs, xi + 14))
    b = (_q4_word(st[o + 5], xs, xi + 32) + _q4_word(st[o + 6], xs, xi + 36) + _q4_word(st[o + 7], xs, xi + 40)
         + _q4_word(st[o + 8], xs, xi + 44))
    return h2f(w0 & 0xffff) * a + h2f(w4 >> 16) * b


@cuda.jit(device=True, inline=True)
def _i8(b):
    return float32(int32(b) - ((int32(b) & 0x80) << 1))


@cuda.jit(device=True, inline=True)
def _q8_word(w, xs, xi):
    s = float32(0.0)
    for k in range(4):
        s += _i8((w >> (8 * k)) & 0xff) * xs[xi + k]
    return s


@cuda.jit(device=True, inline=True)
def _q8_half(w, xs, xi):
    return _i8(w & 0xff) * xs[xi] + _i8((w >> 8) & 0xff) * xs[xi + 1]


@cuda.jit(device=True, inline=True)
def _q8_pair(st, o, xs, xi):
    """Two Q8_0 blocks (17 words at st[o:]) against 64 activations at xs[xi:]."""
    w0 = st[o]
    w8 = st[o + 8]
    a = _q8_half(w0 >> 16, xs, xi) + _q8_half(w8 & 0xffff, xs, xi + 30)
    for j in range(7):
        a += _q8_word(st[o + 1 + j], xs, xi + 2 + 4 * j)
    b = float32(0.0)
    for j in range(8):
        b += _q8_word(st[o + 9 + j], xs, xi + 32 + 4 * j)
    return h2f(w0 & 0xffff) * a + h2f(w8 >> 16) * b


def _make_fast(qt: int, fused: bool):
    PW = 9 if qt == Q4_0 else 17           # words per pair of blocks
    PPL = 2 if qt == Q4_0 else 1           # pairs per lane per chunk
    CH = 32 * PPL * PW                     # words per chunk (a multiple of 32)
    LOADS = CH // 32
    STAGE = WARPS * CH
    pair = _q4_pair if qt == Q4_0 else _q8_pair

    @cuda.jit(device=True, inline=True)
    def rowdot(W, rbase, row_words, stage, sb, xs, lane):
        acc = float32(0.0)
        for c0 in range(0, row_words, CH):
            n = min(CH, row_words - c0)
            for j in range(LOADS):
                w = lane + 32 * j
                if w < n:
                    stage[sb + w] = W[rbase + c0 + w]
            cuda.syncwarp()
            np_ = n // PW
            pb = c0 // PW
            for q in range(PPL):
                lp = lane + 32 * q
                if lp < np_:
                    acc += pair(stage, sb + lp * PW, xs, 65 * (pb + lp))
            cuda.syncwarp()
        return warp_sum(acc)

    @cuda.jit
    def kern(W, W2, mats, xidx, x, y, rows, cols, mat_words):
        xs = cuda.shared.array(0, float32)
        stage = cuda.shared.array(STAGE, uint32)
        p = cuda.blockIdx.y
        tid = cuda.threadIdx.x
        lane = tid & 31
        warp = tid >> 5
        xr = xidx[p]
        for i in range(tid, cols, THREADS):
            xs[i + (i >> 6)] = x[xr, i]
        cuda.syncthreads()
        row_words = (cols // 64) * PW
        mbase = int64(mats[p]) * mat_words
        sb = warp * CH
        for r in range(cuda.blockIdx.x * WARPS + warp, rows, cuda.gridDim.x * WARPS):
            rb = mbase + int64(r) * row_words
            g = rowdot(W, rb, row_words, stage, sb, xs, lane)
            if fused:
                u = rowdot(W2, rb, row_words, stage, sb, xs, lane)
                if lane == 0:
                    y[p, r] = silu(g) * u
            elif lane == 0:
                y[p, r] = g

    return kern


# -- generic: any type, any shape ---------------------------------------------------------------------

def _make_generic(qt: int, fused: bool):
    if qt in (Q4_0, Q8_0):
        BS = BLOCK_BYTES[qt]

        @cuda.jit(device=True, inline=True)
        def rowdot(W, base, x, xr, cols, lane):
            acc = float32(0.0)
            for b in range(lane, cols // 32, 32):
                o = base + b * BS
                d = h2f(uint32(W[o]) | (uint32(W[o + 1]) << 8))
                s = float32(0.0)
                if qt == Q4_0:
                    for j in range(16):
                        q = int32(W[o + 2 + j])
                        s += float32((q & 15) - 8) * x[xr, 32 * b + j] + float32((q >> 4) - 8) * x[xr, 32 * b + j + 16]
                else:
                    for j in range(32):
                        s += _i8(W[o + 2 + j]) * x[xr, 32 * b + j]
                acc += d * s
            return warp_sum(acc)
    else:
        ES = ESIZE[qt]

        @cuda.jit(device=True, inline=True)
        def rowdot(W, base, x, xr, cols, lane):
            acc = float32(0.0)
            for i in range(lane, cols, 32):
                o = base + i * ES
                h = uint32(W[o]) | (uint32(W[o + 1]) << 8)
                if qt == F32:
                    h = h | (uint32(W[o + 2]) << 16) | (uint32(W[o + 3]) << 24)
                    v = libdevice.int_as_float(int32(h & 0x7fffffff))
                    if h & 0x80000000:
                        v = -v
                elif qt == F16:
                    v = h2f(h)
                else:
                    v = bf2f(h)
                acc += v * x[xr, i]
            return warp_sum(acc)

    @cuda.jit
    def kern(W, W2, mats, xidx, x, y, rows, cols, row_bytes, mat_bytes):
        p = cuda.blockIdx.y
        tid = cuda.threadIdx.x
        lane = tid & 31
        warp = tid >> 5
        xr = xidx[p]
        mbase = int64(mats[p]) * mat_bytes
        for r in range(cuda.blockIdx.x * WARPS + warp, rows, cuda.gridDim.x * WARPS):
            rb = mbase + int64(r) * row_bytes
            g = rowdot(W, rb, x, xr, cols, lane)
            if fused:
                u = rowdot(W2, rb, x, xr, cols, lane)
                if lane == 0:
                    y[p, r] = silu(g) * u
            elif lane == 0:
                y[p, r] = g

    return kern


_CACHE: dict = {}


def fast_ok(qt: int, cols: int) -> bool:
    return qt in (Q4_0, Q8_0) and cols % 64 == 0


def gemv_kernel(qt: int, cols: int, fused: bool):
    fast = fast_ok(qt, cols)
    key = (qt, fast, fused)
    if key not in _CACHE:
        _CACHE[key] = (_make_fast if fast else _make_generic)(qt, fused)
    return fast, _CACHE[key]


def launch_gemv(qt, cols, rows, W, W2, mats, xidx, x, y, P, row_bytes, mat_bytes, sms, fused=False):
    """Launch the batched gemv (see the module doc) on device arrays; W, W2 uint32 words for the fast
    kernels (`fast_ok`), else uint8 bytes. Grid: BLOCKS_PER_SM blocks per SM, rows split over warps."""
    fast, kern = gemv_kernel(qt, cols, fused)
    gx = max(1, min((rows + WARPS - 1) // WARPS, max(1, BLOCKS_PER_SM * sms // P)))
    if fast:
        kern[(gx, P), THREADS, 0, 4 * (cols + cols // 64 + 1)](W, W2, mats, xidx, x, y, rows, cols, mat_bytes // 4)
    else:
        kern[(gx, P), THREADS](W, W2, mats, xidx, x, y, rows, cols, row_bytes, mat_bytes)


# -- the rest -----------------------------------------------------------------------------------------

@cuda.jit(device=True, inline=True)
def _block_reduce(red, v, tid, is_max):
    red[tid] = v
    cuda.syncthreads()
    s = THREADS // 2
    while s > 0:
        if tid < s:
            if is_max:
                red[tid] = max(red[tid], red[tid + s])
            else:
                red[tid] += red[tid + s]
        cuda.syncthreads()
        s //= 2
    r = red[0]
    cuda.syncthreads()
    return r


@cuda.jit
def rmsnorm_kernel(x, w, out, eps):
    """One block per row: out = x * rsqrt(mean(x^2) + eps) * w."""
    red = cuda.shared.array(THREADS, float32)
    t = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    h = x.shape[1]
    ss = float32(0.0)
    for i in range(tid, h, THREADS):
        ss += x[t, i] * x[t, i]
    ss = _block_reduce(red, ss, tid, False)
    inv = float32(1.0) / math.sqrt(ss / float32(h) + eps)
    for i in range(tid, h, THREADS):
        out[t, i] = x[t, i] * inv * w[i]


@cuda.jit
def attention_kernel(q, k, v, out, s, pos0, scale, T, group):
    """Block (i, h): causal softmax attention of query i (position pos0 + i), head h, over keys
    0..min(T, pos0+i+1)-1 of kv head h // group. Scores go to the scratch s[i, h, :]."""
    red = cuda.shared.array(THREADS, float32)
    i = cuda.blockIdx.x
    h = cuda.blockIdx.y
    kh = h // group
    tid = cuda.threadIdx.x
    end = min(T, pos0 + i + 1)
    dk = q.shape[2]
    dv = v.shape[2]
    m = float32(-3.0e38)
    for t in range(tid, end, THREADS):
        a = float32(0.0)
        for d in range(dk):
            a += q[i, h, d] * k[t, kh, d]
        a *= scale
        s[i, h, t] = a
        m = max(m, a)
    m = _block_reduce(red, m, tid, True)
    l = float32(0.0)
    for t in range(tid, end, THREADS):
        e = math.exp(s[i, h, t] - m)
        s[i, h, t] = e
        l += e
    l = _block_reduce(red, l, tid, False)   # its barriers also publish s to the whole block
    inv = float32(1.0) / l
    for d in range(tid, dv, THREADS):
        a = float32(0.0)
        for t in range(end):
            a += s[i, h, t] * v[t, kh, d]
        out[i, h, d] = a * inv


@cuda.jit
def combine_kernel(yp, wts, y):
    """y[t, c] = sum_j wts[t, j] * yp[t * k + j, c]."""
    t = cuda.blockIdx.y
    k = wts.shape[1]
    for c in range(cuda.blockIdx.x * THREADS + cuda.threadIdx.x, y.shape[1], cuda.gridDim.x * THREADS):
        a = float32(0.0)
        for j in range(k):
            a += wts[t, j] * yp[t * k + j, c]
        y[t, c] = a


@cuda.jit
def copy_kernel(src, dst):
    """Plain device-to-device copy of uint32 words (the bandwidth yardstick)."""
    for i in range(cuda.grid(1), src.shape[0], cuda.gridsize(1)):
        dst[i] = src[i]
