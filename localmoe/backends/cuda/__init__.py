"""The CUDA backend: the kernel interface of CPUBackend on numba.cuda kernels (kernels.py).

Weights are uploaded once, on first use, as the GGUF's own bytes (a `Weight` -> device array cache
keyed by the stored array's address, shape, strides and type) and never dequantised. Activations
stay on the GPU as cupy arrays (`xp` = cupy; the model glue in localmoe/models uses `be.xp`): methods
accept host or device arrays and return device arrays; only `to_host` (the chosen expert ids for the
counters, the final logits) copies back. The numba kernels take the cupy arrays through
__cuda_array_interface__; cupy and numba both issue to one stream (`STREAM`, made current for cupy).

Decode steps are CUDA graphs (`replay`): the model's device-only step is run eagerly once, then
captured from that stream and replayed, one graph launch per token instead of ~650 Python-side kernel
launches (numba's dispatcher costs ~80 us each). Nothing in a step reads a host value: positions,
the router's top-k and the KV-cache writes all work from device memory.

Importing this package needs neither numba-cuda nor a GPU; `available()` says whether one is usable.
"""
from __future__ import annotations

import os

import numpy as np

from .. import DenseFFN, Normed, Weight, plain, swiglu


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


_STREAM = []


def _stream():
    """The one stream all backends launch on: a blocking stream (so the weight uploads numba makes
    on the legacy stream stay ordered before it) that, unlike the legacy stream, can be captured."""
    if not _STREAM:
        import cupy as cp
        from . import kernels as K
        from ._numba import cuda
        st = cp.cuda.Stream(non_blocking=False)
        K.STREAM[0] = cuda.external_stream(st.ptr)
        _STREAM.append(st)
    _STREAM[0].use()
    return _STREAM[0]


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
        self.stream = _stream()
        self.S = K.STREAM                 # launch config's stream slot: kernel[grid, block, self.S[0]]
        self._graphs: dict = {}           # replay key -> (segments, pinned inputs, pinned outputs, what they use)
        self.graph_kernels = 0            # numba kernel launches inside the last captured step
        self.use_graphs = True            # False: every step launched from Python (the bench compares)
        self.streamer = None              # ExpertStreamer when the routed experts live in a VRAM cache
        self._segments = None             # while a streamed step is captured: [(graph, host action, gate)]
        self._gated = self._last_action = None   # ... the flag the next segment waits on; the last action
        self._pinned: dict = {}           # pinned host buffers the captured segments copy ids into
        self._tick = 0                    # replays so far: the value this one's publications write
        self.pipelined = False            # streamed replay keeps the host a layer ahead (stream memory ops)
        self.pipelined_why_not = "no streamed experts"
        self.next_experts: dict = {}      # streaming: MoE layer -> (next MoE layer, its Experts), for prefetch
        self.guess_layers = 2             # ... how many MoE layers ahead the device mode guesses (_guess)
        self.rope_tables: dict = {}      # rope tables cached per backend (models/rope.py)
        self.device_name = why
        self.sms = getattr(cuda.get_current_device(), "MULTIPROCESSOR_COUNT", 1)
        self._sms_beside = 0              # SMs a streamed layer's copy kernel holds while its hits run
        self._weights: dict = {}          # key -> (the host arrays it keeps alive..., device array)
        self._vectors: dict = {}          # norm weights and other float vectors
        self._ints: dict = {}             # cached index arrays
        self.bytes_uploaded = 0           # weight bytes host -> device so far
        self.launches = 0                 # kernel launches so far (for launches per token)
        self._slot_rows = None            # the last route's (ids, weights, slot rows, their weights): expert_ffn
        from ._numba import PDL_WHY_NOT
        cc = tuple(getattr(cuda.get_current_device(), "compute_capability", (0, 0)))
        self.pdl_why_not = PDL_WHY_NOT or ("" if cc >= (9, 0) else f"compute capability {cc} < 9.0")
        self.pdl = not self.pdl_why_not and os.environ.get("LOCALMOE_PDL", "1") != "0"

    @property
    def pdl(self) -> bool:
        """Programmatic dependent launch (_numba.PDL): on where the GPU and numba-cuda allow it, unless
        LOCALMOE_PDL=0. Switching it drops the captured graphs (the bench compares)."""
        from ._numba import PDL
        return PDL[0]

    @pdl.setter
    def pdl(self, on: bool) -> None:
        from ._numba import PDL
        if on and self.pdl_why_not:
            raise RuntimeError(f"no programmatic dependent launch: {self.pdl_why_not}")
        PDL[0] = bool(on)
        self._graphs.clear()

    def free_memory(self) -> int:
        """Free bytes on the GPU now (for localmoe/placement.py)."""
        return int(self.xp.cuda.Device().mem_info[0])

    def stream_experts(self, budget_bytes: int, n_layers: int, n_experts: int, policy: str = "lfu", **kw) -> None:
        """Keep the routed experts in a `budget_bytes` pool of slots instead of uploading them whole
        (streaming.py); dense weights stay resident. Decode steps are then captured as graph segments cut at
        each MoE layer's ids, the host fetching between them (`replay`). kw: ExpertStreamer's, e.g. host_buffer (the mapped
        file, DMA'd from directly once registered) and host_register. Called again, it replaces the streamer:
        the old one is closed and the graphs that read its pools are dropped."""
        from .streaming import ExpertStreamer, stream_memops_why_not
        if self.streamer is not None:
            self.close()
            self._graphs.clear()
        self.streamer = ExpertStreamer(self, budget_bytes, n_layers, n_experts, policy, **kw)
        self.pipelined_why_not = stream_memops_why_not(self.xp)
        self.pipelined = not self.pipelined_why_not

    def close(self) -> None:
        """Unregister the mapped file the expert streamer pinned (this must come before the file is unmapped);
        resident weights stay usable."""
        if self.streamer is not None:
            self.streamer.close()

    # -- weights ----------------------------------------------------------------------------------
    def upload(self, w: Weight):
        """The device copy of a weight's stored blocks, uploaded on first use: interleaved where
        `kernels.interleaved_ok` (what `gemv` reads), else as in the file."""
        k = _key(w.raw, int(w.type))
        hit = self._weights.get(k)
        if hit is None:
            hit = self._weights[k] = (w.raw, self._upload_parts([w]))
        return hit[-1]

    def _with_shared(self, routed: Weight, shared: Weight):
        """One device array of routed's E matrices then the shared expert's as matrix E (read through the
        gemv's `pools`), so the shared expert runs in the routed experts' launches; uploaded once."""
        k = ("+shared", _key(routed.raw, int(routed.type)), _key(shared.raw, int(shared.type)))
        hit = self._weights.get(k)
        if hit is None:
            hit = self._weights[k] = (routed.raw, shared.raw, self._upload_parts([routed, shared]))
        return hit[-1]

    def _upload_parts(self, ws: list[Weight]):
        """One device array of the weights' blocks back to back (uint32 words for the fast kernels, else
        bytes), each interleaved where `interleaved_ok`: the GGUF's bytes go up in pieces through a scratch
        buffer that interleave_kernel rewrites into place."""
        w0 = ws[0]
        qt = int(w0.type)
        dtype = np.uint32 if self.K.fast_ok(qt, w0.cols) else np.uint8
        parts = [np.ascontiguousarray(w.raw).reshape(-1).view(np.uint8) for w in ws]
        dev = self.cuda.device_array(sum(a.nbytes for a in parts) // np.dtype(dtype).itemsize, dtype)
        il = self.interleaved(w0)
        if il:
            chunk = self.K.CHUNK * 16 * self.K.UNIT_VECTORS[qt]               # bytes of CHUNK units
            step = max(1, self.UPLOAD_PIECE // chunk) * chunk
        start = 0
        for a in parts:
            if il:
                for i in range(0, a.nbytes, step):
                    piece = self.cuda.to_device(a[i:i + step].view(np.uint32))
                    out = dev[start + i // 4:start + (i + piece.size * 4) // 4]
                    self.K.interleave_kernel[min(1024, (piece.size // 4 + 255) // 256), 256](
                        piece, out, self.K.UNIT_VECTORS[qt])
            else:
                dev[start:start + a.nbytes // dev.dtype.itemsize].copy_to_device(a.view(dtype))
            start += a.nbytes // dev.dtype.itemsize
        self.bytes_uploaded += start * dev.dtype.itemsize
        return dev

    UPLOAD_PIECE = 64 << 20                  # bytes of the GGUF per interleave_kernel launch of an upload

    def interleaved(self, w: Weight) -> bool:
        """w's uploads are interleaved (kernels.interleave); a streamer's slots are where its `interleaved` is
        also true."""
        return self.K.interleaved_ok(int(w.type), w.rows, w.cols)

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
    def gemv(self, w: Weight, mats, xidx, x_dev, P: int, w2: Weight | None = None, out=None, pools=None,
             preload: bool = True, norm=None, residual=None, skip: bool = False, interleaved: bool = False,
             spread: bool = False, x_ready: bool = False):
        """Device y [P, rows]: y[p] = W[mats[p]] @ x[xidx[p]] (or silu(gate) * up with w2). `pools`:
        device arrays laid out like w (and w2) to read instead of their uploads (the expert slots).
        preload=False when the kernel just before this one wrote `mats`; norm: (weight, eps) to rmsnorm the
        x rows with first (kernels.norm_ok shapes); residual [P, rows]: added to y, in the same launch where
        the kernel can (kernels.residual_ok), else by one more; skip: leave out the products with mats[p] < 0
        (their rows of y are not written; fast2 shapes). interleaved: `pools` hold interleaved matrices where
        `self.interleaved(w)` (as the uploads do). spread: a skip launch whose products are few, each gets
        a warp per task (kernels.launch_fast2). x_ready: x_dev was written two or more kernels back (or
        never), as the routed experts' input is (the router and its top-k ran since)."""
        qt, cols, rows = int(w.type), w.cols, w.rows
        if pools is None:
            dev = self.upload(w)
            dev2 = self.upload(w2) if w2 is not None else dev
            interleaved = self.interleaved(w)
        else:
            dev, dev2 = pools[0], pools[-1]
            interleaved = interleaved and self.interleaved(w)
        y = out if out is not None else self.xp.empty((P, rows), np.float32)
        row_bytes = w.raw.shape[-1]
        fused = w2 is not None
        own = residual is not None and self.K.residual_ok(qt, cols, fused)
        self.K.launch_gemv(qt, cols, rows, dev, dev2, mats, xidx, x_dev, y, P, row_bytes, row_bytes * rows,
                           self.sms - self._sms_beside,
                           fused=fused, preload=preload, norm=norm, residual=residual if own else None, skip=skip,
                           interleaved=interleaved, spread=spread, x_ready=x_ready)
        self.launches += 1
        if residual is not None and not own:
            y += residual
            self.launches += 1
        return y

    def _input(self, x, w: Weight, fused: bool = False):
        """(x rows [n, w.cols], norm) for a gemv by w: a `Normed` x stays unnormalised, with norm = (weight, eps)
        for the gemv to apply, where its kernel can (kernels.norm_ok); else x normalised here, norm None."""
        if isinstance(x, Normed) and self.K.norm_ok(int(w.type), w.cols, fused):
            return self._rows(x.x, w.cols), (self._vector(x.weight), np.float32(x.eps))
        return self._dev(plain(self, x), (-1, w.cols)), None

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

    def _rows(self, x, cols: int):
        """x as float32 device rows [n, cols], left a view when each row is contiguous (e.g. one
        projection's part of a stacked output: `Projections`), so no copy kernel runs."""
        x = self.xp.asarray(x, dtype=np.float32).reshape(-1, cols)
        return x if x.strides[-1] == 4 else self.xp.ascontiguousarray(x)

    # -- the kernel interface ---------------------------------------------------------------------
    def linear(self, w: Weight, x, residual=None):
        """y [n, rows] = x [n, cols] @ W.T (+ residual [n, rows]), on the stored blocks; x an array or a `Normed`,
        whose norm the gemv applies as it loads x where its kernel can (fast2, f32rows), as it adds the residual
        in its store (fast2)."""
        squeeze = (x.x if isinstance(x, Normed) else x).ndim == 1
        x2, norm = self._input(x, w)
        n = len(x2)
        y = self.gemv(w, self._zeros(n), self._arange(n), x2, n, norm=norm,
                      residual=None if residual is None else self._dev(residual, (n, w.rows)))
        return y[0] if squeeze else y

    def linear_heads(self, w: Weight, x, out=None):
        """Per-head matrices w [heads, rows, cols] applied to x [n, heads, cols] -> [n, heads, rows]
        (written into `out`, which may be a strided view, e.g. part of a wider row, when given)."""
        n, heads, cols = x.shape
        P = n * heads
        k = ("heads", n, heads)
        if k not in self._ints:
            self._ints[k] = self.xp.asarray(np.tile(np.arange(heads, dtype=np.int32), n))
        rows = None
        if out is not None:                      # the [P, rows] view of out the kernel writes through
            assert out.shape == (n, heads, w.rows) and out.strides[0] == heads * out.strides[1]
            rows = self.xp.ndarray((P, w.rows), np.float32, out.data, strides=out.strides[1:])
        y = self.gemv(w, self._ints[k], self._arange(P), self._dev(x, (P, cols)), P, out=rows)
        return out if out is not None else y.reshape(n, heads, w.rows)

    def glu(self, gate: Weight, up: Weight, x):
        """silu(x @ gate.T) * (x @ up.T) [n, rows]: the SwiGLU hidden layer, one fused gemv when gate
        and up are stored alike."""
        if int(gate.type) == int(up.type):
            x2, norm = self._input(x, gate, fused=True)
            n = len(x2)
            return self.gemv(gate, self._zeros(n), self._arange(n), x2, n, w2=up, norm=norm)
        x2 = self._dev(plain(self, x), (-1, gate.cols))
        g = self.linear(gate, x2)
        return g / (1.0 + self.xp.exp(-g)) * self.linear(up, x2)

    def rmsnorm(self, x, weight: np.ndarray, eps: float):
        x2 = self._rows(x, x.shape[-1])
        out = self.xp.empty(x2.shape, np.float32)
        self.K.rmsnorm_kernel[len(x2), self.K.THREADS, self.S[0]](x2, self._vector(weight), out, np.float32(eps))
        self.launches += 1
        return out.reshape(x.shape)

    def mla_rope(self, q, kv, positions, cos, sin, kv_norm: np.ndarray, eps: float, cache, k_b: Weight,
                 beta: float = 0.0, length: int = 1):
        """MLA's work between its projections and the attention in one kernel (`mla_rope_kernel`; the
        arithmetic and shapes of CPUBackend.mla_rope): the cache row [rmsnorm(c), rope(k_rope)] is written at
        each position; returns the query, W_kb q_nope folded in by the same kernel where its type and shape
        allow (`kernels.heads_fused_ok`), else by a gemv of its own."""
        xp = self.xp
        n, heads, _ = q.shape
        r = 2 * cos.shape[1]
        kvr = kv.shape[1] - r
        if max(r, q.shape[2] - r) > self.K.THREADS:
            raise ValueError(f"MLA heads of {q.shape[2] - r} + {r} columns: the GPU kernel handles <= "
                             f"{self.K.THREADS} of each")
        proj = self._heads_proj(k_b, heads, q.shape[2] - r)
        query = xp.empty((n, heads, kv.shape[1]), np.float32)
        q_nope = query if proj else xp.empty((n, heads, q.shape[2] - r), np.float32)
        self.K.mla_rope_kernel(proj)[(n, heads + 1), self.K.THREADS, self.S[0]](
            self._dev(q), self._rows(kv, kv.shape[-1]), xp.asarray(positions, dtype=np.int32), cos, sin, self._vector(kv_norm),
            np.float32(eps), np.float64(beta), int(length), cache, q_nope, query,
            self.upload(k_b) if proj else query)
        self.launches += 1
        if not proj:
            self.linear_heads(k_b, q_nope, out=query[..., :kvr])
        return query

    def _heads_proj(self, w: Weight, heads: int, cols: int):
        """(qt, rows, cols, interleaved) for mla_rope to apply per-head w [heads, rows, cols] to its own output
        (`kernels.heads_fused_ok`), or None: w is applied by a gemv of its own."""
        if w.raw.ndim != 3 or w.raw.shape[0] != heads or w.cols != cols:
            return None
        qt = int(w.type)
        return (qt, w.rows, cols, self.interleaved(w)) if self.K.heads_fused_ok(qt, w.rows, cols) else None

    def route(self, logits, k: int, norm: bool = True, scale: float = 1.0, n_group: int = 1, topk_group: int = 1,
              out=None):
        """The router's choice for logits [n, E] on the GPU (moe.route_topk's arithmetic):
        (ids [n, k] int32, weights [n, k] float32), both device arrays; ids written into `out` when given."""
        xp = self.xp
        z = self._dev(logits)
        n, E = z.shape
        if E > self.K.MAX_EXPERTS or n_group > self.K.MAX_GROUPS:
            raise ValueError(f"router of {E} experts in {n_group} groups: the GPU router handles "
                             f"<= {self.K.MAX_EXPERTS} experts, <= {self.K.MAX_GROUPS} groups")
        ids, w = xp.empty((n, k), np.int32) if out is None else out, xp.empty((n, k), np.float32)
        slots, sw = xp.empty((n, k + 1), np.int32), xp.empty((n, k + 1), np.float32)
        if n_group == 1 and k <= 32:        # one warp per token (lane r keeps pick r)
            self.K.route_warp_kernel(E)[(n + self.K.WARPS - 1) // self.K.WARPS, self.K.THREADS, self.S[0]](
                z, k, bool(norm), np.float32(scale), ids, w, slots, sw)
        else:                   # grouped (DeepSeek-style), or more than 32 picks: one thread per token
            self.K.route_kernel[(n + 31) // 32, 32, self.S[0]](z, k, bool(norm), np.float32(scale), n_group,
                                                              topk_group, ids, w, slots, sw)
        self.launches += 1
        self._slot_rows = (ids, w, slots, sw)
        return ids, w

    def expert_ffn(self, gate: Weight, up: Weight, down: Weight, x, ids, weights, shared: DenseFFN | None = None,
                   residual=None):
        """sum_k weights[:, k] * down_e(silu(gate_e x) * up_e x) over each token's selected experts e, plus the
        shared expert's swiglu(x) when given: resident, and stored like the routed experts, it is matrix E of
        the layer's uploads (`_with_shared`) and runs in the same launches with weight 1 (else its own, added
        in the combine), plus residual (in the combine). ids [n, k] and weights [n, k]: the router's device
        arrays (host arrays are uploaded). x: an array, or a `Normed` the gate/up launch normalises; a device
        x must have been written before the kernels that wrote ids (moe(): the router reads x first), so the
        gate/up launch quantizes it before it waits for them (kernels._make_fast2's x_ready)."""
        xp = self.xp
        squeeze = (x.x if isinstance(x, Normed) else x).ndim == 1
        if int(gate.type) == int(up.type):
            x2, norm = self._input(x, gate, fused=True)
        else:
            x2, norm = self._dev(plain(self, x), (-1, gate.cols)), None
        xn = x2 if norm is None else Normed(x2, x.weight, x.eps)          # x2 as the other readers need it
        src = x.x if isinstance(x, Normed) else x     # read in place, x2 is the caller's: the router read it since
        x_ready = isinstance(src, xp.ndarray) and x2.data.ptr == src.data.ptr
        n = len(x2)
        if isinstance(ids, np.ndarray) and (ids.min() < 0 or ids.max() >= gate.n_experts):
            raise ValueError("expert id out of range")
        ids2 = xp.asarray(ids).reshape(n, -1)
        wd = self._dev(weights, ids2.shape)
        routed = (gate, up, down)
        fold = (shared is not None and self.streamer is None
                and all((int(s.type), s.rows, s.cols) == (int(r.type), r.rows, r.cols)
                        for s, r in zip((shared.gate, shared.up, shared.down), routed)))
        res = None if residual is None else self._dev(residual, (n, down.rows))
        pg = pu = pd = None
        host_decides, copied, folded, place = False, None, False, None
        if self.streamer is not None:
            P = ids2.size
            layer = int(gate.name.split(".")[1])                         # blk.<layer>.ffn_..._exps
            split = (int(gate.type) == int(up.type) and self.K.fast2_ok(int(gate.type), gate.cols)
                     and self.K.fast2_ok(int(down.type), down.cols))   # launches that can skip products
            ahead = self._ahead(layer) if n == 1 else []
            got = self.streamer.lookup_on_device(layer, gate, up, down, ids2, shared=shared, overlap=split,
                                                 ahead=[(j, ex.gate, ex.up, ex.down) for j, ex in ahead])
            # (kernels decide, copy and prefetch; the guesses run after the hits: `place`)
            host_decides = got is None
            if not host_decides:
                mats, halves, copied, folded, place = got
                if folded:                     # the shared expert is each token's last product, weight 1
                    wd = self._shared_rows(ids, weights, ids2, wd, gate.n_experts)[1]
                cb = self.streamer.copy_blocks()
                if copied is not None and cb < self.sms:   # until the join, the gemvs' grids: the SMs left
                    self._sms_beside = cb
        if host_decides:                       # the cache decides on the host: one device->host copy per layer
            fetch, prefetch = self._fetcher(layer, gate, up, down, xn, ids2)
            if self._segments is not None:     # capturing: the graph ends here, the host fetches, the next begins
                mats = self._ints.get(("slots", layer, P))
                if mats is None:
                    mats = self._ints[("slots", layer, P)] = xp.zeros(P, np.int32)
                self._cut(self._publisher(fetch, prefetch, mats))
            else:
                mats = xp.asarray(fetch().reshape(P).astype(np.int32))  # (the pools exist after the first fetch)
                prefetch()
        il = True                              # the pools hold interleaved matrices where their shapes allow
        if self.streamer is not None:
            pg, pu, pd = self.streamer.pools
            il = self.streamer.interleaved
        elif fold:                             # each token's row of slots: its k experts, then the shared one
            pg, pu, pd = (self._with_shared(r, s) for r, s in zip(routed, (shared.gate, shared.up, shared.down)))
            m2, wd = self._shared_rows(ids, weights, ids2, wd, gate.n_experts)
            mats = m2.reshape(-1)
        else:
            mats = ids2.reshape(-1).astype(np.int32, copy=False)
        plus = swiglu(self, shared, xn, residual=res) if shared is not None and not (fold or folded) else res
        if host_decides and self._segments is not None:
            self._gate(cut=plus is not res)    # the shared expert ran while the host fetched; now the routed ones
        k = wd.shape[1]
        P = n * k
        kt = ("tok", n, k)
        if kt not in self._ints:
            self._ints[kt] = xp.asarray(np.repeat(np.arange(n, dtype=np.int32), k))
        tok = self._ints[kt]
        # the router's kernels just wrote mats: the gate's launch cannot read it early; the down projection's can
        gx = max(1, min(64, (down.rows + self.K.THREADS - 1) // self.K.THREADS))
        if copied is not None:                 # decided on the device: the hits run while the misses copy, then those
            h, yp = xp.empty((P, gate.rows), np.float32), xp.empty((P, down.rows), np.float32)
            for i in (0, 1):
                if i and place is not None:    # the next layers' guesses, from this layer's output so far
                    so_far = xp.empty((n, down.rows), np.float32)
                    raw = x2 if not isinstance(x, Normed) or norm is not None else self._rows(x.x, gate.cols)
                    self.K.combine_kernel(k, masked=True)[(gx, n), self.K.THREADS, self.S[0]](yp, wd, so_far, raw,
                                                                                          True, halves[0])
                    self.launches += 1
                    place(self._guess(ahead, Normed(so_far, x.weight, x.eps) if isinstance(x, Normed) else so_far,
                                      ids2.shape[1]))
                if i:
                    self.streamer.join(copied)
                    self._sms_beside = 0           # (even beside a prefetch: measured faster, session 21)
                # a decode layer's misses are 1-4 products: spread over every SM, not sized for all P
                spread = bool(i) and n == 1
                self.gemv(gate, halves[i], tok, x2, P, w2=up, pools=(pg, pu), preload=False, norm=norm, out=h,
                          skip=True, interleaved=il, spread=spread)
                self.gemv(down, halves[i], self._arange(P), h, P, pools=(pd,), out=yp, skip=True, interleaved=il,
                          spread=spread)
        elif int(gate.type) == int(up.type):
            h = self.gemv(gate, mats, tok, x2, P, w2=up, pools=None if pg is None else (pg, pu),
                          preload=False, norm=norm, interleaved=il, x_ready=x_ready)   # silu(g) * u, fused
        else:
            g = self.gemv(gate, mats, tok, x2, P, pools=None if pg is None else (pg,), preload=False, interleaved=il)
            u = self.gemv(up, mats, tok, x2, P, pools=None if pu is None else (pu,), interleaved=il)
            h = xp.ascontiguousarray(g / (1.0 + xp.exp(-g)) * u, dtype=np.float32)
        if copied is None:
            yp = self.gemv(down, mats, self._arange(P), h, P, pools=None if pd is None else (pd,), interleaved=il)
        y = xp.empty((n, down.rows), np.float32)
        self.K.combine_kernel(k)[(gx, n), self.K.THREADS, self.S[0]](yp, wd, y, y if plus is None else plus,
                                                                     plus is not None)
        self.launches += 1
        return y[0] if squeeze else y

    def _shared_rows(self, ids, weights, ids2, wd, E: int):
        """Each token's k expert ids then E (the shared expert, matrix E of `_with_shared`), and their weights
        then 1: the rows our router wrote with them (`route`), else built."""
        r = self._slot_rows
        if r is not None and r[0] is ids and r[1] is weights:
            return r[2], r[3]
        xp, n = self.xp, len(ids2)
        return (xp.concatenate([ids2.astype(np.int32), xp.full((n, 1), E, np.int32)], axis=1),
                xp.concatenate([wd, xp.ones((n, 1), np.float32)], axis=1))

    def _fetcher(self, layer: int, gate: Weight, up: Weight, down: Weight, x, ids):
        """The host's part of a streamed MoE layer, as two calls (run now, or between graph segments): fetch
        the chosen experts (-> their slots); then prefetch: start copying the experts the next MoE layer's router
        picks for this layer's input (`next_experts`; consecutive layers' inputs are close), so their copies
        overlap this layer's experts and the next attention."""
        ids_h = self._to_host_later(ids, ("ids", layer))
        ahead = self._ahead(layer, 1)
        if ahead:
            guess_h = self._to_host_later(self._guess(ahead, x, ids.shape[1])[0], ("guess", layer))

        def fetch(readers_done=None):
            return self.streamer.fetch(layer, gate, up, down, ids_h, readers_done)[3]

        def prefetch():
            for j, ex in ahead:
                self.streamer.prefetch(j, ex.gate, ex.up, ex.down, guess_h)
        return fetch, prefetch

    def _ahead(self, layer: int, layers: int | None = None) -> list:
        """[(the next MoE layer, its Experts)] where streaming prefetches (`next_experts`), else []; up to `layers`
        (guess_layers) in a row, the MoE layers after it (the device mode prefetches the second's guess where
        the first's finds nothing missing)."""
        out, at = [], layer
        for _ in range(self.guess_layers if layers is None else layers):
            nxt = self.next_experts.get(at) if self.next_experts else None
            if nxt is None:
                break
            out.append(nxt)
            at = nxt[0]
        return out

    def _guess(self, ahead: list, x, k: int) -> list:
        """Each layer of `ahead`'s router's k picks for x (int32 device ids [n, k]): a layer's state is close to
        the next ones'. The host mode guesses from the layer's input, the device mode from its output so far
        (the input plus the hits and the shared expert, after they ran; bench/bench_guess.py measures both)."""
        rows = self._slot_rows                          # (the layer's own route's rows: expert_ffn reads them after)
        out = [self.guess_route(self.linear(ex.router, x), k, d) for d, (_, ex) in enumerate(ahead, 1)]
        self._slot_rows = rows
        return out

    def guess_route(self, logits, k: int, layers: int = 1):
        """The ids route() picks for a guess `layers` MoE layers ahead: a method of its own, so
        bench/bench_cuda.py can replay guesses."""
        return self.route(logits, k)[0]

    def _to_host_later(self, a, key) -> np.ndarray:
        """a's values on the host: now (to_host), or while a step is captured, a pinned buffer (one per key)
        that a copy in the graph fills, to be read once the segment ending with it has run."""
        if self._segments is None:
            return self.to_host(a)
        import cupyx
        a = self.xp.ascontiguousarray(a)
        h = self._pinned.get(key)
        if h is None or h.shape != a.shape or h.dtype != a.dtype:
            h = self._pinned[key] = cupyx.empty_pinned(a.shape, a.dtype)
        rt = self.xp.cuda.runtime
        rt.memcpyAsync(h.ctypes.data, a.data.ptr, a.nbytes, rt.memcpyDeviceToHost, self.stream.ptr)
        return h

    def _publisher(self, fetch, prefetch, mats):
        """The host's action after a captured segment that ends with a layer's ids: fetch the experts, hand
        their slots to `mats` (read by the next segments), then prefetch the next layer's guesses (their copies
        queue behind the slots' publication, so this layer's experts never wait for them). Pipelined
        (`self.pipelined`), it is called with the event behind that segment while later segments are already
        enqueued, the first of which waits on the device until the streamer publishes the slots behind this
        layer's copies; else with None, after the segment, and the next segment is launched after it returns."""
        import cupyx
        P = len(mats)
        slots_h, flag = cupyx.empty_pinned(P, np.int32), self.xp.zeros(1, np.uint32)

        def publish(ev):
            if ev is None:
                self.stream.synchronize()
                slots_h[:] = fetch().reshape(P)
                mats.set(slots_h, stream=self.stream)
            else:
                ev.synchronize()
                slots_h[:] = fetch(ev).reshape(P)
                self.streamer.publish(mats, slots_h, flag, self._tick)
            prefetch()
        publish.flag = flag
        return publish

    def attention(self, q, k, v, positions, scale: float):
        """Causal attention: query j of q [n, Hq, dk] sees the keys k [:, Hkv, dk] and values
        v [:, Hkv, dv] at positions 0..positions[j] (a device int array; Hq a multiple of Hkv)
        -> [n, Hq, dv]. k and v may be strided views of the cache (no copy); where v is k's first dv columns
        (MLA's latent cache) the kernel reads each row once."""
        n, hq, dk = q.shape
        hkv, dv = v.shape[1:]
        if dv > self.K.MAX_DV:
            raise ValueError(f"attention values {dv} wide: the GPU kernel handles <= {self.K.MAX_DV}")
        xp = self.xp
        k, v = xp.asarray(k), xp.asarray(v)
        v_is_k = v.data.ptr == k.data.ptr and v.strides == k.strides and v.shape[:2] == k.shape[:2] and dv <= dk
        out = xp.empty((n, hq, dv), np.float32)
        pos = xp.asarray(positions, dtype=np.int32)
        self.K.attention_kernel(dk, dv, v_is_k)[(n, hq), self.K.THREADS, self.S[0]](
            self._dev(q), k, v, out, pos, np.float32(scale), hq // hkv)
        self.launches += 1
        return out

    # -- CUDA graphs ------------------------------------------------------------------------------
    def replay(self, key, step, *inputs, meanwhile=lambda: None):
        """step(*inputs) on device copies of the host arrays `inputs`; returns step's outputs (device arrays) as
        host arrays. With a key, the first call runs the step eagerly, runs it once more into a private memory
        pool, then captures it with the inputs' copies in (from pinned buffers) at its start and the outputs'
        copies out (to pinned buffers) at its end. A later call with the key writes the inputs into their pinned
        buffers, launches the graph and waits for it: the host adds no copy, allocation or launch of its own
        (it cost ~0.5 ms of a 3.3 ms step, `bench/host_gap.py`). The step must be idempotent (a decode step
        rewrites the same cache rows) and read nothing back — except, with streamed experts, the ids each MoE
        layer's fetch reads between graph segments. meanwhile(): host work that goes while the graph runs (before
        the step, when it runs eagerly)."""
        key = key if self.use_graphs else None
        g = self._graphs.get(key) if key is not None else None
        if g is None:
            meanwhile()
            static = [self.xp.array(a) for a in inputs]
            out = tuple(self.to_host(o) for o in step(*static))
            if key is not None:
                self._capture(key, step, static)
        else:
            segments, pins_in, pins_out, _ = g
            for pin, a in zip(pins_in, inputs):
                pin[...] = a                            # the last replay has ended: nothing reads them now
            if len(segments) == 1:
                segments[0][0].launch(self.stream)
                self.launches += 1
            else:
                self._run_segments(segments)
            meanwhile()
            self.stream.synchronize()
            out = tuple(p.copy() for p in pins_out)
        if self.streamer is not None:                   # the cache's clock: one tick per token (a graph's is in it)
            self.streamer.end_token(len(inputs[0]), ticked=g is not None)
        return out

    def _run_segments(self, segments) -> None:
        """Streamed experts: launch the segments, the host's action (fetch, publish the slots) after each that
        ends with a layer's ids. Pipelined, the host stays one layer ahead: it enqueues up to the next layer's
        ids (the segment that needs this layer's experts waits on the device for their publication) before it
        acts, so the GPU never waits for a launch, only for the host's decision and the copies."""
        self._tick = (self._tick + 1) & 0xFFFFFFFF
        pending = None
        try:
            for graph, action, gated in segments:
                if gated is not None and self.pipelined:
                    self.streamer.await_published(gated, self._tick)
                graph.launch(self.stream)
                self.launches += 1
                if action is None:
                    continue
                if not self.pipelined:
                    action(None)
                    continue
                ev = self.xp.cuda.Event(disable_timing=True)   # a new one: the streamer keeps it (rule 2)
                ev.record(self.stream)
                if pending is not None:
                    pending[0](pending[1])
                pending = (action, ev)
            if pending is not None:
                pending[0](pending[1])
        except BaseException:                  # e.g. CacheFullError: let the enqueued segments run out, then raise
            if self.pipelined:
                from .streaming import raise_flags
                raise_flags(self.xp, [g for _, _, g in segments if g is not None], self._tick)
            raise

    def _capture(self, key, step, static) -> None:
        """Capture step(*static) as graphs: one, or with streamed experts segments (graph, host action, gate):
        cut at each MoE layer's ids, with the host's action after that segment (fetch the experts, hand their
        slots over), and again after the shared expert; the segment with the routed experts carries the gate,
        the flag it waits on when pipelined (`_cut`, `_gate`). The first segment starts with static's copies
        from pinned input buffers, the last ends with the outputs' copies to pinned output buffers (`replay`)."""
        import cupy as cp
        import cupyx
        rt = cp.cuda.runtime
        pool = cp.cuda.MemoryPool()                 # the graph's temporaries: never handed to anyone else
        with cp.cuda.using_allocator(pool.malloc):
            out = step(*static)                     # warm the pool with exactly this step's allocations
            pins_in = [cupyx.empty_pinned(a.shape, a.dtype) for a in static]
            pins_out = [cupyx.empty_pinned(o.shape, o.dtype) for o in out]
            n0 = self.launches
            self._segments = []
            self.stream.begin_capture(self._CAPTURE_MODE)
            try:
                for pin, a in zip(pins_in, static):
                    rt.memcpyAsync(a.data.ptr, pin.ctypes.data, a.nbytes, rt.memcpyHostToDevice, self.stream.ptr)
                out = [self.xp.ascontiguousarray(o) for o in step(*static)]
                if self.streamer is not None:
                    self.streamer.tick(len(static[0]))
                for pin, o in zip(pins_out, out):
                    rt.memcpyAsync(pin.ctypes.data, o.data.ptr, o.nbytes, rt.memcpyDeviceToHost, self.stream.ptr)
            finally:
                self._segments.append((self.stream.end_capture(), None, self._gated))
                self._gated = None
                segments, self._segments = self._segments, None
        self.graph_kernels = self.launches - n0
        self.launches = n0
        while len(self._graphs) >= 2:                # a chat keeps one cache; drop the oldest graph
            self._graphs.pop(next(iter(self._graphs)))
        self._graphs[key] = (segments, pins_in, pins_out, (static, out, pool))

    _CAPTURE_MODE = 2                                # cudaStreamCaptureModeRelaxed

    def _cut(self, action) -> None:
        """While capturing: end the current graph here, to be followed by the host's `action` at replay."""
        self._segments.append((self.stream.end_capture(), action, self._gated))
        self._gated, self._last_action = None, action
        self.stream.begin_capture(self._CAPTURE_MODE)

    def _gate(self, cut: bool) -> None:
        """While capturing: the kernels from here on wait for the last action's slots. cut: end the current graph
        first (it holds work done meanwhile); else the current one, empty so far, is the one that waits."""
        if cut:
            self._segments.append((self.stream.end_capture(), None, self._gated))
            self.stream.begin_capture(self._CAPTURE_MODE)
        self._gated = self._last_action.flag
