"""The CUDA backend against the CPU backend (same GGUF bytes, same inputs).

Without a usable GPU every GPU test skips ("no CUDA GPU"); the backend-selection test runs everywhere.
The model-level tests read the reference set written by tests/cuda_refs.py (GGUFs + CPU logits) from
$LOCALMOE_CUDA_REFS (default .cudaref).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from localmoe.backends import DenseFFN, Normed, Weight
from localmoe.backends.cuda import available
from localmoe.gguf.format import GGMLType

GPU, WHY = available()
needs_gpu = pytest.mark.skipif(not GPU, reason="no CUDA GPU")
REFS = Path(os.environ.get("LOCALMOE_CUDA_REFS", Path(__file__).parent.parent / ".cudaref"))

TYPES = [GGMLType.Q4_0, GGMLType.Q8_0, GGMLType.F32, GGMLType.F16, GGMLType.BF16]


def rel(a, b) -> float:
    """Relative max difference of a GPU result a (must be a device array: activations stay on the GPU)
    from a host reference b."""
    if not isinstance(b, np.ndarray) or hasattr(a, "__cuda_array_interface__"):
        import cupy
        assert isinstance(a, cupy.ndarray), f"backend returned {type(a)}, not a device array"
        a = cupy.asnumpy(a)
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_rope_tables_gathered_rows_are_exact():
    """The per-backend cached rope tables (one table for 0..n_ctx-1, rows gathered at the positions)
    equal Rope.tables bit for bit, plain and YaRN, also after a regrowth for a longer context."""
    from localmoe.backends.cpu import CPUBackend
    from localmoe.models.rope import Rope, rope_tables
    be = CPUBackend()
    for rope in (Rope(64, 10000.0), Rope(64, 1e6, 128.0, 8192, 32.0, 1.0, 1.3)):
        for n_ctx, p0, n in [(256, 0, 1), (256, 0, 37), (256, 5, 1), (256, 255, 1), (2048, 256, 1),
                             (2048, 300, 128), (2048, 1000, 3), (1024, 7, 600)]:
            pos = np.arange(p0, p0 + n, dtype=np.int32)
            cos, sin = rope_tables(be, rope, n_ctx, pos)
            ref = rope.tables(pos)
            assert cos.dtype == np.float32 and np.array_equal(cos, ref[0]) and np.array_equal(sin, ref[1])


def test_every_kernel_waits_for_its_predecessor():
    """Programmatic dependent launch lets a kernel start before the one before it ends, so every kernel's
    first statement must be grid_dependency() (generated kernels get it from _jit_source), or every statement
    before it may read only arrays no kernel writes: the step's positions (copied from the host) and the rope
    tables. Read from the source: runs without numba-cuda."""
    import ast
    src = (Path(__file__).parent.parent / "localmoe/backends/cuda/kernels.py").read_text()
    kernels = [f for f in ast.walk(ast.parse(src)) if isinstance(f, ast.FunctionDef)
               and any(ast.unparse(d) == "cuda.jit" for d in f.decorator_list)]
    assert len(kernels) >= 7
    for f in kernels:
        body = f.body[1:] if isinstance(f.body[0], ast.Expr) and isinstance(f.body[0].value, ast.Constant) else f.body
        wait = [i for i, st in enumerate(body) if ast.unparse(st) == "grid_dependency()"]
        assert wait, f"kernel {f.name} (line {f.lineno}) never waits"
        early = [n.value.id for st in body[:wait[0]] for n in ast.walk(st)
                 if isinstance(n, ast.Subscript) and isinstance(n.value, ast.Name)]
        assert set(early) <= {"positions", "cos", "sin"}, f"kernel {f.name} reads {early} before its wait"
    jit_source = next(f for f in ast.walk(ast.parse(src)) if isinstance(f, ast.FunctionDef) and f.name == "_jit_source")
    assert "'    grid_dependency()'" in ast.unparse(jit_source)


def mean_kl(ref: np.ndarray, ours: np.ndarray) -> float:
    def logsm(z):
        z = z.astype(np.float64)
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))
    lp, lq = logsm(ref), logsm(ours)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def make_weight(rng, shape, t) -> Weight:
    from gguf.quants import quantize
    a = rng.standard_normal(shape).astype(np.float32)
    if t == GGMLType.F32:
        raw = a.view(np.uint8).reshape(*shape[:-1], -1)
    elif t == GGMLType.F16:
        raw = a.astype(np.float16).view(np.uint8).reshape(*shape[:-1], -1)
    else:
        raw = quantize(a, t)
    return Weight(raw, t, shape[-1], f"{t.name}{shape}")


def test_backend_selection():
    from localmoe.errors import InputError
    from localmoe.model import make_backend
    assert make_backend("auto").name == ("cuda" if GPU else "cpu")
    if not GPU:
        with pytest.raises(InputError, match="cuda"):
            make_backend("cuda")


@pytest.fixture(scope="module")
def backends():
    from localmoe.backends.cpu import CPUBackend
    from localmoe.backends.cuda import CUDABackend
    return CUDABackend(), CPUBackend()


@needs_gpu
@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows,cols", [(300, 4096), (64, 2048), (300, 128), (40, 96), (17, 32)])
@pytest.mark.parametrize("n", [1, 5])
def test_linear(backends, t, rows, cols, n):
    gpu, cpu = backends
    rng = np.random.default_rng(rows * cols + n)
    w = make_weight(rng, (rows, cols), t)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    assert rel(gpu.linear(w, x), cpu.linear(w, x)) < 1e-4


@needs_gpu
@pytest.mark.parametrize("t", [GGMLType.Q4_0, GGMLType.Q8_0, GGMLType.F16, GGMLType.F32], ids=lambda t: t.name)
@pytest.mark.parametrize("cols", [1024, 4096, 256])
@pytest.mark.parametrize("n", [1, 3])
def test_linear_of_the_norm_plus_residual(backends, t, cols, n):
    """linear(w, Normed(x, weight, eps), residual=r) = linear(w, rmsnorm(x) * weight) + r: norm and add in the
    gemv's own launch where its kernel can (fast2 at 512..4096 columns: the layers' norms, MLA's q_b with its
    x a row-strided view of the stacked q_a + kv_a output; f32rows: the router) or as more calls."""
    import cupy
    gpu, cpu = backends
    rng = np.random.default_rng(cols + n + int(t))
    w = make_weight(rng, (300, cols), t)
    wide = cupy.asarray(rng.standard_normal((n, cols + 576)).astype(np.float32) * 3)
    nw = rng.uniform(0.5, 1.5, cols).astype(np.float32)
    x = wide[:, :cols]
    r = rng.standard_normal((n, 300)).astype(np.float32)
    ref = cpu.linear(w, Normed(cupy.asnumpy(x), nw, 1e-6))
    assert rel(gpu.linear(w, Normed(x, nw, 1e-6)), ref) < 1e-4
    assert rel(gpu.linear(w, gpu.rmsnorm(x, nw, 1e-6)), ref) < 1e-4
    assert rel(gpu.linear(w, Normed(x, nw, 1e-6), residual=cupy.asarray(r)), ref + r) < 1e-4
    assert np.array_equal(cpu.linear(w, Normed(cupy.asnumpy(x), nw, 1e-6), residual=r), ref + r)


@needs_gpu
@pytest.mark.parametrize("t", [GGMLType.Q4_0, GGMLType.Q8_0, GGMLType.F16], ids=lambda t: t.name)
def test_linear_heads(backends, t):
    gpu, cpu = backends
    rng = np.random.default_rng(1)
    w = make_weight(rng, (4, 64, 128), t)
    x = rng.standard_normal((3, 4, 128)).astype(np.float32)
    ref = cpu.linear_heads(w, x)
    assert rel(gpu.linear_heads(w, x), ref) < 1e-4
    # into a strided view: the first 64 of 100 values per row of a wider buffer (MLA's query), the rest untouched
    import cupy
    wide = rng.standard_normal((3, 4, 100)).astype(np.float32)
    out = cupy.asarray(wide)
    assert gpu.linear_heads(w, x, out=out[..., :64]) is not None
    assert rel(out[..., :64], ref) < 1e-4 and np.array_equal(cupy.asnumpy(out[..., 64:]), wide[..., 64:])


@needs_gpu
@pytest.mark.parametrize("tg,tu", [(GGMLType.Q4_0, GGMLType.Q4_0), (GGMLType.Q8_0, GGMLType.Q8_0),
                                   (GGMLType.F16, GGMLType.F16), (GGMLType.Q8_0, GGMLType.F16)],
                         ids=lambda t: t.name)
@pytest.mark.parametrize("n", [1, 5])
def test_glu(backends, tg, tu, n):
    """silu(gate x) * up x: one fused gemv when gate and up are stored alike, else two and the product."""
    gpu, cpu = backends
    rng = np.random.default_rng(n + int(tg) + 3 * int(tu))
    gate, up = make_weight(rng, (192, 512), tg), make_weight(rng, (192, 512), tu)
    x = rng.standard_normal((n, 512)).astype(np.float32)
    assert rel(gpu.glu(gate, up, x), cpu.glu(gate, up, x)) < 1e-4
    nx = Normed(x, rng.uniform(0.5, 1.5, 512).astype(np.float32), 1e-6)       # (Q4_0/Q8_0: in fast2's prologue)
    assert rel(gpu.glu(gate, up, nx), cpu.glu(gate, up, nx)) < 1e-4


@needs_gpu
@pytest.mark.parametrize("beta", [0.0, 0.4])
def test_mla_rope(backends, beta):
    """MLA's step between its projections and the attention equals the CPU backend's: the query (W_kb q_nope,
    then the rotated rope part, llama-4 scaled) and the cache rows written at scattered positions — the other
    rows untouched. W_kb in the kernel (Q4_0 / Q8_0, in the file's order and interleaved, rows shared by 1 and 2
    threads) and by a gemv of its own (F32; Q4_0 32 columns wide)."""
    import cupy
    from localmoe.models.rope import Rope, rope_table
    gpu, cpu = backends
    rng = np.random.default_rng(int(10 * beta))
    heads, r, cap = 4, 16, 300
    rope = Rope(r, 1e6, 16.0, 64, 32.0, 1.0, 1.2)
    kb_cases = [(GGMLType.Q4_0, 64, 256, True), (GGMLType.Q8_0, 128, 64, True), (GGMLType.Q4_0, 256, 128, True),
                (GGMLType.F32, 32, 64, False), (GGMLType.Q4_0, 32, 64, False)]
    for t, nope, kvr, fused in kb_cases:
        k_b = make_weight(rng, (heads, kvr, nope), t)
        assert (gpu._heads_proj(k_b, heads, nope) is not None) == fused
        for pos in (np.array([7], np.int32), np.array([3, 250, 120, 0, 99], np.int32)):
            n = len(pos)
            q = rng.standard_normal((n, heads, nope + r)).astype(np.float32)
            kv = rng.standard_normal((n, kvr + r)).astype(np.float32)
            w = rng.standard_normal(kvr).astype(np.float32)
            cache = rng.standard_normal((cap, kvr + r)).astype(np.float32)
            ref_cache = cache.copy()
            ref = cpu.mla_rope(q, kv, pos, *rope_table(cpu, rope, 512), w, 1e-6, ref_cache, k_b, beta, 7)
            dev_cache = cupy.asarray(cache)
            query = gpu.mla_rope(cupy.asarray(q), cupy.asarray(kv), cupy.asarray(pos), *rope_table(gpu, rope, 512),
                                 w, 1e-6, dev_cache, k_b, beta, 7)
            assert rel(query[..., :kvr], ref[..., :kvr]) < 1e-4
            assert rel(query[..., kvr:], ref[..., kvr:]) < 1e-6
            assert rel(dev_cache, ref_cache) < 1e-6
            untouched = np.setdiff1d(np.arange(cap), pos)
            assert np.array_equal(cupy.asnumpy(dev_cache)[untouched], cache[untouched])


@needs_gpu
@pytest.mark.parametrize("t", [GGMLType.Q4_0, GGMLType.Q8_0, GGMLType.F32], ids=lambda t: t.name)
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("n", [1, 6])
@pytest.mark.parametrize("H", [256, 512])
def test_expert_ffn(backends, t, fused, n, H):
    """Against the CPU backend; also of a `Normed` x (at H = 512 fast2's gate/up launch applies the norm)
    plus a residual (added in the combine)."""
    gpu, cpu = backends
    rng = np.random.default_rng(n + 7 * fused + H)
    E, I, k = 8, 128, 3
    if fused:   # mistral4's layout: gate and up are views of one [E, 2I, H] tensor
        gu = make_weight(rng, (E, 2 * I, H), t)
        gate, up = (Weight(gu.raw[:, s], t, H) for s in (slice(0, I), slice(I, None)))
    else:
        gate, up = make_weight(rng, (E, I, H), t), make_weight(rng, (E, I, H), t)
    down = make_weight(rng, (E, H, I), t)
    x = rng.standard_normal((n, H)).astype(np.float32)
    ids = np.stack([rng.choice(E, k, replace=False) for _ in range(n)])
    wts = rng.random((n, k)).astype(np.float32)
    assert rel(gpu.expert_ffn(gate, up, down, x, ids, wts), cpu.expert_ffn(gate, up, down, x, ids, wts)) < 1e-4
    # a shared expert: stored like the routed ones it runs in their launches (matrix E); stored otherwise
    # (here F16, or 64 rows wide) it runs apart and is added in the combine
    for st, si in ((t, I), (GGMLType.F16, I), (t, 64)):
        shared = DenseFFN(make_weight(rng, (si, H), st), make_weight(rng, (si, H), st), make_weight(rng, (H, si), st))
        assert rel(gpu.expert_ffn(gate, up, down, x, ids, wts, shared=shared),
                   cpu.expert_ffn(gate, up, down, x, ids, wts, shared=shared)) < 1e-4
        nx, r = Normed(x, rng.uniform(0.5, 1.5, H).astype(np.float32), 1e-6), rng.standard_normal((n, H)).astype(np.float32)
        for sh in (None, shared):
            assert rel(gpu.expert_ffn(gate, up, down, nx, ids, wts, shared=sh, residual=r),
                       cpu.expert_ffn(gate, up, down, nx, ids, wts, shared=sh, residual=r)) < 1e-4


@needs_gpu
def test_rmsnorm_attention(backends):
    gpu, cpu = backends
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 320)).astype(np.float32)
    nw = rng.standard_normal(320).astype(np.float32)
    assert rel(gpu.rmsnorm(x, nw, 1e-6), cpu.rmsnorm(x, nw, 1e-6)) < 1e-5
    for n, T, pos0, hq, hkv, dk, dv in [(3, 7, 4, 8, 2, 40, 24), (1, 300, 299, 4, 1, 320, 256), (6, 6, 0, 4, 4, 16, 16)]:
        q = rng.standard_normal((n, hq, dk)).astype(np.float32)
        k = rng.standard_normal((T, hkv, dk)).astype(np.float32)
        v = rng.standard_normal((T, hkv, dv)).astype(np.float32)
        pos = np.arange(pos0, pos0 + n, dtype=np.int32)
        assert rel(gpu.attention(q, k, v, pos, 0.2), cpu.attention(q, k, v, pos, 0.2)) < 1e-5
    # MLA's decode layout: keys = a cache buffer longer than the context, values = a strided view of it;
    # and every query at the last key (pixtral's bidirectional use)
    import cupy
    buf = rng.standard_normal((512, 1, 320)).astype(np.float32)
    q = rng.standard_normal((4, 8, 320)).astype(np.float32)
    for pos in (np.arange(200, 204, dtype=np.int32), np.full(4, 99, np.int32)):
        kd = cupy.asarray(buf)
        ours = gpu.attention(q, kd, kd[..., :256], cupy.asarray(pos), 0.1)
        assert rel(ours, cpu.attention(q, buf, buf[..., :256], pos, 0.1)) < 1e-5


@needs_gpu
@pytest.mark.parametrize("E,k,n_group,topk_group", [(8, 2, 1, 1), (128, 4, 1, 1), (64, 6, 8, 3)])
@pytest.mark.parametrize("norm", [True, False])
def test_route(backends, E, k, n_group, topk_group, norm):
    """The GPU router chooses what moe.route_topk chooses, with the same weights; it also writes the slot rows
    the shared expert's fold reads: [ids, E] and [weights, 1]."""
    gpu, cpu = backends
    rng = np.random.default_rng(E + k + norm)
    logits = (3 * rng.standard_normal((37, E))).astype(np.float32)
    ids, w = gpu.route(logits, k, norm, 2.5, n_group, topk_group)
    ref_ids, ref_w = cpu.route(logits, k, norm, 2.5, n_group, topk_group)
    import cupy
    assert np.array_equal(cupy.asnumpy(ids), ref_ids)
    assert rel(w, ref_w) < 1e-5
    assert gpu._slot_rows[0] is ids and gpu._slot_rows[1] is w
    slots, sw = (cupy.asnumpy(a) for a in gpu._slot_rows[2:])
    assert np.array_equal(slots, np.concatenate([ref_ids, np.full((37, 1), E)], axis=1))
    assert np.array_equal(sw, np.concatenate([cupy.asnumpy(w), np.ones((37, 1), np.float32)], axis=1))
    out = cupy.full((37, k), -1, np.int32)
    assert gpu.route(logits, k, norm, 2.5, n_group, topk_group, out=out)[0] is out
    assert np.array_equal(cupy.asnumpy(out), ref_ids)


@needs_gpu
@pytest.mark.parametrize("case", ["mistral4-q4_0", "mixtral-q8_0"])
def test_decode_graph_matches_eager(case):
    """Decode steps replayed from the captured CUDA graph give the eager steps' logits and expert
    counts, across the cache's regrowth (a new graph) and a truncation (a chat's edit); so do both with
    programmatic dependent launch (kernels overlap their predecessors' tails) where the GPU has it."""
    path = REFS / f"{case}.gguf"
    assert path.exists(), f"no reference set at {REFS}: build it with python tests/cuda_refs.py {REFS}"
    import localmoe
    m = localmoe.load(path, backend="cuda")
    rng = np.random.default_rng(5)
    prompt = rng.integers(0, m.config.vocab_size, 250)
    steps = rng.integers(0, m.config.vocab_size, 12)
    be = m.backend
    runs = {}
    modes = [(g, False) for g in (False, True)] + ([(g, True) for g in (False, True)] if not be.pdl_why_not else [])
    for graphs, pdl in modes:
        be.use_graphs, be.pdl = graphs, pdl
        m.stats.reset()
        cache = m.new_cache()
        m.prefill(prompt, cache)
        out = [m.net.forward(np.array([t]), cache, last_only=True) for t in steps]   # crosses 256: regrowth
        cache.truncate(252)
        out += [m.net.forward(np.array([t]), cache, last_only=True) for t in steps[:3]]
        runs[graphs, pdl] = np.concatenate(out), m.stats.expert_counts.copy()
        assert not graphs or len(be._graphs) >= 1
    ref = runs[False, False]
    for mode, (logits, counts) in runs.items():
        assert np.abs(logits - ref[0]).max() <= 1e-5 * np.abs(ref[0]).max(), mode
        assert np.array_equal(counts, ref[1]), mode


CASES = [(c, q) for c in ("mistral4", "mixtral") for q in ("f32", "q8_0", "q4_0")]


@needs_gpu
@pytest.mark.parametrize("case,quant", CASES, ids=[f"{c}-{q}" for c, q in CASES])
def test_model_matches_cpu(case, quant, capsys):
    path = REFS / f"{case}-{quant}.gguf"
    assert path.exists(), f"no reference set at {REFS}: build it with python tests/cuda_refs.py {REFS}"
    import localmoe
    ids = np.load(REFS / f"{case}.ids.npy")
    ref = np.load(REFS / f"{case}-{quant}.logits.npy")
    m = localmoe.load(path, backend="cuda")
    ours = m.logits(ids)
    d, kl = rel(ours, ref), mean_kl(ref, ours)
    greedy_ref = np.load(REFS / f"{case}-{quant}.greedy.npy")
    greedy = np.array(list(m.generate(ids[:8], max_tokens=len(greedy_ref), stop=())))
    agree = float((greedy == greedy_ref).mean())
    with capsys.disabled():
        print(f"\n  {case} {quant}: max|diff|/max|logit| {d:.2e}, mean KL {kl:.2e}, "
              f"top-1 {float((ours.argmax(-1) == ref.argmax(-1)).mean()):.1%}, greedy {len(greedy)} tokens "
              f"{agree:.1%} identical")
    assert d < 1e-3 and kl < 1e-4
    if quant == "f32":
        assert list(greedy) == list(greedy_ref)


def restream(m, on_device: bool):
    """m's expert streamer replaced by a fresh one (same budget and policy) that decides on the device or not."""
    be, st = m.backend, m.backend.streamer
    be.stream_experts(st.budget, st.n_layers, st.n_experts, st.policy, host_buffer=m.file.data, on_device=on_device)
    m.net.stats.expert_cache = m._streamer = be.streamer


@needs_gpu
@pytest.mark.parametrize("mode", ["device", "pipelined", "in-turn"])
@pytest.mark.parametrize("case", ["mistral4-q4_0", "mixtral-q8_0"])
def test_streamed_experts_match_resident(case, mode):
    """With a --gpu-mem cache smaller than the experts (1.5 layers' worth), prompt and decode logits
    equal the resident run's, the cache misses and hits, and host->GPU bytes are counted. Decoded as one
    graph whose kernels decide and copy (device: the default where the file is mapped), or through the
    segmented graphs with the host a layer ahead (pipelined: stream memory operations) or in turn."""
    path = REFS / f"{case}.gguf"
    assert path.exists(), f"no reference set at {REFS}: build it with python tests/cuda_refs.py {REFS}"
    import localmoe
    ids = np.load(REFS / f"{case.split('-')[0]}.ids.npy")
    resident = localmoe.load(path, backend="cuda")
    assert resident.placement is not None and not resident.placement.streams()
    ex = resident.net.layers[0].experts
    budget = int(1.5 * resident.config.n_experts * ex.bytes_per_expert)
    streamed = localmoe.load(path, backend="cuda", gpu_mem=budget)
    assert streamed.placement.streams() and streamed.backend.streamer is not None
    if mode != "device":
        restream(streamed, on_device=False)
        assert streamed.backend.pipelined and streamed.backend.pipelined_why_not == ""
        streamed.backend.pipelined = mode == "pipelined"
    ref, ours = resident.logits(ids), streamed.logits(ids)
    assert rel(ours, ref) < 1e-6
    st = streamed.backend.streamer.stats()
    assert st["on_device"] == (mode == "device"), st["device_why_not"]
    a = list(resident.generate(ids[:8], max_tokens=16, stop=()))
    b = list(streamed.generate(ids[:8], max_tokens=16, stop=()))
    assert a == b                      # decoded through the captured graphs
    segments = next(iter(streamed.backend._graphs.values()))[0]
    moe = [L for L in streamed.net.layers if L.experts is not None]
    if mode == "device":
        assert len(segments) == 1      # nothing read back: the whole step is one graph
        st = streamed.backend.streamer  # LFU's clock: one tick a token, inside the replayed graph, none twice
        assert st.policy == "lfu" and st.cache._p.weight > 1
        assert float(st._dstate["wt"].get()[0]) == pytest.approx(st.cache._p.weight, rel=1e-12)
    else:
        per_layer = 2 if getattr(moe[0], "shared", None) is not None else 1   # the shared expert: while the host fetches
        assert len(segments) == per_layer * len(moe) + 1
        assert sum(a is not None for _, a, _ in segments) == sum(g is not None for _, _, g in segments) == len(moe)
    d = streamed.stats.as_dict()
    assert 0 < d["cache_hit_rate"] < 1 and d["bytes_h2d"] > 0
    ex, K = moe[0].experts, streamed.backend.K
    if mode == "device" and K.fast2_ok(int(ex.gate.type), ex.gate.cols) and K.fast2_ok(int(ex.down.type), ex.down.cols):
        st = streamed.backend.streamer.stats()      # decode copied beside the hits: the next router's guesses
        assert st["prefetch_loads"] > 0 and st["bytes_prefetch"] > 0     # were prefetched (and matched above)


@needs_gpu
@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("L,E,S", [(3, 16, 19), (10, 128, 600)])
def test_device_cache_decides_like_expert_cache(policy, L, E, S):
    """kernels.cache_lookup_kernel (+ cache_tick_kernel) on fresh random lookups makes localmoe/cache.py's
    ExpertCache's choices: the same slot for every id, the same misses in the same order, the same counters;
    with duplicate ids (prefill batches), a pool barely larger than a layer or several slots per thread, and
    LFU's rescaling (decay tiny); every other lookup with a shared expert's slot after each token's k."""
    import cupy as cp
    from localmoe.backends.cuda import kernels as K
    from localmoe.backends.cuda.streaming import device_cache_state
    from localmoe.cache import ExpertCache
    rng = np.random.default_rng()
    decay = 1e-9          # the weight passes 1e200 within ~20 tokens; growth ** 11 stays finite
    host = ExpertCache(S, L, E, policy, decay=decay)
    d = device_cache_state(cp, K, L, E, S)
    for step in range(200):
        layer = step % L
        n = 1 if rng.random() < 0.7 else int(rng.integers(2, 12))
        ids = np.concatenate([rng.choice(E, 4, replace=False) for _ in range(n)]).astype(np.int32)
        uniq = np.unique(ids)
        slots, miss = host.lookup(layer, uniq)
        shared = S + layer if step % 2 else -1       # a shared expert's slot: each token's product k + 1
        at = np.searchsorted(uniq, ids).reshape(n, 4)
        want, fresh = slots[at], miss[at]
        if shared >= 0:
            want = np.concatenate([want, np.full((n, 1), shared)], axis=1)
            fresh = np.concatenate([fresh, np.zeros((n, 1), bool)], axis=1)
        want, fresh = want.reshape(-1), fresh.reshape(-1)
        mats, split = cp.empty(len(want), np.int32), cp.empty(2 * len(want), np.int32)
        misses, nmiss = cp.full(3 * len(ids), -7, np.int32), cp.zeros(1, np.int32)
        K.cache_lookup_kernel[1, K.LOOKUP_THREADS](cp.asarray(ids), 4, shared, layer * E, E, policy == "lfu", d["slot_of"],
                                            d["key_of"], d["score"], d["last"], d["pin"], d["state"], d["wt"], mats,
                                            split, misses, nmiss, d["have"], 5, d["pf"], layer)
        assert np.array_equal(mats.get(), want), f"step {step}"
        assert np.array_equal(split.get(), np.concatenate([np.where(fresh, -1, want), np.where(fresh, want, -1)]))
        m = int(nmiss.get()[0])
        assert misses.get()[:3 * m].reshape(m, 3).tolist() == [[int(e), int(s), 0] for e, s in zip(uniq[miss], slots[miss])]
        if layer == L - 1:
            host.end_token(n)
            if policy == "lfu":
                K.cache_tick_kernel[1, K.THREADS](d["score"], d["wt"], (1 / decay) ** n)
    h = host.stats()
    got = dict(zip(("lookups", "hits", "misses", "evictions"), d["state"].get()[K.LOOKUPS:K.EVICTIONS + 1].tolist()))
    assert got == {k: h[k] for k in got} and 0 < h["evictions"]
    assert d["state"].get()[K.PREFETCHED] == d["state"].get()[K.FOUND] == 0
    assert np.array_equal(d["slot_of"].get().reshape(L, E), host.table())


@needs_gpu
@pytest.mark.parametrize("grid,threads", [(7, 256), (2, 4), (1, 1)])
@pytest.mark.parametrize("interleaved", [False, True])
def test_copy_kernel_moves_the_misses_from_mapped_host_memory(grid, threads, interleaved):
    """kernels.expert_copy_kernel copies each listed (expert, slot) pair's three matrices from pinned host
    memory (read by the SMs, no DMA) into the slots, and nothing else; interleaved: the first two matrices
    (a chunk of Q4_0 units, one of Q8_0) land as kernels.interleave lays them out, the third as it is. The
    small grids run its loop of four loads in flight and the rest after it; the large one only the rest."""
    import cupy as cp
    import cupyx
    from localmoe.backends.cuda import kernels as K
    from localmoe.backends.cuda.streaming import device_cache_state
    rng = np.random.default_rng()
    E, S = 6, 5
    words = (36 * K.CHUNK, 68 * K.CHUNK, 4 * 64) if interleaved else (4 * 37, 4 * 5, 4 * 64)
    qts = (K.Q4_0, K.Q8_0, None) if interleaved else (None, None, None)
    uvs = tuple(0 if q is None else K.UNIT_VECTORS[q] for q in qts)
    host = [cupyx.empty_pinned(E * w, np.uint32) for w in words]
    for h in host:
        h[:] = rng.integers(0, 2 ** 32, h.size, dtype=np.uint32)
    pools = [cp.asarray(rng.integers(0, 2 ** 32, S * w, dtype=np.uint32)) for w in words]
    before = [p.get() for p in pools]
    pairs = [(4, 1), (0, 3), (5, 0)]
    miss = cp.asarray(np.array([(e, s, 0) for e, s in pairs + [(2, 2)]], np.int32).reshape(-1))   # 4th: past the count
    d = device_cache_state(cp, K, 1, E, S)
    K.expert_copy_kernel[grid, threads](miss, cp.asarray(np.array([3], np.int32)), *(h.ctypes.data for h in host),
                                       *pools, words, uvs, d["state"], d["pf"], -1, d["key_of"], d["have"], -1, 0, 0, 0, -1, 0,
                                       0, 0)
    for h, p, b, w, q in zip(host, pools, before, words, qts):
        want = b.reshape(S, w).copy()
        for e, s in pairs:
            m = h.reshape(E, w)[e]
            want[s] = m if q is None else K.interleave(m.view(np.uint8), q).view(np.uint32)
        assert np.array_equal(p.get().reshape(S, w), want)
    assert d["state"].get()[K.DEMAND_VECS] == 3 * sum(words) // 4


class PrefetchRig:
    """L layers of E experts in pinned host memory (random words; Q4_0 and Q8_0 chunks, interleaved, then a plain
    matrix), an S-slot device cache, and the device mode's lookup and copy kernels on them."""

    def __init__(self, L, E, S, k, blocks):
        import cupy as cp
        import cupyx
        from localmoe.backends.cuda import kernels as K
        from localmoe.backends.cuda.streaming import device_cache_state
        rng = np.random.default_rng()
        self.K, self.cp, self.L, self.E, self.S, self.k, self.blocks = K, cp, L, E, S, k, blocks
        self.words = (36 * K.CHUNK * 3, 68 * K.CHUNK, 4 * 3000)
        self.uvs = (K.UNIT_VECTORS[K.Q4_0], K.UNIT_VECTORS[K.Q8_0], 0)
        self.qts = (K.Q4_0, K.Q8_0, None)
        self.full = K.expert_items(self.words)
        assert self.full == sum(-(-(w // 4) // K.ITEM_VECTORS) for w in self.words) and self.full >= 4
        assert self.words[2] // 4 > K.ITEM_VECTORS
        self.host = [cupyx.empty_pinned(L * E * w, np.uint32) for w in self.words]      # [layer, expert, words]
        for h in self.host:
            h[:] = rng.integers(0, 2 ** 32, h.size, dtype=np.uint32)
        self.pools = [cp.asarray(rng.integers(0, 2 ** 32, S * w, dtype=np.uint32)) for w in self.words]
        self.d = device_cache_state(cp, K, L, E, S)
        self.bufs = dict(mats=cp.empty(3 * k, np.int32), split=cp.empty(6 * k, np.int32),
                         miss=cp.empty(3 * k, np.int32), nmiss=cp.zeros(1, np.int32))
        self.middle = sum(-(-(w // 4) // K.ITEM_VECTORS) for w in self.words[:2]) + 1   # inside the third matrix

    def src(self, layer):
        return [h.ctypes.data + layer * self.E * w * 4 for h, w in zip(self.host, self.words)]

    def lookup(self, layer, ids, guess=None, guess2=None, meanwhile=None):
        """Layer `layer`'s lookup of ids, its targets from the guesses for the next layer and the one after (where
        there is a guess for the next); then its copy kernel (after meanwhile()). Returns the ids' slots."""
        cp, K, d, b, E = self.cp, self.K, self.d, self.bufs, self.E
        nxt, nxt2 = (-1 if g is None else layer + i for i, g in ((1, guess), (2, guess2)))
        g, g2 = (cp.asarray(np.array(x if x is not None else [0], np.int32)) for x in (guess, guess2))
        K.cache_lookup_kernel[1, K.LOOKUP_THREADS](
            cp.asarray(np.array(ids, np.int32)), self.k, -1, layer * E, E, True, d["slot_of"], d["key_of"], d["score"],
            d["last"], d["pin"], d["state"], d["wt"], b["mats"][:len(ids)], b["split"][:2 * len(ids)], b["miss"],
            b["nmiss"], d["have"], self.full, d["pf"], layer)
        if nxt >= 0:
            K.cache_target_kernel[1, K.LOOKUP_THREADS](
                True, d["slot_of"], d["key_of"], d["score"], d["last"], d["pin"], d["state"], d["have"], d["pf"],
                layer, g, len(guess), nxt * E, nxt, g2, 0 if guess2 is None else len(guess2), max(nxt2, 0) * E, nxt2)
        if meanwhile is not None:
            meanwhile()
        K.expert_copy_kernel[self.blocks, 64](
            b["miss"], b["nmiss"], *self.src(layer), *self.pools, self.words, self.uvs, d["state"], d["pf"], layer,
            d["key_of"], d["have"], nxt, *(self.src(nxt) if nxt >= 0 else (0, 0, 0)), nxt2,
            *(self.src(nxt2) if nxt2 >= 0 else (0, 0, 0)))
        return b["mats"][:len(ids)].get()

    def expected(self, layer, e, s, prefix=0, before=None):
        """Slot s's words once expert e of layer is in from item `prefix` on (the rest as `before` had them)."""
        out, b = [], 0
        for h, w, q in zip(self.host, self.words, self.qts):
            m = h.reshape(self.L, self.E, w)[layer, e]
            idx = np.repeat(np.arange(w // 4, dtype=np.uint32), 4)     # each 16-byte vector's own index
            if q is not None:
                m, idx = (self.K.interleave(a.view(np.uint8), q).view(np.uint32) for a in (m, idx))
            keep = idx < min(max(prefix - b, 0) * self.K.ITEM_VECTORS, w // 4)
            out.append(np.where(keep, before[len(out)][s * w:(s + 1) * w] if before else 0, m))
            b += -(-(w // 4) // self.K.ITEM_VECTORS)
        return out

    def holds(self, layer, e, s, prefix=0, before=None):
        return all(np.array_equal(p.reshape(self.S, w)[s].get(), x)
                   for p, w, x in zip(self.pools, self.words, self.expected(layer, e, s, prefix, before)))

    def prefix_vectors(self, a):
        b, n = 0, 0
        for w in self.words:
            n += min(max(a - b, 0) * self.K.ITEM_VECTORS, w // 4)
            b += -(-(w // 4) // self.K.ITEM_VECTORS)
        return n

    def stopper(self, stop_at, record, lookups):
        """meanwhile() for a lookup (the `lookups`-th) whose prefetch, record `record`, gets as far as stop_at:
        stopped before its first item (a newer lookup came first), as if stopped at `middle` (NEXT set by hand),
        or run to the end."""
        def stop():
            if stop_at in ("start", "middle"):
                self.d["pf"][self.K.PF_STOP] = lookups + 1
            if stop_at == "middle":
                self.d["pf"][record + self.K.PF_NEXT] = self.middle
        return stop


@needs_gpu
@pytest.mark.parametrize("stop_at", ["start", "middle", "all"])
def test_prefetch_then_the_next_lookup_finishes_what_it_needs(stop_at):
    """A lookup of layer 0 with a guess for layer 1 picks the guessed experts that are not resident as targets
    (in the guess's order, at most PREFETCH_TARGETS, slots after the misses'); the copy kernel copies the
    misses, raises PF_READY (await_ready_kernel's flag), then copies the targets item by item until stopped;
    layer 1's lookup stops it, finds the target it asks for as a miss that keeps its slot (FOUND), and the
    copy kernel copies only the items the prefetch did not: every slot layer 1 uses then holds its expert's
    bytes (interleaved), and the unasked target keeps its prefix (have), so a later lookup of it finishes it.
    stop_at: how far the prefetch got (stopped before its first item, NEXT set by hand as if it had stopped
    after the first of the third matrix's two items, the last one short, or run to the end)."""
    from localmoe.backends.cuda import kernels as K
    x = PrefetchRig(L=3, E=8, S=12, k=2, blocks=5)
    d, full, middle = x.d, x.full, x.middle
    r = K.PF_HEAD + 1 * K.PF_WORDS
    before = [p.get() for p in x.pools]
    slots0 = x.lookup(0, [3, 5], guess=[6, 2, 7, 1], meanwhile=x.stopper(stop_at, r, 1))   # 6, 2 targets; 7, 1 not
    assert x.holds(0, 3, slots0[0]) and x.holds(0, 5, slots0[1])
    pf = d["pf"].get()
    assert pf[r + K.PF_NT] == 2 and pf[r + K.PF_GEN] == 1 and pf[K.PF_READY] == 1 and pf[K.PF_DONE] == x.blocks
    t0, t1 = (pf[r + K.PF_TARGET + 4 * t:r + K.PF_TARGET + 4 * t + 4] for t in range(2))
    assert (t0[K.PF_EXPERT], t1[K.PF_EXPERT]) == (6, 2) and (t0[K.PF_KEY], t1[K.PF_KEY]) == (8 + 6, 8 + 2)
    assert sorted([t0[K.PF_SLOT], t1[K.PF_SLOT], *slots0]) == [0, 1, 2, 3]
    got = int(pf[r + K.PF_NEXT])
    assert got == {"start": 0, "middle": middle, "all": 2 * full + x.blocks}[stop_at]   # + each block's last take
    if stop_at == "all":
        assert x.holds(1, 6, t0[K.PF_SLOT]) and x.holds(1, 2, t1[K.PF_SLOT])
    slots1 = x.lookup(1, [6, 4])                              # asks for target 0, not target 1
    st = d["state"].get()
    assert slots1[0] == t0[K.PF_SLOT] and st[K.FOUND] == 1 and st[K.PREFETCHED] == 2 and st[K.MISSES] == 4
    a0, a1 = min(got, full), min(max(got - full, 0), full)
    assert x.holds(1, 6, slots1[0], a0 if stop_at == "middle" else 0, before) and x.holds(1, 4, slots1[1])
    vec = sum(x.words) // 4
    assert st[K.DEMAND_VECS] == 3 * vec + vec - x.prefix_vectors(a0)   # layer 0's two, expert 4, target 0's rest
    assert st[K.PREFETCH_VECS] == x.prefix_vectors(a0) + x.prefix_vectors(a1)
    have = d["have"].get()
    assert have[slots1[0]] == have[slots1[1]] == full and have[t1[K.PF_SLOT]] == a1
    slots2 = x.lookup(1, [2, 4])                              # target 1, asked for later: finished then
    assert slots2[0] == t1[K.PF_SLOT] and x.holds(1, 2, slots2[0]) and d["have"].get()[slots2[0]] == full
    assert d["state"].get()[K.FOUND] == 1 + (a1 < full)


@needs_gpu
@pytest.mark.parametrize("stop_at", ["start", "middle", "all"])
def test_a_guess_two_layers_ahead_fills_a_window_the_next_one_leaves_idle(stop_at):
    """Layer 0's guess for layer 1 finds everything resident, so its guess for layer 2 picks the targets (record
    L + 2), pinned through layer 1's lookup: that lookup evicts LFU's best victims but not them (their score is
    0, the lowest), although the prefetch may still be copying into them. Layer 1's copy kernel records how far
    they got (have), and layer 2's lookup finishes the one it asks for from there (a partial slot: FOUND)."""
    from localmoe.backends.cuda import kernels as K
    x = PrefetchRig(L=4, E=8, S=7, k=2, blocks=5)
    d, full = x.d, x.full
    r2 = K.PF_HEAD + (4 + 2) * K.PF_WORDS
    before = [p.get() for p in x.pools]
    x.lookup(1, [1, 2])                                       # layer 1's guessed experts resident (slots 0, 1)
    slots0 = x.lookup(0, [3, 5], guess=[1, 2, 2, 1], guess2=[6, 7, 6, 0], meanwhile=x.stopper(stop_at, r2, 2))
    pf = d["pf"].get()
    assert pf[K.PF_HEAD + 1 * K.PF_WORDS + K.PF_GEN] != 2     # nothing for layer 1
    assert pf[r2 + K.PF_GEN] == 2 and pf[r2 + K.PF_NT] == 2 and pf[K.PF_READY] == 2
    t0, t1 = (pf[r2 + K.PF_TARGET + 4 * t:r2 + K.PF_TARGET + 4 * t + 4] for t in range(2))
    assert (t0[K.PF_KEY], t1[K.PF_KEY]) == (16 + 6, 16 + 7) and sorted(slots0) == [2, 3]
    assert sorted([t0[K.PF_SLOT], t1[K.PF_SLOT]]) == [4, 5] and (d["pin"].get()[[4, 5]] == 3).all()
    got = int(pf[r2 + K.PF_NEXT])
    assert got == {"start": 0, "middle": x.middle, "all": 2 * full + x.blocks}[stop_at]
    slots1 = x.lookup(1, [0, 4], guess=[6, 7])                # 2 misses, 1 free slot: an eviction, not a target
    assert 6 in slots1 and not set(slots1.tolist()) & {4, 5}
    key_of = d["key_of"].get()
    assert key_of[t0[K.PF_SLOT]] == 16 + 6 and key_of[t1[K.PF_SLOT]] == 16 + 7
    a0, a1 = min(got, full), min(max(got - full, 0), full)
    assert list(d["have"].get()[[t0[K.PF_SLOT], t1[K.PF_SLOT]]]) == [a0, a1]
    assert d["state"].get()[K.PREFETCH_VECS] == x.prefix_vectors(a0) + x.prefix_vectors(a1)
    found = d["state"].get()[K.FOUND]
    slots2 = x.lookup(2, [6, 3])                              # target 0 from where it stopped, and a miss
    assert slots2[0] == t0[K.PF_SLOT] and x.holds(2, 3, slots2[1])
    assert x.holds(2, 6, slots2[0], a0 if stop_at == "middle" else 0, before)   # (middle: NEXT set by hand)
    assert d["state"].get()[K.FOUND] == found + (a0 < full) and d["have"].get()[slots2[0]] == full


@needs_gpu
def test_uploads_are_interleaved_on_the_gpu_as_on_the_host():
    """CUDABackend's uploads of fast2 shapes go through interleave_kernel in pieces (here of 3 chunks, so
    pieces and a short last one): the same bytes as the host's kernels.interleave; other shapes as stored."""
    from localmoe.backends.cuda import CUDABackend
    from localmoe.backends.cuda import kernels as K
    from localmoe.backends import Weight
    from localmoe.gguf.format import GGMLType
    be = CUDABackend()
    be.UPLOAD_PIECE = 3 * K.CHUNK * 8 * 18
    rng = np.random.default_rng()
    for qt, rows, cols, E in ((K.Q4_0, 64, 1024, 3), (K.Q8_0, 96, 512, None), (K.Q4_0, 30, 1024, None)):
        bb = K.BLOCK_BYTES[qt]
        shape = (rows, cols // 32 * bb) if E is None else (E, rows, cols // 32 * bb)
        raw = rng.integers(0, 256, shape, dtype=np.uint8)
        w = Weight(raw, GGMLType(qt), cols, f"t{qt}")
        got = be.upload(w).copy_to_host().view(np.uint8)
        want = K.interleave(raw, qt) if K.interleaved_ok(qt, rows, cols) else raw.reshape(-1)
        assert be.interleaved(w) == (rows != 30)
        assert np.array_equal(got, want)


@needs_gpu
def test_a_failed_fetch_in_a_pipelined_replay_leaves_the_gpu_free():
    """An error in the host's part of a pipelined streamed replay (here a fetch that raises) reaches the caller,
    and the segments already enqueued behind the device-side waits still run out: the stream drains."""
    import threading
    import localmoe
    path = REFS / "mistral4-q4_0.gguf"
    ids = np.load(REFS / "mistral4.ids.npy")
    m = localmoe.load(path, backend="cuda")
    ex = next(L.experts for L in m.net.layers if L.experts is not None)
    m2 = localmoe.load(path, backend="cuda", gpu_mem=int(1.5 * m.config.n_experts * ex.bytes_per_expert))
    restream(m2, on_device=False)
    be = m2.backend
    assert be.pipelined
    list(m2.generate(ids[:8], max_tokens=3, stop=()))          # graphs captured, replayed
    real = be.streamer.fetch

    def failing(*a):
        if a[5] is not None:                                  # readers_done: a pipelined replay's fetch
            raise RuntimeError("injected")
        return real(*a)
    be.streamer.fetch = failing
    with pytest.raises(RuntimeError, match="injected"):
        list(m2.generate(ids[:8], max_tokens=3, stop=()))
    done = threading.Event()
    threading.Thread(target=lambda: (be.stream.synchronize(), done.set()), daemon=True).start()
    assert done.wait(30), "the compute stream is stuck behind a wait that no one will satisfy"
