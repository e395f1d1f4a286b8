"""CPU kernels on GGUF blocks vs numpy (gguf.quants dequantisation, float64 references).

Error measure everywhere: max|y - ref| / max|ref| over the whole output, ref in float64 from the
dequantised weights and the exact (unquantised) activation. Float weights: < 1e-5. Quantized
weights: < 1e-3 (the kernel quantizes the activation per 32 values with one float scale, as
llama.cpp does, but to 16-bit integers, so the measured error is ~1e-5 to 1e-4).
"""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants
from hypothesis import given, settings, strategies as st

from localmoe.backends.cpu import kernels as K

TYPES = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0]
FLOAT_TOL = 1e-5
QUANT_TOL = 1e-3


def tol(qt) -> float:
    return QUANT_TOL if int(qt) in K.QUANTIZED else FLOAT_TOL


def encode(w: np.ndarray, qt) -> tuple[np.ndarray, np.ndarray]:
    """(raw uint8 blocks, dequantised float64 values) of w [..., cols] as type qt."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if qt == T.F32:
        raw = w.view(np.uint8)
    elif qt == T.F16:
        raw = w.astype(np.float16).view(np.uint8)
    else:
        raw = quants.quantize(w, qt)
    if qt == T.F32:
        deq = w
    elif qt == T.F16:
        deq = raw.view(np.float16).astype(np.float32)
    else:
        deq = quants.dequantize(raw, qt)
    assert raw.dtype == np.uint8 and deq.shape == w.shape
    return raw, deq.astype(np.float64)


def rel_err(y, ref) -> float:
    return float(np.abs(np.asarray(y, np.float64) - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module", autouse=True)
def _compiled():
    K.compile_all()


# ---------------------------------------------------------------------------------------- matmul

@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows,cols", [(37, 96), (4096, 1024)])
@pytest.mark.parametrize("n", [1, 3, 70])
def test_matmul_vs_numpy(qt, rows, cols, n):
    rng = np.random.default_rng(rows * 7 + cols + n + int(qt))
    raw, deq = encode(rng.standard_normal((rows, cols), dtype=np.float32), qt)
    x = rng.standard_normal((n, cols), dtype=np.float32) + 0.1
    y = K.matmul(raw, qt, x)
    assert y.shape == (n, rows) and y.dtype == np.float32
    assert rel_err(y, x.astype(np.float64) @ deq.T) < tol(qt)


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n", [1, 5])
def test_matmul_heads_vs_numpy(qt, n):
    rng = np.random.default_rng(int(qt) + n)
    heads, rows, cols = 6, 40, 64
    raw, deq = encode(rng.standard_normal((heads, rows, cols), dtype=np.float32), qt)
    x = rng.standard_normal((n, heads, cols), dtype=np.float32)
    y = K.matmul_heads(raw, qt, x)
    assert y.shape == (n, heads, rows) and y.dtype == np.float32
    assert rel_err(y, np.einsum("nhc,hrc->nhr", x.astype(np.float64), deq)) < tol(qt)


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_matvec_1d_and_readonly_memmap(qt, tmp_path):
    """A 1-D x gives a 1-D y; weights may be a read-only memory map (as GGUFReader gives)."""
    rng = np.random.default_rng(5)
    raw, deq = encode(rng.standard_normal((50, 160), dtype=np.float32), qt)
    path = tmp_path / "w.bin"
    raw.tofile(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r", shape=raw.shape)
    x = rng.standard_normal(160, dtype=np.float32)
    y = K.matmul(mm, qt, x)
    assert y.shape == (50,)
    assert rel_err(y, deq @ x.astype(np.float64)) < tol(qt)
    # a row range of the map (what a fused tensor split gives) reads the right rows
    y2 = K.matmul(mm[10:30], qt, x)
    np.testing.assert_array_equal(y2, y[10:30])


def test_matvec_odd_float_width():
    """Float types need no block alignment: cols not a multiple of 16 go through the tail loop."""
    rng = np.random.default_rng(6)
    for qt in (T.F32, T.F16, T.BF16):
        raw, deq = encode(rng.standard_normal((9, 45), dtype=np.float32), qt)
        x = rng.standard_normal((2, 45), dtype=np.float32)
        assert rel_err(K.matmul(raw, qt, x), x.astype(np.float64) @ deq.T) < FLOAT_TOL


def test_matmul_rejects_bad_shapes():
    raw, _ = encode(np.ones((4, 64), np.float32), T.Q8_0)
    with pytest.raises(ValueError):
        K.matmul(raw, T.Q8_0, np.ones(96, np.float32))
    with pytest.raises(ValueError):
        K.matmul(raw, T.Q4_K, np.ones(64, np.float32))


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_dequantize_rows_equals_gguf(qt):
    """The embedding lookup: the chosen rows, bit for bit what gguf's dequantize makes of them (random bytes:
    every scale and value pattern, inf included; a NaN stays NaN, its payload quietened), only valid ids."""
    rng = np.random.default_rng(int(qt))
    cols = 96 if qt == T.BF16 or int(qt) in K.QUANTIZED else 45
    row_bytes = cols // 32 * K._BLOCK_BYTES[int(qt)] if int(qt) in K.QUANTIZED else cols * (4 if qt == T.F32 else 2)
    raw = rng.integers(0, 256, (50, row_bytes), dtype=np.uint8)
    ids = rng.integers(0, 50, 7)
    ref = raw[ids].view(np.float32) if qt == T.F32 else quants.dequantize(raw[ids], qt).astype(np.float32)
    got, ref = K.dequantize_rows(raw, qt, ids), ref.reshape(7, cols)
    assert got.shape == (7, cols)
    assert ((got.view(np.uint32) == ref.view(np.uint32)) | (np.isnan(got) & np.isnan(ref))).all()  # NaNs: quiet
    with pytest.raises(IndexError):
        K.dequantize_rows(raw, qt, [50])


@settings(max_examples=25, deadline=None)
@given(qt=st.sampled_from(TYPES), rows=st.integers(1, 70), nbk=st.integers(1, 9),
       n=st.integers(1, 5), seed=st.integers(0, 2**31))
def test_matmul_hypothesis(qt, rows, nbk, n, seed):
    rng = np.random.default_rng(seed)
    cols = 32 * nbk
    raw, deq = encode(rng.standard_normal((rows, cols), dtype=np.float32), qt)
    x = rng.standard_normal((n, cols), dtype=np.float32).astype(np.float64)
    y = K.matmul(raw, qt, x.astype(np.float32))
    # With one or a few outputs max|ref| can be tiny by cancellation, so here the error is measured
    # against the bound sum_i |x_i w_i| rather than against max|ref|.
    err = np.abs(y - x @ deq.T).max() / (np.abs(x) @ np.abs(deq).T).max()
    assert err < tol(qt)


# ------------------------------------------------------------------------------------ expert_ffn

def ffn_ref(x, ids, wts, g, u, d):
    """float64 reference; g, u [E, I, H], d [E, H, I] dequantised."""
    out = np.zeros(x.shape, np.float64)
    for t in range(x.shape[0]):
        for e, w in zip(ids[t], wts[t]):
            a = g[e] @ x[t]
            h = a / (1 + np.exp(-a)) * (u[e] @ x[t])
            out[t] += w * (d[e] @ h)
    return out


def poison(raw: np.ndarray, qt, experts) -> None:
    """Make the given experts' blocks NaN (scales for quantized types, values for float types)."""
    for e in experts:
        if qt == T.Q8_0 or qt == T.Q4_0:
            bs = 34 if qt == T.Q8_0 else 18
            blocks = raw[e].reshape(raw.shape[1], -1, bs)
            blocks[:, :, 0] = 0x00
            blocks[:, :, 1] = 0x7E  # fp16 NaN
        elif qt == T.F32:
            raw[e].view(np.float32)[:] = np.nan
        else:
            raw[e].view(np.uint16)[:] = 0x7FC0  # NaN as both F16 and BF16


def make_experts(rng, E, I, H, qts, fused):
    gq, uq, dq = qts
    g = rng.standard_normal((E, I, H), dtype=np.float32) * 0.2
    u = rng.standard_normal((E, I, H), dtype=np.float32) * 0.2
    d = rng.standard_normal((E, H, I), dtype=np.float32) * 0.2
    draw, dd = encode(d, dq)
    if fused:
        graw, gu = encode(np.concatenate([g, u], axis=1), gq)
        return (graw, None, draw), (gu[:, :I], gu[:, I:], dd)
    graw, gd = encode(g, gq)
    uraw, ud = encode(u, uq)
    return (graw, uraw, draw), (gd, ud, dd)


@pytest.mark.parametrize("n", [1, 3, 70])
@pytest.mark.parametrize("qts,fused", [
    ((T.Q8_0, T.Q8_0, T.Q8_0), False),
    ((T.Q8_0, T.Q8_0, T.Q8_0), True),
    ((T.Q4_0, T.Q4_0, T.Q4_0), True),
    ((T.Q4_0, T.Q8_0, T.F16), False),
    ((T.F32, T.BF16, T.Q4_0), False),
    ((T.F16, T.F16, T.F32), True),
], ids=lambda v: "-".join(t.name for t in v) if isinstance(v, tuple) else ("fused" if v else "split"))
def test_expert_ffn_vs_numpy(n, qts, fused):
    rng = np.random.default_rng(n + 100 * fused + sum(int(q) for q in qts))
    E, I, H, k = 9, 64, 96, 3
    (graw, uraw, draw), (gd, ud, dd) = make_experts(rng, E, I, H, qts, fused)
    x = rng.standard_normal((n, H), dtype=np.float32)
    # tokens choose among experts 0..5 only; 6..8 are poisoned and must never be read
    ids = np.stack([rng.choice(6, k, replace=False) for _ in range(n)]).astype(np.int32)
    wts = rng.random((n, k), dtype=np.float32) + 0.1
    for raw, qt in ((graw, qts[0]), (uraw, qts[1]), (draw, qts[2])):
        if raw is not None:
            poison(raw, qt, [6, 7, 8])
    y = K.expert_ffn(x, ids, wts, graw, qts[0], draw, qts[2], up=uraw, up_type=qts[1])
    assert y.shape == (n, H) and y.dtype == np.float32
    assert np.isfinite(y).all()
    ref = ffn_ref(x.astype(np.float64), ids, wts, gd, ud, dd)
    quantized = any(int(q) in K.QUANTIZED for q in qts)
    assert rel_err(y, ref) < (2 * QUANT_TOL if quantized else FLOAT_TOL)


def test_expert_ffn_single_token_and_split_views():
    """1-D x / ids / weights; gate and up given as row-range views of one fused tensor."""
    rng = np.random.default_rng(11)
    E, I, H = 4, 32, 64
    (graw, _, draw), (gd, ud, dd) = make_experts(rng, E, I, H, (T.Q8_0, T.Q8_0, T.Q8_0), True)
    x = rng.standard_normal(H, dtype=np.float32)
    ids, wts = np.array([3, 1]), np.array([0.7, 0.3], np.float32)
    y_fused = K.expert_ffn(x, ids, wts, graw, T.Q8_0, draw, T.Q8_0)
    y_split = K.expert_ffn(x, ids, wts, graw[:, :I], T.Q8_0, draw, T.Q8_0,
                           up=graw[:, I:], up_type=T.Q8_0)
    assert y_fused.shape == (H,)
    np.testing.assert_array_equal(y_fused, y_split)
    ref = ffn_ref(x[None].astype(np.float64), ids[None], wts[None], gd, ud, dd)[0]
    assert rel_err(y_fused, ref) < 2 * QUANT_TOL


def test_expert_ffn_repeated_expert_and_bad_id():
    rng = np.random.default_rng(12)
    E, I, H = 3, 32, 64
    (graw, uraw, draw), (gd, ud, dd) = make_experts(rng, E, I, H, (T.F32, T.F32, T.F32), False)
    x = rng.standard_normal((2, H), dtype=np.float32)
    ids = np.array([[1, 1], [2, 0]])
    wts = np.array([[0.5, 0.25], [1.0, -1.0]], np.float32)
    y = K.expert_ffn(x, ids, wts, graw, T.F32, draw, T.F32, up=uraw, up_type=T.F32)
    assert rel_err(y, ffn_ref(x.astype(np.float64), ids, wts, gd, ud, dd)) < FLOAT_TOL
    with pytest.raises(ValueError):
        K.expert_ffn(x, ids + 5, wts, graw, T.F32, draw, T.F32, up=uraw, up_type=T.F32)


# ----------------------------------------------------------------------------- elementwise / misc

def test_silu_rmsnorm():
    rng = np.random.default_rng(13)
    x = rng.standard_normal((3, 200), dtype=np.float32) * 4
    x64 = x.astype(np.float64)
    assert rel_err(K.silu(x), x64 / (1 + np.exp(-x64))) < FLOAT_TOL
    w = rng.standard_normal(200, dtype=np.float32)
    ref = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-6) * w
    assert rel_err(K.rmsnorm(x, w, 1e-6), ref) < FLOAT_TOL
    assert rel_err(K.rmsnorm(x[0], w, 1e-6), ref[0]) < FLOAT_TOL


def test_quantize_activation():
    rng = np.random.default_rng(14)
    x = rng.standard_normal((2, 64), dtype=np.float32)
    xq, xd = K.quantize_activation(x)
    assert xq.dtype == np.int16 and np.abs(xq.astype(np.int32)).max() <= 32767
    back = (xq.reshape(-1, 32) * xd[:, None]).reshape(x.shape)
    assert np.abs(back - x).max() <= xd.max() / 2 + 1e-7


def test_compile_all_is_quick_when_cached():
    assert K.compile_all() < 5.0
