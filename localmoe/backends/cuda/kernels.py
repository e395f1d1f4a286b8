"""CUDA kernels (numba.cuda) that compute directly on GGUF blocks, as stored.

Matrix-vector products ("gemv") are written once for a batch of P independent products: product p
multiplies matrix `mats[p]` of a (possibly 3-D: experts / heads) weight by activation row `xidx[p]`
and writes y[p]. `linear` (P = tokens, one matrix), `linear_heads` (P = tokens x heads) and the
routed experts (P = token x slot pairs, matrix = expert id) are all this one kernel.

Three kernel families:
  * fast2 Q4_0 / Q8_0 (cols % 256 == 0, cols / 256 a power of 2: every Small 4 matrix): int16
    activations and dp2a integer dot products, 16-byte loads; described above `_make_fast2`.
  * fast Q4_0 / Q8_0 (cols % 64 == 0, the rest): the weight is read as uint32 words. A pair of blocks is
    9 words (Q4_0: 2 x 18 bytes) or 17 words (Q8_0: 2 x 34 bytes), so every pair starts 4-byte
    aligned. Each warp owns one row at a time; it loads a chunk of the row into shared memory with
    fully coalesced 4-byte loads (all of the chunk's loads issued before the first use), then each
    lane decodes its own pair(s) from shared memory (word stride 9 or 17: odd, so conflict-free)
    against the activation, which sits in shared memory padded by one float every 64 (also
    conflict-free). Persistent grid: blocks loop over rows.
  * generic (any supported type, any cols): one block per row, its columns split over the threads, byte
    loads. Used for F32/F16/BF16 (the routers) and
    for odd shapes of tiny test models.
fast2 quantizes activations to int16 per 32-block exactly as the CPU kernels do; fast and generic
accumulate float32 activations.
Streamed experts decided on the device (streaming.py): cache_lookup_kernel (localmoe/cache.py's choices,
from the router's ids), expert_copy_kernel (the misses read from the mapped file by the SMs, then the
next layer's guessed experts until that layer's lookup stops it), await_ready_kernel (the join) and
cache_tick_kernel (LFU's aging), at the end.
"""
from __future__ import annotations

import math
import re

import numpy as np
from numba import float32, float64, int32, int64, uint32
from numba.cuda import libdevice

from ._numba import cuda

F32, F16, Q4_0, Q8_0, BF16 = 0, 1, 2, 8, 30
BLOCK_BYTES = {Q8_0: 34, Q4_0: 18}
UNIT_VECTORS = {t: 8 * b // 16 for t, b in BLOCK_BYTES.items()}   # fast2: 16-byte vectors in 8 blocks (a lane's unit)
ESIZE = {F32: 4, F16: 2, BF16: 2}

from llvmlite import ir as _ir  # noqa: E402
from numba.core import types as _t  # noqa: E402
from numba.core.extending import intrinsic as _intrinsic  # noqa: E402

_I32 = _ir.IntType(32)
_I64 = _ir.IntType(64)


def _asm(builder, rtype, argtypes, text, constraints, args, side_effect=False):
    fn = _ir.InlineAsm(_ir.FunctionType(rtype, argtypes), text, constraints, side_effect=side_effect)
    return builder.call(fn, args)


def _compute_capability_at_least(cc: tuple[int, int]) -> bool:
    """The current GPU's compute capability is cc or later (no GPU: True, as the offline tools in bench/
    compile for sm_90)."""
    try:
        return tuple(cuda.get_current_device().compute_capability) >= cc
    except Exception:
        return True


def _has_griddepcontrol() -> bool:
    return _compute_capability_at_least((9, 0))


@_intrinsic
def grid_dependency(typingctx):
    """Every kernel's first statement (programmatic dependent launch, see _numba.PDL): wait until the kernel
    before it in the stream has completed and its writes are visible, then let the next kernel launch, so
    that one's blocks are resident, waiting here, when this one ends. A no-op for a launch without the PDL
    attribute; nothing is emitted before sm_90."""
    def codegen(context, builder, sig, args):
        if _has_griddepcontrol():
            _asm(builder, _ir.VoidType(), [], "griddepcontrol.wait;\n\tgriddepcontrol.launch_dependents;",
                 "~{memory}", [], side_effect=True)
        return context.get_dummy_value()
    return _t.none(), codegen


WARPS = 8
THREADS = 32 * WARPS
STREAM = [0]              # the stream every launch goes to (the backend sets its own: capturable, unlike the legacy one)
BLOCKS_PER_SM = 2          # gemv grid: this many blocks per SM, split over the P products (bench_cuda sweeps it)
_TWO112 = float32(5.192296858534828e+33)   # 2**112: rebias an fp16 exponent into fp32


def _jit_source(src: list[str], name: str, max_registers: int | None = None, **names):
    """cuda.jit of a generated kernel `kern` (straight-line code where numba would keep a loop: named
    registers, loads placed before stores), its globals the module's common names plus `names`; the text
    is kept as `.source_text` (the simulator checks run it). The kernel begins with `grid_dependency()` unless it
    calls it itself, after loads of weights that no kernel writes (see _make_fast2's preload)."""
    assert src[0].startswith("def kern(")
    if not any(line.strip() == "grid_dependency()" for line in src):     # else placed by the kernel (after preloads)
        src = [src[0], "    grid_dependency()"] + src[1:]
    text = "\n".join(src)
    g = dict(cuda=cuda, grid_dependency=grid_dependency, float32=float32, int32=int32, int64=int64, uint32=uint32, libdevice=libdevice, math=math,
             min=min, max=max, abs=abs, THREADS=THREADS, WARPS=WARPS)
    g.update(names)
    exec(compile(text, f"<{name}>", "exec"), g)
    k = cuda.jit(g["kern"]) if max_registers is None else cuda.jit(g["kern"], max_registers=max_registers)
    k.source_text = text
    return k


@cuda.jit(device=True, inline=True)
def h2f(h):
    """float32 of the fp16 bit pattern in the low 16 bits of h (normals and subnormals)."""
    v = libdevice.int_as_float(int32((h & 0x7fff) << 13)) * _TWO112
    if h & 0x8000:
        v = -v
    return v


@cuda.jit(device=True, inline=True)
def f32bits(h):
    """float32 of the bit pattern in the uint32 h."""
    v = libdevice.int_as_float(int32(h & 0x7fffffff))
    if h & 0x80000000:
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
def _q4_pair_w(w0, w1, w2, w3, w4, w5, w6, w7, w8, xs, xi):
    """Two Q4_0 blocks (9 words) against 64 activations at xs[xi:]."""
    a = (_q4_half(w0 >> 16, xs, xi) + _q4_word(w1, xs, xi + 2) + _q4_word(w2, xs, xi + 6)
         + _q4_word(w3, xs, xi + 10) + _q4_half(w4 & 0xffff, xs, xi + 14))
    b = _q4_word(w5, xs, xi + 32) + _q4_word(w6, xs, xi + 36) + _q4_word(w7, xs, xi + 40) + _q4_word(w8, xs, xi + 44)
    return h2f(w0 & 0xffff) * a + h2f(w4 >> 16) * b


@cuda.jit(device=True, inline=True)
def _q4_pair(st, o, xs, xi):
    """_q4_pair_w on the 9 words at st[o:]."""
    return _q4_pair_w(st[o], st[o + 1], st[o + 2], st[o + 3], st[o + 4], st[o + 5], st[o + 6], st[o + 7],
                      st[o + 8], xs, xi)


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
def _q8_pair_w(w0, w1, w2, w3, w4, w5, w6, w7, w8, w9, w10, w11, w12, w13, w14, w15, w16, xs, xi):
    """Two Q8_0 blocks (17 words) against 64 activations at xs[xi:]."""
    a = (_q8_half(w0 >> 16, xs, xi) + _q8_half(w8 & 0xffff, xs, xi + 30) + _q8_word(w1, xs, xi + 2)
         + _q8_word(w2, xs, xi + 6) + _q8_word(w3, xs, xi + 10) + _q8_word(w4, xs, xi + 14)
         + _q8_word(w5, xs, xi + 18) + _q8_word(w6, xs, xi + 22) + _q8_word(w7, xs, xi + 26))
    b = (_q8_word(w9, xs, xi + 32) + _q8_word(w10, xs, xi + 36) + _q8_word(w11, xs, xi + 40)
         + _q8_word(w12, xs, xi + 44) + _q8_word(w13, xs, xi + 48) + _q8_word(w14, xs, xi + 52)
         + _q8_word(w15, xs, xi + 56) + _q8_word(w16, xs, xi + 60))
    return h2f(w0 & 0xffff) * a + h2f(w8 >> 16) * b


@cuda.jit(device=True, inline=True)
def _q8_pair(st, o, xs, xi):
    """_q8_pair_w on the 17 words at st[o:]."""
    return _q8_pair_w(st[o], st[o + 1], st[o + 2], st[o + 3], st[o + 4], st[o + 5], st[o + 6], st[o + 7],
                      st[o + 8], st[o + 9], st[o + 10], st[o + 11], st[o + 12], st[o + 13], st[o + 14],
                      st[o + 15], st[o + 16], xs, xi)


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
        grid_dependency()
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


# -- lanes: short rows (Q4_0 / Q8_0, cols % 64 == 0, cols <= LANE_COLS), one row per thread ---------------
# MLA's absorbed key matrices are 32 heads of 512 x 128: rows of 72 bytes (Q4_0), too short for a warp
# per row (the fast kernel's warps took one such row per round trip). Here each thread loads its whole
# row into named registers (all loads issued before any arithmetic) and does its dot product alone, x in
# shared memory (read as broadcasts). Generated per column count, so the loads are straight-line code.

LANE_COLS = 256


def lanes_ok(qt: int, cols: int, fused: bool) -> bool:
    return qt in (Q4_0, Q8_0) and cols % 64 == 0 and cols <= LANE_COLS and not fused


def _make_lanes(qt: int, cols: int, preload: bool):
    """preload: the row's words are loaded before grid_dependency() (`mats` constant or written two or more
    kernels back: see _make_fast2)."""
    PW = 9 if qt == Q4_0 else 17                 # words per pair of blocks
    RW = cols // 64 * PW                         # words per row
    pair = "_q4_pair_w" if qt == Q4_0 else "_q8_pair_w"
    src = ["def kern(W, W2, mats, xidx, x, y, rows, cols, mat_words):",
           "    p = cuda.blockIdx.y",
           "    tid = cuda.threadIdx.x",
           "    r = cuda.blockIdx.x * THREADS + tid"]
    ind = "    " if preload else "        "
    row = "min(r, rows - 1)" if preload else "r"
    loads = [f"{ind}base = int64(mats[p]) * mat_words + int64({row}) * {RW}"]
    loads += [f"{ind}w{i} = W[base + {i}]" for i in range(RW)]
    if preload:
        src += loads + ["    grid_dependency()"]
    src += [
        f"    xs = cuda.shared.array({cols}, float32)",
        "    xr = xidx[p]",
        f"    for i in range(tid, {cols}, THREADS):",
        "        xs[i] = x[xr, i]",
        "    cuda.syncthreads()",
        "    if r < rows:",
    ]
    if not preload:
        src += loads
    src += ["        acc = float32(0.0)"]
    for k in range(cols // 64):
        ws = ", ".join(f"w{k * PW + i}" for i in range(PW))
        src.append(f"        acc += {pair}({ws}, xs, {64 * k})")
    src.append("        y[p, r] = acc")
    return _jit_source(src, f"lanes {qt} cols={cols} preload={preload}", _q4_pair_w=_q4_pair_w, _q8_pair_w=_q8_pair_w)


def launch_lanes(qt, cols, rows, W, mats, xidx, x, y, P, mat_bytes, preload=False):
    _compiled(_make_lanes, qt, cols, preload)[((rows + THREADS - 1) // THREADS, P), THREADS, STREAM[0]](
        W, W, mats, xidx, x, y, rows, cols, mat_bytes // 4)


# -- W_kb inside mla_rope -------------------------------------------------------------------------------
# MLA applies W_kb [heads, kv_lora, nope] to q_nope between mla_rope and the attention. As a gemv launch of its own
# it cost ~3.0 us a layer for 0.3 MB (docs/PERFORMANCE.md, session 17's launch_costs); instead mla_rope's block for
# head h keeps q_nope in shared memory and applies W_kb[h] there, the lanes way: a thread's share of a row in
# named registers, loaded before the kernel's wait (a weight no kernel writes). (W_vb inside the attention kernel,
# the same way, measured no faster: session 19.)

def heads_fused_ok(qt: int, rows: int, cols: int) -> bool:
    """A head's [rows, cols] matrix of this type can be applied inside mla_rope (`_head_rows_code`)."""
    return qt in (Q4_0, Q8_0) and cols % 64 == 0 and cols <= THREADS and rows <= THREADS


def _head_rows_code(qt: int, rows: int, cols: int, interleaved: bool, W: str, head: str, ind: str):
    """Source lines (preload, product) for y[r] = W[head, r, :] @ xs[:cols], r < rows, in one block: W the
    uint32 words of [heads, rows, cols] blocks, in the file's order or `interleave`d (as the backend uploads
    them); xs float32 shared memory. S threads share a row (a power of two: as many as fit THREADS and divide its
    pairs of blocks), each PPT pairs. preload (4-space indent, before the kernel's wait): the thread's words
    pw*. product (indent `ind`; after xs is written and the block synced; every thread of the block runs it):
    the row's sum hy, on the thread where hy_ok, of row hr."""
    PW = 9 if qt == Q4_0 else 17                  # words per pair of blocks
    NP = cols // 64
    S = 1
    while 2 * S * rows <= THREADS and NP % (2 * S) == 0 and 2 * S <= 32:
        S *= 2
    PPT = NP // S
    TW = PPT * PW                                 # words per thread
    pre = [f"    hr = min(int32(tid // {S}), {rows - 1})",
           f"    ps = int32(tid & {S - 1})",
           f"    hm = int64({head})"]
    if interleaved:     # word jr of the row: unit jr // UW, its 16-byte vector (jr % UW) // 4, word jr % 4
        UV = UNIT_VECTORS[qt]
        UW = 4 * UV
        pre.append(f"    hu = (hm * {rows} + hr) * {cols // 256}")
        for j in range(TW):
            pre += [f"    jr = int32(ps * {TW} + {j})",
                    f"    u = hu + jr // {UW}",
                    f"    pw{j} = {W}[(u >> 5) * {128 * UV} + ((jr % {UW}) >> 2) * 128 + (u & 31) * 4 + (jr & 3)]"]
    else:
        pre.append(f"    hb = (hm * {rows} + hr) * {NP * PW} + ps * {TW}")
        pre += [f"    pw{j} = {W}[hb + {j}]" for j in range(TW)]
    pair = "_q4_pair_w" if qt == Q4_0 else "_q8_pair_w"
    prod = ["hy = float32(0.0)", f"if tid < {rows * S}:"]
    for k in range(PPT):
        ws = ", ".join(f"pw{k * PW + i}" for i in range(PW))
        prod.append(f"    hy += {pair}({ws}, xs, ps * {64 * PPT} + {64 * k})")
    o = S // 2
    while o:
        prod.append(f"hy += cuda.shfl_xor_sync(0xffffffff, hy, {o})")
        o //= 2
    prod.append(f"hy_ok = tid < {rows * S} and ps == 0")
    return pre, [ind + line for line in prod]


F32_LOADS = 4              # f32rows: 16-byte weight loads per thread, all issued first (4096 columns at 256 threads)


def f32rows_ok(qt: int, cols: int, fused: bool) -> bool:
    return qt == F32 and cols % 4 == 0 and cols <= 4 * THREADS * F32_LOADS and not fused


def _make_f32rows(preload: bool, norm: bool):
    """Float32 rows of <= 4 * THREADS * F32_LOADS columns (the router, 128 x 4096): a block per row, each
    thread's 16-byte pieces of it (coalesced across the block) and its x values loaded before any
    arithmetic, instead of the generic kernel's byte loads one column at a time. preload: the block's first
    row is loaded before grid_dependency() (`mats` constant or written two or more kernels back).
    norm: y = W (rmsnorm(x) * nw), as (W (x * nw)) / rms(x): the block holds all of x, so the sum of squares
    rides along with the dot product."""
    L = F32_LOADS

    def weights(ind: str, prefix: str) -> list[str]:
        out = []
        for l in range(L):       # columns c .. c + 3 (clamped to the row; counted only when in it)
            out += [f"{ind}c{l} = min(4 * (tid + {THREADS * l}), cols - 4)",
                    f"{ind}{prefix}{l}0, {prefix}{l}1, {prefix}{l}2, {prefix}{l}3 = ldg4(W, rb + 4 * c{l})"]
        return out

    def row(ind: str, prefix: str) -> list[str]:
        """Row r's dot product with x and its store; the weight words in {prefix}{l}{j}."""
        out = [f"{ind}x{l}{j} = x[xr, c{l} + {j}]" for l in range(L) for j in range(4)]
        if norm:
            out += [f"{ind}n{l}{j} = nw[c{l} + {j}]" for l in range(L) for j in range(4)]
        sums = ["acc", "ss"] if norm else ["acc"]             # ss: x's sum of squares, for the norm
        out += [f"{ind}{a} = float32(0.0)" for a in sums]
        for l in range(L):
            out += [f"{ind}if 4 * (tid + {THREADS * l}) < cols:"]
            if norm:
                out += [f"{ind}    ss += x{l}{j} * x{l}{j}" for j in range(4)]
            xn = (lambda j: f"(x{l}{j} * n{l}{j})") if norm else (lambda j: f"x{l}{j}")
            out += [f"{ind}    acc += f32bits({prefix}{l}{j}) * {xn(j)}" for j in range(4)]
        out += [f"{ind}{a} = warp_sum({a})" for a in sums]
        out += [f"{ind}if (tid & 31) == 0:"] + [f"{ind}    red[{i} * WARPS + (tid >> 5)] = {a}" for i, a in enumerate(sums)]
        out += [f"{ind}cuda.syncthreads()",
                f"{ind}if tid == 0:"] + [f"{ind}    {a}0 = red[{i} * WARPS]" for i, a in enumerate(sums)]
        out += [f"{ind}    for w in range(1, WARPS):"] + [f"{ind}        {a}0 += red[{i} * WARPS + w]" for i, a in enumerate(sums)]
        out += [f"{ind}    y[p, r] = acc0 / math.sqrt(ss0 / float32(cols) + eps)" if norm else f"{ind}    y[p, r] = acc0",
                f"{ind}cuda.syncthreads()"]
        return out

    src = ["def kern(W, mats, xidx, x, y, rows, cols, mat_bytes" + (", nw, eps):" if norm else "):"),
           "    p = cuda.blockIdx.y",
           "    tid = cuda.threadIdx.x",
           "    mbase = int64(mats[p]) * mat_bytes"]
    first = "cuda.blockIdx.x"
    if preload:
        src += ["    r = cuda.blockIdx.x", "    rb = mbase + int64(min(r, rows - 1)) * (4 * cols)"]
        src += weights("    ", "P") + ["    grid_dependency()"]
    src += [f"    red = cuda.shared.array({2 * WARPS}, float32)", "    xr = xidx[p]"]
    if preload:
        src += ["    if r < rows:"] + row("        ", "P")
        first = "cuda.blockIdx.x + cuda.gridDim.x"
    src += [f"    for r in range({first}, rows, cuda.gridDim.x):",
            "        rb = mbase + int64(r) * (4 * cols)"]
    src += weights("        ", "w") + row("        ", "w")
    return _jit_source(src, f"f32rows preload={preload} norm={norm}", ldg4=ldg4, f32bits=f32bits, warp_sum=warp_sum)


def launch_f32rows(cols, rows, W, mats, xidx, x, y, P, mat_bytes, sms, preload=False, norm=None):
    """norm: (weight, eps), x rows rmsnorm'ed first."""
    gx = max(1, min(rows, 8 * BLOCKS_PER_SM * sms // P))
    _compiled(_make_f32rows, preload, norm is not None)[(gx, P), THREADS, STREAM[0]](
        W, mats, xidx, x, y, rows, cols, mat_bytes, *(norm or ()))


# -- generic: any type, any shape ---------------------------------------------------------------------

def _make_generic(qt: int, fused: bool):
    if qt in (Q4_0, Q8_0):
        BS = BLOCK_BYTES[qt]

        @cuda.jit(device=True, inline=True)
        def rowdot(W, base, x, xr, cols, tid):
            acc = float32(0.0)
            for b in range(tid, cols // 32, THREADS):
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
        def rowdot(W, base, x, xr, cols, tid):
            acc = float32(0.0)
            for i in range(tid, cols, THREADS):
                o = base + i * ES
                h = uint32(W[o]) | (uint32(W[o + 1]) << 8)
                if qt == F32:
                    v = f32bits(h | (uint32(W[o + 2]) << 16) | (uint32(W[o + 3]) << 24))
                elif qt == F16:
                    v = h2f(h)
                else:
                    v = bf2f(h)
                acc += v * x[xr, i]
            return warp_sum(acc)

    @cuda.jit
    def kern(W, W2, mats, xidx, x, y, rows, cols, row_bytes, mat_bytes):
        """One row per block at a time, its columns split over all the block's threads."""
        grid_dependency()
        red = cuda.shared.array(WARPS, float32)
        red2 = cuda.shared.array(WARPS, float32)
        p = cuda.blockIdx.y
        tid = cuda.threadIdx.x
        xr = xidx[p]
        mbase = int64(mats[p]) * mat_bytes
        for r in range(cuda.blockIdx.x, rows, cuda.gridDim.x):
            rb = mbase + int64(r) * row_bytes
            g = rowdot(W, rb, x, xr, cols, tid)
            u = rowdot(W2, rb, x, xr, cols, tid) if fused else float32(0.0)
            if (tid & 31) == 0:
                red[tid >> 5] = g
                red2[tid >> 5] = u
            cuda.syncthreads()
            if tid == 0:
                g = red[0]
                u = red2[0]
                for w in range(1, WARPS):
                    g += red[w]
                    u += red2[w]
                y[p, r] = silu(g) * u if fused else g
            cuda.syncthreads()

    return kern


_CACHE: dict = {}


def _compiled(make, *args):
    """make(*args): a kernel, generated once per arguments (numba compiles it at its first launch)."""
    key = (make, *args)
    if key not in _CACHE:
        _CACHE[key] = make(*args)
    return _CACHE[key]


def fast_ok(qt: int, cols: int) -> bool:
    return qt in (Q4_0, Q8_0) and cols % 64 == 0


def gemv_kernel(qt: int, cols: int, fused: bool):
    fast = fast_ok(qt, cols)
    return fast, _compiled(_make_fast if fast else _make_generic, qt, fused)


def launch_gemv(qt, cols, rows, W, W2, mats, xidx, x, y, P, row_bytes, mat_bytes, sms, fused=False, preload=False,
                norm=None, residual=None, skip=False, interleaved=False, spread=False, x_ready=False):
    """Launch the batched gemv (see the module doc) on device arrays; W, W2 uint32 words for the fast
    kernels (`fast_ok`), else uint8 bytes. Grid: BLOCKS_PER_SM blocks per SM, rows split over warps.
    preload: `mats` is constant or was written two or more kernels back, so the kernels that can start
    loading weights before the previous kernel ends (_make_fast2) do. norm: (weight, eps), x rows rmsnorm'ed
    first, on `norm_ok` shapes only; residual: [P, rows] added to y, on `residual_ok` shapes only; skip: the
    products with mats[p] < 0 are left out (fast2 shapes only); interleaved: W (and W2) are stored as
    `interleave` writes them (`interleaved_ok` shapes only); spread: see launch_fast2 (skip launches); x_ready: x
    (and xidx) were written two or more kernels back, so fast2 may quantize x before the wait."""
    assert norm is None or norm_ok(qt, cols, fused)
    assert not skip or fast2_ok(qt, cols)
    assert not interleaved or interleaved_ok(qt, rows, cols)
    assert residual is None or residual_ok(qt, cols, fused)
    if fast2_ok(qt, cols):
        return launch_fast2(qt, cols, rows, W, W2, mats, xidx, x, y, P, mat_bytes, sms, fused, preload=preload,
                            norm=norm, residual=residual, skip=skip, interleaved=interleaved, spread=spread,
                            x_ready=x_ready)
    if f32rows_ok(qt, cols, fused):
        return launch_f32rows(cols, rows, W, mats, xidx, x, y, P, mat_bytes, sms, preload, norm)
    assert norm is None
    if lanes_ok(qt, cols, fused):
        return launch_lanes(qt, cols, rows, W, mats, xidx, x, y, P, mat_bytes, preload)
    launch_gemv_v1(qt, cols, rows, W, W2, mats, xidx, x, y, P, row_bytes, mat_bytes, sms, fused)


def launch_gemv_v1(qt, cols, rows, W, W2, mats, xidx, x, y, P, row_bytes, mat_bytes, sms, fused=False):
    """The float32 kernels (fast: cols % 64 == 0 on Q4_0/Q8_0; generic: anything)."""
    fast, kern = gemv_kernel(qt, cols, fused)
    gx = max(1, min((rows + WARPS - 1) // WARPS, max(1, BLOCKS_PER_SM * sms // P)))
    if fast:
        kern[(gx, P), THREADS, STREAM[0], 4 * (cols + cols // 64 + 1)](W, W2, mats, xidx, x, y, rows, cols, mat_bytes // 4)
    else:                                           # the generic kernel: a block per row
        gx = max(1, min(rows, 8 * BLOCKS_PER_SM * sms // P))
        kern[(gx, P), THREADS, STREAM[0]](W, W2, mats, xidx, x, y, rows, cols, row_bytes, mat_bytes)


# -- fast2: Q4_0 / Q8_0 on int16 activations with dp2a (cols % 256 == 0, cols / 256 a power of 2) -----
#
# The CPU kernels' scheme on the GPU: each block quantizes its activation row once into shared memory
# as int16 per 32-block (d = max|x| / 32767, q = rint(x / d), exactly as backends/cpu/kernels.py), and
# a 32-value block's dot product is integer: dp2a (2 x int16 * 2 x 8-bit, accumulated in int32) over
# the raw bytes, so a quant word of 8 nibbles costs 3 logic ops + 4 dp2a and no int->float converts.
# block result = float(idot) * d_w * d_x, as on the CPU.
# Weights are read as "units" of 8 blocks (256 values): Q4_0 144 bytes = 9 x 16 B, Q8_0 272 = 17 x 16 B,
# so every unit starts 16-byte aligned and is read with 16-byte loads. A matrix is a flat run of units
# (rows are contiguous): a warp task is 32 consecutive units (lane = unit), i.e. 32/U rows when a row
# has U < 32 units, or one row of U >= 32 units; a segmented shuffle sum finishes each row.
# direct=True: each lane loads its own unit (9/17 x 16 B, stride 144/272 B across the warp: every
# sector is touched by two neighbouring lanes' loads); direct=False: the warp loads the 32 units
# coalesced (lane + 32 i) into a shared stage, then each lane reads its unit back (conflict-free:
# unit stride 36/68 words = 4 mod 32).
# x layout in shared memory (int32 words = int16 pairs): unit cu at word cu * 132 (128 + 4 pad, so
# lanes on different units hit different banks), then per 32-block d_x (float bits) at XW + 9 cu + b
# and the block's int16 sum (Q4_0's -8 offset) at XW + 9 U + 9 cu + b.



def _i32s(context, builder, sig, args):
    return [context.cast(builder, v, t, _t.int32) for v, t in zip(args, sig.args)]


@_intrinsic
def ldg4(typingctx, arr, idx):
    """4 uint32 words at word index idx (16-byte aligned) of a global uint32 array: ld.global.nc.v4."""
    rt = _t.UniTuple(_t.uint32, 4)

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        i = context.cast(builder, args[1], sig.args[1], _t.int64)
        addr = builder.ptrtoint(builder.gep(ary.data, [i]), _I64)
        r = _asm(builder, _ir.LiteralStructType([_I32] * 4), [_I64],
                 "{.reg .u64 g; cvta.to.global.u64 g, $4; ld.global.nc.v4.u32 {$0,$1,$2,$3}, [g];}",
                 "=r,=r,=r,=r,l", [addr])
        return context.make_tuple(builder, rt, [builder.extract_value(r, k) for k in range(4)])
    return rt(arr, idx), codegen


# 32-bit shared-window addresses and 64-bit global addresses (fast2): numba's array indexing is int64 with a
# negative-index fix-up per access, and a 64-bit generic address per shared access; these take an address the
# kernel computes once per task (int32 offsets from there), so ptxas folds the constant offsets into the loads.

@_intrinsic
def smem_base16(typingctx, arr):
    """The 32-bit shared-window byte address of arr[0] (a shared array) rounded up to 16 bytes, i.e. of
    the first word a 16-byte (v4) access may use (numba aligns dynamic shared memory to 4 bytes only)."""
    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        addr = builder.ptrtoint(ary.data, _I64)
        return _asm(builder, _I32, [_I64],
                    "{.reg .u64 s; .reg .b32 w; cvta.to.shared.u64 s, $1; cvt.u32.u64 w, s; add.u32 w, w, 15; "
                    "and.b32 $0, w, -16;}", "=r,l", [addr])
    return _t.int32(arr), codegen


@_intrinsic
def lds4a(typingctx, addr):
    """4 words at shared byte address addr (32-bit, 16-byte aligned): ld.shared.v4."""
    rt = _t.UniTuple(_t.uint32, 4)

    def codegen(context, builder, sig, args):
        a = context.cast(builder, args[0], sig.args[0], _t.int32)
        r = _asm(builder, _ir.LiteralStructType([_I32] * 4), [_I32], "ld.shared.v4.u32 {$0,$1,$2,$3}, [$4];",
                 "=r,=r,=r,=r,r,~{memory}", [a], side_effect=True)
        return context.make_tuple(builder, rt, [builder.extract_value(r, k) for k in range(4)])
    return rt(addr), codegen


@_intrinsic
def lds1a(typingctx, addr):
    """The int32 word at shared byte address addr (32-bit): ld.shared."""
    def codegen(context, builder, sig, args):
        a = context.cast(builder, args[0], sig.args[0], _t.int32)
        return _asm(builder, _I32, [_I32], "ld.shared.u32 $0, [$1];", "=r,r,~{memory}", [a], side_effect=True)
    return _t.int32(addr), codegen


@_intrinsic
def sts1a(typingctx, addr, v):
    """Store the low 32 bits of v at shared byte address addr (32-bit): st.shared."""
    def codegen(context, builder, sig, args):
        _asm(builder, _ir.VoidType(), [_I32, _I32], "st.shared.u32 [$0], $1;", "r,r,~{memory}",
             _i32s(context, builder, sig, args), side_effect=True)
        return context.get_dummy_value()
    return _t.none(addr, v), codegen


@_intrinsic
def sts4a(typingctx, addr, a, b, c, d):
    """Store 4 words at shared byte address addr (32-bit, 16-byte aligned): st.shared.v4."""
    def codegen(context, builder, sig, args):
        _asm(builder, _ir.VoidType(), [_I32] * 5, "st.shared.v4.u32 [$0], {$1,$2,$3,$4};", "r,r,r,r,r,~{memory}",
             _i32s(context, builder, sig, args), side_effect=True)
        return context.get_dummy_value()
    return _t.none(addr, a, b, c, d), codegen


@_intrinsic
def gaddr(typingctx, arr, i):
    """The global byte address (int64) of row i of a 2-D array (data + i * strides[0]); of a 1-D array, of
    arr[0] (i unused)."""
    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        addr = builder.ptrtoint(ary.data, _I64)
        if sig.args[0].ndim == 2:
            stride = builder.extract_value(ary.strides, 0)
            addr = builder.add(addr, builder.mul(context.cast(builder, args[1], sig.args[1], _t.int64), stride))
        return _asm(builder, _I64, [_I64], "cvta.to.global.u64 $0, $1;", "=l,l", [addr])
    return _t.int64(arr, i), codegen


@_intrinsic
def ldg4a(typingctx, addr):
    """4 uint32 words at global byte address addr (int64, 16-byte aligned; weights no kernel writes):
    ld.global.nc.v4."""
    rt = _t.UniTuple(_t.uint32, 4)

    def codegen(context, builder, sig, args):
        a = context.cast(builder, args[0], sig.args[0], _t.int64)
        r = _asm(builder, _ir.LiteralStructType([_I32] * 4), [_I64], "ld.global.nc.v4.u32 {$0,$1,$2,$3}, [$4];",
                 "=r,=r,=r,=r,l", [a])
        return context.make_tuple(builder, rt, [builder.extract_value(r, k) for k in range(4)])
    return rt(addr), codegen


@_intrinsic
def ldg4a_if(typingctx, addr, ok):
    """ldg4a(addr) where ok (an int), else no load and the 4 words undefined: a predicated ld.global.nc.v4,
    for a load that is wasted when it is past the end (fast2's next chunk)."""
    rt = _t.UniTuple(_t.uint32, 4)

    def codegen(context, builder, sig, args):
        a = context.cast(builder, args[0], sig.args[0], _t.int64)
        k = context.cast(builder, args[1], sig.args[1], _t.int32)
        r = _asm(builder, _ir.LiteralStructType([_I32] * 4), [_I64, _I32],
                 "{.reg .pred p; setp.ne.s32 p, $5, 0; @p ld.global.nc.v4.u32 {$0,$1,$2,$3}, [$4];}",
                 "=r,=r,=r,=r,l,r", [a, k])
        return context.make_tuple(builder, rt, [builder.extract_value(r, j) for j in range(4)])
    return rt(addr, ok), codegen


@_intrinsic
def ldgf(typingctx, addr):
    """The float32 at global byte address addr (int64): ld.global, kept in program order (after
    grid_dependency(): the kernel before may have written it)."""
    def codegen(context, builder, sig, args):
        a = context.cast(builder, args[0], sig.args[0], _t.int64)
        return _asm(builder, _ir.FloatType(), [_I64], "ld.global.f32 $0, [$1];", "=f,l,~{memory}", [a],
                    side_effect=True)
    return _t.float32(addr), codegen


@_intrinsic
def ldgf_if(typingctx, addr, ok):
    """ldgf(addr) where ok (an int or bool), else 0.0 (no load): a predicated ld.global."""
    def codegen(context, builder, sig, args):
        a = context.cast(builder, args[0], sig.args[0], _t.int64)
        k = context.cast(builder, args[1], sig.args[1], _t.int32)
        return _asm(builder, _ir.FloatType(), [_I64, _I32],
                    "{.reg .pred p; setp.ne.s32 p, $2, 0; mov.b32 $0, 0; @p ld.global.f32 $0, [$1];}",
                    "=f,l,r,~{memory}", [a, k], side_effect=True)
    return _t.float32(addr, ok), codegen


@_intrinsic
def ld_acquire(typingctx, addr):
    """The int64 at global byte address addr, read from L2 (ld.acquire.gpu: not a stale L1 line) and before any
    access after it: for a word another kernel running beside this one writes, and what it wrote before it."""
    def codegen(context, builder, sig, args):
        a = context.cast(builder, args[0], sig.args[0], _t.int64)
        return _asm(builder, _I64, [_I64], "ld.acquire.gpu.global.b64 $0, [$1];", "=l,l,~{memory}", [a],
                    side_effect=True)
    return _t.int64(addr), codegen


@_intrinsic
def globaltimer(typingctx):
    """The GPU's clock in ns (%globaltimer): the copy kernel's bounded wait, bench_cuda.py's timeline."""
    def codegen(context, builder, sig, args):
        return _asm(builder, _I64, [], "mov.u64 $0, %globaltimer;", "=l", [], side_effect=True)
    return _t.int64(), codegen


@_intrinsic
def stgf(typingctx, addr, v):
    """Store the float32 v at global byte address addr (int64): st.global."""
    def codegen(context, builder, sig, args):
        a = context.cast(builder, args[0], sig.args[0], _t.int64)
        f = context.cast(builder, args[1], sig.args[1], _t.float32)
        _asm(builder, _ir.VoidType(), [_I64, _ir.FloatType()], "st.global.f32 [$0], $1;", "l,f,~{memory}", [a, f],
             side_effect=True)
        return context.get_dummy_value()
    return _t.none(addr, v), codegen


@_intrinsic
def stg4a(typingctx, addr, a, b, c, d):
    """Store 4 uint32 words at global byte address addr (int64, 16-byte aligned): st.global.v4."""
    def codegen(context, builder, sig, args):
        ad = context.cast(builder, args[0], sig.args[0], _t.int64)
        ws = [context.cast(builder, v, ty, _t.uint32) for v, ty in zip(args[1:], sig.args[1:])]
        _asm(builder, _ir.VoidType(), [_I64] + [_I32] * 4, "st.global.v4.u32 [$0], {$1,$2,$3,$4};",
             "l,r,r,r,r,~{memory}", [ad] + ws, side_effect=True)
        return context.get_dummy_value()
    return _t.none(addr, a, b, c, d), codegen


@_intrinsic
def sar32(typingctx, a, n):
    """a >> n, 32-bit arithmetic (numba's is 64-bit: two shifts, and 64-bit address math after)."""
    def codegen(context, builder, sig, args):
        return _asm(builder, _I32, [_I32, _I32], "shr.s32 $0, $1, $2;", "=r,r,r", _i32s(context, builder, sig, args))
    return _t.int32(a, n), codegen


def _has_redux() -> bool:
    return _compute_capability_at_least((8, 0))       # redux.sync


@_intrinsic
def warp_sum_i32(typingctx, v):
    """The int32 sum of v over the (full) warp, to every lane: redux.sync.add (one instruction for a 5-step
    shuffle tree; integer, so the same sum in any order)."""
    def codegen(context, builder, sig, args):
        return _asm(builder, _I32, [_I32], "redux.sync.add.s32 $0, $1, 0xffffffff;", "=r,r",
                    _i32s(context, builder, sig, args), side_effect=True)
    return _t.int32(v), codegen


@_intrinsic
def q4dot(typingctx, q, x0, x1, x2, x3, acc):
    """acc + sum over the 4 low nibbles of q (x pairs x0, x1) and 4 high nibbles (x2, x3): unsigned
    nibbles times int16 activations, 3 logic ops + 4 dp2a."""
    def codegen(context, builder, sig, args):
        return _asm(builder, _I32, [_I32] * 6,
                    "{.reg .b32 lo, hi, t; and.b32 lo, $1, 0x0F0F0F0F; shr.u32 hi, $1, 4; "
                    "and.b32 hi, hi, 0x0F0F0F0F; dp2a.lo.s32.u32 t, $2, lo, $6; dp2a.hi.s32.u32 t, $3, lo, t; "
                    "dp2a.lo.s32.u32 t, $4, hi, t; dp2a.hi.s32.u32 $0, $5, hi, t;}",
                    "=r,r,r,r,r,r,r", _i32s(context, builder, sig, args))
    return _t.int32(q, x0, x1, x2, x3, acc), codegen


@_intrinsic
def q8dot(typingctx, q, x0, x1, acc):
    """acc + the 4 signed bytes of q times the int16 pairs x0, x1: 2 dp2a."""
    def codegen(context, builder, sig, args):
        return _asm(builder, _I32, [_I32] * 4,
                    "{.reg .b32 t; dp2a.lo.s32.s32 t, $2, $1, $4; dp2a.hi.s32.s32 $0, $3, $1, t;}",
                    "=r,r,r,r,r", _i32s(context, builder, sig, args))
    return _t.int32(q, x0, x1, acc), codegen


@_intrinsic
def hi16lo16(typingctx, a, b):
    """(a >> 16) | (b << 16): the word that starts 2 bytes into a (prmt)."""
    def codegen(context, builder, sig, args):
        return _asm(builder, _I32, [_I32] * 2, "prmt.b32 $0, $1, $2, 0x5432;", "=r,r,r",
                    _i32s(context, builder, sig, args))
    return _t.int32(a, b), codegen


def _half_f32(hi: bool):
    @_intrinsic
    def h(typingctx, w):
        def codegen(context, builder, sig, args):
            pick = "h" if hi else "l"
            return _asm(builder, _ir.FloatType(), [_I32],
                        "{.reg .b16 l, h; mov.b32 {l, h}, $1; cvt.f32.f16 $0, %s;}" % pick, "=f,r",
                        _i32s(context, builder, sig, args))
        return _t.float32(w), codegen
    return h


lo_f16 = _half_f32(False)   # float32 of the fp16 in the low 16 bits of a word
hi_f16 = _half_f32(True)


def _unit_code(qt: int, W: str, acc: str, ind: str, after=None) -> list[str]:
    """Source lines: acc += this lane's unit (words {W}0..) against x unit cu: its int16 pairs at shared byte
    address xu, its blocks' d_x at sb (+ 4 b) and (Q4_0) int16 sums at sq (+ 4 b). after(b, words): lines
    to place after block b, given the words no later block reads (fast2 reloads them for the next task)."""
    L, blocks, start = [], [], 0
    PW = 9 if qt == Q4_0 else 17          # words per pair of blocks
    NQ = 4 if qt == Q4_0 else 8           # quant words per block
    for b in range(8):
        k = b // 2
        base = PW * k
        if b % 2 == 0:
            L.append(f"dw = lo_f16({W}{base})")
            qs = [f"hi16lo16({W}{base + j}, {W}{base + j + 1})" for j in range(NQ)]
        else:
            L.append(f"dw = hi_f16({W}{base + NQ})")
            qs = [f"{W}{base + NQ + 1 + j}" for j in range(NQ)]
        L.append(f"a0, a1, a2, a3 = lds4a(xu + {64 * b})")
        L.append(f"a4, a5, a6, a7 = lds4a(xu + {64 * b + 16})")
        L.append(f"a8, a9, a10, a11 = lds4a(xu + {64 * b + 32})")
        L.append(f"a12, a13, a14, a15 = lds4a(xu + {64 * b + 48})")
        if qt == Q4_0:
            L.append(f"s = q4dot({qs[0]}, a0, a1, a8, a9, zero)")
            for j in range(1, 4):
                L.append(f"s = q4dot({qs[j]}, a{2 * j}, a{2 * j + 1}, a{8 + 2 * j}, a{9 + 2 * j}, s)")
            L.append(f"s = int32(s - (lds1a(sq + {4 * b}) << 3))")
        else:
            L.append(f"s = q8dot({qs[0]}, a0, a1, zero)")
            for j in range(1, 8):
                L.append(f"s = q8dot({qs[j]}, a{2 * j}, a{2 * j + 1}, s)")
        L.append(f"{acc} += float32(s) * dw * libdevice.int_as_float(lds1a(sb + {4 * b}))")
        if after is not None:
            blocks.append(L[start:])
            start = len(L)
    if after is not None:     # a word is free after the last block that names it
        last = {int(w): b for b, lines in enumerate(blocks) for w in re.findall(rf"\b{W}(\d+)\b", " ".join(lines))}
        L = [line for b, lines in enumerate(blocks)
             for line in lines + after(b, sorted(w for w, lb in last.items() if lb == b))]
    return [ind + s for s in L]


X_LOADS = 8                # fast2: x values a lane loads before quantizing them (4096 columns at 16 warps: all)
# fast2: the groups of a warp's X_LOADS x blocks that it quantizes together (their shuffle reductions interleaved:
# one chain's latency per group, not one per block); a group runs when its first block is in the row, so short
# rows (1024 columns: 2 blocks a warp, 2048: 4) skip the rest. Q8_0's plain kernel keeps 62 registers (2 blocks
# per SM) with groups of 2, 74 with 4 (`bench/kernel_registers.py`). Chosen by `bench/ab_configs.py $F quantize`.
QUANT_GROUPS = {Q4_0: (2, 2, 4), Q8_0: (2, 2, 2, 2)}
# fast2 (direct): the first PIPELINED[qt] of a unit's 16-byte vectors are loaded one chunk ahead, each as soon as the
# chunk before has read its old words, so a warp's next loads are in flight while it sums and stores; the rest at
# the chunk's start. The words loaded ahead stay live across the loop: Q4_0's whole unit (9 vectors) keeps 72-125
# registers (`bench/kernel_registers.py`); Q8_0's (17) would need 128-253.
PIPELINED = {Q4_0: 9, Q8_0: 0}


def _make_fast2(qt: int, fused: bool, warps: int, direct: bool, preload: bool = False, norm: bool = False,
                residual: bool = False, skip: bool = False, interleaved: bool = False, x_ready: bool = False):
    """preload (plain, direct, cols <= 8192): the warp's first task's weight words are loaded before
    grid_dependency(), i.e. while the kernel before this one still runs; for launches whose `mats` were
    written two or more kernels back (or never: dense weights), which that kernel's start has waited for.
    x_ready (not preload, not skip): likewise for x and xidx: the quantize prologue (and norm) runs before the
    wait, and only `mats` is read after it (the routed experts' gate/up: their x is three kernels back).
    norm (`fast2_norm_ok` columns): x row xr is rmsnorm'ed (weight nw, eps) before it is quantized, so the
    norm costs no launch of its own (every layer's two norms, the output norm, MLA's q_a norm).
    residual (plain): y = W x + res, res [P, rows]: the residual stream's add in the store (attn_output).
    skip: products p with mats[p] < 0 are left out (their blocks return at once, y[p] untouched): streamed
    experts run their hits while the misses are copied, then the misses (CUDABackend.expert_ffn). Only that
    variant tests it: the test would put the mats load in front of every other load of the kernel.
    Index arithmetic is int32 (numba's is int64: every `int32(...)` below narrows it), from two 64-bit bases
    per task (the matrix's global address, mats[p] * mat_words words in: can pass 2^31 in a streamed pool);
    shared memory is addressed by 32-bit byte addresses (lds4a/lds1a/sts1a: no 64-bit generic addresses).
    interleaved (direct): the weights are stored as `interleave` writes them, so a task's loads are 512
    contiguous bytes per instruction; the arithmetic is the same, so are the results, bit for bit.
    direct: a warp's chunks are pipelined: each loads (the first PIPELINED[qt] vectors of) the next one's words
    as it reads its own (`reload`), so the next loads are in flight while it sums and stores."""
    assert not preload or (direct and not fused)
    assert not (x_ready and (preload or skip))
    assert not interleaved or direct
    assert not (residual and fused)
    UV = UNIT_VECTORS[qt]                  # 16-byte vectors per unit
    UW = 4 * UV                            # words per unit
    redux = _has_redux()
    mats = ["W"] + (["W2"] if fused else [])
    accs = ["acc"] + (["acc2"] if fused else [])
    src = ["def kern(W, W2, mats, xidx, x, y, rows, cols, mat_words, log2u" + (", nw, eps" if norm else "")
           + (", res):" if residual else "):"),
           "    p = cuda.blockIdx.y"]
    src += ["    if mats[p] < 0:", "        return"] if skip else []
    src += ["    lane = int32(cuda.threadIdx.x & 31)",
            "    warp = int32(cuda.threadIdx.x >> 5)",
            "    U = int32(cols >> 8)",
            "    total = int32(rows * U)"]              # units in a matrix (< 2^31: its words are < 2^32 * 4)
    offset = ["    mp = int64(mats[p]) * (mat_words * 4)"]  # the matrix's byte offset in W (64-bit)
    src += [] if x_ready else offset
    tasks = ["    CPT = int32(max(int32(1), int32(U >> 5)))",
             "    tsh = int32(max(int32(5), int32(log2u)))",         # 32 CPT = max(32, U) = 1 << tsh
             "    ntask = int32(int32(total + int32(1 << tsh) - 1) >> tsh)",
             "    step = int32(cuda.gridDim.x * " + str(warps) + ")",
             f"    t = int32(cuda.blockIdx.x * {warps} + warp)"]
    VS = 512 if interleaved else 16    # bytes between a lane's vectors (direct)

    AHEAD = range(PIPELINED[qt])        # direct: the vectors a chunk loads for the next one (see PIPELINED)

    def chunk_words(m: str, base: str, u0: str, ok: str | None, vectors) -> list[str]:
        """direct: load this lane's unit of the chunk of 32 units from unit u0 (interleaved, the chunk's vectors
        lie 512 bytes apart) of matrix m at byte address base into words {m}w*: the vectors given, where ok."""
        at = (f"{base} + int64(uint32({u0})) * {4 * UW} + 16 * lane" if interleaved else
              f"{base} + int64(uint32(min(int32({u0} + lane), int32(total - 1)))) * {4 * UW}")
        load = (lambda i: f"ldg4a(a{m} + {VS * i})") if ok is None else (lambda i: f"ldg4a_if(a{m} + {VS * i}, {ok})")
        return [f"a{m} = {at}"] + [f"{m}w{4 * i}, {m}w{4 * i + 1}, {m}w{4 * i + 2}, {m}w{4 * i + 3} = {load(i)}"
                                   for i in vectors]

    if direct:   # the warp's first chunk: before the wait where preload (weights no kernel writes), else after it
        first = [f"    {line}" for m in mats for line in chunk_words(m, f"gaddr({m}, 0) + mp", "int32(t * CPT * 32)",
                                                                      "int32(t < ntask)", AHEAD)] if AHEAD else []
        src += (tasks + first + ["    grid_dependency()"]) if preload else []
    # shared memory, in bytes from XA0 (16-byte aligned; word sk of the dynamic array, see the layout above):
    # x unit cu at XA0 + 528 cu, d_x of block b of unit cu at DA0 + 36 cu + 4 b, its int16 sum at SA0 + 36 cu +
    # 4 b, the warps' stages (direct=False) from STA
    src += [
        "    sm = cuda.shared.array(0, int32)",
        "    XA0 = smem_base16(sm)",
        "    DA0 = int32(XA0 + U * 528)",
        "    SA0 = int32(DA0 + U * 36)",
        "    zero = int32(0)",
        # quantize x row xr: a warp takes 32-blocks warp, warp + warps, ... (lane = element), X_LOADS at a
        # time, all loaded before the first is quantized (stores to shared memory would hold back later loads)
        "    nblk = int32(cols >> 5)",
        "    xa = gaddr(x, xidx[p]) + 4 * lane",
    ]
    if norm:
        src += [f"    red = cuda.shared.array({warps}, float32)",
                "    na = gaddr(nw, 0) + 4 * lane"]
    src += ["    r = warp", "    while r < nblk:"]
    src.append("        ro = int32(r << 7)")
    # blocks past the row are not loaded (v = 0: not used), the rest at constant offsets from one address
    src += ["        xb = xa + int64(uint32(ro))"]
    src += [f"        v{i} = ldgf_if(xb + {i * warps * 128}, int32(r + {i * warps}) < nblk)" for i in range(X_LOADS)]
    if norm:   # one pass of this loop holds the whole row (fast2_norm_ok): every warp is in it, once
        src += ["        nb = na + int64(uint32(ro))"]
        src += [f"        n{i} = ldgf_if(nb + {i * warps * 128}, int32(r + {i * warps}) < nblk)" for i in range(X_LOADS)]
        src.append("        ss = float32(0.0)")
        for i in range(X_LOADS):
            src += [f"        if int32(r + {i * warps}) < nblk:", f"            ss += v{i} * v{i}"]
        src += ["        for o in (16, 8, 4, 2, 1):",
                "            ss += cuda.shfl_xor_sync(0xffffffff, ss, o)",
                "        if lane == 0:",
                "            red[warp] = ss",
                "        cuda.syncthreads()",
                "        ss = red[0]",
                f"        for w in range(1, {warps}):",
                "            ss += red[w]",
                "        inv = float32(1.0) / math.sqrt(ss / float32(cols) + eps)"]
        src += [f"        v{i} = v{i} * inv * n{i}" for i in range(X_LOADS)]
    # block r + i warps: unit (r >> 3) + (i warps >> 3), block (r & 7) when warps % 8 == 0 (constant offsets)
    src += ["        qa = int32(XA0 + (r >> 3) * 528 + (r & 7) * 64 + ((lane >> 1) << 2))",
            "        da = int32(DA0 + (r >> 3) * 36 + (r & 7) * 4)"]
    # QUANT_GROUPS[qt]: each step of a group's reductions issued for all its blocks together; a block past the row
    # quantizes its zeros and stores nothing
    assert sum(QUANT_GROUPS[qt]) == X_LOADS
    for k, gs in enumerate(QUANT_GROUPS[qt]):
        g0 = sum(QUANT_GROUPS[qt][:k])
        group = range(g0, g0 + gs)
        src.append(f"        if int32(r + {g0 * warps}) < nblk:")
        n0 = len(src)
        src += [f"        a{i} = abs(v{i})" for i in group]
        for o in (16, 8, 4, 2, 1):
            src += [f"        a{i} = max(a{i}, cuda.shfl_xor_sync(0xffffffff, a{i}, {o}))" for i in group]
        src += [f"        d{i} = a{i} / float32(32767.0)" for i in group]
        src += [f"        e{i} = float32(1.0) / d{i} if d{i} > float32(0.0) else float32(0.0)" for i in group]
        src += [f"        q{i} = int32(libdevice.rintf(v{i} * e{i}))" for i in group]
        src += [f"        qn{i} = cuda.shfl_down_sync(0xffffffff, q{i}, 1)" for i in group]
        if redux:                                                      # |sum| < 2^21: int32 exact
            src += [f"        qs{i} = warp_sum_i32(q{i})" for i in group]
        else:
            src += [f"        qs{i} = q{i}" for i in group]
            for o in (16, 8, 4, 2, 1):
                src += [f"        qs{i} = int32(qs{i} + cuda.shfl_xor_sync(0xffffffff, qs{i}, {o}))" for i in group]
        for i in group:
            if warps % 8 == 0:
                qa, da = f"qa + {528 * (i * warps // 8)}", f"da + {36 * (i * warps // 8)}"
            else:
                qa = f"XA0 + ((r + {i * warps}) >> 3) * 528 + ((r + {i * warps}) & 7) * 64 + ((lane >> 1) << 2)"
                da = f"DA0 + ((r + {i * warps}) >> 3) * 36 + ((r + {i * warps}) & 7) * 4"
            src += [
                f"        if int32(r + {i * warps}) < nblk:",
                "            if (lane & 1) == 0:",
                f"                sts1a({qa}, (q{i} & 0xffff) | (qn{i} << 16))",
                "            if lane == 0:",
                f"                di = int32({da})",
                f"                sts1a(di, libdevice.float_as_int(d{i}))",
                f"                sts1a(di + (SA0 - DA0), qs{i})",
            ]
        src[n0:] = ["    " + line for line in src[n0:]]
    src.append(f"        r = int32(r + {warps * X_LOADS})")
    src += ["    cuda.syncthreads()", "    SEG = int32(min(U, int32(32)))"] + ([] if direct and preload else tasks)
    src += (["    grid_dependency()"] + offset) if x_ready else []
    src += [f"    g{m} = gaddr({m}, 0) + mp" for m in mats]
    src += ["    ya = gaddr(y, p)", "    nrows = int32(rows)", "    l2u = int32(log2u)"]
    src += ["    ra = gaddr(res, p)"] if residual else []
    if not direct:   # the warp's stage: word ST + warp * 32 UW of the layout above
        src.append(f"    STW = int32(SA0 + 4 * (9 * U + ((4 - ((18 * U) & 3)) & 3)) + warp * {128 * UW})")

    def reload(m: str):
        """_unit_code's `after` for direct kernels: each 16-byte vector of m's words, once no later block of
        this unit reads it, is loaded again from the warp's next chunk (a register's load issued as early as
        its old value allows: the next chunk's bytes are in flight while this one is summed and stored)."""
        free: set[int] = set()
        done: set[int] = set()

        def after(b: int, words: list[int]) -> list[str]:
            free.update(words)
            ready = [i for i in AHEAD if i not in done and free >= {4 * i, 4 * i + 1, 4 * i + 2, 4 * i + 3}]
            done.update(ready)
            return chunk_words(m, f"g{m}", "int32((tn * CPT + cn) * 32)", "okn", ready) if ready else []
        return after

    def task(ind: str) -> list[str]:
        """One warp task t (CPT chunks of 32 units): dot products, segmented sums, stores. direct: each chunk's
        words were loaded by the chunk before it (or before the loop), and it loads the next one's."""
        L = [f"{a} = float32(0.0)" for a in accs]
        L += ["for c in range(CPT):",
              "    u0 = int32((t * CPT + c) * 32)",
              "    cu = int32((u0 + lane) & (U - 1))",
              "    xu = int32(XA0 + cu * 528)",
              "    sb = int32(DA0 + cu * 36)"]
        if qt == Q4_0:
            L.append("    sq = int32(SA0 + cu * 36)")
        if direct and AHEAD:      # the chunk after this one: the task's next, else the warp's next task's first
            L += ["    last = c + 1 == CPT",
                  "    tn = int32(t + step) if last else t",
                  "    cn = int32(0) if last else int32(c + 1)",
                  "    okn = int32(tn < ntask)"]
        elif not direct:
            L.append(f"    nv = int32(min(32, total - u0) * {UV})")
            L.append(f"    uo = int64(uint32(u0)) * {4 * UW}")
        for m, a in zip(mats, accs):
            if direct:
                rest = range(len(AHEAD), UV)
                L += [f"    {line}" for line in chunk_words(m, f"g{m}", "u0", None, rest)] if rest else []
                L += _unit_code(qt, f"{m}w", a, "    ", after=reload(m))
                continue
            L.append(f"    ga = g{m} + uo")
            for i in range(UV):
                L.append(f"    vi = int32(min(int32(lane + {32 * i}), int32(nv - 1)))")
                L.append("    r0, r1, r2, r3 = ldg4a(ga + int64(uint32(vi)) * 16)")
                L.append(f"    sts4a(STW + {512 * i} + 16 * lane, r0, r1, r2, r3)")
            L.append("    cuda.syncwarp()")
            for i in range(UV):
                L.append(f"    {m}w{4 * i}, {m}w{4 * i + 1}, {m}w{4 * i + 2}, {m}w{4 * i + 3} = "
                         f"lds4a(STW + lane * {4 * UW} + {16 * i})")
            L.append("    cuda.syncwarp()")
            L += _unit_code(qt, f"{m}w", a, "    ")
        # segmented: the sum of the row's SEG lanes. Unrolled (numba keeps a loop over a tuple with a test); every
        # shuffle is taken (no branch around it), its value added where the segment spans it
        for o in (16, 8, 4, 2, 1):          # (fused: both rows' steps together)
            L += [f"sh{a} = cuda.shfl_xor_sync(0xffffffff, {a}, {o})" for a in accs]
            L += [f"if SEG > {o}:"] + [f"    {a} += sh{a}" for a in accs]
        L += ["if int32(lane & int32(SEG - 1)) == 0:",
              "    row = sar32(int32(t * CPT * 32 + lane), l2u)",
              "    if row < nrows:",
              "        stgf(ya + int64(uint32(row)) * 4, silu(acc) * acc2)" if fused else
              "        stgf(ya + int64(uint32(row)) * 4, acc + ldgf(ra + int64(uint32(row)) * 4))" if residual else
              "        stgf(ya + int64(uint32(row)) * 4, acc)"]
        return [ind + line for line in L]

    if direct and not preload:
        src += first
    src.append("    while t < ntask:")        # (a range() would divide for its trip count)
    src += task("        ") + ["        t = int32(t + step)"]
    return _jit_source(src, f"fast2 {qt} fused={fused} warps={warps} direct={direct} preload={preload} norm={norm} "
                       f"residual={residual} interleaved={interleaved} x_ready={x_ready}", max_registers=65536 // (32 * warps) & ~7,
                       ldg4a=ldg4a, ldg4a_if=ldg4a_if, ldgf=ldgf,
                       gaddr=gaddr, lds4a=lds4a, lds1a=lds1a, sts1a=sts1a, sts4a=sts4a, smem_base16=smem_base16,
                       stgf=stgf, ldgf_if=ldgf_if, sar32=sar32, warp_sum_i32=warp_sum_i32, q4dot=q4dot, q8dot=q8dot, hi16lo16=hi16lo16,
                       lo_f16=lo_f16, hi_f16=hi_f16, silu=silu)


CHUNK = 32                 # fast2: units (8 blocks: a lane's share of a row) per warp task


def interleaved_ok(qt: int, rows: int, cols: int) -> bool:
    """Matrices of this shape are stored interleaved on the GPU (`interleave`): fast2 shapes whose units fill
    whole chunks (every quantized matrix of Small 4); the rest stay in the file's order."""
    return fast2_ok(qt, cols) and rows * (cols // 256) % CHUNK == 0


def interleave(raw: np.ndarray, qt: int) -> np.ndarray:
    """GGUF blocks (uint8, whole chunks of units: `interleaved_ok`) in fast2's interleaved layout: per chunk of
    CHUNK units, the units' 16-byte vector 0 one after another, then vector 1, ..., so a warp's i-th load
    reads 512 contiguous bytes (lane l: unit l's vector i) rather than 32 vectors a unit (144 or 272 bytes)
    apart: 1.1-1.35x the bandwidth (H100, docs/PERFORMANCE.md). The host's version of interleave_kernel."""
    a = np.asarray(raw, np.uint8).reshape(-1, CHUNK, UNIT_VECTORS[qt], 16)
    return np.ascontiguousarray(a.transpose(0, 2, 1, 3)).reshape(-1)


@cuda.jit(device=True, inline=True)
def _interleaved_vector(v, uv):
    """Where 16-byte vector v of GGUF-ordered units (uv vectors each) goes in the interleaved layout."""
    u = v // uv
    return ((u >> 5) * uv + (v - u * uv)) * CHUNK + (u & 31)


@cuda.jit
def interleave_kernel(src, dst, uv):
    """dst (uint32 words) = src's whole chunks of units interleaved (`interleave`), a thread per 16-byte vector;
    an upload's second step, on the GPU (numpy's transpose runs at ~1 GB/s: a minute for Small 4)."""
    grid_dependency()
    a, b = gaddr(src, 0), gaddr(dst, 0)
    for v in range(cuda.grid(1), src.shape[0] >> 2, cuda.gridsize(1)):
        w0, w1, w2, w3 = ldg4a(a + int64(v) * 16)
        stg4a(b + int64(_interleaved_vector(v, uv)) * 16, w0, w1, w2, w3)


def fast2_ok(qt: int, cols: int) -> bool:
    u = cols // 256
    return qt in (Q4_0, Q8_0) and cols % 256 == 0 and u & (u - 1) == 0


# Chosen by `bench/bench_cuda.py --sweep` on an H100 (2026-11-23): best mean ratio over Small 4's four shapes.
# The staged variants (direct=False) were slower, and their fused forms failed to launch (CUDA_ERROR_INVALID_VALUE).
# bps: blocks per SM (plain, fused) = what fits an SM by registers (`bench/kernel_registers.py`, session 20: Q4_0
# 70-125, Q8_0 62-78 per thread x 512 threads), so a launch is one wave: a second wave waits for the first's slowest warp (H100, 2026-11-23:
# routed experts Q4_0 gate+up 30.0 -> 24.3 us, down 19.0 -> 14.9 us).
# preload (_make_fast2): Q4_0 only; Q8_0's plain kernel would need 128 registers per thread, one block per SM, not 2.
# Every fast2 kernel is compiled with at most 65536 / threads registers, so a block always launches (a variant past
# it spills instead: Q4_0 with a strided x, norm, preload and residual needs 140).
FAST2 = {Q4_0: dict(warps=16, direct=True, bps=(1, 1), preload=True),
         Q8_0: dict(warps=16, direct=True, bps=(2, 1), preload=False)}


def fast2_kernel(qt: int, fused: bool, warps: int, direct: bool, preload: bool = False, norm: bool = False,
                 residual: bool = False, skip: bool = False, interleaved: bool = False, x_ready: bool = False):
    return _compiled(_make_fast2, qt, fused, warps, direct, preload, norm, residual, skip, interleaved, x_ready)


def fast2_norm_ok(qt: int, cols: int) -> bool:
    """fast2 can rmsnorm its x row first: one pass of its quantize loop holds the row, and every warp has a part."""
    warps = FAST2.get(qt, {}).get("warps", 0)
    return fast2_ok(qt, cols) and 32 * warps <= cols <= 32 * warps * X_LOADS


def norm_ok(qt: int, cols: int, fused: bool) -> bool:
    """launch_gemv can take norm= on this shape (fast2's quantize prologue; f32rows holds the whole row)."""
    return fast2_norm_ok(qt, cols) or f32rows_ok(qt, cols, fused)


def residual_ok(qt: int, cols: int, fused: bool) -> bool:
    """launch_gemv can take residual= on this shape (fast2's store)."""
    return fast2_ok(qt, cols) and not fused


def launch_fast2(qt, cols, rows, W, W2, mats, xidx, x, y, P, mat_bytes, sms, fused=False, warps=None, direct=None,
                 bps=None, preload=False, norm=None, residual=None, skip=False, interleaved=False, spread=False,
                 x_ready=False):
    """preload: `mats` was written two or more kernels back, or is constant (see _make_fast2); taken where
    the kernel has that variant (plain, direct, cols <= 8192); x_ready: so were x and xidx (taken where no
    preload or skip is). norm: (weight, eps) to rmsnorm x rows with first
    (`fast2_norm_ok` shapes); residual: [P, rows] added to y (plain only); skip: products with mats[p] < 0
    are left out; spread: a block for every `warps` tasks of each product (every warp one task, in waves if
    the products are many), not the SMs shared by P: for a skip launch whose few products run alone."""
    if x.strides[-1] != 4 or y.strides[-1] != 4 or (residual is not None and residual.strides[-1] != 4):
        raise ValueError("fast2 addresses x, y and residual by rows: each row must be contiguous")
    cfg = FAST2[qt]
    warps = warps or cfg["warps"]
    direct = cfg["direct"] if direct is None else direct
    bps = bps or cfg["bps"][fused]
    U = cols // 256
    preload = preload and cfg.get("preload", False) and direct and not fused and U <= 32
    kern = fast2_kernel(qt, fused, warps, direct, preload, norm is not None, residual is not None, skip, interleaved,
                        x_ready and not (preload or skip))
    ntask = (rows * U + 32 * max(1, U // 32) - 1) // (32 * max(1, U // 32))
    gx = (ntask + warps - 1) // warps
    if not spread:
        gx = max(1, min(gx, max(1, bps * sms // P)))
    shared = 4 * (U * 132 + 18 * U + 8 + (0 if direct else warps * 32 * (36 if qt == Q4_0 else 68)))
    args = ((W, W2, mats, xidx, x, y, rows, cols, mat_bytes // 4, U.bit_length() - 1) + (() if norm is None else tuple(norm))
            + (() if residual is None else (residual,)))
    kern[(gx, P), 32 * warps, STREAM[0], shared](*args)


# -- the rest -----------------------------------------------------------------------------------------

@cuda.jit(device=True, inline=True)
def _block_reduce(red, v, tid, is_max):
    """Sum (or max) of v over the block's THREADS threads, returned to all: a shuffle tree in each warp,
    the WARPS partials through shared memory (red: >= WARPS floats), then every thread folds those."""
    for o in (16, 8, 4, 2, 1):
        u = cuda.shfl_xor_sync(0xffffffff, v, o)
        v = max(v, u) if is_max else v + u
    if (tid & 31) == 0:
        red[tid >> 5] = v
    cuda.syncthreads()
    r = red[0]
    for w in range(1, WARPS):
        r = max(r, red[w]) if is_max else r + red[w]
    cuda.syncthreads()
    return r


@cuda.jit(device=True, inline=True)
def _rmsnorm_row(x, r, n, w, out, orow, eps, red, tid):
    """The block's rmsnorm of x[r, :n] into out[orow, :n]: x * rsqrt(mean(x^2) + eps) * w."""
    ss = float32(0.0)
    for i in range(tid, n, THREADS):
        ss += x[r, i] * x[r, i]
    ss = _block_reduce(red, ss, tid, False)
    inv = float32(1.0) / math.sqrt(ss / float32(n) + eps)
    for i in range(tid, n, THREADS):
        out[orow, i] = x[r, i] * inv * w[i]


@cuda.jit
def rmsnorm_kernel(x, w, out, eps):
    """One block per row: out = x * rsqrt(mean(x^2) + eps) * w."""
    grid_dependency()
    red = cuda.shared.array(THREADS, float32)
    t = cuda.blockIdx.x
    _rmsnorm_row(x, t, x.shape[1], w, out, t, eps, red, cuda.threadIdx.x)


def _make_mla_rope(proj):
    """MLA between its projections and the attention (CPUBackend.mla_rope's arithmetic), one launch.
    Block (j, h < heads): q_nope = q[j, h, :nope] * s and query[j, h, kvr:] = rope(q[j, h, nope:]) * s,
    s = 1 + beta * log1p(position // length) (llama-4 query scaling; 1 when beta is 0). Block (j, heads):
    cache[position] = [rmsnorm(kv[j, :kvr]) * w, rope(kv[j, kvr:])]. cos/sin: whole tables, rows read
    at the positions from device memory (so one captured launch serves every decode step). A thread's rotation
    pair (its position, cos and sin: inputs no kernel writes) is loaded before the wait, and its q or kv values
    all before its first store. One rotation pair and one q_nope value per thread: 2 * half and nope <= THREADS.
    proj: W_kb's (qt, rows, cols, interleaved) (`heads_fused_ok`): the block also folds W_kb[h] into the query,
    query[j, h, :kvr] = W_kb[h] @ q_nope (Wk: its words, loaded before the wait), from shared memory; None:
    q_nope is written out for a gemv launch of its own."""
    src = ["def kern(q, kv, positions, cos, sin, w, eps, beta, length, cache, q_nope, query, Wk):",
           "    red = cuda.shared.array(THREADS, float32)",
           "    j = cuda.blockIdx.x",
           "    h = cuda.blockIdx.y",
           "    tid = cuda.threadIdx.x",
           "    pos = positions[j]",
           "    half = cos.shape[1]",
           "    i = min(tid, half - 1)",
           "    c = cos[pos, i]",
           "    sn = sin[pos, i]",
           "    kvr = cache.shape[1] - 2 * half"]
    if proj:
        preload, product = _head_rows_code(*proj, "Wk", "min(h, q.shape[1] - 1)", "        ")
        src += preload + [f"    xs = cuda.shared.array({proj[2]}, float32)"]
    src += ["    grid_dependency()",
            "    if h < q.shape[1]:",
            "        nope = q.shape[2] - 2 * half",
            "        qn = q[j, h, min(tid, nope - 1)]",
            "        a = q[j, h, nope + 2 * i]",
            "        b = q[j, h, nope + 2 * i + 1]",
            "        s = float32(1.0)",
            "        if beta != 0.0:",
            "            s = float32(1.0 + beta * math.log1p(float64(pos // length)))",
            "        if tid < nope:",
            "            xs[tid] = qn * s" if proj else "            q_nope[j, h, tid] = qn * s",
            "        if tid < half:",
            "            query[j, h, kvr + 2 * i] = (a * c - b * sn) * s",
            "            query[j, h, kvr + 2 * i + 1] = (b * c + a * sn) * s"]
    if proj:
        src += ["        cuda.syncthreads()"] + product + ["        if hy_ok:", "            query[j, h, hr] = hy"]
    src += ["    else:",
            "        a = kv[j, kvr + 2 * i]",
            "        b = kv[j, kvr + 2 * i + 1]",
            "        _rmsnorm_row(kv, j, kvr, w, cache, pos, eps, red, tid)",
            "        if tid < half:",
            "            cache[pos, kvr + 2 * i] = a * c - b * sn",
            "            cache[pos, kvr + 2 * i + 1] = b * c + a * sn"]
    return _jit_source(src, f"mla_rope proj={proj}", float64=float64, _rmsnorm_row=_rmsnorm_row,
                       _q4_pair_w=_q4_pair_w, _q8_pair_w=_q8_pair_w)


def mla_rope_kernel(proj=None):
    """The MLA kernel, W_kb folded in for proj = (qt, rows, cols, interleaved) (`heads_fused_ok`), else not."""
    return _compiled(_make_mla_rope, proj)


MAX_DV = 512               # attention_kernel's largest value width (MLA's latent: 256 for Small 4)


def _make_attention(nj: int, nv: int, v_is_k: bool):
    """Block (i, h): causal softmax attention of query i (at positions[i]), head h, over keys
    0..positions[i] of kv head h // group; heads up to 32 * nj wide, values up to 32 * nv. The positions come
    from device memory, so one captured launch serves every decode step.
    One pass over the keys, softmax online (flash-decoding within a block): warp w takes keys w * B, w * B +
    WARPS * B, ..., B at a time, its lanes across the head dimension (coalesced rows; the query row in
    registers; every load of the pass issued before its arithmetic), and keeps its own running max m, sum l and
    value sums (lane: columns lane + 32 j); the WARPS partial results meet once in shared memory, rescaled to
    the largest max. Two block barriers in all (the three-phase form had five, and the scores' round trip through
    global memory: 6.5 us a Small 4 layer at decode, session 19).
    v_is_k: the values are the keys' first columns (MLA's latent cache: v = k[..., :kv_lora]), so the key loads
    are the value loads; B = 4 keys a pass then, else 2 (registers for both rows)."""
    B = 4 if v_is_k else 2
    src = [
        "def kern(q, k, v, out, positions, scale, group):",
        "    lane = cuda.threadIdx.x & 31",
        "    warp = cuda.threadIdx.x >> 5",
        "    i = cuda.blockIdx.x",
        "    h = cuda.blockIdx.y",
        "    kh = h // group",
        "    end = positions[i] + 1",
        "    dk = q.shape[2]",
        "    dv = v.shape[2]",
    ]
    for j in range(nj):     # lane's part of the query row; past dk a zero times a clamped (real) key value
        src += [f"    c{j} = min(lane + {32 * j}, dk - 1)",
                f"    q{j} = q[i, h, c{j}] if lane + {32 * j} < dk else float32(0.0)"]
    if not v_is_k:
        src += [f"    d{j} = min(lane + {32 * j}, dv - 1)" for j in range(nv)]
    src += [f"    acc{j} = float32(0.0)" for j in range(nv)]
    src += ["    m = float32(-3.0e38)",
            "    l = float32(0.0)",
            f"    for t0 in range(warp * {B}, end, WARPS * {B}):"]
    src += [f"        t{b} = min(t0 + {b}, end - 1)" for b in range(B)]
    src += [f"        k{b}_{j} = k[t{b}, kh, c{j}]" for b in range(B) for j in range(nj)]
    if not v_is_k:
        src += [f"        v{b}_{j} = v[t{b}, kh, d{j}]" for b in range(B) for j in range(nv)]
    src += [f"        a{b} = q0 * k{b}_0" for b in range(B)]
    src += [f"        a{b} += q{j} * k{b}_{j}" for j in range(1, nj) for b in range(B)]
    src += ["        for o in (16, 8, 4, 2, 1):"]
    src += [f"            a{b} += cuda.shfl_xor_sync(0xffffffff, a{b}, o)" for b in range(B)]
    src += [f"        a{b} = a{b} * scale if t0 + {b} < end else float32(-3.0e38)" for b in range(B)]
    src += ["        mn = max(m, " + ", ".join(f"a{b}" for b in range(B)) + ")",
            "        cr = math.exp(m - mn)"]
    src += [f"        e{b} = math.exp(a{b} - mn)" for b in range(B)]
    src += ["        l = l * cr + " + " + ".join(f"e{b}" for b in range(B)),
            "        m = mn"]
    val = (lambda b, j: f"k{b}_{j}") if v_is_k else (lambda b, j: f"v{b}_{j}")
    src += [f"        acc{j} = acc{j} * cr + " + " + ".join(f"e{b} * {val(b, j)}" for b in range(B)) for j in range(nv)]
    src += [
        "    ms = cuda.shared.array(WARPS, float32)",
        "    ls = cuda.shared.array(WARPS, float32)",
        f"    part = cuda.shared.array((WARPS, {32 * nv}), float32)",
        "    if lane == 0:",
        "        ms[warp] = m",
        "    cuda.syncthreads()",
        "    big = ms[0]",
        "    for w in range(1, WARPS):",
        "        big = max(big, ms[w])",
        "    sc = math.exp(m - big)             # a warp with no keys: exp(-3e38 - big) = 0",
        "    if lane == 0:",
        "        ls[warp] = l * sc",
    ]
    src += [f"    part[warp, lane + {32 * j}] = acc{j} * sc" for j in range(nv)]
    src += [
        "    cuda.syncthreads()",
        "    tot = ls[0]",
        "    for w in range(1, WARPS):",
        "        tot += ls[w]",
        "    inv = float32(1.0) / tot",
        "    for d in range(cuda.threadIdx.x, dv, THREADS):",
        "        a = part[0, d]",
        "        for w in range(1, WARPS):",
        "            a += part[w, d]",
        "        out[i, h, d] = a * inv",
    ]
    return _jit_source(src, f"attention nj={nj} nv={nv} v_is_k={v_is_k}")


def attention_kernel(dk: int, dv: int, v_is_k: bool = False):
    """The attention kernel for heads dk wide and values dv wide (one compile per 32 columns of each);
    v_is_k: v is a view of k's first dv columns (MLA)."""
    return _compiled(_make_attention, (dk + 31) // 32, (dv + 31) // 32, v_is_k)


MAX_EXPERTS = 512
EXPERTS_PER_LANE = MAX_EXPERTS // 32
MAX_GROUPS = 64


@cuda.jit
def route_kernel(logits, k, norm, scale, n_group, topk_group, ids, wts, slots, swts):
    """Thread t: row t's router exactly as models/moe.route_topk: softmax over the experts, the k
    largest (within the best topk_group of n_group groups, a group ranked by its two largest),
    renormalised, times scale; ties go to the lower expert id like the reference's stable sort.
    On the GPU so a decode step needs no host round trip (and can be captured). Also the slot rows
    slots[t] = [ids[t], E], swts[t] = [wts[t], 1]: the shared expert as matrix E (CUDABackend._with_shared)."""
    grid_dependency()
    t = cuda.grid(1)
    if t >= logits.shape[0]:
        return
    E = logits.shape[1]
    p = cuda.local.array(MAX_EXPERTS, float32)
    c = cuda.local.array(MAX_EXPERTS, float32)
    m = float32(-3.0e38)
    for e in range(E):
        m = max(m, logits[t, e])
    total = float32(0.0)
    for e in range(E):
        p[e] = math.exp(logits[t, e] - m)
        total += p[e]
    for e in range(E):
        p[e] /= total
        c[e] = p[e]
    if n_group > 1:
        gs = E // n_group
        score = cuda.local.array(MAX_GROUPS, float32)
        for g in range(n_group):
            a = float32(-1.0)
            b = float32(-1.0)
            for e in range(g * gs, (g + 1) * gs):
                if p[e] > a:
                    b = a
                    a = p[e]
                elif p[e] > b:
                    b = p[e]
            score[g] = a + b
        keep = cuda.local.array(MAX_GROUPS, float32)
        for g in range(n_group):
            keep[g] = float32(0.0)
        for j in range(topk_group):
            best = 0
            bv = float32(-3.0e38)
            for g in range(n_group):
                if keep[g] == 0.0 and score[g] > bv:
                    bv = score[g]
                    best = g
            keep[best] = float32(1.0)
        for e in range(E):
            if keep[e // gs] == 0.0:
                c[e] = float32(0.0)
    total = float32(0.0)
    for j in range(k):
        best = 0
        bv = float32(-3.0e38)
        for e in range(E):
            if c[e] > bv:
                bv = c[e]
                best = e
        c[best] = float32(-2.0)
        ids[t, j] = best
        wts[t, j] = p[best]
        total += p[best]
    for j in range(k):
        w = wts[t, j]
        if norm:
            w = w / (total + float32(1e-20))
        wts[t, j] = w * scale
        slots[t, j] = ids[t, j]
        swts[t, j] = w * scale
    slots[t, k] = E
    swts[t, k] = float32(1.0)


def _make_route_warp(nj: int):
    """route_kernel's choice without groups, one warp per row t, for up to 32 nj experts: lane holds experts
    lane + 32 j in named registers (all its logits loaded at once); softmax by shuffles; each of the k picks
    is a warp-wide argmax (ties to the lower id, like the stable sort), kept by lane r for pick r (k <= 32),
    so the k lanes write their ids and weights at once at the end. The order of the picks only needs
    exp(logit - max), so it cannot depend on the summation order. Also route_kernel's slot rows."""
    J = range(nj)
    src = ["def kern(logits, k, norm, scale, ids, wts, slots, swts):",
           "    t = cuda.blockIdx.x * WARPS + (cuda.threadIdx.x >> 5)",
           "    lane = cuda.threadIdx.x & 31",
           "    if t >= logits.shape[0]:",
           "        return",
           "    E = logits.shape[1]"]
    src += [f"    z{j} = logits[t, min(lane + {32 * j}, E - 1)]" for j in J]
    src.append("    m = float32(-3.0e38)")
    src += [f"    if lane + {32 * j} < E:\n        m = max(m, z{j})" for j in J]
    src += ["    for o in (16, 8, 4, 2, 1):", "        m = max(m, cuda.shfl_xor_sync(0xffffffff, m, o))",
            "    total = float32(0.0)"]
    for j in J:
        src += [f"    p{j} = float32(-1.0)", f"    if lane + {32 * j} < E:", f"        p{j} = math.exp(z{j} - m)",
                f"        total += p{j}"]
    src += ["    for o in (16, 8, 4, 2, 1):", "        total += cuda.shfl_xor_sync(0xffffffff, total, o)",
            "    wsum = float32(0.0)", "    mine = float32(0.0)", "    mid = E",
            "    for r in range(k):", "        bv = float32(-3.0)", "        be = E"]
    src += [f"        if p{j} > bv:\n            bv = p{j}\n            be = lane + {32 * j}" for j in J]
    src += ["        for o in (16, 8, 4, 2, 1):",
            "            ov = cuda.shfl_xor_sync(0xffffffff, bv, o)",
            "            oe = cuda.shfl_xor_sync(0xffffffff, be, o)",
            "            if ov > bv or (ov == bv and oe < be):",
            "                bv = ov",
            "                be = oe"]
    src += [f"        if be == lane + {32 * j}:\n            p{j} = float32(-2.0)" for j in J]
    src += ["        w = bv / total",
            "        wsum += w",
            "        if lane == r:",
            "            mine = w",
            "            mid = be",
            "    if lane < k:",
            "        if norm:",
            "            mine = mine / (wsum + float32(1e-20))",
            "        ids[t, lane] = mid",
            "        slots[t, lane] = mid",
            "        wts[t, lane] = mine * scale",
            "        swts[t, lane] = mine * scale",
            "    if lane == 0:",
            "        slots[t, k] = E",
            "        swts[t, k] = float32(1.0)"]
    return _jit_source(src, f"route_warp nj={nj}")


def route_warp_kernel(E: int):
    """The one-warp-per-token router for E experts (one compile per 32 experts)."""
    return _compiled(_make_route_warp, (E + 31) // 32)


def _make_combine(k: int, masked: bool = False):
    """y[t, c] = sum_j wts[t, j] * yp[t * k + j, c] (+ plus[t, c] when add: the shared expert's output, when
    it ran apart), the k weights and each column's k values loaded before the sum (a loop over a run-time k
    would load them one after another). masked: only the products whose sel[t * k + j] >= 0 (the hits, before
    the misses are in: their rows of yp are not written yet)."""
    src = ["def kern(yp, wts, y, plus, add" + (", sel):" if masked else "):"),
           "    t = cuda.blockIdx.y"]
    src += [f"    w{j} = wts[t, {j}]" for j in range(k)]
    src += [f"    m{j} = sel[t * {k} + {j}] >= 0" for j in range(k) if masked]
    src += ["    for c in range(cuda.blockIdx.x * THREADS + cuda.threadIdx.x, y.shape[1], cuda.gridDim.x * THREADS):"]
    src += [f"        v{j} = yp[t * {k} + {j}, c]" + (f" if m{j} else float32(0.0)" if masked else "") for j in range(k)]
    src += ["        b = plus[t, c] if add else float32(0.0)", "        a = float32(0.0)"]
    src += [f"        a += w{j} * v{j}" for j in range(k)]
    src += ["        y[t, c] = a + b if add else a"]
    return _jit_source(src, f"combine k={k}" + (" masked" if masked else ""))


def combine_kernel(k: int, masked: bool = False):
    """The combine of k products per token (masked: of those sel marks)."""
    return _compiled(_make_combine, k, masked)


# -- the expert cache decided on the device (streaming.py's device mode) ----------------------------------
# Its state, in device arrays the streamer owns: slot_of [L * E] (key = layer * E + expert -> slot, -1),
# key_of [S] (slot -> key, -1 while never filled), score [L * E] float64 (LFU's decayed use counts), last [S]
# (the clock at a slot's last use), pin [S] (the lookup number that last pinned it), CACHE_STATE int64
# counters and wt [1] float64 (LFU's weight of a use). The arithmetic is localmoe/cache.py's, in its order,
# so the device makes the host ExpertCache's choices (tests/test_cuda.py compares them).
CLOCK, FILLED, LOOKUP_NO, LOOKUPS, HITS, MISSES, EVICTIONS = range(7)
PREFETCHED, FOUND, DEMAND_VECS, PREFETCH_VECS = range(7, 11)   # targets; misses a prefetch had begun; vectors
CACHE_STATE = 12           # int64 words of the state array (one spare)               copied on demand, ahead
# The next-layer prefetch (the device mode's guess): have [S] int32, each slot's copied prefix in items (pieces
# of ITEM_VECTORS 16-byte vectors, matrix by matrix: `expert_items`); pf int64 [PF_HEAD + 2 L * PF_WORDS]:
# PF_STOP (the newest lookup number: a prefetch an older lookup picked stops), PF_READY (the newest lookup
# whose misses are all in: the join's flag when a prefetch follows them), PF_DONE (copy blocks past their
# misses), PF_TARGETED (the newest lookup whose guesses' targets cache_target_kernel has placed), then per
# target layer two records, one for a guess from the layer before (index: the layer) and one for a guess from
# two layers before (index: L + the layer): the lookup number that picked it (GEN), its targets (NT), the next
# item to copy (NEXT), and per target t at PF_TARGET + 4 t its key, slot, expert and whether that layer's lookup
# asked for it (REQ).
PREFETCH_TARGETS = 2       # experts a guess may start per layer (its window, ~100 us, is ~40% of one)
TARGETS_WAIT_NS = 2_000_000  # the copy kernel waits at most this long for the targets, then skips its prefetch:
                             # the host enqueues them after its copy kernel, and an eager host that synchronizes
                             # before (a first upload or module load) must not wait on the copy kernel forever
PF_STOP, PF_READY, PF_DONE, PF_TARGETED, PF_HEAD = 0, 1, 2, 3, 4
PF_GEN, PF_NT, PF_NEXT, PF_TARGET = 0, 1, 2, 4
PF_KEY, PF_SLOT, PF_EXPERT, PF_REQ = range(4)
PF_WORDS = PF_TARGET + 4 * PREFETCH_TARGETS


LOOKUP_WARPS = 32          # cache_lookup_kernel's and cache_target_kernel's block: 1024 threads, so that each ...
LOOKUP_THREADS = 32 * LOOKUP_WARPS
CANDIDATES = 8             # ... ranks few slots from registers (slots <= 8 x 1024), loaded at once (two latencies)
MAX_GUESS = 32             # ids a guess may give cache_target_kernel (a router's k) ...
GUESS_KEYS = 2 * MAX_GUESS  # ... of each of two guesses


@cuda.jit(device=True, inline=True)
def _better(s1, l1, i1, s2, l2, i2):
    """(s2, l2) ranks before (s1, l1) for eviction (a lower score, then an older last use; i < 0: none)."""
    return i2 >= 0 and (i1 < 0 or s2 < s1 or (s2 == s1 and l2 < l1))


@cuda.jit(device=True, inline=True)
def _record(pf, layer, far):
    """Where layer's prefetch record starts in pf: its guess from the layer before (far 0) or from two before (1)."""
    return PF_HEAD + (layer + far * ((pf.shape[0] - PF_HEAD) // (2 * PF_WORDS))) * PF_WORDS


@cuda.jit(device=True, inline=True)
def _warp_best(bs, bl, bi):
    """The first in eviction order (_better) of the warp's (score, last, slot), to every lane."""
    for o in (16, 8, 4, 2, 1):
        os_ = cuda.shfl_xor_sync(0xffffffff, bs, o)
        ol = cuda.shfl_xor_sync(0xffffffff, bl, o)
        oi = cuda.shfl_xor_sync(0xffffffff, bi, o)
        if _better(bs, bl, bi, os_, ol, oi):
            bs, bl, bi = os_, ol, oi
    return bs, bl, bi


@cuda.jit(device=True, inline=True)
def _targets(gkey, away, ng, most, tk):
    """The first `most` distinct keys of gkey[:ng] that were not resident (away), into tk; how many."""
    nt = 0
    for g in range(ng):
        key = gkey[g]
        new = nt < most and away[g] != 0
        for u in range(nt):
            new = new and tk[u] != key
        if new:
            tk[nt] = key
            nt += 1
    return nt


@cuda.jit(device=True, inline=True)
def _take_slots(n, free, filled, lk, lfu, key_of, score, last, pin, slot, ws, wl, wi):
    """slot[:n] for n new experts (the whole block calls it): the never-filled slots from `filled` (free of them)
    first, then the victims: the filled slots no lookup up to lk pinned (pin < lk), lowest (score, last) first
    (LRU: last). Each thread ranks its share of the slots from registers, so a victim costs a block-wide argmin,
    not a pass over memory. Returns how many it found (fewer than n only where every other slot is pinned)."""
    tid = cuda.threadIdx.x
    lane, warp = tid & 31, tid >> 5
    S = key_of.shape[0]
    for j in range(tid, min(n, free), LOOKUP_THREADS):
        slot[j] = filled + j
    cuda.syncthreads()
    got = min(n, max(free, 0))
    if n > got:
        cs = cuda.local.array(CANDIDATES, float64)
        cl = cuda.local.array(CANDIDATES, int64)
        ck = cuda.local.array(CANDIDATES, int64)
        for c in range(CANDIDATES):                   # unconditional loads, all in flight together
            t = tid + c * LOOKUP_THREADS
            u = min(t, S - 1)
            ck[c], lu, pu = key_of[u], last[u], pin[u]
            cl[c] = lu if t < filled and pu < lk else -1
        for c in range(CANDIDATES):
            cs[c] = score[max(ck[c], 0)] if lfu else 0.0
        for j in range(got, n):
            bs, bl, bi = math.inf, int64(0), int32(-1)
            for c in range(CANDIDATES):
                if cl[c] >= 0 and _better(bs, bl, bi, cs[c], cl[c], 0):
                    bs, bl, bi = cs[c], cl[c], int32(tid + c * LOOKUP_THREADS)
            bs, bl, bi = _warp_best(bs, bl, bi)
            if lane == 0:
                ws[warp], wl[warp], wi[warp] = bs, bl, bi
            cuda.syncthreads()
            bs, bl, bi = _warp_best(ws[lane], wl[lane], wi[lane])   # LOOKUP_WARPS = 32: a lane each
            if bi >= 0:
                got += 1
            for c in range(CANDIDATES):
                if tid + c * LOOKUP_THREADS == bi:
                    cl[c] = -1                        # taken
            if tid == 0:
                slot[j] = bi
            cuda.syncthreads()
    return got


@cuda.jit(max_registers=65536 // LOOKUP_THREADS)
def cache_lookup_kernel(ids, k, shared, base, E, lfu, slot_of, key_of, score, last, pin, state, wt, mats, split, miss,
                        nmiss, have, full, pf, cur):
    """One block: ExpertCache.lookup(layer, distinct ids) for the ids [n * k] a router kernel just wrote, base =
    layer * E. Hits (ascending ids) are used and pinned; misses (ascending) take slots (_take_slots), in order.
    Writes mats [Q] (each id's slot: the expert kernels' matrix indices; Q = n * k, or n * (k + 1) with each
    token's k slots followed by `shared`, the shared expert's slot, when it is >= 0), split [2, Q] (the
    same, -1 except at the hits and the shared expert; -1 except at the misses: for launches that skip the
    others), and the misses as (expert, slot, start) triples in miss, their count in nmiss[0], for
    expert_copy_kernel. Every step is a few parallel loads: the misses' copies wait for this kernel.
    The prefetch (the record above PREFETCH_TARGETS): a hit whose slot is not whole (have < full items) is a
    miss that keeps its slot, copied from where it stopped (start: its have, or -2 - t for target t of record
    `cur`, this layer's, maybe still in flight: the copy kernel reads how far it got); it counts as a miss
    and as FOUND. At the end, with the misses known, the prefetch in flight is told to stop (PF_STOP; the copy
    kernel behind it waits for its last items); cache_target_kernel picks the next one after this kernel.
    With whole slots this is exactly ExpertCache.lookup."""
    grid_dependency()
    tid = cuda.threadIdx.x
    lane, warp = tid & 31, tid >> 5
    S = key_of.shape[0]
    mark = cuda.shared.array(MAX_EXPERTS, int32)      # which experts the ids name, then each one's slot (-2 - slot:
                                                      # copied by this lookup's copy kernel)
    order = cuda.shared.array(MAX_EXPERTS, int32)     # the distinct ids, ascending
    hit = cuda.shared.array(MAX_EXPERTS, int32)       # ... their slots (-1: a miss)
    rank = cuda.shared.array(MAX_EXPERTS, int32)      # ... their place among the hits, or among the misses
    slot = cuda.shared.array(MAX_EXPERTS, int32)      # the k-th miss's slot
    cnt = cuda.shared.array(EXPERTS_PER_LANE, int32)  # ids set per 32-expert chunk
    ws = cuda.shared.array(LOOKUP_WARPS, float64)     # each warp's best candidate (_take_slots)
    wl = cuda.shared.array(LOOKUP_WARPS, int64)
    wi = cuda.shared.array(LOOKUP_WARPS, int32)
    part = cuda.shared.array(MAX_EXPERTS, int32)      # ... a hit's copy to finish: -1 none, else its start
    sv = cuda.shared.array(6, int64)                  # distinct, hits, misses, partial, clock, filled
    lk = state[LOOKUP_NO] + 1
    rc = _record(pf, cur, 0)
    live = cur >= 0 and pf[rc + PF_GEN] == lk - 1     # record cur is the last lookup's: its targets are this layer's
    for e in range(tid, E, LOOKUP_THREADS):
        mark[e] = 0
    cuda.syncthreads()
    for p in range(tid, ids.shape[0], LOOKUP_THREADS):
        mark[ids[p]] = 1
    cuda.syncthreads()
    nch = (E + 31) >> 5
    below = (1 << lane) - 1
    for c in range(warp, nch, LOOKUP_WARPS):          # the distinct ids in order: ballots and a prefix count
        e = c * 32 + lane
        cnt[c] = cuda.popc(cuda.ballot_sync(0xffffffff, e < E and mark[e] != 0))
    cuda.syncthreads()
    for c in range(warp, nch, LOOKUP_WARPS):
        e = c * 32 + lane
        b = cuda.ballot_sync(0xffffffff, e < E and mark[e] != 0)
        at = 0
        for j in range(c):
            at += cnt[j]
        if e < E and mark[e] != 0:
            i = at + cuda.popc(b & below)
            order[i] = e
            s = slot_of[base + e]
            hit[i] = s
            c = int32(-1)
            if s >= 0:
                if have[s] < full:
                    c = have[s]
                if live:
                    for t in range(pf[rc + PF_NT]):
                        r = rc + PF_TARGET + 4 * t
                        if pf[r + PF_SLOT] == s and pf[r + PF_KEY] == base + e:
                            c = -2 - t
                            pf[r + PF_REQ] = 1
            part[i] = c
    cuda.syncthreads()
    if warp == 0:                                     # ranks among the hits and among the misses
        nd = 0
        for j in range(nch):
            nd += cnt[j]
        nh, nm, npart = 0, 0, 0
        for c in range(0, nd, 32):
            i = c + lane
            h = i < nd and hit[i] >= 0 and part[i] == -1
            m = i < nd and hit[i] < 0
            q = i < nd and hit[i] >= 0 and part[i] != -1
            bh = cuda.ballot_sync(0xffffffff, h)
            bm = cuda.ballot_sync(0xffffffff, m)
            bq = cuda.ballot_sync(0xffffffff, q)
            if h:
                rank[i] = nh + cuda.popc(bh & below)
            if m:
                rank[i] = nm + cuda.popc(bm & below)
            if q:
                rank[i] = npart + cuda.popc(bq & below)
            nh += cuda.popc(bh)
            nm += cuda.popc(bm)
            npart += cuda.popc(bq)
        if lane == 0:
            sv[0], sv[1], sv[2], sv[3], sv[4], sv[5] = nd, nh, nm, npart, state[CLOCK], state[FILLED]
    cuda.syncthreads()
    nd, nh, nm, npart, clock, filled = sv[0], sv[1], sv[2], sv[3], sv[4], sv[5]
    w = wt[0]
    for i in range(tid, nd, LOOKUP_THREADS):          # the hits: used in order, pinned before any eviction
        s = hit[i]
        if s >= 0:
            if lfu:
                score[base + order[i]] += w
            pin[s] = lk
            if part[i] == -1:
                last[s] = clock + 1 + rank[i]
                mark[order[i]] = s
            else:                                     # a partial slot: its copy finishes with the misses'
                mark[order[i]] = -2 - s
                j = nm + rank[i]
                last[s] = clock + 1 + nh + j
                miss[3 * j], miss[3 * j + 1], miss[3 * j + 2] = order[i], s, part[i]
                have[s] = full
    free = S - filled
    _take_slots(nm, free, filled, lk, lfu, key_of, score, last, pin, slot, ws, wl, wi)
    for i in range(tid, nd, LOOKUP_THREADS):          # the misses: placed in order, in parallel
        if hit[i] < 0:
            j = rank[i]
            s = slot[j]
            key = base + order[i]
            if j >= free:
                slot_of[key_of[s]] = -1
            slot_of[key] = s
            key_of[s] = key
            if lfu:
                score[key] += w
            last[s] = clock + 1 + nh + j
            pin[s] = lk
            have[s] = full
            mark[order[i]] = -2 - s
            miss[3 * j], miss[3 * j + 1], miss[3 * j + 2] = order[i], s, 0
    cuda.syncthreads()
    kk = k + 1 if shared >= 0 else k
    Q = ids.shape[0] // k * kk
    for q in range(tid, Q, LOOKUP_THREADS):
        t = q // kk
        j = q - t * kk
        s, fresh = shared, False
        if j < k:
            s = mark[ids[t * k + j]]
            fresh = s < 0
            s = -2 - s if fresh else s
        mats[q] = s
        split[q] = -1 if fresh else s
        split[Q + q] = s if fresh else -1
    if tid == 0:
        nmiss[0] = nm + npart
        state[CLOCK] = clock + nd
        state[FILLED] = min(S, filled + nm)
        state[LOOKUP_NO] = lk
        state[LOOKUPS] += nd
        state[HITS] += nh
        state[MISSES] += nm + npart
        state[EVICTIONS] += max(0, nm - free)
        state[FOUND] += npart
        pf[PF_DONE] = 0
        cuda.atomic.max(pf, PF_STOP, lk)              # the prefetch the last lookup started stops after its item


@cuda.jit(max_registers=65536 // LOOKUP_THREADS)
def cache_target_kernel(lfu, slot_of, key_of, score, last, pin, state, have, pf, cur, guess, ng, gbase, nxt, guess2,
                        ng2, gbase2, nxt2):
    """One block, after cache_lookup_kernel (ExpertCache.prefetch after its lookup): the next layer's guess (ng
    ids in guess, keys from gbase, layer nxt) picks up to PREFETCH_TARGETS experts that are not resident, each
    given a slot (_take_slots: pinned, newest, empty), into record `nxt` for expert_copy_kernel, which waits for
    PF_TARGETED to reach the lookup's number after its misses. When none of them is missing, the guess for the
    layer after (ng2 ids in guess2, keys from gbase2, layer nxt2 >= 0) picks them instead, into record L + nxt2:
    that window's link would idle otherwise. Those stay pinned through the next lookup too (the prefetch may still
    be copying into them then; the next copy kernel records how far it got in `have`, and the lookup of their
    layer finishes them like any partial slot). A kernel of its own so that the guesses' routers run after the
    lookup, while the misses copy, not before it. So it runs beside that copy kernel, which begins by storing in
    `have` how far the targets of record `cur` (the lookup's layer) got: it does not evict those."""
    grid_dependency()
    tid = cuda.threadIdx.x
    S = key_of.shape[0]
    gkey = cuda.shared.array(GUESS_KEYS, int64)       # the guesses' keys (the layer after's from MAX_GUESS) ...
    away = cuda.shared.array(GUESS_KEYS, int32)       # ... and whether they are not resident
    tk = cuda.shared.array(PREFETCH_TARGETS, int64)   # the keys to prefetch
    slot = cuda.shared.array(PREFETCH_TARGETS, int32)
    ws = cuda.shared.array(LOOKUP_WARPS, float64)
    wl = cuda.shared.array(LOOKUP_WARPS, int64)
    wi = cuda.shared.array(LOOKUP_WARPS, int32)
    sv = cuda.shared.array(4, int64)                  # far, targets, clock, filled
    lk = state[LOOKUP_NO]
    rc = _record(pf, cur, 0)
    if tid < pf[rc + PF_NT] and pf[rc + PF_GEN] == lk - 1:
        pin[pf[rc + PF_TARGET + 4 * tid + PF_SLOT]] = lk    # (the copy kernel's _prefetched may be writing its have)
    if tid < GUESS_KEYS:                              # the guesses' residency, loaded together
        two = tid >= MAX_GUESS
        u = tid - MAX_GUESS if two else tid
        if u < (ng2 if two else ng) and (nxt2 if two else nxt) >= 0:
            key = (gbase2 + guess2[u]) if two else (gbase + guess[u])
            gkey[tid] = key
            away[tid] = slot_of[key] < 0
    cuda.syncthreads()
    if tid == 0:
        nt = _targets(gkey, away, min(ng, MAX_GUESS), PREFETCH_TARGETS, tk)
        far = 0
        if nt == 0 and nxt2 >= 0:                     # nothing to fetch for the next layer: the one after
            nt = _targets(gkey[MAX_GUESS:], away[MAX_GUESS:], min(ng2, MAX_GUESS), PREFETCH_TARGETS, tk)
            far = 1
        sv[0], sv[1], sv[2], sv[3] = far, nt, state[CLOCK], state[FILLED]
    cuda.syncthreads()
    far, nt, clock, filled = sv[0], sv[1], sv[2], sv[3]
    free = S - filled
    nt = _take_slots(nt, free, filled, lk, lfu, key_of, score, last, pin, slot, ws, wl, wi)
    rn = _record(pf, nxt2 if far else nxt, far)
    for t in range(tid, nt, LOOKUP_THREADS):          # placed after the lookup's, empty
        s = slot[t]
        key = tk[t]
        if t >= free:
            slot_of[key_of[s]] = -1
        slot_of[key] = s
        key_of[s] = key
        last[s] = clock + 1 + t
        pin[s] = lk + far
        have[s] = 0
        r = rn + PF_TARGET + 4 * t
        pf[r + PF_KEY], pf[r + PF_SLOT], pf[r + PF_EXPERT], pf[r + PF_REQ] = key, s, key - (gbase2 if far else gbase), 0
    if tid == 0:
        pf[rn + PF_GEN], pf[rn + PF_NT], pf[rn + PF_NEXT] = lk, nt, 0
        state[CLOCK] = clock + nt
        state[FILLED] = min(S, filled + nt)
        state[EVICTIONS] += max(0, nt - free)
        state[PREFETCHED] += nt
    cuda.threadfence()                                # the record and the slots, then the flag
    cuda.syncthreads()
    if tid == 0:
        cuda.atomic.max(pf, PF_TARGETED, lk)


COPY_BLOCKS = 16           # expert_copy_kernel's grid: a few SMs keep PCIe busy; the others run the hits meanwhile
COPY_THREADS = 512         # (with 4 loads of 16 bytes in flight a thread: 512 KB in flight on 16 SMs)


@cuda.jit(device=True, inline=True)
def _slot_vector(v, uv):
    """Where a matrix's 16-byte vector v goes in its slot: v itself (uv 0), else interleaved (uv per unit)."""
    return v if uv == 0 else _interleaved_vector(v, uv)


ITEM_VECTORS = 4 * COPY_THREADS   # a prefetch's piece of an expert: one pass of a copy block (32 KB)


def expert_items(words) -> int:
    """Items of an expert whose three matrices are words[j] uint32 words (multiples of 4): each matrix's
    16-byte vectors in pieces of ITEM_VECTORS, the last one short (have[] and the prefetch count these)."""
    return sum(-(-(w // 4) // ITEM_VECTORS) for w in words)


@cuda.jit(device=True, inline=True)
def _items(nvec):
    return (nvec + ITEM_VECTORS - 1) // ITEM_VECTORS


@cuda.jit(device=True, inline=True)
def _prefix_vectors(a, before, nvec):
    """Of a matrix of nvec vectors whose items come after `before` others, the vectors in an expert's first a
    items."""
    return min(max(a - before, 0) * ITEM_VECTORS, nvec)


@cuda.jit(device=True, inline=True)
def _expert_prefix(a, nv0, nv1, nv2, n0, n01):
    """The vectors of each of an expert's three matrices in its first a items."""
    return _prefix_vectors(a, 0, nv0), _prefix_vectors(a, n0, nv1), _prefix_vectors(a, n01, nv2)


@cuda.jit(device=True, inline=True)
def _copy_from_host(src, dst, v, nvec, step, uv):
    """The 16-byte vectors v, v + step, ... below nvec at global byte address src (host memory the GPU maps)
    to dst (device), in order or interleaved (uv, see _slot_vector), four loads a thread issued before their
    stores: PCIe's latency is microseconds. The loads stay contiguous (PCIe reads whole lines); the stores
    scatter."""
    while v + 3 * step < nvec:
        a = src + int64(v) * 16
        s = int64(step) * 16
        a0, a1, a2, a3 = ldg4a(a)
        b0, b1, b2, b3 = ldg4a(a + s)
        c0, c1, c2, c3 = ldg4a(a + 2 * s)
        d0, d1, d2, d3 = ldg4a(a + 3 * s)
        stg4a(dst + int64(_slot_vector(v, uv)) * 16, a0, a1, a2, a3)
        stg4a(dst + int64(_slot_vector(v + step, uv)) * 16, b0, b1, b2, b3)
        stg4a(dst + int64(_slot_vector(v + 2 * step, uv)) * 16, c0, c1, c2, c3)
        stg4a(dst + int64(_slot_vector(v + 3 * step, uv)) * 16, d0, d1, d2, d3)
        v += 4 * step
    while v < nvec:
        a0, a1, a2, a3 = ldg4a(src + int64(v) * 16)
        stg4a(dst + int64(_slot_vector(v, uv)) * 16, a0, a1, a2, a3)
        v += step


@cuda.jit
def expert_copy_kernel(miss, nmiss, src0, src1, src2, pool0, pool1, pool2, words, uvs, state, pf, cur, key_of, have,
                       nxt, nsrc0, nsrc1, nsrc2, nxt2, fsrc0, fsrc1, fsrc2):
    """The misses cache_lookup_kernel just listed, copied by the SMs themselves from host memory the GPU maps
    (the registered GGUF: src_j, the device address of the layer's expert 0 of matrix j, expert e at
    src_j + 4 e words_j) into their slots of the pools (uint32 words, words_j per slot): no host in the
    loop, at ~92% of a DMA's rate over PCIe (bench/bench_zero_copy.py); matrix j interleaved on the way
    when uvs[j] > 0 (its 16-byte vectors per unit: the pools' layout, `interleave`). A miss (e, s, start)
    copies its items from start on (-2 - t: target t of the prefetch record `cur`, from where that prefetch
    stopped). Then the targets of record cur that this layer did not ask for, and those of record L + nxt (the
    last lookup's guess two layers ahead), keep what got in (have), and DEMAND_VECS / PREFETCH_VECS count the
    vectors each moved.
    nxt >= 0: then the blocks prefetch the targets cache_target_kernel picks after this lookup (they wait for
    its PF_TARGETED, at most TARGETS_WAIT_NS), record nxt's (nsrc_j: that layer's sources), or where it picked its guess for layer nxt2
    instead, record L + nxt2's (fsrc_j; _prefetch), once the last of them past its misses has raised PF_READY to
    this lookup's number: the compute stream's join is `await_ready_kernel`, not the kernel's end. The copy SMs go from the misses to the guesses with no
    launch in between, and no other kernel's blocks in between. Launched on COPY_BLOCKS blocks: a block of
    the fused gemvs takes a whole SM's registers, so the hits can run beside the copy only on SMs it leaves
    free (CUDABackend.expert_ffn sizes their grids to those)."""
    grid_dependency()
    placed = cuda.shared.array(1, int32)
    t0, step = cuda.grid(1), cuda.gridsize(1)
    nv0, nv1, nv2 = words[0] >> 2, words[1] >> 2, words[2] >> 2
    n0, n01 = _items(nv0), _items(nv0) + _items(nv1)
    full = n01 + _items(nv2)
    lk = state[LOOKUP_NO]
    rc = _record(pf, cur, 0)
    live = cur >= 0 and pf[rc + PF_GEN] == lk - 1
    nt = pf[rc + PF_NT] if live else int64(0)
    got = min(pf[rc + PF_NEXT], nt * full) if live else int64(0)   # every item the prefetch took is in
    moved = int64(0)
    for i in range(nmiss[0]):
        e, s, c = int64(miss[3 * i]), int64(miss[3 * i + 1]), int64(miss[3 * i + 2])
        a = c if c >= 0 else min(max(got - (-2 - c) * full, 0), full)
        v0, v1, v2 = _expert_prefix(a, nv0, nv1, nv2, n0, n01)
        moved += nv0 - v0 + nv1 - v1 + nv2 - v2
        _copy_from_host(src0 + 4 * e * words[0], gaddr(pool0, 0) + 4 * s * words[0], v0 + t0, nv0, step, uvs[0])
        _copy_from_host(src1 + 4 * e * words[1], gaddr(pool1, 0) + 4 * s * words[1], v1 + t0, nv1, step, uvs[1])
        _copy_from_host(src2 + 4 * e * words[2], gaddr(pool2, 0) + 4 * s * words[2], v2 + t0, nv2, step, uvs[2])
    if t0 == 0:
        ahead = _prefetched(pf, rc, nt, got, full, key_of, have, nv0, nv1, nv2, n0, n01)
        r2 = _record(pf, nxt, 1)
        if nxt >= 0 and pf[r2 + PF_GEN] == lk - 1:    # the last lookup's guess for two layers on
            nt2 = pf[r2 + PF_NT]
            ahead += _prefetched(pf, r2, nt2, min(pf[r2 + PF_NEXT], nt2 * full), full, key_of, have, nv0, nv1, nv2,
                                 n0, n01)
        state[DEMAND_VECS] += moved
        state[PREFETCH_VECS] += ahead
    if nxt >= 0:
        cuda.threadfence()                            # this block's copies are visible before it is counted
        cuda.syncthreads()
        if cuda.threadIdx.x == 0:
            if cuda.atomic.add(pf, PF_DONE, 1) == cuda.gridDim.x - 1:
                cuda.threadfence()
                cuda.atomic.max(pf, PF_READY, lk)
            end = globaltimer() + TARGETS_WAIT_NS
            while _pf_now(pf, PF_TARGETED) < lk and globaltimer() < end:   # cache_target_kernel placed them
                pass
            placed[0] = _pf_now(pf, PF_TARGETED) >= lk
        cuda.syncthreads()
        rn, rf = _record(pf, nxt, 0), _record(pf, nxt2, 1)
        if not placed[0]:
            return
        if _pf_now(pf, rn + PF_GEN) == lk:
            _prefetch(pf, rn, nsrc0, nsrc1, nsrc2, pool0, pool1, pool2, words, uvs, n0, n01, full)
        elif nxt2 >= 0 and _pf_now(pf, rf + PF_GEN) == lk:
            _prefetch(pf, rf, fsrc0, fsrc1, fsrc2, pool0, pool1, pool2, words, uvs, n0, n01, full)


@cuda.jit(device=True, inline=True)
def _pf_now(pf, i):
    """pf[i] as cache_target_kernel, running beside the copy kernel, wrote it (ld_acquire)."""
    return ld_acquire(gaddr(pf, 0) + 8 * i)


@cuda.jit(device=True, inline=True)
def _prefetched(pf, r, nt, got, full, key_of, have, nv0, nv1, nv2, n0, n01):
    """The nt targets of the record at r, once its prefetch has stopped after `got` items: each one this layer did
    not ask for (and still in its slot) keeps its prefix (have); returns the vectors they all got."""
    ahead = int64(0)
    for t in range(nt):
        a = min(max(got - t * full, 0), full)
        p0, p1, p2 = _expert_prefix(a, nv0, nv1, nv2, n0, n01)
        ahead += p0 + p1 + p2
        q = r + PF_TARGET + 4 * t
        if pf[q + PF_REQ] == 0 and key_of[pf[q + PF_SLOT]] == pf[q + PF_KEY]:
            have[pf[q + PF_SLOT]] = a
    return ahead


@cuda.jit(device=True, inline=True)
def _prefetch(pf, rr, src0, src1, src2, pool0, pool1, pool2, words, uvs, n0, n01, full):
    """The targets of the record at rr (cache_lookup_kernel's guess; src_j their layer's), copied item by item in
    their order, each block taking the next item with an atomic, until all are in or a newer lookup raises
    PF_STOP (checked before each item). Every item taken is finished, so the first min(NEXT, NT x items)
    are in when the kernel ends. It uses the link while the misses compute and the next layer's attention
    runs, which it would otherwise idle through; a wrong guess costs no link time a demand copy needed."""
    tid = cuda.threadIdx.x
    nv0, nv1, nv2 = words[0] >> 2, words[1] >> 2, words[2] >> 2
    gen, total = _pf_now(pf, rr + PF_GEN), _pf_now(pf, rr + PF_NT) * full
    take = cuda.shared.array(1, int64)
    while True:
        if tid == 0:
            it = int64(-1)
            if cuda.atomic.add(pf, PF_STOP, 0) <= gen:
                it = cuda.atomic.add(pf, rr + PF_NEXT, 1)
            take[0] = it
        cuda.syncthreads()
        it = take[0]
        cuda.syncthreads()
        if it < 0 or it >= total:
            return
        t = it // full
        a = it - t * full
        q = rr + PF_TARGET + 4 * t
        e, s = _pf_now(pf, q + PF_EXPERT), _pf_now(pf, q + PF_SLOT)
        if a < n0:
            _copy_from_host(src0 + 4 * e * words[0], gaddr(pool0, 0) + 4 * s * words[0], a * ITEM_VECTORS + tid,
                            min((a + 1) * ITEM_VECTORS, nv0), cuda.blockDim.x, uvs[0])
        elif a < n01:
            _copy_from_host(src1 + 4 * e * words[1], gaddr(pool1, 0) + 4 * s * words[1],
                            (a - n0) * ITEM_VECTORS + tid, min((a - n0 + 1) * ITEM_VECTORS, nv1), cuda.blockDim.x,
                            uvs[1])
        else:
            _copy_from_host(src2 + 4 * e * words[2], gaddr(pool2, 0) + 4 * s * words[2],
                            (a - n01) * ITEM_VECTORS + tid, min((a - n01 + 1) * ITEM_VECTORS, nv2),
                            cuda.blockDim.x, uvs[2])


@cuda.jit
def await_ready_kernel(pf, state):
    """The compute stream's join with a copy kernel that prefetches after its misses: one thread polls
    PF_READY until it reaches the lookup's number (the copy kernel's blocks are resident by then: they were
    launched before the hits, which left them their SMs)."""
    grid_dependency()
    lk = state[LOOKUP_NO]
    while cuda.atomic.add(pf, PF_READY, 0) < lk:
        pass


@cuda.jit
def cache_tick_kernel(score, wt, factor):
    """ExpertCache.end_token for LFU: the weight of a use grows by factor (decay^-n); past 1e200 every
    score is divided by it and it restarts at 1 (one block)."""
    grid_dependency()
    w = wt[0] * factor
    cuda.syncthreads()
    if w > 1e200:
        for k in range(cuda.threadIdx.x, score.shape[0], THREADS):
            score[k] = score[k] / w
        w = 1.0
    if cuda.threadIdx.x == 0:
        wt[0] = w


@cuda.jit
def copy_kernel(src, dst):
    """Plain device-to-device copy of uint32 words (the bandwidth yardstick)."""
    grid_dependency()
    for i in range(cuda.grid(1), src.shape[0], cuda.gridsize(1)):
        dst[i] = src[i]
