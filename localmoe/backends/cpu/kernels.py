"""CPU kernels that compute directly on GGUF blocks (Numba, nopython, cached).

Weights stay in the GGUF's own layout (usually a view into the memory-mapped file) and are never
dequantised whole. Supported weight types: F32, F16, BF16, Q8_0, Q4_0.

How the quantized matvec works (like llama.cpp): the activation is quantized once per call to
blocks of 32 integers with one float32 scale per block. llama.cpp uses int8 there; here the
integers are int16 (range +-32767), which costs nothing extra because the products are taken in
16-bit lanes anyway (`vpmaddwd`; |w| <= 128 keeps every block sum far inside int32), and leaves
the result within ~1e-5 of the float computation. Each weight row is then a run of integer block dot products. The inner loop over a
row's blocks is written directly in LLVM vector IR (`_q8_0_dot`, `_q4_0_dot`) — a <8 x float>
accumulator, per block one 32-wide int multiply, pairwise int32 sums, a convert and an fma — because
Numba's own integer typing widens every int8 product to int64 and nothing vectorises. The IR is
portable (no x86 intrinsics); LLVM picks the instructions for the host CPU.

Public functions (all pure: inputs -> new output array):
    matmul(raw, qtype, x) -> y                       y[n, rows] = x[n, cols] @ W.T
    expert_ffn(x, ids, weights, gate, gate_type, down, down_type, up=None, up_type=None) -> y
    dequantize_rows(raw, qtype, ids) -> rows       rows ids of W as float32 (the token embedding)
    silu(x), rmsnorm(x, w, eps), quantize_activation(x)
    compile_all() -> seconds spent compiling / loading the cache
"""
from __future__ import annotations

import time

import numpy as np
import numba
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

# ggml type codes (gguf.GGMLQuantizationType values), as plain ints for nopython code.
F32 = 0
F16 = 1
Q4_0 = 2
Q8_0 = 8
BF16 = 30
SUPPORTED = (F32, F16, BF16, Q8_0, Q4_0)
QUANTIZED = (Q8_0, Q4_0)
_BLOCK_BYTES = {Q8_0: 34, Q4_0: 18}
_QK = 32

# Decode matvecs over at most this many weight bytes run on the calling thread only.
SERIAL_BYTES = 1 << 17

# Rows handled per parallel task when several tokens share the weights (prefill): each task's rows
# stay in L1/L2 while every token of the batch is run against them.
_ROW_TILE = 16

# ----------------------------------------------------------------------------------------------
# LLVM-IR intrinsics
# ----------------------------------------------------------------------------------------------

_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_F32, _HALF = ir.FloatType(), ir.HalfType()


def _vec(t, n):
    return ir.VectorType(t, n)


def _splat(t, n, v):
    return ir.Constant(_vec(t, n), [ir.Constant(t, v)] * n)


def _data_ptr(context, builder, aty, aval, off):
    """Pointer to element `off` of array `aval` (in units of its dtype)."""
    ary = context.make_array(aty)(context, builder, aval)
    return builder.gep(ary.data, [off])


def _load(builder, ptr, ty, align=1):
    return builder.load(builder.bitcast(ptr, ty.as_pointer()), align=align)


def _vfma(builder, a, b, c):
    """a*b + c on float vectors (llvm.fma; llvmlite's builder.fma takes scalars only)."""
    ty = a.type
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ty, [ty, ty, ty]),
                                        f"llvm.fma.v{ty.count}f32")
    return builder.call(fn, [a, b, c])


def _broadcast8(builder, s):
    v = builder.insert_element(ir.Constant(_vec(_F32, 8), None), s, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, 8), [0] * 8))


def _hsum8(builder, v):
    lo = builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, 4), [0, 1, 2, 3]))
    hi = builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, 4), [4, 5, 6, 7]))
    s4 = builder.fadd(lo, hi)
    a = builder.shuffle_vector(s4, s4, ir.Constant(_vec(_I32, 2), [0, 1]))
    b = builder.shuffle_vector(s4, s4, ir.Constant(_vec(_I32, 2), [2, 3]))
    s2 = builder.fadd(a, b)
    return builder.fadd(builder.extract_element(s2, ir.Constant(_I32, 0)),
                        builder.extract_element(s2, ir.Constant(_I32, 1)))


def _unpack_block(builder, base, i, q4: bool, tabp):
    """Block i of a Q8_0/Q4_0 row at `base`: (fp32 scale, <32 x i16> signed values)."""
    bs = 18 if q4 else 34
    bp = builder.gep(base, [builder.mul(i, ir.Constant(_I64, bs))])
    # The scale, by table lookup: LLVM turns a scalar `fpext half` into vpinsrw into a live
    # register, a false dependency on the accumulator chain (made the loop 3x slower).
    hbits = builder.zext(_load(builder, bp, _I16), _I64)
    d = builder.load(builder.gep(tabp, [hbits]))
    qp = builder.gep(bp, [ir.Constant(_I64, 2)])
    if q4:
        # 16-bit lanes: zero-extend the 16 bytes once; low nibbles are elements 0..15, high 16..31.
        q = builder.zext(_load(builder, qp, _vec(_I8, 16)), _vec(_I16, 16))
        lo = builder.sub(builder.and_(q, _splat(_I16, 16, 15)), _splat(_I16, 16, 8))
        hi = builder.sub(builder.lshr(q, _splat(_I16, 16, 4)), _splat(_I16, 16, 8))
        w = builder.shuffle_vector(lo, hi, ir.Constant(_vec(_I32, 32), list(range(32))))
    else:
        w = builder.sext(_load(builder, qp, _vec(_I8, 32)), _vec(_I16, 32))
    return d, w


def _block_fma(builder, w, d, xqp, xdp, i, acc):
    """acc + float(sum_j w_j x_j) * d * xd[i] as <8 x float>; x = xqp[32 i : 32 i + 32] (int16).

    Written as products of sign-extended i16 and pairwise adds so that LLVM emits vpmaddwd."""
    xv = _load(builder, builder.gep(xqp, [builder.mul(i, ir.Constant(_I64, 32))]), _vec(_I16, 32), 2)
    dx = builder.load(builder.gep(xdp, [i]))
    prod = builder.mul(builder.sext(w, _vec(_I32, 32)), builder.sext(xv, _vec(_I32, 32)))
    p16 = builder.add(builder.shuffle_vector(prod, prod, ir.Constant(_vec(_I32, 16), list(range(0, 32, 2)))),
                      builder.shuffle_vector(prod, prod, ir.Constant(_vec(_I32, 16), list(range(1, 32, 2)))))
    s8 = builder.add(builder.shuffle_vector(p16, p16, ir.Constant(_vec(_I32, 8), list(range(8)))),
                     builder.shuffle_vector(p16, p16, ir.Constant(_vec(_I32, 8), list(range(8, 16)))))
    fs = builder.sitofp(s8, _vec(_F32, 8))
    return _vfma(builder, fs, _broadcast8(builder, builder.fmul(d, dx)), acc)


def _as_i64(builder, v):
    return builder.sext(v, _I64) if v.type != _I64 else v


def _make_qdot(q4: bool):
    def qdot(typingctx, buf, off, nbk, xq, xoff, xd, doff, tab):
        """float32 dot of `nbk` Q8_0/Q4_0 blocks at byte `off` of int8 `buf` with the int16
        activation xq[xoff : xoff + 32*nbk] whose block scales are xd[doff : doff + nbk];
        tab: float32[65536], the value of every fp16 bit pattern."""
        sig = types.float32(buf, off, nbk, xq, xoff, xd, doff, tab)

        def codegen(context, builder, sig, args):
            vbuf, voff, vnbk, vxq, vxoff, vxd, vdoff, vtab = args
            tabp = _data_ptr(context, builder, sig.args[7], vtab, ir.Constant(_I64, 0))
            base = _data_ptr(context, builder, sig.args[0], vbuf, voff)
            xqp = _data_ptr(context, builder, sig.args[3], vxq, vxoff)
            xdp = _data_ptr(context, builder, sig.args[5], vxd, vdoff)
            f8 = _vec(_F32, 8)

            def block(i, acc):
                d, w = _unpack_block(builder, base, i, q4, tabp)
                return _block_fma(builder, w, d, xqp, xdp, i, acc)

            # Two independent accumulators (even / odd blocks) to halve the fma latency chain.
            acc0 = cgutils.alloca_once_value(builder, ir.Constant(f8, None))
            acc1 = cgutils.alloca_once_value(builder, ir.Constant(f8, None))
            nbk64 = _as_i64(builder, vnbk)
            npair = builder.lshr(nbk64, ir.Constant(_I64, 1))
            with cgutils.for_range(builder, npair) as loop:
                i0 = builder.shl(loop.index, ir.Constant(_I64, 1))
                builder.store(block(i0, builder.load(acc0)), acc0)
                i1 = builder.add(i0, ir.Constant(_I64, 1))
                builder.store(block(i1, builder.load(acc1)), acc1)
            odd_n = builder.icmp_unsigned("!=", builder.and_(nbk64, ir.Constant(_I64, 1)),
                                          ir.Constant(_I64, 0))
            with builder.if_then(odd_n):
                last = builder.sub(nbk64, ir.Constant(_I64, 1))
                builder.store(block(last, builder.load(acc0)), acc0)
            return _hsum8(builder, builder.fadd(builder.load(acc0), builder.load(acc1)))

        return sig, codegen

    return intrinsic(qdot)


_q8_0_dot = _make_qdot(False)
_q4_0_dot = _make_qdot(True)


def _make_qdot4(q4: bool):
    def qdot4(typingctx, buf, off, nbk, xq, xo0, xo1, xo2, xo3, xd, do0, do1, do2, do3, tab):
        """One weight row against 4 activations at once (prefill): each block is loaded and
        unpacked once and used 4 times. Activation j is xq[xoj:], scales xd[doj:]. Returns a
        4-tuple of float32."""
        rty = types.UniTuple(types.float32, 4)
        sig = rty(buf, off, nbk, xq, xo0, xo1, xo2, xo3, xd, do0, do1, do2, do3, tab)

        def codegen(context, builder, sig, args):
            (vbuf, voff, vnbk, vxq, x0, x1, x2, x3, vxd, d0, d1, d2, d3, vtab) = args
            tabp = _data_ptr(context, builder, sig.args[13], vtab, ir.Constant(_I64, 0))
            base = _data_ptr(context, builder, sig.args[0], vbuf, voff)
            xqps = [_data_ptr(context, builder, sig.args[3], vxq, _as_i64(builder, xo))
                    for xo in (x0, x1, x2, x3)]
            xdps = [_data_ptr(context, builder, sig.args[8], vxd, _as_i64(builder, do))
                    for do in (d0, d1, d2, d3)]
            f8 = _vec(_F32, 8)
            accs = [cgutils.alloca_once_value(builder, ir.Constant(f8, None)) for _ in range(4)]
            with cgutils.for_range(builder, _as_i64(builder, vnbk)) as loop:
                i = loop.index
                d, w = _unpack_block(builder, base, i, q4, tabp)
                for j in range(4):
                    builder.store(_block_fma(builder, w, d, xqps[j], xdps[j], i,
                                             builder.load(accs[j])), accs[j])
            vals = [_hsum8(builder, builder.load(a)) for a in accs]
            return context.make_tuple(builder, sig.return_type, vals)

        return sig, codegen

    return intrinsic(qdot4)


_q8_0_dot4 = _make_qdot4(False)
_q4_0_dot4 = _make_qdot4(True)


def _make_fdot(kind: int):
    esize = {F32: 4, F16: 2, BF16: 2}[kind]

    def fdot(typingctx, buf, off, n16, x, xoff):
        """float32 dot of 16*n16 F32/F16/BF16 values at byte `off` of int8 `buf` with x[xoff:]."""
        sig = types.float32(buf, off, n16, x, xoff)

        def codegen(context, builder, sig, args):
            vbuf, voff, vn16, vx, vxoff = args
            base = _data_ptr(context, builder, sig.args[0], vbuf, voff)
            xp = _data_ptr(context, builder, sig.args[3], vx, vxoff)
            f16v = _vec(_F32, 16)
            acc = cgutils.alloca_once_value(builder, ir.Constant(f16v, None))
            n64 = builder.sext(vn16, _I64) if vn16.type != _I64 else vn16
            with cgutils.for_range(builder, n64) as loop:
                i = loop.index
                wp = builder.gep(base, [builder.mul(i, ir.Constant(_I64, 16 * esize))])
                if kind == F32:
                    w = _load(builder, wp, f16v)
                elif kind == F16:
                    w = builder.fpext(_load(builder, wp, _vec(_HALF, 16)), f16v)
                else:
                    u = builder.zext(_load(builder, wp, _vec(_I16, 16)), _vec(_I32, 16))
                    w = builder.bitcast(builder.shl(u, _splat(_I32, 16, 16)), f16v)
                xv = _load(builder, builder.gep(xp, [builder.mul(i, ir.Constant(_I64, 16))]), f16v, 4)
                builder.store(_vfma(builder, w, xv, builder.load(acc)), acc)
            v = builder.load(acc)
            lo = builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, 8), list(range(8))))
            hi = builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, 8), list(range(8, 16))))
            return _hsum8(builder, builder.fadd(lo, hi))

        return sig, codegen

    return intrinsic(fdot)


_f32_dot = _make_fdot(F32)
_f16_dot = _make_fdot(F16)
_bf16_dot = _make_fdot(BF16)


def _make_scalar(kind: int):
    def load(typingctx, buf, off):
        """float32 value of type `kind` at byte `off` of int8 `buf`."""
        sig = types.float32(buf, off)

        def codegen(context, builder, sig, args):
            p = _data_ptr(context, builder, sig.args[0], args[0], args[1])
            if kind == F32:
                return _load(builder, p, _F32)
            if kind == F16:
                return builder.fpext(_load(builder, p, _HALF), _F32)
            u = builder.zext(_load(builder, p, _I16), _I32)
            return builder.bitcast(builder.shl(u, ir.Constant(_I32, 16)), _F32)

        return sig, codegen

    return intrinsic(load)


_ld_f32 = _make_scalar(F32)
_ld_f16 = _make_scalar(F16)
_ld_bf16 = _make_scalar(BF16)

# ----------------------------------------------------------------------------------------------
# Nopython building blocks
# ----------------------------------------------------------------------------------------------

# float32 value of every fp16 bit pattern (a compile-time constant of the kernels that use it).
_F16_TABLE = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)

_JIT = dict(cache=True, nogil=True, fastmath=True)


@njit(**_JIT)
def _quantize_rows(x, xq, xd):
    """x float32 [m, cols] (C) -> xq int16 [m*cols] (values in [-32767, 32767]: 16-bit activations keep the quantized kernels within ~1e-5 of float), xd float32 [m*cols/32]."""
    m, cols = x.shape
    nbk = cols // 32
    for t in range(m):
        for b in range(nbk):
            o = b * 32
            amax = np.float32(0.0)
            for i in range(32):
                a = abs(x[t, o + i])
                if a > amax:
                    amax = a
            d = amax / np.float32(32767.0)
            inv = np.float32(1.0) / d if d > 0 else np.float32(0.0)
            base = t * cols + o
            for i in range(32):
                xq[base + i] = np.int16(np.rint(x[t, o + i] * inv))
            xd[t * nbk + b] = d


@njit(**_JIT)
def _dequantize_rows(buf, offs, row_bytes, qt, out):
    """out[r] = the row of type qt at byte offs[r] of int8 `buf`, as float32 (d * q per quantized value, as
    gguf's dequantize computes it)."""
    cols = out.shape[1]
    for r in range(out.shape[0]):
        off = offs[r]
        if off < 0 or off + row_bytes > buf.shape[0]:
            raise IndexError("row id out of range")
        if qt == F32:
            for j in range(cols):
                out[r, j] = _ld_f32(buf, off + 4 * j)
        elif qt == F16:
            for j in range(cols):
                out[r, j] = _ld_f16(buf, off + 2 * j)
        elif qt == BF16:
            for j in range(cols):
                out[r, j] = _ld_bf16(buf, off + 2 * j)
        elif qt == Q4_0:
            for b in range(cols // 32):
                o = off + 18 * b
                d = _ld_f16(buf, o)
                for i in range(16):
                    q = np.int32(buf[o + 2 + i]) & 255
                    out[r, 32 * b + i] = d * np.float32((q & 15) - 8)
                    out[r, 32 * b + 16 + i] = d * np.float32((q >> 4) - 8)
        else:
            for b in range(cols // 32):
                o = off + 34 * b
                d = _ld_f16(buf, o)
                for i in range(32):
                    out[r, 32 * b + i] = d * np.float32(buf[o + 2 + i])


@njit(**_JIT)
def _rowdot_float(buf, off, qt, cols, xf, xo):
    """Dot of an F32/F16/BF16 row at byte `off` of `buf` with xf[xo : xo + cols]."""
    n16 = cols // 16
    if qt == F32:
        s = _f32_dot(buf, off, n16, xf, xo)
        for j in range(n16 * 16, cols):
            s += _ld_f32(buf, off + 4 * j) * xf[xo + j]
    elif qt == F16:
        s = _f16_dot(buf, off, n16, xf, xo)
        for j in range(n16 * 16, cols):
            s += _ld_f16(buf, off + 2 * j) * xf[xo + j]
    else:
        s = _bf16_dot(buf, off, n16, xf, xo)
        for j in range(n16 * 16, cols):
            s += _ld_bf16(buf, off + 2 * j) * xf[xo + j]
    return s


@njit(**_JIT)
def _rowdot(buf, off, qt, cols, xq, xd, xf, t):
    """Dot of the weight row at byte `off` of `buf` (type qt, `cols` values) with token t
    (quantized activation xq/xd for Q8_0/Q4_0, float32 xf otherwise)."""
    if qt == Q8_0:
        nbk = cols // 32
        return _q8_0_dot(buf, off, nbk, xq, t * cols, xd, t * nbk, _F16_TABLE)
    if qt == Q4_0:
        nbk = cols // 32
        return _q4_0_dot(buf, off, nbk, xq, t * cols, xd, t * nbk, _F16_TABLE)
    return _rowdot_float(buf, off, qt, cols, xf, t * cols)


@njit(**_JIT)
def _rowdot4(buf, off, qt, nbk, xq, xd, xo0, xo1, xo2, xo3, do0, do1, do2, do3):
    """One Q8_0/Q4_0 row against four quantized activations (offsets into xq / xd)."""
    if qt == Q8_0:
        return _q8_0_dot4(buf, off, nbk, xq, xo0, xo1, xo2, xo3, xd, do0, do1, do2, do3, _F16_TABLE)
    return _q4_0_dot4(buf, off, nbk, xq, xo0, xo1, xo2, xo3, xd, do0, do1, do2, do3, _F16_TABLE)


@njit(**_JIT)
def _rows4(buf, off, qt, cols, xq, xd, t0, t1, t2, t3):
    """The Q8_0/Q4_0 row at byte `off` against quantized activation rows t0..t3 (4-tuple)."""
    nbk = cols // 32
    return _rowdot4(buf, off, qt, nbk, xq, xd, t0 * cols, t1 * cols, t2 * cols, t3 * cols,
                    t0 * nbk, t1 * nbk, t2 * nbk, t3 * nbk)


@njit(**_JIT)
def _quantize_if(qt, x2):
    """The int16 activation + block scales for quantized weight types, dummies otherwise."""
    n, cols = x2.shape
    if qt == Q8_0 or qt == Q4_0:
        xq = np.empty(n * cols, np.int16)
        xd = np.empty(n * (cols // 32), np.float32)
        _quantize_rows(x2, xq, xd)
    else:
        xq = np.empty(1, np.int16)
        xd = np.empty(1, np.float32)
    return xq, xd


@njit(parallel=True, **_JIT)
def _matvec_kernel(buf, row_stride, rows, qt, x2):
    """n == 1: quantize x once, then one parallel loop over rows. Returns float32 [rows]."""
    xq, xd = _quantize_if(qt, x2)
    xf = x2.reshape(x2.size)
    cols = x2.shape[1]
    out = np.empty(rows, np.float32)
    for r in prange(rows):
        out[r] = _rowdot(buf, r * row_stride, qt, cols, xq, xd, xf, 0)
    return out


@njit(**_JIT)
def _matvec_serial(buf, row_stride, rows, qt, x2):
    """_matvec_kernel on the calling thread: for small matrices a parallel region costs more
    (fork/join, and far more when the machine is busy) than it saves."""
    xq, xd = _quantize_if(qt, x2)
    xf = x2.reshape(x2.size)
    cols = x2.shape[1]
    out = np.empty(rows, np.float32)
    for r in range(rows):
        out[r] = _rowdot(buf, r * row_stride, qt, cols, xq, xd, xf, 0)
    return out


@njit(parallel=True, **_JIT)
def _matmul_kernel(buf, row_stride, rows, qt, cols, n, xq, xd, xf, out):
    """n > 1: parallel over tiles of rows; each tile's rows are read from memory once and reused
    (from cache) by every token. out float32 [n, rows]."""
    ntiles = (rows + _ROW_TILE - 1) // _ROW_TILE
    n4 = n - n % 4 if (qt == Q8_0 or qt == Q4_0) else 0
    nbk = cols // 32
    for tile in prange(ntiles):
        r0 = tile * _ROW_TILE
        r1 = min(rows, r0 + _ROW_TILE)
        for t in range(0, n4, 4):
            for r in range(r0, r1):
                a, b, c, d = _rowdot4(buf, r * row_stride, qt, nbk, xq, xd,
                                      t * cols, (t + 1) * cols, (t + 2) * cols, (t + 3) * cols,
                                      t * nbk, (t + 1) * nbk, (t + 2) * nbk, (t + 3) * nbk)
                out[t, r] = a
                out[t + 1, r] = b
                out[t + 2, r] = c
                out[t + 3, r] = d
        for t in range(n4, n):
            for r in range(r0, r1):
                out[t, r] = _rowdot(buf, r * row_stride, qt, cols, xq, xd, xf, t)


@njit(parallel=True, **_JIT)
def _heads_kernel(buf, head_stride, row_stride, heads, rows, qt, x2, n):
    """Per-head matrices (MLA's attn_k_b / attn_v_b): out[t, h, r] = W[h, r] . x[t, h], with x2 the
    activations as [n * heads, cols]. One parallel loop over all heads' rows."""
    xq, xd = _quantize_if(qt, x2)
    xf = x2.reshape(x2.size)
    cols = x2.shape[1]
    out = np.empty((n, heads, rows), np.float32)
    for hr in prange(heads * rows):
        h = hr // rows
        off = h * head_stride + (hr - h * rows) * row_stride
        for t in range(n):
            out[t, h, hr - h * rows] = _rowdot(buf, off, qt, cols, xq, xd, xf, t * heads + h)
    return out


@njit(**_JIT)
def _silu1(g):
    return g / (np.float32(1.0) + np.exp(-g))


@njit(parallel=True, **_JIT)
def _expert_ffn_kernel(xf, ids, wts, n_experts,
                       gbuf, g_es, g_rs, g_off, gqt,
                       ubuf, u_es, u_rs, u_off, uqt,
                       dbuf, d_es, d_rs, dqt, inter):
    """Routed experts for n tokens; see `expert_ffn`. xf float32 [n, H]; ids int64 [n, k];
    wts float32 [n, k]. Expert e's gate row r lives at byte e*g_es + (g_off + r)*g_rs of gbuf
    (likewise up, down). Returns float32 [n, H]."""
    n, hidden = xf.shape
    k = ids.shape[1]
    npairs = n * k
    # (token, slot) pairs grouped by expert: counting sort.
    counts = np.zeros(n_experts + 1, np.int64)
    for t in range(n):
        for j in range(k):
            e = ids[t, j]
            if e < 0 or e >= n_experts:
                raise ValueError("expert id out of range")
            counts[e + 1] += 1
    for e in range(n_experts):
        counts[e + 1] += counts[e]
    start = counts.copy()
    pair_tok = np.empty(npairs, np.int64)
    pair_w = np.empty(npairs, np.float32)
    pair_src = np.empty(npairs, np.int64)
    for t in range(n):
        for j in range(k):
            e = ids[t, j]
            p = start[e]
            start[e] = p + 1
            pair_tok[p] = t
            pair_w[p] = wts[t, j]
            pair_src[p] = t * k + j
    used = np.empty(n_experts, np.int64)
    nused = 0
    for e in range(n_experts):
        if counts[e + 1] > counts[e]:
            used[nused] = e
            nused += 1

    # Activation for gate/up.
    quant_gu = gqt == Q8_0 or gqt == Q4_0 or uqt == Q8_0 or uqt == Q4_0
    if quant_gu:
        xq = np.empty(n * hidden, np.int16)
        xd = np.empty(n * (hidden // 32), np.float32)
        _quantize_rows(xf, xq, xd)
    else:
        xq = np.empty(1, np.int16)
        xd = np.empty(1, np.float32)
    xflat = xf.reshape(n * hidden)

    # Several tokens per expert (prefill): quantized rows are run against 4 tokens at a time.
    gu4 = (gqt == Q8_0 or gqt == Q4_0) and (uqt == Q8_0 or uqt == Q4_0)
    d4 = dqt == Q8_0 or dqt == Q4_0

    # 1) h[p] = silu(gate_e x_t) * (up_e x_t), one parallel loop over (expert, row tile).
    h = np.empty((npairs, inter), np.float32)
    rt = _ROW_TILE if n > 1 else 4
    ntile = (inter + rt - 1) // rt
    for task in prange(nused * ntile):
        e = used[task // ntile]
        r0 = (task % ntile) * rt
        r1 = min(inter, r0 + rt)
        p0 = counts[e]
        p1 = counts[e + 1]
        p4 = p0 + (p1 - p0) // 4 * 4 if gu4 else p0
        for p in range(p0, p4, 4):  # four tokens per pass over the rows: weights unpacked once
            ta, tb, tc, td = pair_tok[p], pair_tok[p + 1], pair_tok[p + 2], pair_tok[p + 3]
            for r in range(r0, r1):
                g = _rows4(gbuf, e * g_es + (g_off + r) * g_rs, gqt, hidden, xq, xd, ta, tb, tc, td)
                u = _rows4(ubuf, e * u_es + (u_off + r) * u_rs, uqt, hidden, xq, xd, ta, tb, tc, td)
                h[p, r] = _silu1(g[0]) * u[0]
                h[p + 1, r] = _silu1(g[1]) * u[1]
                h[p + 2, r] = _silu1(g[2]) * u[2]
                h[p + 3, r] = _silu1(g[3]) * u[3]
        for p in range(p4, p1):
            t = pair_tok[p]
            for r in range(r0, r1):
                g = _rowdot(gbuf, e * g_es + (g_off + r) * g_rs, gqt, hidden, xq, xd, xflat, t)
                u = _rowdot(ubuf, e * u_es + (u_off + r) * u_rs, uqt, hidden, xq, xd, xflat, t)
                h[p, r] = _silu1(g) * u

    # 2) quantize h for the down projection.
    if dqt == Q8_0 or dqt == Q4_0:
        nbk = inter // 32
        hq = np.empty(npairs * inter, np.int16)
        hd = np.empty(npairs * nbk, np.float32)
        if npairs <= 16:
            _quantize_rows(h, hq, hd)
        else:
            for p in prange(npairs):
                _quantize_rows(h[p:p + 1], hq[p * inter:(p + 1) * inter], hd[p * nbk:(p + 1) * nbk])
    else:
        hq = np.empty(1, np.int16)
        hd = np.empty(1, np.float32)
    hflat = h.reshape(npairs * inter)

    # 3) out[t] += w * down_e h[p]; parallel over output-row tiles, so no two tasks write the same
    # element; within a tile each used expert's rows are read once for all its tokens.
    out = np.zeros((n, hidden), np.float32)
    ntile = (hidden + rt - 1) // rt
    for tile in prange(ntile):
        r0 = tile * rt
        r1 = min(hidden, r0 + rt)
        for ui in range(nused):
            e = used[ui]
            p0 = counts[e]
            p1 = counts[e + 1]
            p4 = p0 + (p1 - p0) // 4 * 4 if d4 else p0
            for p in range(p0, p4, 4):
                for r in range(r0, r1):
                    v = _rows4(dbuf, e * d_es + r * d_rs, dqt, inter, hq, hd, p, p + 1, p + 2, p + 3)
                    out[pair_tok[p], r] += pair_w[p] * v[0]
                    out[pair_tok[p + 1], r] += pair_w[p + 1] * v[1]
                    out[pair_tok[p + 2], r] += pair_w[p + 2] * v[2]
                    out[pair_tok[p + 3], r] += pair_w[p + 3] * v[3]
            for p in range(p4, p1):
                t = pair_tok[p]
                w = pair_w[p]
                for r in range(r0, r1):
                    out[t, r] += w * _rowdot(dbuf, e * d_es + r * d_rs, dqt, inter, hq, hd, hflat, p)
    return out


@njit(parallel=True, **_JIT)
def _silu_kernel(x):
    flat = x.reshape(x.size)
    out = np.empty(x.size, np.float32)
    for i in prange(x.size):
        out[i] = _silu1(flat[i])
    return out


@njit(**_JIT)
def _rmsnorm_kernel(x, w, eps):
    n, h = x.shape
    out = np.empty((n, h), np.float32)
    for t in range(n):
        ss = np.float32(0.0)
        for i in range(h):
            ss += x[t, i] * x[t, i]
        inv = np.float32(1.0) / np.sqrt(ss / np.float32(h) + eps)
        for i in range(h):
            out[t, i] = x[t, i] * inv * w[i]
    return out


# ----------------------------------------------------------------------------------------------
# Python entry points
# ----------------------------------------------------------------------------------------------


def flat_view(raw: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Zero-copy 1-D int8 view spanning `raw` (2-D (rows, row_bytes) or 3-D (E, rows, row_bytes)),
    with its expert stride and row stride in bytes. Rows must be contiguous (stride 1 bytes)."""
    a = np.asarray(raw)
    if a.dtype != np.uint8 and a.dtype != np.int8:
        a = a.view(np.uint8)
    if a.strides[-1] != a.itemsize:
        raise ValueError("weight rows must be contiguous")
    row_stride = a.strides[-2]
    es = a.strides[0] if a.ndim == 3 else 0
    if a.flags.c_contiguous:
        flat = a.view(np.int8).reshape(-1)
    else:
        if min(a.strides) < 0:
            raise ValueError("negative strides are not supported")
        span = sum((s - 1) * st for s, st in zip(a.shape, a.strides)) + 1
        flat = np.lib.stride_tricks.as_strided(a.view(np.int8), shape=(span,), strides=(1,))
    # Always read-only (memory-mapped GGUFs are), so every caller hits one compiled signature.
    flat.flags.writeable = False
    return flat, es, row_stride


def _activation(x2: np.ndarray, qtypes) -> tuple[np.ndarray, np.ndarray]:
    if any(int(q) in QUANTIZED for q in qtypes):
        n, cols = x2.shape
        xq = np.empty(n * cols, np.int16)
        xd = np.empty(n * (cols // 32), np.float32)
        _quantize_rows(x2, xq, xd)
        return xq, xd
    return _DUMMY_Q, _DUMMY_D


_DUMMY_Q = np.zeros(1, np.int16)
_DUMMY_D = np.zeros(1, np.float32)


def _check_type(qt: int, cols: int, row_bytes: int) -> None:
    if qt not in SUPPORTED:
        raise ValueError(f"unsupported weight type {qt}")
    if qt in QUANTIZED:
        if cols % 32:
            raise ValueError(f"quantized weights need cols % 32 == 0, got {cols}")
        need = cols // 32 * _BLOCK_BYTES[qt]
    else:
        need = cols * (4 if qt == F32 else 2)
    if row_bytes != need:
        raise ValueError(f"row has {row_bytes} bytes, type {qt} with {cols} columns needs {need}")


def _cols_of(qt: int, row_bytes: int) -> int:
    if qt in QUANTIZED:
        return row_bytes // _BLOCK_BYTES[qt] * 32
    return row_bytes // (4 if qt == F32 else 2)


def dequantize_rows(raw: np.ndarray, qtype: int, ids) -> np.ndarray:
    """float32 [n, cols]: rows `ids` of W stored as GGUF blocks `raw` (uint8 (rows, row_bytes)), only those
    rows read: the token embedding's lookup (a decode step waits for it: ~2 us a row, gguf's dequantize ~60)."""
    qt, row_bytes = int(qtype), raw.shape[-1]
    _check_type(qt, _cols_of(qt, row_bytes), row_bytes)
    flat, _, row_stride = flat_view(raw)
    offs = np.asarray(ids, dtype=np.int64).reshape(-1) * row_stride
    out = np.empty((len(offs), _cols_of(qt, row_bytes)), np.float32)
    _dequantize_rows(flat, offs, row_bytes, qt, out)
    return out


def matmul(raw: np.ndarray, qtype: int, x: np.ndarray) -> np.ndarray:
    """y = x @ W.T for W stored as GGUF blocks `raw` (uint8 (rows, row_bytes)) of type `qtype`.

    x: float32 [cols] or [n, cols]; returns float32 [rows] or [n, rows]. Quantized types use an
    int16-quantized copy of x (one float scale per 32 values).
    """
    qt = int(qtype)
    x = np.asarray(x, dtype=np.float32)
    squeeze = x.ndim == 1
    x2 = np.ascontiguousarray(x.reshape(1, -1) if squeeze else x)
    n, cols = x2.shape
    rows, row_bytes = raw.shape[-2], raw.shape[-1]
    _check_type(qt, cols, row_bytes)
    if qt == F32 and n > 1:  # BLAS is the best float32 GEMM here; this is a view, not a copy.
        w = np.asarray(raw).view(np.float32).reshape(rows, cols)
        return np.ascontiguousarray(x2 @ w.T)
    buf, _, row_stride = flat_view(raw)
    if n == 1:
        kern = _matvec_serial if rows * row_bytes <= SERIAL_BYTES else _matvec_kernel
        out = kern(buf, row_stride, rows, qt, x2)
        return out if squeeze else out.reshape(1, rows)
    xq, xd = _activation(x2, (qt,))
    xf = x2.reshape(-1)
    out = np.empty((n, rows), np.float32)
    _matmul_kernel(buf, row_stride, rows, qt, cols, n, xq, xd, xf, out)
    return out


def matmul_heads(raw: np.ndarray, qtype: int, x: np.ndarray) -> np.ndarray:
    """y[n, heads, rows] = per head h: x[n, h] @ W[h].T, for W stored as `raw` uint8
    (heads, rows, row_bytes) — one call for all heads instead of one per head."""
    qt = int(qtype)
    n, heads, cols = x.shape
    if raw.shape[0] != heads:
        raise ValueError(f"{raw.shape[0]} weight heads for {heads} activation heads")
    _check_type(qt, cols, raw.shape[2])
    buf, head_stride, row_stride = flat_view(raw)
    x2 = np.ascontiguousarray(np.asarray(x, dtype=np.float32).reshape(n * heads, cols))
    return _heads_kernel(buf, head_stride, row_stride, heads, raw.shape[1], qt, x2, n)


def expert_ffn(x: np.ndarray, ids: np.ndarray, weights: np.ndarray,
               gate: np.ndarray, gate_type: int, down: np.ndarray, down_type: int,
               up: np.ndarray | None = None, up_type: int | None = None) -> np.ndarray:
    """Routed-experts FFN: y[t] = sum_j weights[t, j] * down_e(silu(gate_e x_t) * up_e x_t), e = ids[t, j].

    x: float32 [H] or [n, H]; ids: int [k] or [n, k]; weights: float32 like ids.
    gate/up/down: raw GGUF blocks, uint8 (E, I, row_bytes) / (E, H, row_bytes).
    Fused layout: pass `up=None` and gate = `ffn_gate_up_exps` (E, 2I, row_bytes), gate rows first.
    Only the selected experts' rows are read. Returns float32 [H] or [n, H].
    """
    x = np.asarray(x, dtype=np.float32)
    squeeze = x.ndim == 1
    x2 = np.ascontiguousarray(x.reshape(1, -1) if squeeze else x)
    n, hidden = x2.shape
    ids2 = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(n, -1))
    w2 = np.ascontiguousarray(np.asarray(weights, dtype=np.float32).reshape(n, -1))
    if ids2.shape != w2.shape:
        raise ValueError("ids and weights must have the same shape")
    gqt, dqt = int(gate_type), int(down_type)
    if up is None:
        fused = gate.shape[1]
        if fused % 2:
            raise ValueError("fused gate_up needs an even row count")
        inter = fused // 2
        uqt = gqt
        gbuf, g_es, g_rs = flat_view(gate)
        ubuf, u_es, u_rs, u_off = gbuf, g_es, g_rs, inter
    else:
        inter = gate.shape[1]
        uqt = gqt if up_type is None else int(up_type)
        if up.shape[:2] != gate.shape[:2]:
            raise ValueError("gate and up must have the same (experts, rows)")
        gbuf, g_es, g_rs = flat_view(gate)
        ubuf, u_es, u_rs = flat_view(up)
        u_off = 0
    n_experts = gate.shape[0]
    _check_type(gqt, hidden, gate.shape[2])
    _check_type(uqt, hidden, (up if up is not None else gate).shape[2])
    if down.shape[0] != n_experts or down.shape[1] != hidden:
        raise ValueError(f"down must be (E={n_experts}, H={hidden}, row_bytes), got {down.shape}")
    _check_type(dqt, inter, down.shape[2])
    dbuf, d_es, d_rs = flat_view(down)
    out = _expert_ffn_kernel(x2, ids2, w2, n_experts,
                             gbuf, g_es, g_rs, 0, gqt,
                             ubuf, u_es, u_rs, u_off, uqt,
                             dbuf, d_es, d_rs, dqt, inter)
    return out[0] if squeeze else out


def silu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x), float32, same shape."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return _silu_kernel(x).reshape(x.shape)


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x * rsqrt(mean(x^2) + eps) * w over the last axis, float32."""
    x = np.asarray(x, dtype=np.float32)
    x2 = np.ascontiguousarray(x.reshape(-1, x.shape[-1]))
    out = _rmsnorm_kernel(x2, np.ascontiguousarray(w, dtype=np.float32), np.float32(eps))
    return out.reshape(x.shape)


def quantize_activation(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x float32 [n, cols] (cols % 32 == 0) -> (int16 values in [-32767, 32767] [n*cols], scales [n*cols/32])."""
    x2 = np.ascontiguousarray(np.asarray(x, dtype=np.float32).reshape(-1, np.shape(x)[-1]))
    n, cols = x2.shape
    xq = np.empty(n * cols, np.int16)
    xd = np.empty(n * (cols // 32), np.float32)
    _quantize_rows(x2, xq, xd)
    return xq, xd


def compile_all() -> float:
    """Compile (or load from NUMBA_CACHE_DIR) every kernel signature the runtime uses; returns seconds."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    cols, rows, e, inter = 64, 8, 3, 32
    x1 = rng.standard_normal(cols, dtype=np.float32)
    x3 = rng.standard_normal((3, cols), dtype=np.float32)
    raws = {}
    for qt in SUPPORTED:
        rb = cols // 32 * _BLOCK_BYTES[qt] if qt in QUANTIZED else cols * (4 if qt == F32 else 2)
        raws[qt] = np.zeros((rows, rb), np.uint8)
        matmul(raws[qt], qt, x1)
        matmul(raws[qt], qt, x3)
        matmul_heads(np.stack([raws[qt]] * 2), qt, np.stack([x3, x3], axis=1))
        dequantize_rows(raws[qt], qt, [1])
    matmul(np.zeros((SERIAL_BYTES // 64 + 1, 68), np.uint8), Q8_0, x1)  # the parallel matvec
    g = np.zeros((e, 2 * inter, cols // 32 * 34), np.uint8)
    d = np.zeros((e, cols, inter // 32 * 34), np.uint8)
    ids = np.array([[0, 2]], np.int64)
    wts = np.ones((1, 2), np.float32)
    expert_ffn(x1, ids[0], wts[0], g, Q8_0, d, Q8_0)
    expert_ffn(x3, np.repeat(ids, 3, 0), np.repeat(wts, 3, 0), g[:, :inter], Q8_0, d, Q8_0,
               up=g[:, inter:], up_type=Q8_0)
    silu(x1)
    rmsnorm(x3, np.ones(cols, np.float32), 1e-6)
    return time.perf_counter() - t0


def threading_layer() -> str:
    """The Numba threading layer in use (after the first parallel call)."""
    try:
        return numba.threading_layer()
    except ValueError:
        return str(numba.config.THREADING_LAYER)
